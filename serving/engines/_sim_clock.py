"""Clocks for the simulated engine: the event loop's monotonic clock, and a hand-driven fake for tests."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from typing import Protocol

__all__ = ["Clock", "FakeClock", "LoopClock"]


class Clock(Protocol):
    """Monotonic seconds and a way to wait until a point in them."""

    def now(self) -> float: ...

    async def sleep_until(self, deadline: float) -> None: ...


class LoopClock:
    """The running event loop's clock (``loop.time()``, monotonic); waits with ``loop.call_at``."""

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def sleep_until(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        if deadline <= loop.time():
            return
        fut: asyncio.Future[None] = loop.create_future()
        handle = loop.call_at(deadline, _resolve, fut)
        try:
            await fut
        finally:
            handle.cancel()


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class FakeClock:
    """Time that moves only when a test says so (the ``MockLoopTime`` idea).

    ``sleep_until`` parks the caller on a future; :meth:`advance` / :meth:`advance_to_next` move time
    and resolve every sleeper whose deadline has come.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    async def sleep_until(self, deadline: float) -> None:
        if deadline <= self._now:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (deadline, next(self._seq), fut))
        await fut

    def next_deadline(self) -> float | None:
        """Earliest pending deadline (cancelled sleepers skipped), or None."""
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
        return self._sleepers[0][0] if self._sleepers else None

    def advance_to(self, t: float) -> None:
        """Move time to ``t`` (never backwards) and wake the sleepers that are due."""
        self._now = max(self._now, t)
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            _resolve(fut)

    def advance(self, dt: float) -> None:
        self.advance_to(self._now + dt)

    def advance_to_next(self) -> bool:
        """Jump to the earliest deadline; False when nobody sleeps."""
        t = self.next_deadline()
        if t is None:
            return False
        self.advance_to(t)
        return True
