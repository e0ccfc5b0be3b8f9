"""Errors of the tenant admin surface, each with its OpenAI error shape and HTTP status."""

from __future__ import annotations

from typing import Any

__all__ = [
    "AdminAuthError",
    "ConflictError",
    "InvalidInputError",
    "NotFoundError",
    "TenancyError",
]


class TenancyError(Exception):
    """Base: carries what the HTTP layer needs to answer with an OpenAI-shaped body."""

    status_code = 400
    error_type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_openai(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep keyword fields when crossing a process boundary (Ray pickles exceptions).
        return (_rebuild, (type(self), self.message, self.param, self.code))


def _rebuild(cls: type[TenancyError], message: str, param: str | None, code: str | None) -> TenancyError:
    return cls(message, param=param, code=code)


class InvalidInputError(TenancyError):
    """Malformed or out-of-range input (400)."""

    code = "invalid_value"


class NotFoundError(TenancyError):
    """Unknown tenant or key (404)."""

    status_code = 404
    code = "not_found"


class ConflictError(TenancyError):
    """The object already exists (409)."""

    status_code = 409
    code = "conflict"


class AdminAuthError(TenancyError):
    """Missing or wrong key for this surface (401)."""

    status_code = 401
    code = "invalid_api_key"
