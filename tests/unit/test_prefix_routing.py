"""Prefix-aware replica choice: the estimated index, following a conversation, the load bound and
spill, and the gateway's view of a pool's prefix cache."""

from __future__ import annotations

import random

import pytest

from serving.config import parse_config, resolve
from serving.gateway.pool_directory import pool_info
from serving.routing import PrefixIndex, PrefixRouter, ReplicaReason

R = ["r0", "r1", "r2", "r3"]


def test_index_matches_leading_blocks_and_evicts_lru() -> None:
    idx = PrefixIndex(capacity_blocks=4)
    a, b, c = [bytes([1]) * 32, bytes([2]) * 32], [bytes([3]) * 32, bytes([4]) * 32], [bytes([5]) * 32]
    idx.record("r0", a)
    idx.record("r0", b)
    assert idx.match("r0", [*a, *b]) == 4 and idx.match("r0", b) == 2 and idx.match("r1", a) == 0
    assert idx.match("r0", [a[0], c[0], a[1]]) == 1  # leading blocks only
    idx.record("r0", a)  # a is now the most recent; c evicts b's first block
    idx.record("r0", c)
    assert idx.num_blocks("r0") == 4 and idx.match("r0", b) == 0 and idx.match("r0", a) == 2
    idx.forget("r0")
    assert idx.match("r0", a) == 0
    with pytest.raises(ValueError):
        PrefixIndex(0)


def test_a_conversation_follows_its_cache_and_new_prompts_balance() -> None:
    router = PrefixRouter(16, 100_000)
    rng = random.Random(0)
    system = list(range(1000, 3000))
    load = dict.fromkeys(R, 0)
    first = router.choose(R, load, [*system, *range(5000, 5100)], rng)
    assert first is not None and first.reason is ReplicaReason.LEAST_LOADED and first.cached_tokens == 0
    load[first.replica] += 1
    # The next turn (previous prompt + answer + user message) goes where its prefix is.
    turn2 = router.choose(R, load, [*system, *range(5000, 5100), *range(9000, 9250)], rng)
    assert turn2 is not None and turn2.replica == first.replica and turn2.reason is ReplicaReason.PREFIX_HIT
    assert turn2.cached_tokens == 2096  # 131 full blocks of the 2,100-token previous prompt
    # A prompt that is exactly 4 blocks can reuse at most 3 (the last token is always computed).
    router.choose(["r1"], {}, list(range(64)), rng)
    again = router.choose(R, dict.fromkeys(R, 0), list(range(64)), rng)
    assert again is not None and again.replica == "r1" and again.cached_tokens == 48
    assert router.stats.requests == 4 and router.stats.by_reason == {"least_loaded": 2, "prefix_hit": 2}


def test_a_hot_prefix_spills_past_the_load_bound() -> None:
    router = PrefixRouter(16, 100_000, load_bound=1.25, load_slack=2)
    rng = random.Random(1)
    hot = list(range(2000))
    router.index.record("r0", router.keys(hot))
    busy = {"r0": 10, "r1": 2, "r2": 2, "r3": 2}  # bound: 1.25 x 17 / 4 + 2 = 7.3 < 11
    c = router.choose(R, busy, [*hot, 1, 2, 3], rng)
    assert c is not None and c.replica != "r0" and c.reason is ReplicaReason.SPILL
    # The spilled replica now holds the prefix too: the next one can hit there under the bound.
    c2 = router.choose(R, {**busy, c.replica: 3}, [*hot, 4, 5, 6], rng)
    assert c2 is not None and c2.replica == c.replica and c2.reason is ReplicaReason.PREFIX_HIT
    # Prefix-only routing ignores load.
    only = PrefixRouter(16, 100_000, load_bound=float("inf"))
    only.index.record("r0", only.keys(hot))
    c3 = only.choose(R, {**busy, "r0": 1000}, [*hot, 7], rng)
    assert c3 is not None and c3.replica == "r0"
    with pytest.raises(ValueError):
        PrefixRouter(16, 10, load_bound=0.5)


def test_pool_info_reads_the_engines_prefix_cache() -> None:
    model = "llama-3.1-8b-instruct"
    cfg = parse_config(
        {
            "models": {model: {"tokenizer": "builtin:tiny-llama"}},
            "pools": [
                {"name": "h", "model": model, "accelerator": "H100", "engine": "sim"},
                {
                    "name": "off",
                    "model": model,
                    "accelerator": "H100",
                    "engine": "sim",
                    "engine_args": {"enable_prefix_caching": False, "block_size": 32},
                },
            ],
        }
    )
    on, off = (pool_info(p) for p in resolve(cfg).pools)
    assert on.prefix_caching and on.block_tokens == 16 and on.kv_capacity_tokens > 100_000
    assert not off.prefix_caching and off.block_tokens == 32
