"""What an engine's prefix cache gained and lost, as vLLM's KV-cache events say it: blocks stored
(named by their chained hashes) and removed, in order, and "everything cleared".

:class:`CacheEventLog` collects them where they happen (the simulated engine's block pool, or the
decoded ``BlockStored``/``BlockRemoved``/``AllBlocksCleared`` of vLLM's publisher) as *runs*: in
order, ``(stored, hashes)`` with consecutive events of one kind merged. :class:`CachedBlocks` is
what a set of runs adds up to, so that a pool replica can hand a gateway that connects late the
whole current content (a snapshot) before the news. Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from serving.kvcache._hash import BlockKey

__all__ = ["CacheEventLog", "CacheRuns", "CachedBlocks"]

CacheRuns = list[tuple[bool, list[BlockKey]]]
"""``(stored, keys)`` in order: True, the blocks were stored (cached); False, removed (evicted).
Blocks are named by :func:`~serving.kvcache.block_key` of their hash, as vLLM's events name them."""


class CacheEventLog:
    """Events since the last :meth:`drain`, merged into runs."""

    __slots__ = ("_runs", "cleared")

    def __init__(self) -> None:
        self._runs: CacheRuns = []
        self.cleared = False
        """Everything was cleared (the runs that follow apply to an empty cache)."""

    def __bool__(self) -> bool:
        return bool(self._runs) or self.cleared

    def add(self, stored: bool, hashes: Iterable[BlockKey]) -> None:
        if self._runs and self._runs[-1][0] is stored:
            self._runs[-1][1].extend(hashes)
        else:
            self._runs.append((stored, list(hashes)))

    def clear(self) -> None:
        self._runs = []
        self.cleared = True

    def drain(self) -> tuple[CacheRuns, bool]:
        """The runs and the cleared flag, and start over."""
        out = self._runs, self.cleared
        self._runs, self.cleared = [], False
        return out


class CachedBlocks:
    """The hashes a replica's cache holds, as its events add up (at most ``limit``: past it the
    oldest are dropped, so a peer that never removes cannot grow it without bound)."""

    __slots__ = ("_blocks", "limit")

    def __init__(self, limit: int = 1_000_000) -> None:
        self._blocks: dict[BlockKey, None] = {}
        self.limit = limit

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, h: object) -> bool:
        return h in self._blocks

    def apply(self, runs: Sequence[tuple[bool, Sequence[BlockKey]]], cleared: bool = False) -> None:
        blocks = self._blocks
        if cleared:
            blocks.clear()
        for stored, hashes in runs:
            if stored:
                for h in hashes:
                    blocks.pop(h, None)
                    blocks[h] = None
            else:
                for h in hashes:
                    blocks.pop(h, None)
        while len(blocks) > self.limit:
            del blocks[next(iter(blocks))]

    def snapshot(self) -> CacheRuns:
        """Runs that rebuild this content from an empty cache (with ``cleared``)."""
        return [(True, list(self._blocks))] if self._blocks else []
