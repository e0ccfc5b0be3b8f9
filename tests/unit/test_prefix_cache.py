"""Prefix caching: vLLM's block hashes bit for bit, the block pool's LRU, the simulated scheduler's
hits (they skip prefill), the engine's timing and counters, and their export as vllm:* metrics."""

from __future__ import annotations

import asyncio

import pytest

from serving.engines._sim_sched import SeqStatus, SimScheduler, SimSeq
from serving.engines.base import EngineRequest, SamplingSpec
from serving.engines.sim import FakeClock, SimEngine
from serving.hardware.catalog import get_gpu
from serving.hardware.perfmodel import ModelArch, PerfModel
from serving.hardware.plan import EngineSettings
from serving.kvcache import BlockHasher, BlockPool, PrefixCacheStats, vllm_none_hash_seed

# Computed with vLLM 0.32.0: init_none_hash(sha256); hash_block_tokens(sha256, parent, tokens, extra).
NONE_HASH = "066b1e8987e027138e98701c46128929378935f9b6cd1549105ae6b4f0d71198"
H_0_16 = "fe8fa5dda3210d0ca2031e37cbe3b001186773cd1c710beb2d45fcb51d434798"  # tokens 0..15
H_16_32 = "8be7aaa33831156d316f1f463ae57e643deb63f42e633e2d631df88815cc4629"  # 16..31, parent H_0_16
H_SALT = "b495739404f5b8faf31eadccd1cfea70dca91741206167f2c0b9e12aee694fe3"  # 0..15, cache_salt "org-a"
H_128 = "92d2c2aeaa49cb9ea0489ce6ce08657c1acc6f7e1f518c086d546e1572338929"  # 1000..1127, block 128

LLAMA8B = ModelArch("llama-8b", 8_030_261_248, 32, 4096, 32, 8, 128, 14336, 128256, 2)
H100 = get_gpu("H100")


def test_block_hashes_are_vllms() -> None:
    h = BlockHasher(16)
    assert h.none_hash.hex() == NONE_HASH
    got = h.block_hashes(list(range(40)))  # two full blocks; the partial third has no hash
    assert [x.hex() for x in got] == [H_0_16, H_16_32]
    assert h.block_hashes(list(range(16)), cache_salt="org-a")[0].hex() == H_SALT
    assert BlockHasher(128).block_hashes(list(range(1000, 1128)))[0].hex() == H_128
    # Resuming from known parents gives the same chain; a salt changes every block after it.
    assert h.block_hashes(list(range(40)), parents=got[:1]) == got
    salted = h.block_hashes(list(range(40)), cache_salt="org-b")
    assert not set(salted) & set(got)
    assert vllm_none_hash_seed({}) == "vllm-none-hash"
    assert vllm_none_hash_seed({"PYTHONHASHSEED": "7"}) == "7"
    assert BlockHasher(16, none_hash_seed="7").block_hashes(list(range(16)))[0].hex() != H_0_16


def test_pool_reuses_cached_blocks_and_evicts_lru_tail_first() -> None:
    pool = BlockPool(4, 16)
    hs = [bytes([i]) * 32 for i in range(6)]
    a = pool.allocate(2)
    pool.cache(a, hs[:2], 0, 2)
    pool.free(a)  # tail first: a[1] (the chain's end) is evicted before a[0]
    assert pool.num_free == 4 and pool.num_cached == 2
    assert pool.longest_hit(hs[:3], 3) == a  # the third hash is not cached
    assert pool.longest_hit(hs[:2], 1) == a[:1]  # capped
    b = pool.allocate(2)  # the two never-used blocks come first
    assert not set(b) & set(a) and pool.num_cached == 2
    c = pool.allocate(1)
    assert c == [a[1]] and pool.longest_hit(hs[:2], 2) == a[:1]  # evicted the chain's end
    assert pool.stats.evicted_blocks == 1
    pool.touch(a[:1])  # a hit takes a free cached block out of the queue
    assert pool.num_free == 0
    with pytest.raises(ValueError, match="1 blocks asked, 0 free"):
        pool.allocate(1)
    # A hash already cached elsewhere stays with its first block.
    pool.cache(b, [hs[0], hs[5]], 0, 2)
    assert pool.by_hash[hs[0]] == a[0] and pool.by_hash[hs[5]] == b[1]


def seq(hashes: list[bytes], prompt: int, max_tokens: int = 4) -> SimSeq:
    return SimSeq(owner=None, index=0, prompt_len=prompt, max_tokens=max_tokens, block_hashes=hashes)


def test_a_shared_prefix_skips_its_prefill() -> None:
    h = BlockHasher(16)
    system = list(range(5000, 5100))  # 100 tokens: 6 full blocks
    p1, p2 = [*system, 1, 2, 3], system + [7] * 40
    s = SimScheduler(max_num_seqs=4, max_num_batched_tokens=512, kv_capacity_tokens=16 * 64)
    first, second = seq(h.block_hashes(p1), len(p1)), seq(h.block_hashes(p2), len(p2))
    s.add(first)
    b = s.schedule()
    assert b.prefill_tokens == 103 and b.prefill_context_tokens == 0
    s.postprocess(b)
    s.add(second)
    b = s.schedule()  # first decodes; second's 96 cached tokens are not computed again
    assert (b.decode_seqs, b.prefill_tokens, b.prefill_context_tokens) == (1, 140 - 96, 96)
    assert second.cached_tokens == 96 and second.num_computed == 96
    st = s.prefix_cache_stats
    assert (st.requests, st.queries, st.hits) == (2, 103 + 140, 96)
    assert st.hit_rate == pytest.approx(96 / 243)
    while s.has_work():
        s.postprocess(s.schedule())
    assert s.free_blocks == s.num_blocks and s.pool.num_cached > 0


def test_a_whole_prompt_hit_still_computes_its_last_block_token() -> None:
    h = BlockHasher(16)
    p = list(range(64))  # exactly 4 blocks: at most (64 - 1) // 16 = 3 are reused
    s = SimScheduler(max_num_seqs=4, max_num_batched_tokens=512, kv_capacity_tokens=16 * 64)
    for _ in range(2):
        s.add(seq(h.block_hashes(p), 64, max_tokens=1))
        b = s.schedule()
        s.postprocess(b)
    assert (b.prefill_tokens, b.prefill_context_tokens) == (16, 48)
    assert s.prefix_cache_stats.hits == 48


def test_cached_prefixes_are_evicted_lru_within_capacity() -> None:
    h = BlockHasher(16)
    prompts = [list(range(k * 1000, k * 1000 + 64)) for k in range(3)]  # 4 blocks each
    s = SimScheduler(max_num_seqs=1, max_num_batched_tokens=512, kv_capacity_tokens=16 * 10)
    for p in prompts:  # each finishes before the next: 10 blocks hold two prompts' 5 (4 + output)
        s.add(seq(h.block_hashes(p), 64, max_tokens=2))
        while s.has_work():
            s.postprocess(s.schedule())
    assert s.prefix_cache_stats.evicted_blocks > 0
    again = [seq(h.block_hashes(p), 64, max_tokens=1) for p in (prompts[2], prompts[0])]
    for q in again:
        s.add(q)
        while s.has_work():
            s.postprocess(s.schedule())
    assert again[0].cached_tokens == 48  # the newest prompt is still cached
    assert again[1].cached_tokens < 48  # the oldest was evicted (at least its tail)


def test_disabled_cache_and_preempted_lookups() -> None:
    h = BlockHasher(16)
    p = list(range(64))
    off = SimScheduler(
        max_num_seqs=2, max_num_batched_tokens=512, kv_capacity_tokens=1024, enable_prefix_caching=False
    )
    for _ in range(2):
        off.add(seq(h.block_hashes(p), 64, max_tokens=1))
        while off.has_work():
            off.postprocess(off.schedule())
    assert off.prefix_cache_stats.hits == 0 and off.pool.num_cached == 0
    # Tight KV: the second sequence is preempted; on re-admission it finds its own blocks again,
    # counted apart from first lookups as vLLM does.
    s = SimScheduler(max_num_seqs=2, max_num_batched_tokens=256, kv_capacity_tokens=16 * 9)
    a, b = seq(h.block_hashes(p), 64, max_tokens=40), seq(h.block_hashes(list(range(500, 564))), 64, 40)
    s.add(a)
    s.add(b)
    while s.has_work():
        s.postprocess(s.schedule())
    assert s.num_preemptions > 0 and a.status is b.status is SeqStatus.FINISHED
    st = s.prefix_cache_stats
    assert st.requests == 2 and st.queries == 128
    assert st.preempted_queries > 0 and st.preempted_hits > 0


def req(rid: str, tokens: list[int], max_tokens: int = 1) -> EngineRequest:
    return EngineRequest(rid, tokens, SamplingSpec(max_tokens=max_tokens, ignore_eos=True))


async def test_engine_ttft_counts_only_uncached_tokens_and_reports_its_counters() -> None:
    clock = FakeClock(0.0)
    engine = SimEngine(LLAMA8B, H100, EngineSettings(8, 1024, 0.9), clock=clock, eos_mean_tokens=None)
    await engine.start()
    perf = PerfModel(LLAMA8B, H100)
    system = list(range(10_000, 12_000))  # a 2,000-token system prompt: 125 blocks

    async def ttft(rid: str, tokens: list[int]) -> float:
        t0 = clock.now()
        stream = engine.generate(req(rid, tokens))
        task = asyncio.get_running_loop().create_task(anext(stream))
        while not task.done():
            for _ in range(20):
                await asyncio.sleep(0)
            if not task.done():
                clock.advance_to_next()
        await stream.aclose()
        return clock.now() - t0

    cold = await ttft("a", [*system, 1, 2, 3])
    warm = await ttft("b", [*system, 9, 9, 9, 9])
    assert cold == pytest.approx(perf.chunked_prefill_time_s(2003, 1024))
    assert warm == pytest.approx(perf.chunked_prefill_time_s(2004, 1024, cached_tokens=2000))
    assert warm < cold / 5
    st = engine.prefix_cache_stats()
    assert st == PrefixCacheStats(requests=2, queries=4007, hits=2000)
    assert st is not engine.stats.prefix_cache  # a copy, safe to ship
    off = SimEngine(LLAMA8B, H100, EngineSettings(8, 1024, 0.9), clock=clock, enable_prefix_caching=False)
    assert off.prefix_cache_stats() is None
    await engine.shutdown()
