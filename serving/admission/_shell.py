"""The thin asyncio shell a pool replica drives: a future per queued request, one deadline timer.

    admission = AsyncAdmission(AdmissionCore(config))
    await admission.acquire(req_id, tenant_id, weight, prompt_tokens, max_tokens)  # may raise
    try:
        async for chunk in engine.generate(request):
            admission.on_tokens(req_id, new_tokens)
    finally:
        admission.done(req_id, usage.prompt_tokens, usage.completion_tokens)

The clock is the event loop's (``loop.time()``), so deadlines are armed with ``loop.call_at``; no
sleep loops. ``done`` must be called exactly once for every request whose ``acquire`` returned.
"""

from __future__ import annotations

import asyncio
import math

from serving.admission._interface import AdmissionPolicy
from serving.admission._types import AdmissionStats, Admitted, LoadSnapshot, Refused
from serving.errors import APIError


class AdmissionRefused(APIError):
    """The admission core refused the request: 429 when this tenant should slow down, 503 when the
    pool is saturated, ``Retry-After`` from the queue's drain rate. A member of the
    :mod:`serving.errors` tree, defined here beside the :class:`Refused` it carries (what the token
    channel sends back)."""

    def __init__(self, refusal: Refused) -> None:
        slow_down = refusal.status_code == 429
        super().__init__(
            refusal.message,
            status_code=429 if slow_down else 503,
            error_type="rate_limit_exceeded" if slow_down else "server_error",
            code=refusal.reason.value,
            headers={"Retry-After": str(max(1, math.ceil(refusal.retry_after_s)))},
        )
        self.refusal = refusal
        self.retry_after_s = refusal.retry_after_s


class AsyncAdmission:
    """Wraps an :class:`AdmissionPolicy` for one event loop."""

    def __init__(self, core: AdmissionPolicy, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.core = core
        self._loop = loop
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def now(self) -> float:
        return self.loop.time()

    async def acquire(
        self,
        req_id: str,
        tenant_id: str,
        weight: float,
        prompt_tokens: int,
        max_tokens: int,
        project_id: str | None = None,
        project_weight: float = 1.0,
    ) -> None:
        """Return once the request may start; raise :class:`AdmissionRefused` if it may not.

        Cancelling the waiting task removes the request from the queue (or gives back its slot if it
        was released at the same moment).
        """
        decision = self.core.submit(
            req_id, tenant_id, weight, prompt_tokens, max_tokens, self.now(), project_id, project_weight
        )
        if isinstance(decision, Admitted):
            return
        if isinstance(decision, Refused):
            raise AdmissionRefused(decision)
        fut: asyncio.Future[None] = self.loop.create_future()
        self._waiters[req_id] = fut
        self._process()
        try:
            await fut
        except asyncio.CancelledError:
            self._waiters.pop(req_id, None)
            if not self.core.cancel(req_id, self.now()):
                # Released while we were being cancelled: hand the slot back, nothing ran.
                self.core.on_finish(req_id, 0, 0, self.now())
            self._process()
            raise

    def on_first_token(self, req_id: str) -> None:
        self.core.on_first_token(req_id, self.now())

    def on_tokens(self, req_id: str, n: int) -> None:
        self.core.on_tokens(req_id, n, self.now())
        if self.core.releases_on_tokens:
            self._process()

    def done(self, req_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        """The request ended (any way); frees its slot and feeds back its latency."""
        self.core.on_finish(req_id, prompt_tokens, completion_tokens, self.now())
        self._process()

    def snapshot(self) -> LoadSnapshot:
        return self.core.snapshot(self.now())

    def stats(self) -> AdmissionStats:
        return self.core.stats()

    def _process(self, now: float | None = None) -> None:
        """Refuse what expired, start what the limit allows, re-arm the deadline timer."""
        now = self.now() if now is None else now
        for req_id, refusal in self.core.expire(now):
            fut = self._waiters.pop(req_id, None)
            if fut is not None and not fut.done():
                fut.set_exception(AdmissionRefused(refusal))
        gave_back = True
        while gave_back:
            gave_back = False
            for req_id in self.core.release(now):
                fut = self._waiters.pop(req_id, None)
                if fut is None or fut.done():
                    self.core.on_finish(req_id, 0, 0, now)  # its waiter is gone: give the slot back
                    gave_back = True
                else:
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
            self._timer = self.loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        at = self._timer_at
        self._timer = None
        self._timer_at = None
        # asyncio may fire a timer up to one clock resolution early: never act before the deadline.
        self._process(max(self.now(), at if at is not None else 0.0))
