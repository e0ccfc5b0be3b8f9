"""KV-cache events (issue 17): the simulated engine's block pool reports what it stores and evicts as
vLLM's publisher does; a pool replica relays them to every gateway on the token channel (a snapshot
first, for a gateway that connects late); the gateway's prefix index follows them, so it knows what
another gateway routed to a replica, and what the engine evicted.

Everything here is real over loopback sockets: the simulated engine (on the performance model, a
fake clock advanced by the engine loop itself), the replica host with its admission core, and two
gateway transports. vLLM's own events are checked against a real vLLM in
tests/integration/test_vllm_cache_events.py.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from serving.admission import AdmissionCore, AdmissionSettings, AsyncAdmission
from serving.config import parse_config
from serving.config.resolved import resolve
from serving.engines.base import EngineChunk, EngineRequest, SamplingSpec
from serving.engines.sim import SimEngine
from serving.gateway.pool_directory import PoolDirectory, PoolRef, pool_info
from serving.gateway.transport import ChannelTransport
from serving.hardware.catalog import get_gpu
from serving.hardware.perfmodel import ModelArch
from serving.hardware.plan import EngineSettings
from serving.kvcache import (
    DEFAULT_NONE_HASH_SEED,
    BlockHasher,
    BlockPool,
    CachedBlocks,
    CacheEventLog,
    CacheRuns,
    block_key,
)
from serving.pools.host import ReplicaHost
from serving.pools.replica import build_engine
from serving.routing._prefix import PrefixIndex, PrefixRouter

pytestmark = pytest.mark.timeout(60)
LLAMA8B = ModelArch("llama-8b", 8_030_261_248, 32, 4096, 32, 8, 128, 14336, 128256, 2)


async def until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.005)


def test_the_block_pools_events_add_up_to_its_content() -> None:
    """Random allocate / cache / free traffic: what the events say equals what the pool holds."""
    rng = random.Random(3)
    pool = BlockPool(12, 16)
    pool.events = CacheEventLog()
    mirror = CachedBlocks()
    live: list[list[int]] = []
    for step in range(400):
        if live and (rng.random() < 0.5 or pool.num_free < 3):
            pool.free(live.pop(rng.randrange(len(live))))
        else:
            n = rng.randint(1, 3)
            blocks = pool.allocate(n)
            hashes = [bytes([rng.randrange(20)]) * 32 for _ in range(n)]
            pool.cache(blocks, hashes, 0, n)
            live.append(blocks)
        if step % 7 == 0:
            mirror.apply(*pool.events.drain())
            assert all(block_key(h) in mirror for h in pool.by_hash)
            assert len(mirror) == pool.num_cached
    assert pool.stats.evicted_blocks > 0  # evictions were reported, not only stores


def test_the_index_follows_events_and_a_snapshot_replaces_it() -> None:
    idx = PrefixIndex(4)
    a, b, c, d, e = (bytes([i]) * 32 for i in range(5))
    idx.record("r1", [a, b])
    idx.apply("r1", [(True, [c]), (False, [a])])
    assert idx.match("r1", [b]) == 1 and idx.match("r1", [a]) == 0 and idx.num_blocks("r1") == 2
    idx.apply("r1", [(True, [a, d, e])])  # past capacity: the oldest (b) goes
    assert idx.num_blocks("r1") == 4 and idx.match("r1", [b]) == 0
    idx.apply("r1", [(True, [e])], cleared=True)
    assert idx.num_blocks("r1") == 1 and idx.match("r1", [e]) == 1
    log = CacheEventLog()
    log.add(True, [a])
    log.add(True, [b])
    log.add(False, [a])
    assert log.drain() == ([(True, [a, b]), (False, [a])], False) and not log


def _sim_host() -> tuple[SimEngine, ReplicaHost]:
    engine = SimEngine(
        LLAMA8B, get_gpu("H100"), EngineSettings(8, 1024, 0.9), speedup=50, eos_mean_tokens=None
    )
    admission = AsyncAdmission(AdmissionCore(AdmissionSettings().for_engine(8, 1_000_000, 2000, 100)))
    return engine, ReplicaHost(engine, admission, "127.0.0.1", "replica-1")


async def _run(transport: ChannelTransport, rid: str, tokens: list[int]) -> EngineChunk:
    stream = transport.submit(
        "replica-1", EngineRequest(rid, tokens, SamplingSpec(max_tokens=2, ignore_eos=True))
    )
    last = None
    try:
        while last is None or not last.finished:
            for item in await stream.next_batch():
                last = item
    finally:
        stream.close()
    return last


async def test_a_replica_relays_its_engines_cache_to_every_gateway_and_a_late_one_gets_a_snapshot() -> None:
    engine, host = _sim_host()
    await engine.start()
    addr = await host.start()
    got: dict[str, list[tuple[str, CacheRuns, bool]]] = {"gw-a": [], "gw-b": []}
    gw_a = ChannelTransport("gw-a")
    gw_a.on_cache = lambda key, runs, cleared: got["gw-a"].append((key, runs, cleared))
    gw_a.sync([("replica-1", *addr)])
    await until(lambda: gw_a.usable("replica-1"))
    system = list(range(5000, 5000 + 16 * 20))  # 20 full blocks
    hashes = [block_key(h) for h in BlockHasher(16).block_hashes(system)]
    router_a = PrefixRouter(16, 100_000)
    for key, runs, cleared in got["gw-a"]:  # the (empty) snapshot on connect
        router_a.index.apply(key, runs, cleared)
    gw_a.on_cache = lambda key, runs, cleared: router_a.index.apply(key, runs, cleared)
    try:
        await _run(gw_a, "a-1", [*system, 1])
        # Gateway A never recorded a routing decision: its index holds the blocks because the
        # engine said it stored them.
        await until(lambda: router_a.index.match("replica-1", hashes) == 20)
        # Gateway B connects later: the snapshot says what the replica holds.
        gw_b = ChannelTransport("gw-b")
        router_b = PrefixRouter(16, 100_000)
        gw_b.on_cache = lambda key, runs, cleared: router_b.index.apply(key, runs, cleared)
        gw_b.sync([("replica-1", *addr)])
        await until(lambda: router_b.index.match("replica-1", hashes) == 20)
        choice = router_b.choose(["replica-1", "replica-2"], {}, [*system, 2], random.Random(0))
        assert choice is not None and choice.replica == "replica-1" and choice.cached_tokens == 320
        last = await _run(gw_b, "b-1", [*system, 2])
        assert last.cached_tokens == 320  # the engine agrees with the prediction
        await gw_b.close()
    finally:
        await gw_a.close()
        await host.close()
        await engine.shutdown()


def test_the_router_hashes_as_the_started_engines_say(tmp_path: Path) -> None:
    """The block size and NONE_HASH seed come from the engine (on the load board); a config that
    assumed otherwise is corrected, so predictions and the engine's events keep one naming."""
    cfg = parse_config(
        {
            "models": {"llama-3.1-8b-instruct": {"tokenizer": "builtin:tiny-llama"}},
            "state_dir": str(tmp_path),
            "pools": [
                {
                    "name": "sim-h100",
                    "model": "llama-3.1-8b-instruct",
                    "accelerator": "H100",
                    "engine": "sim",
                    "replicas": 2,  # a choice to make: routed by cached prefix
                }
            ],
        }
    )
    pool = resolve(cfg).pools[0]
    assert pool.prefix_routed
    one = resolve(cfg.model_copy(update={"pools": [cfg.pools[0].model_copy(update={"replicas": 1})]}))
    assert not one.pools[0].prefix_routed  # one replica, one pool: nothing to choose, nothing hashed
    assert build_engine(pool).prefix_hashing() == (16, DEFAULT_NONE_HASH_SEED)
    ref = PoolRef(pool.name, pool.model, pool.accelerator, 1, None, pool.slo.ttft_ms, pool.slo.tpot_ms)
    directory = PoolDirectory([ref], [pool_info(pool)], ChannelTransport("gw"))
    before = directory.prefix["sim-h100"]
    directory._follow_engine_hashing("sim-h100", [{"prefix_hashing": (16, DEFAULT_NONE_HASH_SEED)}])
    assert directory.prefix["sim-h100"] is before  # as configured: nothing to do
    directory._follow_engine_hashing("sim-h100", [{}, {"prefix_hashing": (128, "7")}])
    after = directory.prefix["sim-h100"]
    assert (after.block_tokens, after.none_hash_seed) == (128, "7")
    assert after.index.capacity_blocks * 128 == pytest.approx(before.index.capacity_blocks * 16, abs=128)
    assert after.keys(list(range(256))) == [
        block_key(h) for h in BlockHasher(128, none_hash_seed="7").block_hashes(list(range(256)))
    ]
