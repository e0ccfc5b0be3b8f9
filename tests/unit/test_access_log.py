"""The access log's line format and the traceparent filter (the live path is in
tests/integration/test_openai_api.py); and, without Ray, what its lines say about a request's way
through the gateway's request path, the token channel (real sockets on 127.0.0.1) and a pool replica
(the replica host, its admission shell and core, the simulated engine serving one sequence at a
time): the queue time of a request that waited for the one sequence, and the trace context the
engine was handed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import stat
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from serving.admission import AdmissionCore, AsyncAdmission
from serving.config import parse_config
from serving.config.resolved import resolve
from serving.engines.base import Abort, ChunkSink, EngineRequest
from serving.engines.sim import SimEngine
from serving.engines.vllm_engine import _trace_headers
from serving.gateway.access_log import AccessLog, AccessRecord, request_record, valid_traceparent
from serving.gateway.pool_directory import PoolDirectory, PoolRef, pool_info
from serving.gateway.service import GatewayService
from serving.gateway.tokenization import PromptTokenizer
from serving.gateway.transport import ChannelTransport
from serving.hardware import EngineSettings
from serving.pools.host import ReplicaHost

MODEL = "llama-3.1-8b-instruct"


def test_traceparent_only_when_well_formed() -> None:
    good = "00-" + "0af7651916cd43dd8448eb211c80319c" + "-" + "b7ad6b7169203331" + "-01"
    assert valid_traceparent(good) == good
    for bad in (None, "", good.upper(), good + "x", "00-xyz", good.replace("-", "_"), "\n" + good[1:]):
        assert valid_traceparent(bad) is None


def test_one_json_line_per_record_without_unknown_fields(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "access.log"
    log = AccessLog(True, str(path))
    log.write(AccessRecord(ts=1.5, status=401, error="invalid_api_key", kind="chat"))
    log.write(
        AccessRecord(
            ts=2.0,
            status=200,
            request_id="r",
            model="m",
            prompt_tokens=3,
            completion_tokens=4,
            credits=7.0,
            queue_s=0.25,
        )
    )
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines == [
        {"ts": 1.5, "status": 401, "kind": "chat", "error": "invalid_api_key"},
        {
            "ts": 2.0,
            "status": 200,
            "request_id": "r",
            "model": "m",
            "prompt_tokens": 3,
            "completion_tokens": 4,
            "credits": 7.0,
            "queue_s": 0.25,
        },
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    off = AccessLog(False, str(tmp_path / "never.log"))
    off.write(AccessRecord(ts=0.0, status=200))
    assert not (tmp_path / "never.log").exists()


async def until(cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll a condition the other end's tasks make true (no fixed sleeps)."""
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.005)


class NotingSimEngine(SimEngine):
    """The simulated engine, keeping each request as it reached the engine (off the channel)."""

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)
        self.received: list[EngineRequest] = []

    async def submit(self, request: EngineRequest, sink: ChunkSink) -> Abort:
        self.received.append(request)
        return await super().submit(request, sink)


@contextlib.asynccontextmanager
async def one_sequence_pool(
    tmp_path: Path,
) -> AsyncIterator[tuple[GatewayService, NotingSimEngine, AsyncAdmission]]:
    """A gateway's request path (metering off) and one replica of a simulated pool that runs one
    sequence at a time, joined by the token channel."""
    cfg = parse_config(
        {
            "models": {MODEL: {"tokenizer": "builtin:tiny-llama"}},
            "state_dir": str(tmp_path / "state"),
            "pools": [
                {
                    "name": "sim",
                    "model": MODEL,
                    "accelerator": "H100",
                    "engine": "sim",
                    "sim_speedup": 2,
                    "engine_args": {"max_num_seqs": 1},
                    "admission": {"queue_deadline_ms": 600_000},  # a wait here is never refused
                }
            ],
        }
    )
    dep = resolve(cfg)
    pool = dep.pools[0]
    args = pool.engine_args
    engine = NotingSimEngine(
        pool.arch,
        pool.gpu,
        EngineSettings(
            int(args["max_num_seqs"]),
            int(args["max_num_batched_tokens"]),
            float(args["gpu_memory_utilization"]),
        ),
        speedup=pool.sim_speedup,
        max_model_len=pool.entry.max_model_len,
        eos_mean_tokens=None,
    )
    await engine.start()
    cap = engine.capacity()
    admission = AsyncAdmission(
        AdmissionCore(
            pool.admission.for_engine(
                cap.max_num_seqs, cap.kv_capacity_tokens, pool.slo.ttft_ms, pool.slo.tpot_ms
            )
        )
    )
    host = ReplicaHost(engine, admission, "127.0.0.1", "replica-1")
    transport = ChannelTransport("gw-1")
    transport.sync([("replica-1", *await host.start())])
    ref = PoolRef(pool.name, pool.model, pool.accelerator, 1, None, pool.slo.ttft_ms, pool.slo.tpot_ms)
    ref.replica_keys = ["replica-1"]
    tokenizer = await asyncio.get_running_loop().run_in_executor(
        None, PromptTokenizer, dep.models[MODEL].tokenizer_source
    )
    service = GatewayService(
        {MODEL: pool.entry}, {MODEL: tokenizer}, PoolDirectory([ref], [pool_info(pool)], transport), 30.0
    )
    try:
        await until(lambda: transport.usable("replica-1"))
        yield service, engine, admission
    finally:
        await transport.close()
        await host.close()
        await engine.shutdown()


@pytest.mark.timeout(120)
async def test_queue_time_is_the_wait_for_the_pools_sequence_and_is_in_the_line(tmp_path: Path) -> None:
    async with one_sequence_pool(tmp_path) as (service, _engine, admission):
        loop = asyncio.get_running_loop()
        body = {"model": MODEL, "prompt": "the first", "max_tokens": 128, "ignore_eos": True}
        first = service.prepare("completion", body)
        second = service.prepare("completion", {**body, "prompt": "the second", "max_tokens": 2})
        second.gate_wait_s = 0.25  # as the deployment sets it from its place at the fair gate
        t0 = time.monotonic()
        running = asyncio.ensure_future(service.complete(first))
        await until(lambda: admission.stats().in_flight_seqs == 1)
        sent = loop.time()
        waiting = asyncio.ensure_future(service.complete(second))
        await until(lambda: admission.stats().queue_depth == 1)  # the one sequence is taken: it queues
        await running
        first_left = loop.time() - sent  # the second waited for the first within this
        d1 = time.monotonic() - t0
        await waiting
        d2 = loop.time() - sent
    a, b = first.outcome, second.outcome
    assert a is not None and b is not None and a.queue_s is not None and b.queue_s is not None
    pool_wait = b.queue_s - 0.25
    assert 0.5 * first_left < pool_wait < first_left, (pool_wait, first_left)  # about the first's time
    assert 0 <= a.queue_s < 0.1 * pool_wait  # the first started at once
    assert b.ttft_s is not None and b.ttft_s > pool_wait  # its first token came after its wait
    path = tmp_path / "access.log"
    log = AccessLog(True, str(path))
    log.write(request_record(first, time.time(), 200, None, "completion", d1, metered=False))
    log.write(request_record(second, time.time(), 200, None, "completion", d2, metered=False))
    log.close()
    one, two = (json.loads(x) for x in path.read_text().splitlines())
    assert (one["queue_s"], two["queue_s"]) == (round(a.queue_s, 6), round(b.queue_s, 6))
    assert two["queue_s"] > 0.25 + 0.5 * one["duration_s"] and two["queue_s"] < two["ttft_s"] + 0.25
    assert one["pool"] == two["pool"] == "sim" and two["completion_tokens"] == 2


@pytest.mark.timeout(120)
async def test_the_engine_is_handed_the_requests_trace_context(tmp_path: Path) -> None:
    """W3C ``traceparent`` accepted at the gateway reaches the pool replica's engine through the
    token channel: the caller's when tracing is off, the gateway's span when it is on."""
    caller = "00-" + "0af7651916cd43dd8448eb211c80319c" + "-" + "b7ad6b7169203331" + "-01"
    gateway_span = "00-" + "0af7651916cd43dd8448eb211c80319c" + "-" + "00f067aa0ba902b7" + "-01"
    async with one_sequence_pool(tmp_path) as (service, engine, _admission):
        body = {"model": MODEL, "prompt": "trace me", "max_tokens": 2}
        plain, traced, untraced = (service.prepare("completion", body) for _ in range(3))
        plain.traceparent = valid_traceparent(caller)  # as the deployment sets them from the header
        traced.traceparent, traced.engine_traceparent = caller, gateway_span
        untraced.traceparent = valid_traceparent("not-a-trace")
        for p in (plain, traced, untraced):
            await service.complete(p)
    got = {r.request_id: r for r in engine.received}
    assert got[plain.request_id].traceparent == caller
    assert got[traced.request_id].traceparent == gateway_span
    assert got[untraced.request_id].traceparent is None
    # What the vLLM engine passes on as the request's ``trace_headers``.
    assert _trace_headers(got[plain.request_id]) == {"traceparent": caller}
    assert _trace_headers(got[untraced.request_id]) is None
