"""A pool with no replica running (every node of its GPU type gone): a request pinned to it is
refused at once with 503 ``pool_unavailable``, not held until the first-token timeout; an unpinned
one goes to the pool that has a replica; a replica the board lists but whose channel is still
connecting is waited for, and one that leaves the board while a request waits ends the wait.

The gateway's request path (:class:`GatewayService`, its pool directory and token channel) against
a real replica host of a simulated L20 pool; the H100 pool's replica is absent from the board, or
listed before its host is up, as a gateway sees a lost node and a replica that starts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from serving.admission import AdmissionCore, AsyncAdmission
from serving.config import parse_config
from serving.config.resolved import ResolvedPool, resolve
from serving.errors import PoolUnavailableError
from serving.gateway.pool_directory import PoolDirectory, PoolRef, pool_info
from serving.gateway.service import GatewayService
from serving.gateway.tokenization import PromptTokenizer
from serving.gateway.transport import ChannelTransport
from serving.pools.host import ReplicaHost
from serving.pools.replica import build_engine

pytestmark = pytest.mark.timeout(120)

MODEL = "llama-3.1-8b-instruct"
HOUR_S = 3600.0
"""The first-token timeout here: a request that waited for it would outlast the test's timeout."""


async def until(cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll a condition another task makes true (no fixed sleeps)."""
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.01)


class Host:
    """A real replica host of one simulated pool on loopback."""

    def __init__(self, pool: ResolvedPool, key: str) -> None:
        self.pool, self.key = pool, key
        self.engine = build_engine(pool)

    async def start(self) -> tuple[str, str, int, bytes]:
        await self.engine.start()
        cap = self.engine.capacity()
        admission = AsyncAdmission(
            AdmissionCore(
                self.pool.admission.for_engine(
                    cap.max_num_seqs, cap.kv_capacity_tokens, self.pool.slo.ttft_ms, self.pool.slo.tpot_ms
                )
            )
        )
        self.host = ReplicaHost(self.engine, admission, "127.0.0.1", self.key)
        return (self.key, *await self.host.start())

    async def close(self) -> None:
        await self.host.close()
        await self.engine.shutdown()


@asynccontextmanager
async def gateway(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    """Pools ``sim-h100`` (no replica yet) and ``sim-l20`` (one, connected) of one model."""
    cfg = parse_config(
        {
            "models": {MODEL: {"tokenizer": "builtin:tiny-llama"}},
            "state_dir": str(tmp_path / "state"),
            "pools": [
                {"name": f"sim-{gpu.lower()}", "model": MODEL, "accelerator": gpu, "engine": "sim"}
                for gpu in ("H100", "L20")
            ],
        }
    )
    dep = resolve(cfg)
    pools = {p.accelerator: p for p in dep.pools}
    l20 = Host(pools["L20"], "l20-1")
    transport = ChannelTransport("gw-1")
    endpoints = [await l20.start()]
    transport.sync(endpoints)
    refs = {
        gpu: PoolRef(p.name, p.model, p.accelerator, 1, None, p.slo.ttft_ms, p.slo.tpot_ms)
        for gpu, p in pools.items()
    }
    refs["L20"].replica_keys = ["l20-1"]
    tokenizer = await asyncio.get_running_loop().run_in_executor(
        None, PromptTokenizer, dep.models[MODEL].tokenizer_source
    )
    directory = PoolDirectory(list(refs.values()), [pool_info(p) for p in pools.values()], transport)
    service = GatewayService({MODEL: pools["L20"].entry}, {MODEL: tokenizer}, directory, HOUR_S)
    await until(lambda: transport.usable("l20-1"))
    hosts = [l20]
    try:
        yield {
            "service": service,
            "refs": refs,
            "transport": transport,
            "pools": pools,
            "endpoints": endpoints,
            "hosts": hosts,
        }
    finally:
        await transport.close()
        for h in hosts:
            await h.close()


async def run(service: GatewayService, gpu: str | None) -> tuple[str, int]:
    """One completion; the pool that served it and its completion tokens."""
    p = service.prepare(
        "completion", {"model": MODEL, "prompt": "where", "max_tokens": 4, "ignore_eos": True}
    )
    p.pinned_gpu = gpu
    body = await service.complete(p)
    assert p.outcome is not None
    return p.outcome.pool, body["usage"]["completion_tokens"]


async def test_a_request_pinned_to_a_pool_without_replicas_is_refused_at_once(tmp_path: Path) -> None:
    async with gateway(tmp_path) as g:
        service: GatewayService = g["service"]
        assert service.pools.reachable() == {
            "sim-h100": "not ready: no reachable replica",
            "sim-l20": "ready",
        }
        with pytest.raises(PoolUnavailableError) as refused:
            await run(service, "H100")
        e = refused.value
        assert (e.status_code, e.code, e.pool) == (503, "pool_unavailable", "sim-h100")
        assert e.body()["error"]["code"] == "pool_unavailable" and "sim-h100" in e.body()["error"]["message"]
        # The other pool is untouched; unpinned requests go to it, never to the pool without replicas.
        assert await run(service, "L20") == ("sim-l20", 4)
        assert [await run(service, None) for _ in range(5)] == [("sim-l20", 4)] * 5
        assert {p.name: p.in_flight for p in service.pools.pools} == {"sim-h100": 0, "sim-l20": 0}


async def test_a_listed_replica_that_is_still_connecting_is_waited_for(tmp_path: Path) -> None:
    async with gateway(tmp_path) as g:
        service: GatewayService = g["service"]
        g["refs"]["H100"].replica_keys = ["h100-1"]  # on the board, its host not up yet
        pending = asyncio.create_task(run(service, "H100"))
        await asyncio.sleep(0)
        assert not pending.done()
        h100 = Host(g["pools"]["H100"], "h100-1")
        g["hosts"].append(h100)
        g["transport"].sync([*g["endpoints"], await h100.start()])
        assert await pending == ("sim-h100", 4)


async def test_a_replica_that_leaves_the_board_ends_the_wait_for_it(tmp_path: Path) -> None:
    async with gateway(tmp_path) as g:
        service: GatewayService = g["service"]
        ref: PoolRef = g["refs"]["H100"]
        ref.replica_keys = ["h100-1"]  # listed, never connecting: its node is gone
        pending = asyncio.create_task(run(service, "H100"))
        await until(lambda: ref.in_flight == 1)
        ref.replica_keys = []  # its board entry expired (what PoolDirectory.apply_board does)
        g["transport"].notify()
        with pytest.raises(PoolUnavailableError):
            await pending
        assert ref.in_flight == 0
