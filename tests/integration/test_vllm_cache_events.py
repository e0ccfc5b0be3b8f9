"""vLLM's own KV-cache events, from the real engine (the CPU build, the tiny model) in this process:
the engine publishes them on the private ipc socket the adapter configured, the adapter decodes
them, and the block hashes are the ones :class:`~serving.kvcache.BlockHasher` computes for the
prompt (in vLLM's 64-bit event form, :func:`~serving.kvcache.block_key`), in the engine's block size
(128 on the CPU build), with and without a ``cache_salt``. That
is what lets the gateway's prefix index be fed by the engine (issue 17).

Alone: ``pytest tests/integration/test_vllm_cache_events.py`` (about 40 s, most of it the engine's
start)."""

from __future__ import annotations

import asyncio

import pytest

from serving.engines.base import EngineRequest, SamplingSpec
from serving.engines.vllm_engine import VllmEngine
from serving.kvcache import (
    BlockHasher,
    CachedBlocks,
    CacheRuns,
    block_key,
    organization_cache_salt,
    vllm_none_hash_seed,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


async def test_vllm_publishes_the_block_hashes_the_gateway_computes(tiny_model_path: str) -> None:
    engine = VllmEngine(tiny_model_path, "tiny-llama", 1024, {"kv_cache_space_gib": 1, "max_num_seqs": 4})
    await engine.start()
    got: list[tuple[CacheRuns, bool]] = []
    cache = CachedBlocks()

    def sink(runs: CacheRuns, cleared: bool) -> None:
        got.append((runs, cleared))
        cache.apply(runs, cleared)

    try:
        assert engine.watch_cache(sink)
        assert engine.prefix_hashing() == (128, vllm_none_hash_seed())  # what the board tells routers
        hasher = BlockHasher(128, none_hash_seed=vllm_none_hash_seed())
        prompt = [(7 * i) % 500 + 3 for i in range(300)]  # two full 128-token blocks
        salt = organization_cache_salt("acme")
        for rid, cache_salt in (("plain", None), ("salted", salt)):
            req = EngineRequest(
                rid, prompt, SamplingSpec(max_tokens=2, ignore_eos=True), cache_salt=cache_salt
            )
            async for _chunk in engine.generate(req):
                pass
            want = [block_key(h) for h in hasher.block_hashes(prompt, cache_salt=cache_salt)]
            assert len(want) == 2
            async with asyncio.timeout(20):
                while not all(h in cache for h in want):
                    await asyncio.sleep(0.05)
        plain = [block_key(h) for h in hasher.block_hashes(prompt)]
        salted = [block_key(h) for h in hasher.block_hashes(prompt, cache_salt=salt)]
        assert not set(plain) & set(salted)  # the salt keeps the two apart in the engine too
        stored = [h for runs, _ in got for ok, hs in runs if ok for h in hs]
        assert set(plain) | set(salted) <= set(stored)
        # A repeat of the salted prompt hits the salted blocks (one block: vLLM recomputes the last).
        again = EngineRequest("again", prompt, SamplingSpec(max_tokens=1, ignore_eos=True), cache_salt=salt)
        chunks = [c async for c in engine.generate(again)]
        assert chunks[-1].cached_tokens == 256
    finally:
        await engine.shutdown()
