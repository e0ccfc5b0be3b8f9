"""Small clock-free meters: the queue's drain rate and a window of recent latencies."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

_DISPERSION_BUCKETS = 32
"""Horizons of saturated time over which the dispersion of openings is averaged."""


class DrainMeter:
    """How fast the queue drains: release openings per *saturated* second, and tokens per request.

    The replica is saturated while a new request could not start at once (a queue waits, or the
    in-flight limit is reached). An opening is a queued request released, or, with the queue empty,
    saturation ending (a queued request would have been released then). Only saturated time counts,
    so the rate is the replica's capacity as a waiting request sees it, measured whether or not a
    queue actually formed, and not the arrival rate of an idle replica. Old data decays: once the
    measured time exceeds ``window_s`` both sums are halved.

    Openings are also counted per ``horizon_s`` of saturated time (the queue deadline): the spread
    of those counts against their mean (:meth:`dispersion`, 1 for a Poisson process) says how far
    the releases within one deadline may fall short of the mean when they come in lumps (a KV
    budget that frees in lumps, a limit that moved, a drain rate that drifts).
    """

    def __init__(self, window_s: float, prior_tokens_per_s: float, horizon_s: float) -> None:
        self._window_s = window_s
        self._prior = prior_tokens_per_s
        self._horizon_s = horizon_s
        self._bucket_s = 0.0
        self._bucket_openings = 0
        self._buckets = 0
        self._count_mean = 0.0
        self._count_sq_mean = 0.0
        self._busy_s = 0.0
        self._openings = 0.0
        self._last_s: float | None = None
        self._saturated = False
        self._cost_sum = 0.0
        self._prompt_sum = 0.0
        self._cost_n = 0.0

    def advance(self, now: float, saturated: bool) -> None:
        """Account the time since the last call; ``saturated`` is the state from now on."""
        if self._last_s is not None and self._saturated and now > self._last_s:
            dt = now - self._last_s
            self._busy_s += dt
            if self._busy_s > self._window_s:
                self._busy_s *= 0.5
                self._openings *= 0.5
            self._bucket_s += dt
            for _ in range(min(int(self._bucket_s / self._horizon_s), _DISPERSION_BUCKETS)):
                self._close_bucket()
            self._bucket_s %= self._horizon_s
        if self._saturated and not saturated:
            self._opening()  # the queue is empty: a waiting request would have started now
        self._last_s = now if self._last_s is None else max(self._last_s, now)
        self._saturated = saturated

    def on_release(self) -> None:
        """A queued request was released (an opening)."""
        self._opening()

    def _opening(self) -> None:
        self._openings += 1.0
        self._bucket_openings += 1

    def _close_bucket(self) -> None:
        n = float(self._bucket_openings)
        self._buckets += 1
        a = 1.0 / min(self._buckets, _DISPERSION_BUCKETS)
        self._count_mean += a * (n - self._count_mean)
        self._count_sq_mean += a * (n * n - self._count_sq_mean)
        self._bucket_openings = 0

    def dispersion(self) -> float:
        """Variance over mean of the openings per horizon (at least 1; 1 until measured)."""
        if self._buckets < _DISPERSION_BUCKETS // 4 or self._count_mean <= 0:
            return 1.0
        var = self._count_sq_mean - self._count_mean**2
        return max(1.0, var / self._count_mean)

    def on_start(self, prompt_tokens: int, cost_tokens: int) -> None:
        """A request started (at once or from the queue); ``cost_tokens``: prompt + max_tokens."""
        self._prompt_sum += prompt_tokens
        self._cost_sum += cost_tokens
        self._cost_n += 1.0
        if self._cost_n >= 512:
            self._prompt_sum *= 0.5
            self._cost_sum *= 0.5
            self._cost_n *= 0.5

    def mean_prompt_tokens(self) -> float:
        """Mean prompt of the recently started requests (0 before the first)."""
        return self._prompt_sum / self._cost_n if self._cost_n > 0 else 0.0

    def mean_cost_tokens(self) -> float | None:
        """Mean queue cost of the recently started requests (None before the first)."""
        return self._cost_sum / self._cost_n if self._cost_n > 0 else None

    def rate_tokens_per_s(self) -> float:
        """Openings per saturated second times the mean cost, once a quarter window of saturation
        was seen; the prior before any, a blend in between."""
        cost = self.mean_cost_tokens()
        if cost is None or self._busy_s <= 0 or self._openings <= 0:
            return self._prior
        measured = self._openings / self._busy_s * cost
        f = min(1.0, self._busy_s / (0.25 * self._window_s))
        return f * measured + (1 - f) * self._prior


@dataclass(frozen=True, slots=True)
class FinishedSample:
    engine_ttft_s: float
    e2e_ttft_s: float
    tpot_s: float | None
    slo_met: bool


class LatencyWindow:
    """The last N finished requests' latencies."""

    def __init__(self, size: int) -> None:
        self._items: deque[FinishedSample] = deque(maxlen=size)

    def add(self, sample: FinishedSample) -> None:
        self._items.append(sample)

    def mean_engine_ttft_s(self) -> float | None:
        if not self._items:
            return None
        return sum(s.engine_ttft_s for s in self._items) / len(self._items)

    def mean_tpot_s(self) -> float | None:
        vals = [s.tpot_s for s in self._items if s.tpot_s is not None]
        return sum(vals) / len(vals) if vals else None

    def attainment(self) -> float | None:
        if not self._items:
            return None
        return sum(1 for s in self._items if s.slo_met) / len(self._items)
