"""The simulated engine's continuous-batching scheduler: pure, synchronous and clock-free.

The shape of nano-vllm's ``scheduler.py`` and vLLM v1's token-budget scheduler: one token budget per
step (``max_num_batched_tokens``) shared by decodes and prefill chunks, running sequences first,
then waiting ones while there is budget, a free ``max_num_seqs`` slot and KV blocks. When a running
sequence needs a block and none is free, the most recently admitted running sequence is preempted
(recompute: its KV is dropped and it goes back to the front of the queue; prompt plus the output so
far is prefilled again). Nothing here knows about time: :meth:`schedule` returns a batch, the
caller prices it with the performance model, and :meth:`postprocess` applies it.

Blocks come from a :class:`~serving.kvcache.BlockPool` with vLLM's automatic prefix caching: a
sequence's full prompt blocks are named by their chained hashes (``SimSeq.block_hashes``) as they
are scheduled; a sequence admitted from the queue first takes the longest cached prefix of its
prompt (at most ``prompt - 1`` tokens, so the last token is always computed, as in vLLM), and
its prefill starts after it. Output tokens have no ids here, so output blocks are never cached.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from serving.hardware.perfmodel import chunk_attn_pairs
from serving.kvcache import BlockHash, BlockPool, PrefixCacheStats

__all__ = ["SeqStatus", "SimScheduler", "SimSeq", "StepBatch"]


class SeqStatus(Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass(slots=True, eq=False)
class SimSeq:
    """One sequence (one choice of a request)."""

    owner: Any
    """Opaque back-reference for the caller (the request's stream)."""
    index: int
    """Choice index within the request."""
    prompt_len: int
    max_tokens: int
    eos_after: int | None = None
    """Output length at which the sequence samples EOS; None when EOS is ignored."""
    block_hashes: list[BlockHash] = field(default_factory=list)
    """Chained hashes of the prompt's full blocks (empty: nothing of it is cacheable)."""
    num_computed: int = 0
    """Tokens whose KV is in the cache."""
    num_output: int = 0
    blocks: list[int] = field(default_factory=list)
    """KV blocks held, in order."""
    num_cached_blocks: int = 0
    """Leading blocks already named by their hash in the pool."""
    preemptions: int = 0
    cached_tokens: int = 0
    """Prompt tokens found in the prefix cache at first admission."""
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    arrival_s: float = 0.0
    last_token_s: float = 0.0
    """When the sequence arrived and sampled its last token, on the engine's clock: the engine's
    latency metrics (this scheduler keeps no time)."""

    @property
    def total_len(self) -> int:
        return self.prompt_len + self.num_output

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


@dataclass(slots=True)
class StepBatch:
    """What one step computes: ``(seq, start, num_tokens)`` items and their aggregates."""

    items: list[tuple[SimSeq, int, int]] = field(default_factory=list)
    decode_seqs: int = 0
    decode_context_tokens: int = 0
    prefill_tokens: int = 0
    prefill_context_tokens: int = 0
    prefill_attn_pairs: int = 0
    sampled_tokens: int = 0
    """Positions whose logits the step computes: every decode, and each chunk that ends its prompt."""
    preempted: int = 0

    def perf_args(self) -> dict[str, int]:
        """Keyword arguments for :meth:`PerfModel.step_time_s`."""
        return {
            "decode_seqs": self.decode_seqs,
            "decode_context_tokens": self.decode_context_tokens,
            "prefill_tokens": self.prefill_tokens,
            "prefill_context_tokens": self.prefill_context_tokens,
            "prefill_attn_pairs": self.prefill_attn_pairs,
            "sampled_tokens": self.sampled_tokens,
        }


class SimScheduler:
    """Continuous batching over a KV cache of ``kv_capacity_tokens`` in blocks of ``block_tokens``."""

    def __init__(
        self,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        kv_capacity_tokens: int,
        block_tokens: int = 16,
        enable_prefix_caching: bool = True,
    ) -> None:
        if min(max_num_seqs, max_num_batched_tokens, block_tokens) < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and block_tokens must be >= 1")
        if kv_capacity_tokens < block_tokens:
            raise ValueError(f"kv_capacity_tokens {kv_capacity_tokens} is less than one block")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_tokens = block_tokens
        self.pool = BlockPool(
            kv_capacity_tokens // block_tokens, block_tokens, enable_caching=enable_prefix_caching
        )
        self.waiting: deque[SimSeq] = deque()
        self.running: list[SimSeq] = []
        self.num_preemptions = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation can take (empty or evictable cached ones)."""
        return self.pool.num_free

    @property
    def prefix_cache_stats(self) -> PrefixCacheStats:
        return self.pool.stats

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_blocks * self.block_tokens

    @property
    def kv_cache_usage(self) -> float:
        """Share of blocks not free, as vLLM's ``kv_cache_usage_perc`` (an unused cached block is free)."""
        return 1.0 - self.pool.num_free / self.pool.num_blocks

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: SimSeq) -> None:
        """Queue a new sequence (FCFS)."""
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: SimSeq, reason: str) -> None:
        """Finish a sequence from outside (abort, stop string) and free its KV at once."""
        if seq.status is SeqStatus.FINISHED:
            return
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        self._release(seq, reason)

    def _release(self, seq: SimSeq, reason: str) -> None:
        self._free(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason

    def _free(self, seq: SimSeq) -> None:
        self.pool.free(seq.blocks)
        seq.blocks = []
        seq.num_cached_blocks = 0

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_tokens)

    def _preempt(self, seq: SimSeq) -> None:
        self._free(seq)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.preemptions += 1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> StepBatch:
        """Pick this step's work: running sequences first, then admit waiting ones."""
        batch = StepBatch()
        budget = self.max_num_batched_tokens
        running = self.running
        i = 0
        bt = self.block_tokens
        items = batch.items
        while i < len(running) and budget > 0:
            seq = running[i]
            nc = seq.num_computed
            if seq.num_output and nc == seq.prompt_len + seq.num_output - 1 and nc < len(seq.blocks) * bt:
                # Fast path: a decode whose next token fits in the blocks it holds.
                items.append((seq, nc, 1))
                batch.decode_seqs += 1
                batch.decode_context_tokens += nc
                batch.sampled_tokens += 1
                budget -= 1
                i += 1
                continue
            n = min(seq.total_len - nc, budget)
            need = self._blocks_for(nc + n) - len(seq.blocks)
            while need > self.pool.num_free:
                victim = running.pop()
                self._preempt(victim)
                batch.preempted += 1
                if victim is seq:
                    break
            if seq.status is not SeqStatus.RUNNING:
                break
            self._take(batch, seq, n, need)
            budget -= n
            i += 1
        if batch.preempted == 0:
            waiting, pool = self.waiting, self.pool
            while waiting and budget > 0 and len(running) < self.max_num_seqs:
                seq = waiting[0]
                hit: list[int] = []
                if seq.num_computed == 0 and seq.block_hashes:
                    hit = pool.longest_hit(seq.block_hashes, (seq.total_len - 1) // bt)
                start = len(hit) * bt if hit else seq.num_computed
                n = min(seq.total_len - start, budget)
                need = self._blocks_for(start + n) - len(hit) - len(seq.blocks)
                if need + pool.evictable(hit) > pool.num_free:
                    break
                waiting.popleft()
                if seq.num_computed == 0:
                    pool.stats.record(seq.total_len, start, seq.preemptions > 0)
                    if seq.preemptions == 0:
                        seq.cached_tokens = start
                if hit:
                    pool.touch(hit)
                    seq.blocks = hit
                    seq.num_cached_blocks = len(hit)
                    seq.num_computed = start
                seq.status = SeqStatus.RUNNING
                running.append(seq)
                self._take(batch, seq, n, need)
                budget -= n
        return batch

    def _take(self, batch: StepBatch, seq: SimSeq, n: int, need_blocks: int) -> None:
        if need_blocks:
            seq.blocks += self.pool.allocate(need_blocks)
        start = seq.num_computed
        hashes = seq.block_hashes
        if seq.num_cached_blocks < len(hashes):
            # The prompt's blocks this step fills are named now (vLLM caches at scheduling time).
            full = min((start + n) // self.block_tokens, len(hashes))
            if full > seq.num_cached_blocks:
                self.pool.cache(seq.blocks, hashes, seq.num_cached_blocks, full)
                seq.num_cached_blocks = full
        batch.items.append((seq, start, n))
        if start + n == seq.total_len:
            batch.sampled_tokens += 1
        if n == 1 and start == seq.total_len - 1 and seq.num_output > 0:
            batch.decode_seqs += 1
            batch.decode_context_tokens += start
        else:
            batch.prefill_tokens += n
            batch.prefill_context_tokens += start
            batch.prefill_attn_pairs += chunk_attn_pairs(start, n)

    def postprocess(self, batch: StepBatch) -> list[SimSeq]:
        """Apply a computed step; return the sequences that sampled a token (finished ones included)."""
        produced: list[SimSeq] = []
        any_finished = False
        for seq, _start, n in batch.items:
            if seq.status is not SeqStatus.RUNNING:
                continue  # aborted or preempted while the step was in flight
            seq.num_computed += n
            if seq.num_computed < seq.total_len:
                continue  # a prefill chunk that did not reach the end of the prompt
            seq.num_output += 1
            produced.append(seq)
            if seq.num_output >= seq.max_tokens:
                self._release(seq, "length")
                any_finished = True
            elif seq.eos_after is not None and seq.num_output >= seq.eos_after:
                self._release(seq, "stop")
                any_finished = True
        if any_finished:
            self.running = [s for s in self.running if s.status is SeqStatus.RUNNING]
        return produced
