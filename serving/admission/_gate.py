"""The gateway's fair gate (pure, clock passed in): when a gateway replica's own event loop is the
bottleneck, requests wait here by tenant, in fair order, instead of in the loop's FIFO.

A gateway replica runs every request as callbacks on one event loop. When the loop has more work
than CPU, each request in it advances one step per round of the loop, so service follows how many
requests a tenant has inside the gateway (five times the concurrency, five times the tokens) before
any pool's fair queue sees them. The gate bounds how many requests are *past* it (reading, parsing,
tokenizing, metering, streaming) and hands each free place to the waiting organization with the
smallest virtual token counter (:class:`FairQueue`, VTC: counters grow by the tokens a request was
served, over the organization's weight, when it leaves). A request waits before its body is read:
a key's organization is known from the gateway's key directory, so waiting costs one parked future.

The limit follows the loop's capacity. ``demand`` is the share of wall time the loop's thread was
running or ready to run (the caller samples it: run-queue wait counts, idle time does not),
smoothed:

* ``demand >= saturated`` while more than one organization is active (past the gate or waiting):
  the loop never idles, so more requests inside only make each slower and share it by concurrency:
  ``limit = max(min_requests, decrease * min(limit, past))``;
* requests wait and either the loop has room (``demand < idle``) or one organization alone is
  active: ``limit += max(1, increase * limit)``;
* otherwise it holds. Between ``min_requests`` and ``max_requests`` always; it starts at
  ``max_requests``.

So a gateway that is not the bottleneck (its pools are) keeps its limit where requests never wait,
and one that is settles, while organizations compete, near the fewest requests that keep its loop
busy, where the waiting happens at the gate. The limit always binds, but it only shrinks while
organizations compete: a lone one is served in arrival order anyway, and bounding its concurrency
would only cost it throughput (fewer requests to share each group commit, frame and write), so
alone it gets its places back within about two seconds. It is not let past the limit at once,
though: a lone organization's requests finish together often enough (a pool's batch ends them in
the same step), and if the one that then had nobody inside were to flood the gate, the other, when
its clients sent again, would wait until all of that had drained (the flood tier saw served tokens
2.3 times the light tenant's where they should be alike). A request waits at most ``timeout_s``
(then it is refused, 503); at most ``max_queued`` wait.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from serving.admission._fair_queue import FairQueue, QueuedRequest

__all__ = ["GateCore", "GateSettings", "GateStats"]


@dataclass(frozen=True, slots=True)
class GateSettings:
    """Bounds and steering of one gateway replica's gate."""

    min_requests: int = 16
    """The limit never drops below this many requests past the gate."""
    max_requests: int = 1024
    """Nor rises above this (the replica's ``max_ongoing_requests``)."""
    max_queued: int = 1024
    """Requests that may wait at once; more are refused at once."""
    timeout_s: float = 30.0
    """Longest a request waits; then it is refused."""
    saturated: float = 0.9
    """Smoothed demand at or above which the loop counts as saturated (the limit decreases)."""
    idle: float = 0.75
    """Smoothed demand below which the loop has room (the limit increases while requests wait)."""
    smoothing: float = 0.3
    """Weight of each new demand sample in the smoothed demand (samples every 0.1 s: ~0.3 s)."""
    decrease: float = 0.9
    """Factor applied to the requests past the gate when the loop is saturated."""
    increase: float = 0.1
    """Share of the limit added when the loop has room and requests wait (at least one)."""
    prompt_token_price: float = 1.0
    completion_token_price: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.min_requests <= self.max_requests:
            raise ValueError(
                f"need 1 <= min_requests ({self.min_requests}) <= max_requests ({self.max_requests})"
            )
        if not 0 < self.idle <= self.saturated:
            raise ValueError(f"need 0 < idle ({self.idle}) <= saturated ({self.saturated})")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing must lie in (0, 1], got {self.smoothing}")
        if not 0 < self.decrease < 1:
            raise ValueError(f"decrease must lie in (0, 1), got {self.decrease}")


@dataclass(frozen=True, slots=True)
class GateStats:
    """What the gate reports (plain data, exported by the gateway)."""

    limit: int
    past: int
    waiting: int
    refused_total: int
    """Refused at once (the queue full) or after waiting ``timeout_s``."""
    waited_total: int
    """Requests that waited before passing."""


class GateCore:
    """Enter, leave, and the limit; the caller wakes waiters with what :meth:`release` returns."""

    def __init__(self, settings: GateSettings) -> None:
        self.settings = settings
        self._limit = float(settings.max_requests)
        self.past = 0
        self._queue = FairQueue(settings.prompt_token_price, settings.completion_token_price)
        self._deadlines: list[tuple[float, str]] = []
        self.refused_total = 0
        self.waited_total = 0
        self.demand: float | None = None
        """The smoothed demand (None before the first sample)."""

    @property
    def limit(self) -> int:
        return max(self.settings.min_requests, math.floor(self._limit))

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def enter(self, ticket: str, tenant_id: str, weight: float, now: float) -> bool | None:
        """A request arrives: True, it is past the gate; False, it waits (for :meth:`release` or
        :meth:`expire` to name it); None, refused (too many wait already)."""
        if self.past < self.limit and not self._queue:
            self._queue.start(self._queue.tenant(tenant_id, weight))
            self.past += 1
            return True
        if len(self._queue) >= self.settings.max_queued:
            self.refused_total += 1
            return None
        deadline = now + self.settings.timeout_s
        self._queue.push(QueuedRequest(ticket, tenant_id, 0, 0, now, deadline), weight)
        heapq.heappush(self._deadlines, (deadline, ticket))
        self.waited_total += 1
        return False

    def release(self) -> list[str]:
        """Waiting requests that may pass now, in fair order (they count as past the gate)."""
        out = []
        while self.past < self.limit and (item := self._queue.peek()) is not None:
            self._queue.release(item.req_id)
            self.past += 1
            out.append(item.req_id)
        return out

    def leave(self, tenant_id: str, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        """A request past the gate has ended; ``prompt_tokens`` and ``completion_tokens``: what it
        was served (its organization's counter grows by them)."""
        self._queue.charge(tenant_id, prompt_tokens, completion_tokens)
        self._queue.finish(tenant_id)
        self.past -= 1

    def cancel(self, ticket: str) -> bool:
        """A waiting request went away; False if it was not waiting (already released)."""
        return self._queue.remove(ticket) is not None

    def expire(self, now: float) -> list[str]:
        """Waiting requests past their deadline, taken out (refuse them)."""
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, ticket = heapq.heappop(self._deadlines)
            if self._queue.remove(ticket) is not None:
                self.refused_total += 1
                out.append(ticket)
        return out

    def next_deadline(self) -> float | None:
        while self._deadlines and self._deadlines[0][1] not in self._queue:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None

    def on_demand(self, sample: float) -> None:
        """The loop's demand over the last interval (0..1; the caller samples it periodically)."""
        s = self.settings
        prev = self.demand
        demand = self.demand = sample if prev is None else prev + s.smoothing * (sample - prev)
        competing = self._queue.active_count > 1
        if demand >= s.saturated and competing:
            self._limit = max(float(s.min_requests), s.decrease * min(self._limit, float(self.past)))
        elif self._queue and (demand < s.idle or not competing):
            self._limit = min(float(s.max_requests), self._limit + max(1.0, s.increase * self._limit))

    def stats(self) -> GateStats:
        return GateStats(self.limit, self.past, self.waiting, self.refused_total, self.waited_total)
