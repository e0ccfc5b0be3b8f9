"""The seam between the request path and metering: authorize before dispatch, settle after.

:class:`NullMeter` is used when metering is off (benchmarks, the first foundation build).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class Reservation:
    """Credits and limits held for one request until it settles."""

    request_id: str
    tenant_id: str
    tenant_weight: float = 1.0
    key_id: str = ""
    headers: dict[str, str] | None = None
    handle: Any = None


class Meter(Protocol):
    """What the gateway needs from metering."""

    async def authorize(self, api_key: str | None, model: str, prompt_tokens: int, max_tokens: int, request_id: str) -> Reservation | None:
        """Reserve credits and rate limits, or raise an APIError subclass."""
        ...

    async def settle(self, reservation: Reservation, outcome: Any) -> None:
        """Charge what was produced and release the rest (idempotent by request id)."""
        ...


class NullMeter:
    """Metering off: every request is allowed and nothing is charged."""

    async def authorize(self, api_key: str | None, model: str, prompt_tokens: int, max_tokens: int, request_id: str) -> Reservation | None:
        return None

    async def settle(self, reservation: Reservation, outcome: Any) -> None:
        return None
