"""Quota arithmetic: token buckets, burn rates, prices, reservation sizes and rate-limit headers.

Pure and clock-free: every call takes ``now`` (seconds on a monotonic clock). No I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

__all__ = [
    "BURN_RATE_TAU_S",
    "BurnRate",
    "ModelPrice",
    "TokenBucket",
    "bucket_rate",
    "format_reset",
    "headers_from_rate",
    "period_start",
    "rate_limit_headers",
    "utc_day",
]


class TokenBucket:
    """A bucket of ``capacity`` tokens refilled continuously at ``capacity / period_s`` per second.

    Used for RPM (cost 1 per request) and TPM (cost = tokens). Starts full.
    """

    __slots__ = ("_level", "_updated", "capacity", "rate_per_s")

    def __init__(self, capacity: int, now: float, period_s: float = 60.0) -> None:
        self.capacity = capacity
        self.rate_per_s = capacity / period_s
        self._level = float(capacity)
        self._updated = now

    def _refill(self, now: float) -> None:
        if now > self._updated:
            self._level = min(float(self.capacity), self._level + (now - self._updated) * self.rate_per_s)
            self._updated = now

    def level(self, now: float) -> float:
        """Tokens available at ``now``."""
        self._refill(now)
        return self._level

    def has_capacity(self, cost: float, now: float) -> bool:
        """Whether ``cost`` could be taken at ``now`` (does not take it)."""
        return self.level(now) >= cost

    def consume(self, cost: float, now: float) -> bool:
        """Take ``cost`` if available; return whether it was taken."""
        if not self.has_capacity(cost, now):
            return False
        self._level -= cost
        return True

    def refund(self, amount: float, now: float) -> None:
        """Give back ``amount`` (unused reserved tokens), never above capacity."""
        self._refill(now)
        self._level = min(float(self.capacity), self._level + amount)

    def retry_after_s(self, cost: float, now: float) -> float | None:
        """Seconds until ``cost`` fits; ``None`` when it never can (cost above capacity)."""
        if cost > self.capacity:
            return None
        missing = cost - self.level(now)
        return 0.0 if missing <= 0 else missing / self.rate_per_s

    def reset_s(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        return (self.capacity - self.level(now)) / self.rate_per_s

    def resize(self, capacity: int, now: float, period_s: float = 60.0) -> None:
        """Change the limit, keeping the fraction used."""
        fraction = self.level(now) / self.capacity
        self.capacity = capacity
        self.rate_per_s = capacity / period_s
        self._level = fraction * capacity


BURN_RATE_TAU_S = 3600.0
"""Time constant of :class:`BurnRate`: a charge weighs ``exp(-age / tau)``, so the rate is about the
last hour's (a steady rate that began ``t`` ago reads ``1 - exp(-t / tau)`` of itself: 63% after an
hour, like a one-hour window's ``t / 3600`` it stays below the truth at first, never above)."""


class BurnRate:
    """An organization's charge rate, exponentially decayed: the sum of its charges, each weighed
    ``exp(-age / tau_s)``, divided by ``tau_s``. One multiply and one ``exp`` per charge and per read,
    two floats of state: cheap enough to keep for every organization and update on every settlement
    (a sliding window would keep every charge in it). A decayed sum below one micro-credit reads as
    idle (no rate), so an organization quiet for about half a day (``ln(1e6)`` time constants after a
    one-credit charge) stops being projected at all. Lives in memory only: it starts at zero with
    the ledger."""

    __slots__ = ("_at", "_sum")

    def __init__(self) -> None:
        self._sum = 0.0
        self._at = 0.0

    def _decayed(self, now: float, tau_s: float) -> float:
        age = now - self._at
        return self._sum if age <= 0 else self._sum * math.exp(-age / tau_s)

    def add(self, amount: float, now: float, tau_s: float = BURN_RATE_TAU_S) -> None:
        """Record a charge of ``amount`` at ``now`` (an earlier ``now`` than the last counts at the
        last one's time)."""
        self._sum = self._decayed(now, tau_s) + amount
        self._at = max(self._at, now)

    def per_s(self, now: float, tau_s: float = BURN_RATE_TAU_S) -> float:
        """The rate at ``now``, in the unit of the amounts per second; 0.0 when idle."""
        s = self._decayed(now, tau_s)
        return 0.0 if s < 1.0 else s / tau_s


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """A model's price in micro-credits per 1,000 tokens (the default makes 1 credit = 1 token)."""

    prompt_ucredits_per_1k: int = 1_000_000_000
    completion_ucredits_per_1k: int = 1_000_000_000
    cached_prompt_ucredits_per_1k: int | None = None
    """Prompt tokens the engine found in its prefix cache; None: half the prompt price."""

    def prompt_cost(self, tokens: int, cached_tokens: int = 0) -> int:
        """Micro-credits for ``tokens`` prompt tokens of which ``cached_tokens`` were cached (rounded
        up once over both parts); at most the uncached price of all of them."""
        cached = min(max(cached_tokens, 0), tokens)
        cached_rate = self.cached_rate()
        return -(-((tokens - cached) * self.prompt_ucredits_per_1k + cached * cached_rate) // 1000)

    def cached_rate(self) -> int:
        """Micro-credits per 1,000 cached prompt tokens (never above the prompt price)."""
        if self.cached_prompt_ucredits_per_1k is None:
            return self.prompt_ucredits_per_1k // 2
        return min(self.cached_prompt_ucredits_per_1k, self.prompt_ucredits_per_1k)

    def completion_cost(self, tokens: int) -> int:
        """Micro-credits for ``tokens`` completion tokens (rounded up)."""
        return -(-tokens * self.completion_ucredits_per_1k // 1000)

    def affordable_completion_tokens(self, budget_ucredits: int) -> int:
        """The most completion tokens ``budget_ucredits`` pays for."""
        if self.completion_ucredits_per_1k == 0:
            return 2**62
        return max(0, budget_ucredits * 1000 // self.completion_ucredits_per_1k)


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: ``"20ms"``, ``"1.5s"``, ``"6m0s"``."""
    if seconds < 1.0:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60.0:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def bucket_rate(
    rpm_bucket: TokenBucket | None, tpm_bucket: TokenBucket | None, now: float
) -> tuple[tuple[str, int, float, float], ...]:
    """``(kind, limit, remaining, reset_s)`` per limited kind, the raw form of the headers."""
    return tuple(
        (kind, b.capacity, b.level(now), b.reset_s(now))
        for kind, b in (("requests", rpm_bucket), ("tokens", tpm_bucket))
        if b is not None
    )


def headers_from_rate(rate: tuple[tuple[str, int, float, float], ...]) -> dict[str, str]:
    """Format :func:`bucket_rate` as OpenAI's headers."""
    headers: dict[str, str] = {}
    for kind, limit, remaining, reset_s in rate:
        headers[f"x-ratelimit-limit-{kind}"] = str(limit)
        headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(remaining)))
        headers[f"x-ratelimit-reset-{kind}"] = format_reset(reset_s)
    return headers


def rate_limit_headers(
    rpm_bucket: TokenBucket | None, tpm_bucket: TokenBucket | None, now: float
) -> dict[str, str]:
    """``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` from the buckets (absent if unlimited)."""
    return headers_from_rate(bucket_rate(rpm_bucket, tpm_bucket, now))


def retry_headers(retry_after_s: float) -> dict[str, str]:
    """``retry-after`` (whole seconds, rounded up, at least 1) and ``retry-after-ms``."""
    return {
        "retry-after": str(max(1, math.ceil(retry_after_s))),
        "retry-after-ms": str(max(1, math.ceil(retry_after_s * 1000))),
    }


def period_start(ts: float, period: str) -> float:
    """Start (unix time, UTC) of the cap period that contains ``ts``: ``lifetime`` never resets
    (0.0), ``daily`` at 00:00 UTC, ``monthly`` on the 1st at 00:00 UTC (LiteLLM's
    ``budget_duration`` of ``1d`` / ``1mo``)."""
    if period == "daily":
        return float(int(ts // 86400) * 86400)
    if period == "monthly":
        d = datetime.fromtimestamp(ts, tz=UTC)
        return datetime(d.year, d.month, 1, tzinfo=UTC).timestamp()
    return 0.0


def utc_day(ts: float) -> str:
    """The UTC date of ``ts`` as ``YYYY-MM-DD`` (the usage roll-up's day); times before 1970 or
    after 9999 (a client's ``since``) are clamped to those days."""
    return datetime.fromtimestamp(min(max(ts, 0.0), _LAST_TS), tz=UTC).date().isoformat()


_LAST_TS = 253_402_300_799.0
"""9999-12-31T23:59:59Z, the last second ``datetime`` represents."""
