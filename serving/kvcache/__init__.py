"""The KV cache as vLLM's automatic prefix caching sees it: chained block hashes of prompt token ids,
and a block pool with LRU eviction. Pure (no I/O, no clock): the simulated engine runs on it, and
routing can hash prompts the way the engine does."""

from serving.kvcache._hash import (
    DEFAULT_NONE_HASH_SEED,
    BlockHash,
    BlockHasher,
    organization_cache_salt,
    vllm_none_hash_seed,
)
from serving.kvcache._pool import BlockPool, PrefixCacheStats

__all__ = [
    "DEFAULT_NONE_HASH_SEED",
    "BlockHash",
    "BlockHasher",
    "BlockPool",
    "PrefixCacheStats",
    "organization_cache_salt",
    "vllm_none_hash_seed",
]
