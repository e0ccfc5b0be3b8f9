"""A pool replica: one engine (vLLM or simulated) for one model on one accelerator type, behind the
tenant-fair admission core.

Ray Serve runs this class as the deployment ``pool-<name>``. Gateways send requests directly on the
token channel (:mod:`serving.pools.channel`; see there why) or, before that is up, through a
streaming deployment handle. A request first waits in the admission queue (VTC fair share, adaptive
in-flight limit); refusals raise :class:`AdmissionRefused`, which the gateway maps to 429/503.
An abort on the channel or a cancelled handle stream (client gone) leaves the queue or aborts the
request in the engine; so does the loss of the gateway's channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from serving.admission import AdmissionCore, AdmissionRefused, AsyncAdmission
from serving.config.resolved import ResolvedPool
from serving.engines.base import Engine, EngineChunk, EngineError, EngineRequest
from serving.logs import route_logs_to_serve
from serving.pools.channel import ChannelLost, ChannelServer, RemoteFailure, Submissions
from serving.pools.loadboard import PUBLISH_INTERVAL_S, get_board
from serving.priority import run_at_normal_priority

log = logging.getLogger("tokenweir.pool")


def build_engine(pool: ResolvedPool) -> Engine:
    """The engine a pool runs, on its resolved engine arguments."""
    if pool.engine == "vllm":
        from serving.engines.vllm_engine import VllmEngine

        cpu = pool.accelerator == "CPU"
        return VllmEngine(
            pool.weights_source,
            pool.model,
            pool.entry.max_model_len,
            pool.engine_args,
            cpu_placement=cpu and pool.cpu_core_placement,
            cpu_model_in_engine_core=cpu and pool.cpu_model_in_engine_core,
        )
    from serving.engines.sim import SimEngine
    from serving.hardware import EngineSettings

    args = pool.engine_args
    settings = EngineSettings(
        int(args["max_num_seqs"]), int(args["max_num_batched_tokens"]), float(args["gpu_memory_utilization"])
    )
    return SimEngine(
        pool.arch, pool.gpu, settings, speedup=pool.sim_speedup, max_model_len=pool.entry.max_model_len
    )


def replica_id() -> str:
    """This Serve replica's unique id (the process id outside Serve)."""
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        return str(getattr(ctx.replica_id, "unique_id", None) or ctx.replica_tag)
    except Exception:
        import os

        return f"pid-{os.getpid()}"


def node_ip() -> str:
    """Where this replica's token channel listens: the Ray node's address (loopback locally)."""
    try:
        import ray

        return str(ray.util.get_node_ip_address())
    except Exception:
        return "127.0.0.1"


class PoolReplica:
    """The body of a pool deployment replica."""

    async def __init__(  # type: ignore[misc]  # Ray Serve awaits async constructors
        self, pool: ResolvedPool, namespace: str = "tokenweir"
    ) -> None:
        run_at_normal_priority()  # before the engine starts: its processes inherit it
        route_logs_to_serve()
        self.pool = pool
        self._engine = build_engine(pool)
        self._channel_host = node_ip()
        self._interval_s = self.pool.stream_interval_ms / 1000.0
        self._started = 0
        self._aborted = 0
        await self._engine.start()
        cap = self._engine.capacity()
        self.admission = AsyncAdmission(
            AdmissionCore(
                pool.admission.for_engine(
                    cap.max_num_seqs, cap.kv_capacity_tokens, pool.slo.ttft_ms, pool.slo.tpot_ms
                )
            )
        )
        placement = getattr(self._engine, "placement", None)
        self._engine_cores = (self._channel_host, sorted(placement.worker_cores)) if placement else None
        """(node, cores) a same-node gateway keeps off (vLLM CPU build only)."""
        self._id = replica_id()
        self._direct: dict[str, tuple[str, asyncio.Task[None] | _Relay]] = {}
        self._direct_total = 0
        self._bookings: list[tuple[str, int]] = []
        self._channels = ChannelServer(
            self._channel_host, Submissions(self._submit, self._abort_direct, self._gateway_gone)
        )
        self._channel_addr = await self._channels.start()
        self._board = get_board(namespace)
        self._publisher = asyncio.get_running_loop().create_task(self._publish_forever())

    async def _produce(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        """Wait for admission, then the engine's chunks (paced by ``stream_interval_ms``)."""
        rid = request.request_id
        n = request.sampling.n
        await self.admission.acquire(
            rid,
            request.tenant_id,
            request.tenant_weight,
            len(request.prompt_token_ids),
            request.sampling.max_tokens * n,
        )
        self._started += 1
        finished = False
        prompt_tokens = len(request.prompt_token_ids)
        completion_tokens = 0
        stream = self._engine.generate(request)
        try:
            async for chunk in stream:
                finished = chunk.finished
                new = chunk.completion_tokens - completion_tokens
                completion_tokens = chunk.completion_tokens
                prompt_tokens = chunk.prompt_tokens
                if new:
                    self.admission.on_tokens(rid, new)
                yield chunk
                if self._interval_s and not finished:
                    await asyncio.sleep(self._interval_s)
        finally:
            if not finished:
                self._aborted += 1
            self.admission.done(rid, prompt_tokens, completion_tokens)
            await stream.aclose()  # type: ignore[attr-defined]

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        """The Ray Serve path: the first chunk on the handle stream, the rest on the channel if
        the gateway has one here (else on the handle stream too)."""
        conn = self._channels.connection(request.reply_to)
        first = True
        chunks = self._produce(request)
        try:
            async for chunk in chunks:
                if first:
                    # The first chunk always rides the request's own stream (TTFT, errors, retries).
                    first = False
                    if conn is not None:
                        chunk.via_channel = self._id
                    yield chunk
                elif conn is not None:
                    if not conn.alive:
                        raise ChannelLost(f"channel to gateway {request.reply_to} closed")
                    conn.send(request.request_id, chunk)
                    if chunk.finished:
                        await conn.drain()
                else:
                    yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]

    # -- direct submissions on the token channel ---------------------------------------------------
    def _submit(self, gateway_id: str, request: EngineRequest) -> None:
        self._direct_total += 1
        serve = self._serve_pushed if not self._interval_s else self._serve_direct
        task = asyncio.get_running_loop().create_task(serve(gateway_id, request))
        self._direct[request.request_id] = (gateway_id, task)

    def _abort_direct(self, gateway_id: str, request_id: str) -> None:
        entry = self._direct.get(request_id)
        if entry is not None and entry[0] == gateway_id:
            entry[1].cancel()

    def _gateway_gone(self, gateway_id: str) -> None:
        for gw, handle in list(self._direct.values()):
            if gw == gateway_id:
                handle.cancel()

    async def _serve_pushed(self, gateway_id: str, request: EngineRequest) -> None:
        """Admission, then the engine pushes chunks straight into the channel's outbox
        (:class:`_Relay`): no task per request once it runs."""
        rid = request.request_id
        try:
            await self.admission.acquire(
                rid,
                request.tenant_id,
                request.tenant_weight,
                len(request.prompt_token_ids),
                request.sampling.max_tokens * request.sampling.n,
            )
        except AdmissionRefused as e:
            self._direct.pop(rid, None)
            self._fail(gateway_id, rid, RemoteFailure(str(e), e.refusal))
            return
        except asyncio.CancelledError:
            self._direct.pop(rid, None)  # aborted while queued: acquire gave the slot back
            return
        self._started += 1
        relay = _Relay(self, gateway_id, request)
        self._direct[rid] = (gateway_id, relay)
        try:
            relay.abort_engine = await self._engine.submit(request, relay)
        except Exception as e:
            log.warning("direct request %s failed", rid, exc_info=True)
            relay.fail(EngineError(f"{type(e).__name__}: {e}"))
            return
        if relay.over:  # cancelled while the engine took it
            relay.abort_engine()

    async def _serve_direct(self, gateway_id: str, request: EngineRequest) -> None:
        """The pulled form (one task per request), for pools that pace streams (``stream_interval_ms``)."""
        rid = request.request_id
        chunks = self._produce(request)
        try:
            async for chunk in chunks:
                conn = self._channels.connection(gateway_id)
                if conn is None:
                    return  # the gateway went away: aborting here frees the engine
                conn.send(rid, chunk)
                if chunk.finished:
                    await conn.drain()
        except AdmissionRefused as e:
            self._fail(gateway_id, rid, RemoteFailure(str(e), e.refusal))
        except asyncio.CancelledError:
            pass  # aborted by the gateway; the engine request is aborted by closing the stream
        except Exception as e:
            log.warning("direct request %s failed", rid, exc_info=True)
            self._fail(gateway_id, rid, RemoteFailure(f"{type(e).__name__}: {e}"))
        finally:
            self._direct.pop(rid, None)
            await chunks.aclose()  # type: ignore[attr-defined]

    def book_tokens(self, request_id: str, n: int) -> None:
        """Book a pushed request's new tokens with the admission core right after this pass: the
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

    def _fail(self, gateway_id: str, request_id: str, failure: RemoteFailure) -> None:
        conn = self._channels.connection(gateway_id)
        if conn is not None:
            conn.send(request_id, failure)

    def _payload(self) -> dict[str, Any]:
        core = self.admission.core
        snap = dataclasses.replace(core.snapshot(self.admission.now()), taken_at_s=time.time())
        return {
            "pool": self.pool.name,
            "accelerator": self.pool.accelerator,
            "snapshot": snap,
            "admission": core.stats(),
            "engine_unfinished": self._engine.num_unfinished(),
            "replica": self._id,
            "channel": self._channel_addr,
            "engine_cores": self._engine_cores,
        }

    async def _publish_forever(self) -> None:
        while True:
            try:
                self._board.publish.remote("pool", f"{self.pool.name}/{self._id}", self._payload())
            except Exception:  # the board restarts on its own; routing tolerates a missed beat
                log.debug("load board publish failed", exc_info=True)
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    async def stats(self) -> dict[str, Any]:
        """The replica's engine and admission counters, for status and tests."""
        a = self.admission.core.stats()
        return {
            "pool": self.pool.name,
            "replica": self._id,
            "accelerator": self.pool.accelerator,
            "engine": self.pool.engine,
            "num_unfinished": self._engine.num_unfinished(),
            "requests_started": self._started,
            "requests_aborted": self._aborted,
            "requests_direct": self._direct_total,
            "queue_depth": a.queue_depth,
            "in_flight_seqs": a.in_flight_seqs,
            "seq_limit": a.seq_limit,
            "engine_cores": self._engine_cores[1] if self._engine_cores else None,
        }

    async def ready(self) -> bool:
        """True once the engine takes requests (the constructor returns only then)."""
        await self._engine.check_health()
        return True

    async def check_health(self) -> None:
        """Ray Serve's health check: an exception marks the replica unhealthy and replaces it."""
        await self._engine.check_health()

    async def __del__(self) -> None:
        self._publisher.cancel()
        for _gw, task in list(self._direct.values()):
            task.cancel()
        await self._channels.close()
        with contextlib.suppress(BaseException):
            await self._publisher
        await self._engine.shutdown()


class _Relay:
    """A running direct request's sink: the engine calls it as output arrives; it books the tokens
    with the admission core and queues the chunk on the gateway's channel (flushed once per loop
    pass for every stream). ``cancel()`` is the abort from the gateway (or its loss)."""

    __slots__ = ("abort_engine", "completion", "gateway_id", "over", "prompt", "replica", "request_id")

    def __init__(self, replica: PoolReplica, gateway_id: str, request: EngineRequest) -> None:
        self.replica = replica
        self.gateway_id = gateway_id
        self.request_id = request.request_id
        self.prompt = len(request.prompt_token_ids)
        self.completion = 0
        self.over = False
        self.abort_engine: Callable[[], None] = _nothing

    def chunk(self, chunk: EngineChunk) -> None:
        if self.over:
            return
        r = self.replica
        new = chunk.completion_tokens - self.completion
        self.completion = chunk.completion_tokens
        self.prompt = chunk.prompt_tokens
        if new:
            r.book_tokens(self.request_id, new)
        conn = r._channels.connection(self.gateway_id)
        if conn is None:  # the gateway went away: free the engine
            self.cancel()
            return
        conn.send(self.request_id, chunk)
        if chunk.finished:
            self._end(aborted=False)

    def fail(self, error: EngineError) -> None:
        if self.over:
            return
        self.replica._fail(
            self.gateway_id, self.request_id, RemoteFailure(f"{type(error).__name__}: {error}")
        )
        self._end(aborted=True)

    def cancel(self) -> None:
        if not self.over:
            self._end(aborted=True)
            self.abort_engine()

    def _end(self, aborted: bool) -> None:
        self.over = True
        r = self.replica
        if aborted:
            r._aborted += 1
        r.apply_bookings()  # this request's tokens first: done() settles to the exact counts
        r.admission.done(self.request_id, self.prompt, self.completion)
        r._direct.pop(self.request_id, None)


def _nothing() -> None:
    pass
