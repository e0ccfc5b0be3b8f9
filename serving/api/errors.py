"""The error hierarchy and its one mapping to HTTP: every client-visible error is OpenAI-shaped.

Body: ``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}``.
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error the client sees; subclasses fix the HTTP status and OpenAI ``type``."""

    status_code = 500
    error_type = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The OpenAI error body."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(APIError):
    """The request is malformed or asks for something impossible (400)."""

    status_code = 400
    error_type = "invalid_request_error"


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested completion exceed the model's length (400)."""

    default_code = "context_length_exceeded"


class AuthenticationError(APIError):
    """Missing or unknown API key (401)."""

    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDeniedError(APIError):
    """The key may not use this model or endpoint (403)."""

    status_code = 403
    error_type = "invalid_request_error"
    default_code = "model_not_allowed"


class NotFoundError(APIError):
    """Unknown model or route (404)."""

    status_code = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class PayloadTooLargeError(APIError):
    """Body larger than the configured limit (413)."""

    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class RateLimitError(APIError):
    """Quota or rate limit refusal (429); carries ``Retry-After``."""

    status_code = 429
    error_type = "rate_limit_exceeded"
    default_code = "rate_limit_exceeded"


class ServiceUnavailableError(APIError):
    """No pool can take the request now, or the engine is down (503)."""

    status_code = 503
    error_type = "server_error"
    default_code = "service_unavailable"


class EngineFailureError(APIError):
    """The engine failed while serving this request (500)."""

    status_code = 500
    error_type = "server_error"
    default_code = "engine_error"
