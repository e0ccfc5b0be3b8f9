"""A paged KV cache with automatic prefix caching, in the shape of vLLM v1's ``BlockPool``.

``num_blocks`` blocks of ``block_tokens`` tokens each. A block is held by the sequences using it
(``ref``), or free. Free blocks wait in one LRU queue (oldest first, as vLLM's
``FreeKVCacheBlockQueue``); a free block that still carries a hash keeps its content, so a later
prompt with that prefix takes it back (a *hit*) instead of recomputing it, until an allocation pops
it from the queue's head and its hash is dropped (*eviction*). Sequences free their blocks
tail-first, so the end of a chain is evicted before its start (a shared prefix outlives its
suffixes). Pure and synchronous: the simulated engine's scheduler drives it, and the counters are
plain data (:class:`PrefixCacheStats`, exported elsewhere as vLLM's ``vllm:prefix_cache_*``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from serving.kvcache._events import CacheEventLog
from serving.kvcache._hash import BlockHash, block_key

__all__ = ["BlockPool", "PrefixCacheStats"]


@dataclass(slots=True)
class PrefixCacheStats:
    """Prefix-cache counters, as vLLM's ``PrefixCacheStats`` (preempted requests kept apart)."""

    requests: int = 0
    """Requests (sequences) that looked their prompt up, on first admission."""
    queries: int = 0
    """Prompt tokens looked up (``vllm:prefix_cache_queries``)."""
    hits: int = 0
    """Of those, tokens found cached (``vllm:prefix_cache_hits``)."""
    preempted_queries: int = 0
    """Tokens looked up again by preempted sequences on re-admission (not in ``queries``)."""
    preempted_hits: int = 0
    evicted_blocks: int = 0
    """Cached blocks whose content was dropped to make room."""

    def record(self, num_tokens: int, num_hits: int, preempted: bool) -> None:
        if preempted:
            self.preempted_queries += num_tokens
            self.preempted_hits += num_hits
            return
        self.requests += 1
        self.queries += num_tokens
        self.hits += num_hits

    @property
    def hit_rate(self) -> float:
        """hits / queries (0 before any query)."""
        return self.hits / self.queries if self.queries else 0.0


class BlockPool:
    """Block allocation with a prefix cache keyed by chained block hashes (see module docstring)."""

    __slots__ = (
        "_free",
        "_hash",
        "_ref",
        "block_tokens",
        "by_hash",
        "enable_caching",
        "events",
        "num_blocks",
        "stats",
    )

    def __init__(self, num_blocks: int, block_tokens: int, *, enable_caching: bool = True) -> None:
        if num_blocks < 1 or block_tokens < 1:
            raise ValueError(f"num_blocks and block_tokens must be >= 1, got {num_blocks}, {block_tokens}")
        self.num_blocks = num_blocks
        self.block_tokens = block_tokens
        self.enable_caching = enable_caching
        self._ref = [0] * num_blocks
        self._hash: list[BlockHash | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        """Free blocks, least recently used first."""
        self.by_hash: dict[BlockHash, int] = {}
        """Cached content: hash -> the block holding it (in use or free)."""
        self.stats = PrefixCacheStats()
        self.events: CacheEventLog | None = None
        """Set (``CacheEventLog()``): every block named or evicted is logged, as vLLM's KV-cache
        events (``BlockStored``/``BlockRemoved``) report them."""

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take now (empty, or cached and unused: evictable)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks whose content is reusable by hash."""
        return len(self.by_hash)

    def longest_hit(self, hashes: Sequence[BlockHash], max_blocks: int) -> list[int]:
        """Blocks holding the longest cached prefix of ``hashes`` (at most ``max_blocks``); no effect."""
        if not self.enable_caching:
            return []
        out = []
        by_hash = self.by_hash
        for h in hashes[:max_blocks]:
            b = by_hash.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def evictable(self, blocks: Sequence[int]) -> int:
        """How many of ``blocks`` are free now (taking them back uses free capacity)."""
        ref = self._ref
        return sum(1 for b in blocks if ref[b] == 0)

    def touch(self, blocks: Sequence[int]) -> None:
        """Take cached blocks for a sequence that hit them."""
        ref, free = self._ref, self._free
        for b in blocks:
            if ref[b] == 0:
                del free[b]
            ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        """``n`` blocks from the LRU head, evicting cached content; ValueError if fewer are free."""
        if n > len(self._free):
            raise ValueError(f"{n} blocks asked, {len(self._free)} free")
        free, ref, hashes = self._free, self._ref, self._hash
        out = []
        for _ in range(n):
            b, _ = free.popitem(last=False)
            h = hashes[b]
            if h is not None:
                hashes[b] = None
                if self.by_hash.get(h) == b:
                    del self.by_hash[h]
                    if self.events is not None:
                        self.events.add(False, (block_key(h),))
                self.stats.evicted_blocks += 1
            ref[b] = 1
            out.append(b)
        return out

    def cache(self, blocks: Sequence[int], hashes: Sequence[BlockHash], start: int, end: int) -> None:
        """Name blocks ``start..end-1`` of a sequence (now full, computed) by their hashes.

        A hash already cached in another block keeps that block (as vLLM: the duplicate is not
        indexed and is freed as plain memory).
        """
        if not self.enable_caching:
            return
        by_hash, names = self.by_hash, self._hash
        for i in range(start, end):
            h = hashes[i]
            if h not in by_hash:
                by_hash[h] = blocks[i]
                names[blocks[i]] = h
                if self.events is not None:
                    self.events.add(True, (block_key(h),))

    def free(self, blocks: Sequence[int]) -> None:
        """Release a sequence's blocks, tail first (its chain's end is evicted before its start)."""
        ref, free = self._ref, self._free
        for b in reversed(blocks):
            ref[b] -= 1
            if ref[b] == 0:
                free[b] = None
