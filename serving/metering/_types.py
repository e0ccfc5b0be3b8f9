"""What the ledger answers: reservations, refusals, settlements; and the errors the gateway raises."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from serving.api.errors import APIError

from ._policy import headers_from_rate

__all__ = [
    "DuplicateRequestError",
    "InsufficientQuotaError",
    "InvalidApiKeyError",
    "InvalidMaxTokensError",
    "LedgerUnavailableError",
    "ModelNotAllowedError",
    "QuotaError",
    "RateLimitExceededError",
    "Refusal",
    "Reservation",
    "Settlement",
]


@dataclass(frozen=True, slots=True)
class Reservation:
    """Credits and limits held for one request until it is settled.

    The gateway must pass ``max_tokens`` to the engine: the reservation covers exactly that.
    """

    request_id: str
    tenant_id: str
    key_id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    reserved_ucredits: int
    tenant_weight: float = 1.0
    rate: tuple[tuple[str, int, float, float], ...] = ()
    """Bucket state at reservation: ``(kind, limit, remaining, reset_s)`` for ``requests``/``tokens``."""

    @property
    def headers(self) -> dict[str, str]:
        """``x-ratelimit-*`` headers to send on the response (formatted here, not in the ledger)."""
        return headers_from_rate(self.rate)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a reservation was refused, with everything an HTTP answer needs."""

    kind: str
    """``invalid_api_key``, ``model_not_allowed``, ``insufficient_quota``, ``rate_limit_exceeded``,
    ``invalid_max_tokens`` or ``duplicate_request``."""
    message: str
    tenant_id: str = ""
    limit: str | None = None
    """For ``rate_limit_exceeded``: ``"requests"``, ``"tokens"`` or ``"concurrency"``."""
    retry_after_s: float | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Settlement:
    """The outcome of settling a request; ``duplicate`` when it had been settled before."""

    request_id: str
    charged_ucredits: int
    released_ucredits: int
    duplicate: bool = False
    unknown: bool = False
    """No reservation and no usage event under this id."""


class QuotaError(APIError):
    """A refused request: an :class:`serving.api.errors.APIError`, so the gateway maps it to HTTP in
    its one place; the subclasses fix status, type and code."""

    status_code = 429
    error_type = "invalid_request_error"
    code: str | None = None
    param: str | None = None

    def __init__(self, refusal: Refusal) -> None:
        cls = type(self)
        super().__init__(refusal.message, param=cls.param, code=cls.code, headers=dict(refusal.headers))
        self.refusal = refusal
        self.retry_after_s = refusal.retry_after_s
        self.limit = refusal.limit

    def to_openai(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return self.body()


class InvalidApiKeyError(QuotaError):
    status_code = 401
    code = "invalid_api_key"


class ModelNotAllowedError(QuotaError):
    status_code = 403
    error_type = "permission_error"
    code = "model_not_allowed"
    param = "model"


class InsufficientQuotaError(QuotaError):
    status_code = 429
    error_type = "insufficient_quota"
    code = "insufficient_quota"


class RateLimitExceededError(QuotaError):
    status_code = 429
    error_type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal)
        # OpenAI reports the exhausted limit as the error type ("requests" or "tokens").
        self.error_type = "tokens" if refusal.limit == "tokens" else "requests"


class InvalidMaxTokensError(QuotaError):
    status_code = 400
    code = "invalid_value"
    param = "max_tokens"


class DuplicateRequestError(QuotaError):
    status_code = 409
    code = "duplicate_request_id"


class LedgerUnavailableError(QuotaError):
    status_code = 503
    error_type = "server_error"
    code = "ledger_unavailable"


_BY_KIND: dict[str, type[QuotaError]] = {
    "invalid_api_key": InvalidApiKeyError,
    "model_not_allowed": ModelNotAllowedError,
    "insufficient_quota": InsufficientQuotaError,
    "rate_limit_exceeded": RateLimitExceededError,
    "invalid_max_tokens": InvalidMaxTokensError,
    "duplicate_request": DuplicateRequestError,
    "ledger_unavailable": LedgerUnavailableError,
}


def error_for(refusal: Refusal) -> QuotaError:
    """The typed error for a refusal."""
    return _BY_KIND.get(refusal.kind, QuotaError)(refusal)
