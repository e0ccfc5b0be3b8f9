"""The KV cache as vLLM's automatic prefix caching sees it: chained block hashes of prompt token ids,
and a block pool with LRU eviction. Pure (no I/O, no clock): the simulated engine runs on it, and
routing can hash prompts the way the engine does, and follow what an engine's cache holds by its
KV-cache events (:class:`CacheEventLog`, :class:`CachedBlocks`)."""

from serving.kvcache._events import CachedBlocks, CacheEventLog, CacheRuns
from serving.kvcache._hash import (
    DEFAULT_NONE_HASH_SEED,
    BlockHash,
    BlockHasher,
    BlockKey,
    block_key,
    organization_cache_salt,
    vllm_none_hash_seed,
)
from serving.kvcache._pool import BlockPool, PrefixCacheStats

__all__ = [
    "DEFAULT_NONE_HASH_SEED",
    "BlockHash",
    "BlockHasher",
    "BlockKey",
    "BlockPool",
    "CacheEventLog",
    "CacheRuns",
    "CachedBlocks",
    "PrefixCacheStats",
    "block_key",
    "organization_cache_salt",
    "vllm_none_hash_seed",
]
