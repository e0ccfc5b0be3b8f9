"""Prefix-aware replica choice: send a prompt where its prefix is already in the KV cache, within a
load bound.

The gateway hashes each prompt in the engine's block size exactly as vLLM does
(:class:`~serving.kvcache.BlockHasher`) and keeps, per replica, an *estimate* of the blocks that
replica holds: the prompts it routed there, most recent last, evicted LRU beyond the replica's KV
capacity (from the performance model), corrected by the replica's own KV-cache events where its
engine publishes them (:meth:`PrefixIndex.apply`: vLLM's ``BlockStored``/``BlockRemoved``, the
simulated engine's alike): what other gateways routed there is then in it too, and so are
evictions. A routed prompt is recorded at once (its events come a step or more later).

The choice among a pool's usable replicas (``load``: this gateway's open requests on each):

1. *eligible*: replicas whose load with this request stays within
   ``load_bound x mean + load_slack`` (the mean over the candidates, this request included), so a
   hot prefix never piles onto one replica: it spills to the next best;
2. among them, the one whose cache holds the longest prefix of the prompt (ties: less load, then
   random); the predicted TTFT there counts only the uncached tokens;
3. no eligible replica holds any of it: the less loaded of two random ones (power of two choices,
   what cache-blind routing does).

Pure: no clock, no I/O; the random generator is passed in.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from serving.kvcache import DEFAULT_NONE_HASH_SEED, BlockHasher, block_key
from serving.routing._replica import pick_replica

__all__ = [
    "PrefixIndex",
    "PrefixRouter",
    "PrefixRoutingStats",
    "PromptBlocks",
    "ReplicaChoice",
    "ReplicaReason",
]


@dataclass(slots=True)
class PromptBlocks:
    """One request's prompt and its block keys, hashed once per way of hashing (block size and
    seed) however many pools and replicas look at it."""

    token_ids: Sequence[int]
    cache_salt: str | None = None
    keys: dict[tuple[int, str], list[int]] = field(default_factory=dict)


class PrefixIndex:
    """Per replica, the blocks it is estimated to hold (by :func:`~serving.kvcache.block_key`, as
    vLLM's KV-cache events name them), LRU within ``capacity_blocks``."""

    __slots__ = ("_blocks", "capacity_blocks")

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._blocks: dict[str, OrderedDict[Hashable, None]] = {}

    def match(self, replica: str, hashes: Sequence[Hashable]) -> int:
        """How many leading ``hashes`` the replica holds."""
        blocks = self._blocks.get(replica)
        if not blocks:
            return 0
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def record(self, replica: str, hashes: Sequence[Hashable]) -> None:
        """The replica now holds ``hashes`` (most recently used); the oldest beyond capacity go."""
        blocks = self._blocks.setdefault(replica, OrderedDict())
        for h in hashes:
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)

    def apply(
        self, replica: str, runs: Sequence[tuple[bool, Sequence[Hashable]]], cleared: bool = False
    ) -> None:
        """The replica's own KV-cache events: blocks stored (most recently used) and removed, in
        order, after emptying it if ``cleared``."""
        blocks = self._blocks.setdefault(replica, OrderedDict())
        if cleared:
            blocks.clear()
        for stored, hashes in runs:
            if stored:
                for h in hashes:
                    if h in blocks:
                        blocks.move_to_end(h)
                    else:
                        blocks[h] = None
            else:
                for h in hashes:
                    blocks.pop(h, None)
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)

    def forget(self, replica: str) -> None:
        """The replica is gone (or restarted): nothing is cached there."""
        self._blocks.pop(replica, None)

    def num_blocks(self, replica: str) -> int:
        return len(self._blocks.get(replica, ()))


class ReplicaReason(StrEnum):
    """Why a replica was chosen (bounded: safe as a metric label)."""

    PREFIX_HIT = "prefix_hit"
    """The eligible replica holding the longest prefix."""
    SPILL = "spill"
    """A replica with a longer cached prefix was over the load bound; this is the best under it."""
    LEAST_LOADED = "least_loaded"
    """No eligible replica holds any of the prompt: power of two choices by load."""


@dataclass(frozen=True, slots=True)
class ReplicaChoice:
    replica: str
    reason: ReplicaReason
    cached_tokens: int
    """Prompt tokens predicted to be in that replica's cache."""


@dataclass(slots=True)
class PrefixRoutingStats:
    """Plain counters (reasons are a bounded set)."""

    requests: int = 0
    prompt_tokens: int = 0
    predicted_cached_tokens: int = 0
    cache_events: int = 0
    """KV-cache event frames from the pool's replicas applied to the index."""
    by_reason: dict[str, int] | None = None

    def count(self, choice: ReplicaChoice, prompt_tokens: int) -> None:
        self.requests += 1
        self.prompt_tokens += prompt_tokens
        self.predicted_cached_tokens += choice.cached_tokens
        if self.by_reason is None:
            self.by_reason = {}
        self.by_reason[choice.reason.value] = self.by_reason.get(choice.reason.value, 0) + 1


class PrefixRouter:
    """Prefix-aware replica choice for one pool (see module docstring)."""

    __slots__ = ("block_tokens", "hasher", "index", "load_bound", "load_slack", "none_hash_seed", "stats")

    def __init__(
        self,
        block_tokens: int,
        capacity_blocks: int,
        *,
        load_bound: float = 1.25,
        load_slack: int = 2,
        none_hash_seed: str = DEFAULT_NONE_HASH_SEED,
    ) -> None:
        """``load_bound`` (>= 1) x mean load + ``load_slack`` requests is the most one replica may
        have with this request; ``float("inf")`` routes on the prefix alone."""
        if load_bound < 1 or load_slack < 0:
            raise ValueError(f"need load_bound >= 1 and load_slack >= 0, got {load_bound}, {load_slack}")
        self.block_tokens = block_tokens
        self.none_hash_seed = none_hash_seed
        self.hasher = BlockHasher(block_tokens, none_hash_seed=none_hash_seed)
        self.index = PrefixIndex(capacity_blocks)
        self.load_bound = load_bound
        self.load_slack = load_slack
        self.stats = PrefixRoutingStats()

    def keys(self, prompt_token_ids: Sequence[int], cache_salt: str | None = None) -> list[int]:
        """The prompt's full blocks as the index names them (vLLM's event form of each hash)."""
        return [block_key(h) for h in self.hasher.block_hashes(prompt_token_ids, cache_salt=cache_salt)]

    def _usable(self, blocks: PromptBlocks) -> tuple[list[int], list[int]]:
        """The prompt's keys, and those a hit may cover (vLLM recomputes at least the last token)."""
        k = (self.block_tokens, self.none_hash_seed)
        hashes = blocks.keys.get(k)
        if hashes is None:
            hashes = blocks.keys[k] = self.keys(blocks.token_ids, blocks.cache_salt)
        return hashes, hashes[: (len(blocks.token_ids) - 1) // self.block_tokens]

    def cached_tokens(self, candidates: Sequence[str], blocks: PromptBlocks) -> int:
        """The longest cached prefix of the prompt on any of ``candidates`` (tokens); no effect."""
        _, usable = self._usable(blocks)
        return max((self.index.match(c, usable) for c in candidates), default=0) * self.block_tokens

    def choose(
        self,
        candidates: Sequence[str],
        load: Mapping[str, int],
        prompt_token_ids: Sequence[int] | PromptBlocks,
        rng: random.Random,
        *,
        cache_salt: str | None = None,
    ) -> ReplicaChoice | None:
        """A replica for this prompt (None without candidates); the choice is recorded in the index.
        ``prompt_token_ids`` may come as :class:`PromptBlocks` (then its salt and hashes are used)."""
        if not candidates:
            return None
        blocks = (
            prompt_token_ids
            if isinstance(prompt_token_ids, PromptBlocks)
            else PromptBlocks(prompt_token_ids, cache_salt)
        )
        hashes, usable = self._usable(blocks)
        loads = {c: load.get(c, 0) for c in candidates}
        bound = self.load_bound * (sum(loads.values()) + 1) / len(candidates) + self.load_slack
        hits = {c: self.index.match(c, usable) for c in candidates}
        eligible = [c for c in candidates if loads[c] + 1 <= bound] or [
            min(candidates, key=loads.__getitem__)
        ]
        best = max(eligible, key=lambda c: (hits[c], -loads[c], rng.random()))
        spilled = max(hits.values()) > hits[best]
        if hits[best] == 0:
            picked = pick_replica(eligible, loads, rng)
            assert picked is not None
            choice = ReplicaChoice(picked, ReplicaReason.SPILL if spilled else ReplicaReason.LEAST_LOADED, 0)
        else:
            reason = ReplicaReason.SPILL if spilled else ReplicaReason.PREFIX_HIT
            choice = ReplicaChoice(best, reason, hits[best] * self.block_tokens)
        self.index.record(choice.replica, hashes)
        self.stats.count(choice, len(blocks.token_ids))
        return choice
