"""The simulator's and router's block hashes against vLLM's own functions (imports vLLM: ~10 s)."""

from __future__ import annotations

import random

import pytest

from serving.kvcache import BlockHasher

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("block_size", [16, 128])
def test_block_hashes_equal_vllms_own(block_size: int) -> None:
    kv = pytest.importorskip("vllm.v1.core.kv_cache_utils")
    from vllm.utils.hashing import sha256

    kv.init_none_hash(sha256)
    rng = random.Random(block_size)
    tokens = [rng.randrange(128_256) for _ in range(5 * block_size + 7)]
    for salt in (None, "org-a"):
        want, parent = [], None
        for i in range(5):
            extra = (("cache_salt", salt),) if i == 0 and salt else None
            parent = kv.hash_block_tokens(
                sha256, parent, tokens[i * block_size : (i + 1) * block_size], extra
            )
            want.append(bytes(parent))
        got = BlockHasher(block_size, none_hash_seed=kv.get_none_hash_seed()).block_hashes(
            tokens, cache_salt=salt
        )
        assert got == want
