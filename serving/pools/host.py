"""A pool replica's data path: requests arrive on the token channel, wait in the admission core,
run on the engine, and their chunks go back on the same channel.

One way through for every request: :meth:`ReplicaHost._submit` starts a task that waits for
admission (how long goes back to the gateway with the first chunk: the pool's part of the queue
time in its access log); once admitted, the engine pushes the request's output into a
:class:`_Relay` (no task per stream while it runs), which books the tokens with the admission core
and queues the chunk on the gateway's connection. ``stream_interval_ms`` wraps the relay (:class:`PacedSink`). An abort
from the gateway, or the loss of its connection, leaves the queue or aborts the engine request.

Shutdown drains (:meth:`ReplicaHost.drain`): every gateway is told to send nothing new, queued
requests are handed back (retried elsewhere: nothing was produced), running streams get until the
deadline to finish, then end with a failure frame; their usage so far travelled with their chunks,
so the gateway charges exactly what was produced.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from serving.admission import AdmissionRefused, AsyncAdmission
from serving.engines.base import Engine, EngineChunk, EngineDeadError, EngineError, EngineRequest
from serving.kvcache import CachedBlocks, CacheEventLog, CacheRuns
from serving.pools.channel import ChannelServer, Outbound, Submissions
from serving.pools.frames import Failure
from serving.pools.pacing import PacedSink

__all__ = ["ReplicaHost"]

log = logging.getLogger("tokenweir.pool")

CACHE_EVENTS_INTERVAL_S = 0.01
"""Longest a cache event waits before it goes to the gateways (they merge many steps' events)."""

_Key = tuple[str, str]
"""(gateway id, request id): request ids are unique per gateway only."""


class ReplicaHost:
    """The token channel's server, the admission core and the engine, joined."""

    def __init__(
        self,
        engine: Engine,
        admission: AsyncAdmission,
        host: str,
        replica: str,
        stream_interval_ms: float = 0.0,
        *,
        cache_events: bool = True,
    ) -> None:
        self.engine = engine
        self.admission = admission
        self.interval_s = stream_interval_ms / 1000.0
        self.channel = ChannelServer(host, replica, Submissions(self._submit, self._abort, self._gone))
        self._queued: dict[_Key, tuple[Outbound, asyncio.Task[None]]] = {}
        self._running: dict[_Key, _Relay] = {}
        self._bookings: list[tuple[str, int]] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self.requests_total = 0
        self.requests_started = 0
        self.requests_aborted = 0
        self._cache_log = CacheEventLog()
        self._cache_flush_due = False
        self._cache_events = cache_events
        """Relay the engine's KV-cache events to gateways (only where they route by them)."""

    async def start(self) -> tuple[str, int, bytes]:
        """Listen on the channel; ``(host, port, secret)`` for the load board. When the engine
        publishes KV-cache events, gateways get them (:meth:`ChannelServer.send_cache`)."""
        if self._cache_events and self.engine.watch_cache(self._on_cache):
            self.channel.cache = CachedBlocks()
        return await self.channel.start()

    def _on_cache(self, runs: CacheRuns, cleared: bool) -> None:
        """The engine's cache events: applied to the replica's view now, sent to gateways at most
        every ``CACHE_EVENTS_INTERVAL_S`` (one frame for many engine steps)."""
        cache = self.channel.cache
        assert cache is not None
        cache.apply(runs, cleared)
        if cleared:
            self._cache_log.clear()
        for stored, hashes in runs:
            self._cache_log.add(stored, hashes)
        if not self._cache_flush_due:
            self._cache_flush_due = True
            asyncio.get_running_loop().call_later(CACHE_EVENTS_INTERVAL_S, self._send_cache)

    def _send_cache(self) -> None:
        self._cache_flush_due = False
        if self._cache_log:
            self.channel.send_cache(*self._cache_log.drain())

    # -- channel messages ---------------------------------------------------------------------------
    def _submit(self, conn: Outbound, request: EngineRequest) -> None:
        rid = request.request_id
        key = (conn.gateway_id, rid)
        if self.channel.draining:
            conn.fail(Failure(rid, "the pool replica is shutting down", retryable=True))
            return
        if key in self._queued or key in self._running:
            conn.fail(Failure(rid, f"request id {rid!r} is already running here"))
            return
        self.requests_total += 1
        self._idle.clear()
        loop = asyncio.get_running_loop()
        self._queued[key] = (conn, loop.create_task(self._serve(conn, request, loop.time())))

    def _abort(self, conn: Outbound, request_id: str) -> None:
        key = (conn.gateway_id, request_id)
        queued = self._queued.get(key)
        if queued is not None and queued[0] is conn:
            queued[1].cancel()
        relay = self._running.get(key)
        if relay is not None and relay.conn is conn:
            relay.cancel()

    def _gone(self, conn: Outbound) -> None:
        for c, task in list(self._queued.values()):
            if c is conn:
                task.cancel()
        for relay in list(self._running.values()):
            if relay.conn is conn:
                relay.cancel()

    # -- one request --------------------------------------------------------------------------------
    async def _serve(self, conn: Outbound, request: EngineRequest, received: float) -> None:
        """Wait for admission (``received``: when the submit frame arrived, on the loop clock),
        then run on the engine."""
        rid = request.request_id
        key = (conn.gateway_id, rid)
        try:
            await self.admission.acquire(
                rid,
                request.tenant_id,
                request.tenant_weight,
                len(request.prompt_token_ids),
                request.sampling.max_tokens * request.sampling.n,
                request.project_id,
                request.project_weight,
            )
        except AdmissionRefused as e:
            conn.fail(Failure(rid, str(e), refusal=e.refusal))
            return
        except asyncio.CancelledError:  # aborted while queued: acquire gave the slot back
            if self.channel.draining:
                conn.fail(Failure(rid, "the pool replica is shutting down", retryable=True))
            return
        finally:
            del self._queued[key]
            self._check_idle()
        self.requests_started += 1
        conn.admitted(rid, asyncio.get_running_loop().time() - received)
        relay = _Relay(self, conn, request)
        self._running[key] = relay
        self._idle.clear()
        try:
            relay.abort_engine = await self.engine.submit(
                request, PacedSink(relay, self.interval_s) if self.interval_s else relay
            )
        except Exception as e:
            log.warning("request %s failed to start", rid, exc_info=True)
            relay.fail(e if isinstance(e, EngineError) else EngineError(f"{type(e).__name__}: {e}"))
            return
        if relay.over:  # aborted while the engine took it
            relay.abort_engine()

    def book_tokens(self, request_id: str, n: int) -> None:
        """Book a running request's new tokens with the admission core right after this pass: the
        engine hands every stream of a step its chunk first (emission stays on the model's
        timeline, ``loadtests/bench_sim_schedule.py``), the bookkeeping follows in one callback."""
        if not self._bookings:
            asyncio.get_running_loop().call_soon(self.apply_bookings)
        self._bookings.append((request_id, n))

    def apply_bookings(self) -> None:
        items, self._bookings = self._bookings, []
        on_tokens = self.admission.on_tokens
        for rid, n in items:
            on_tokens(rid, n)

    def ended(self, relay: _Relay, aborted: bool) -> None:
        """A running request is over (finished, failed or aborted)."""
        if aborted:
            self.requests_aborted += 1
        self.apply_bookings()  # this request's tokens first: done() settles to the exact counts
        self.admission.done(relay.request_id, relay.prompt, relay.completion)
        self._running.pop((relay.conn.gateway_id, relay.request_id), None)
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._queued and not self._running:
            self._idle.set()

    # -- shutdown -----------------------------------------------------------------------------------
    async def drain(self, timeout_s: float) -> int:
        """No new requests; queued ones go back to their gateways (retryable), running ones get
        ``timeout_s`` to finish and then end with a failure. Returns how many were cut off."""
        self.channel.drain()
        for _conn, task in list(self._queued.values()):
            task.cancel()
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
            return 0
        except TimeoutError:
            cut = list(self._running.values())
            for relay in cut:
                relay.shut("the pool replica shut down before the stream finished")
            log.warning("drain: %d streams still running after %.1f s were ended", len(cut), timeout_s)
            return len(cut)

    @property
    def unfinished(self) -> int:
        """Requests queued or running here."""
        return len(self._queued) + len(self._running)

    async def close(self) -> None:
        for _conn, task in list(self._queued.values()):
            task.cancel()
        for relay in list(self._running.values()):
            relay.cancel()
        await self.channel.close()


class _Relay:
    """A running request's sink: the engine calls it as output arrives."""

    __slots__ = ("abort_engine", "completion", "conn", "host", "over", "prompt", "request_id")

    def __init__(self, host: ReplicaHost, conn: Outbound, request: EngineRequest) -> None:
        self.host = host
        self.conn = conn
        self.request_id = request.request_id
        self.prompt = len(request.prompt_token_ids)
        self.completion = 0
        self.over = False
        self.abort_engine: Callable[[], None] = _nothing

    def chunk(self, chunk: EngineChunk) -> None:
        if self.over:
            return
        new = chunk.completion_tokens - self.completion
        self.completion = chunk.completion_tokens
        self.prompt = chunk.prompt_tokens
        if new:
            self.host.book_tokens(self.request_id, new)
        if not self.conn.alive:  # the gateway went away: free the engine
            self.cancel()
            return
        self.conn.send(self.request_id, chunk)
        if chunk.finished:
            self._end(aborted=False)

    def fail(self, error: Exception) -> None:
        if self.over:
            return
        retryable = isinstance(error, EngineDeadError) and self.completion == 0
        self.conn.fail(Failure(self.request_id, f"{type(error).__name__}: {error}", retryable=retryable))
        self._end(aborted=True)

    def cancel(self) -> None:
        """The gateway aborted (or went away): nothing more is sent."""
        if not self.over:
            self._end(aborted=True)
            self.abort_engine()

    def shut(self, message: str) -> None:
        """The replica ends the stream: the gateway is told, the engine request aborted."""
        if not self.over:
            self.conn.fail(Failure(self.request_id, message))
            self._end(aborted=True)
            self.abort_engine()

    def _end(self, aborted: bool) -> None:
        self.over = True
        self.host.ended(self, aborted)


def _nothing() -> None:
    pass
