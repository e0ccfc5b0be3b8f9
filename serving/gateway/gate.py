"""The asyncio shell of a gateway replica's fair gate (:class:`serving.admission.GateCore`): a future
per waiting request, one deadline timer, and the loop's demand sampled from the kernel.

    slot = await gate.acquire(tenant_id, weight)      # may wait; raises GatewayBusyError
    try:
        ...                                           # read, prepare, meter, stream
    finally:
        slot.release(prompt_tokens, completion_tokens)  # once; what it was served

*Demand* is the share of wall time the event loop's thread spent running or waiting to run, from
``/proc/thread-self/schedstat`` (run time and run-queue wait): a loop that always has work reads 1
even when other processes take half the CPU, and one that waits in ``epoll`` for its sockets reads
less. Where that file is missing, the thread's CPU time stands in (it misses run-queue waits, so the
gate then engages only when the loop has a core to itself and still cannot keep up).
"""

from __future__ import annotations

import asyncio
import itertools
import time

from serving.admission import GateCore, GateSettings, GateStats
from serving.errors import GatewayBusyError

__all__ = ["FairGate", "GateSlot", "loop_busy_ns"]

SAMPLE_S = 0.1
"""How often the loop's demand is sampled and the limit steered."""
_SCHEDSTAT = "/proc/thread-self/schedstat"


def loop_busy_ns() -> int:
    """Nanoseconds this thread has run or waited to run (run-queue wait included where the kernel
    reports it)."""
    try:
        with open(_SCHEDSTAT, "rb") as f:
            run_ns, wait_ns, _ = f.read().split()
        return int(run_ns) + int(wait_ns)
    except (OSError, ValueError):
        return time.thread_time_ns()


class GateSlot:
    """A place past the gate, held until :meth:`release` (idempotent)."""

    __slots__ = ("_gate", "tenant_id", "waited_s")

    def __init__(self, gate: FairGate | None, tenant_id: str, waited_s: float = 0.0) -> None:
        self._gate = gate
        self.tenant_id = tenant_id
        self.waited_s = waited_s
        """How long the request waited for it (0 when it passed at once)."""

    def release(self, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._leave(self.tenant_id, prompt_tokens, completion_tokens)


class FairGate:
    """One replica's gate, on its event loop."""

    def __init__(self, settings: GateSettings) -> None:
        self.core = GateCore(settings)
        self.demand = 0.0
        """The loop's demand over the last sample (0..1; the core keeps it smoothed)."""
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._tickets = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    async def acquire(self, tenant_id: str, weight: float = 1.0) -> GateSlot:
        """Pass the gate (at once, or when the fair order reaches this request); raise
        :class:`GatewayBusyError` when too many wait or the wait runs past ``timeout_s``."""
        loop = asyncio.get_running_loop()
        ticket = str(next(self._tickets))
        entered_at = loop.time()
        entered = self.core.enter(ticket, tenant_id, weight, entered_at)
        if entered is None:
            raise _busy("too many requests are waiting at this gateway replica")
        if entered:
            return GateSlot(self, tenant_id)
        fut = loop.create_future()
        self._waiters[ticket] = fut
        self._process()
        try:
            await fut
        except asyncio.CancelledError:
            self._waiters.pop(ticket, None)
            if not self.core.cancel(ticket):  # released as we were cancelled: give the place back
                self.core.leave(tenant_id)
            self._process()
            raise
        return GateSlot(self, tenant_id, loop.time() - entered_at)

    def _leave(self, tenant_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.core.leave(tenant_id, prompt_tokens, completion_tokens)
        self._process()

    def stats(self) -> GateStats:
        return self.core.stats()

    async def steer(self) -> None:
        """Sample the loop's demand every :data:`SAMPLE_S` and steer the limit (a background task
        of the replica; a periodic timer, not a wait for a condition)."""
        busy, at = loop_busy_ns(), time.monotonic_ns()
        while True:
            await asyncio.sleep(SAMPLE_S)
            busy2, at2 = loop_busy_ns(), time.monotonic_ns()
            self.demand = min(1.0, (busy2 - busy) / max(1, at2 - at))
            busy, at = busy2, at2
            self.core.on_demand(self.demand)
            self._process()

    def _process(self) -> None:
        """Refuse what waited too long, let in what the limit allows, re-arm the deadline timer."""
        loop = asyncio.get_running_loop()
        for ticket in self.core.expire(loop.time()):
            fut = self._waiters.pop(ticket, None)
            if fut is not None and not fut.done():
                fut.set_exception(_busy("no place at this gateway replica within the wait"))
        for ticket in self.core.release():
            fut = self._waiters.pop(ticket, None)
            # A cancelled waiter whose task has not run yet gives its place back when it does.
            if fut is not None and not fut.done():
                fut.set_result(None)
        self._arm(self.core.next_deadline())

    def _arm(self, at: float | None) -> None:
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None:
            self._timer = asyncio.get_running_loop().call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._process()


def _busy(message: str) -> GatewayBusyError:
    return GatewayBusyError(f"{message}; retry shortly", headers={"Retry-After": "1"})
