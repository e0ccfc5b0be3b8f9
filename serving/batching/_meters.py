"""Small clock-free meters: the queue's drain rate and a window of recent latencies."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


class DrainMeter:
    """Queue tokens released per *backlogged* second.

    Only releases from a waiting queue count, and only time with a queue counts, so the rate is the
    replica's capacity as the queue sees it, not the arrival rate of an idle replica. Old data decays:
    once the measured time exceeds ``window_s`` both sums are halved.
    """

    def __init__(self, window_s: float, prior_tokens_per_s: float) -> None:
        self._window_s = window_s
        self._prior = prior_tokens_per_s
        self._busy_s = 0.0
        self._tokens = 0.0
        self._last_s: float | None = None
        self._backlogged = False

    def advance(self, now: float, backlogged: bool) -> None:
        """Account the time since the last call; ``backlogged`` is the state from now on."""
        if self._last_s is not None and self._backlogged and now > self._last_s:
            self._busy_s += now - self._last_s
            if self._busy_s > self._window_s:
                self._busy_s *= 0.5
                self._tokens *= 0.5
        self._last_s = now if self._last_s is None else max(self._last_s, now)
        self._backlogged = backlogged

    def on_release(self, tokens: int) -> None:
        self._tokens += tokens

    def rate_tokens_per_s(self) -> float:
        """The measured rate once a quarter window of backlog was seen, else the prior."""
        if self._busy_s >= 0.25 * self._window_s and self._tokens > 0:
            return self._tokens / self._busy_s
        if self._busy_s > 0 and self._tokens > 0:
            # Blend towards the measurement while data accumulates.
            f = self._busy_s / (0.25 * self._window_s)
            return f * self._tokens / self._busy_s + (1 - f) * self._prior
        return self._prior


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
