"""What the ledger answers: reservations, refusals, settlements; and the client-visible error of a
refusal (:func:`error_for`; the error classes are :mod:`serving.errors`'s)."""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.errors import (
    APIError,
    AuthenticationError,
    DuplicateRequestError,
    InsufficientQuotaError,
    InvalidMaxTokensError,
    LedgerUnavailableError,
    ModelNotAllowedError,
    RateLimitExceededError,
)

from ._policy import headers_from_rate

__all__ = ["Refusal", "Reservation", "Settlement", "error_for"]


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


_BY_KIND: dict[str, type[APIError]] = {
    "invalid_api_key": AuthenticationError,
    "model_not_allowed": ModelNotAllowedError,
    "insufficient_quota": InsufficientQuotaError,
    "invalid_max_tokens": InvalidMaxTokensError,
    "duplicate_request": DuplicateRequestError,
    "ledger_unavailable": LedgerUnavailableError,
}


def error_for(refusal: Refusal) -> APIError:
    """The client-visible error for a refusal."""
    if refusal.kind == "rate_limit_exceeded":
        return RateLimitExceededError(
            refusal.message, limit=refusal.limit, retry_after_s=refusal.retry_after_s, headers=refusal.headers
        )
    return _BY_KIND[refusal.kind](refusal.message, headers=refusal.headers)
