"""A pure performance model of one transformer decoder on one accelerator: bytes, KV capacity, step times.

Every engine step (decode, prefill, or vLLM's mixed chunked-prefill step) is priced from the model's
shape and a few per-GPU constants (:class:`PerfFactors`)::

    t = overhead + smax(floor, smax(W / bw, G / flops) + smax(KV / bw, A / flops))
    overhead = step_overhead_s + layers x step_overhead_per_layer_s
    floor    = layers x prefill_floor_per_layer_s      (steps that carry prefill tokens only)
    bw = mem_efficiency x datasheet bandwidth; flops = compute_efficiency x datasheet dense bf16
    smax(x, ...) = (x^k + ...)^(1/k)                   (a smooth max; k = ``sharpness``, 3)

* W = bytes of the weights a step streams: the decoder layers and the LM head (an untied input
  embedding is a gather of a few rows, not a read of the table);
* G = GEMM FLOPs: 2 x decoder-layer params per new token, plus 2 x vocab x hidden per position
  whose logits are computed (``sampled_tokens``: vLLM computes one per decode and one per prefill
  chunk that completes its prompt; the calibration runs computed them at every prompt position);
* KV = the KV cache attention reads plus the KV written for the new tokens;
  A = 4 x layers x heads x head_dim FLOPs per causal (query, key) pair.

Decode is memory-bound (weights, then KV, over bandwidth), prefill compute-bound (FLOPs over peak).
The GEMMs and attention are separate kernels, so their rooflines add rather than overlap.

**What changed to transfer across shapes** (round 2, issue 17). Fitted on the Llama-3.1-8B H100 table
alone, the round-1 model (one roofline over all bytes and FLOPs, a constant per-step overhead, a
constant eager-prefill floor, FLOPs and bytes counting the embedding table) predicted the
Llama-3.2-1B shape on the same card up to 45% too slow on decode and 29% on a 2,048-token prefill;
fitted on the 1B, it put 8B decode up to 13% too fast. Three terms had to depend on the shape:

1. the fixed per-step cost scales with layers: kernel launches and per-kernel tails inside a CUDA
   graph (~56 us per layer on the H100, plus ~0.16 ms per step that does not);
2. the eager-prefill floor scales with layers too (Python-side kernel launches, ~0.26 ms per layer);
3. the embedding table is neither streamed nor multiplied (it is 6.5% of the 8B's parameters but
   17.5% of the 1B's), and attention is its own roofline next to the GEMMs'.

One shape cannot tell a per-layer cost from a constant one; :func:`~serving.hardware.calibration.calibrate`
then fits the per-layer part alone (``step_overhead_s`` = 0), and fits both once the samples span
two layer counts. A prefill efficiency that grows with the step's tokens was tried and not kept: the
fit drove it to zero. Leave-one-shape-out on the two H100 tables (fit on one shape, predict every
point of the other; ``python loadtests/bench_perfmodel.py``): worst decode error 7.9% (fit on 8B,
predict 1B) and 5.8% (fit on 1B, predict 8B); worst prefill of >= 2,048 tokens 7.6% and 6.1%.

:data:`H100_FACTORS` is the joint fit on both tables (``models/calibration/h100.json``). Cards
without their own measurements reuse the H100 factors against their own datasheet ceilings
(:func:`factors_for`); that is an assumption, not a measurement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass
from typing import Any

from serving.hardware.catalog import GpuProfile

__all__ = [
    "H100_FACTORS",
    "KV_BLOCK_TOKENS",
    "ModelArch",
    "PerfFactors",
    "PerfModel",
    "chunk_attn_pairs",
    "factors_for",
    "smooth_max",
]

KV_BLOCK_TOKENS = 16
"""vLLM's default KV block size (GPU builds); capacity is rounded down to whole blocks."""
_RUNTIME_RESERVE_BYTES = int(1.5 * 2**30)
"""Non-KV memory inside the utilisation budget: CUDA graphs, allocator slack, sampler workspace."""


@dataclass(frozen=True, slots=True)
class ModelArch:
    """Architecture facts of a decoder-only model (what the performance model needs)."""

    name: str
    params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype_bytes: int = 2
    tied_embeddings: bool = False
    """Whether the LM head shares the input embedding table (then ``params`` counts it once)."""

    def __post_init__(self) -> None:
        for f in ("params", "layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
            if getattr(self, f) <= 0:
                raise ValueError(f"ModelArch.{f} must be > 0, got {getattr(self, f)}")
        if self.dtype_bytes not in (1, 2, 4):
            raise ValueError(f"ModelArch.dtype_bytes must be 1, 2 or 4, got {self.dtype_bytes}")
        if self.layer_params <= 0:
            raise ValueError(
                f"ModelArch {self.name}: params {self.params} leave nothing for the decoder layers "
                f"after the {self.vocab} x {self.hidden} embedding table(s)"
            )

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights at ``dtype_bytes`` each (what occupies device memory)."""
        return self.params * self.dtype_bytes

    @property
    def embedding_params(self) -> int:
        """Parameters of one vocab x hidden table (the input embedding, or the LM head)."""
        return self.vocab * self.hidden

    @property
    def layer_params(self) -> int:
        """Parameters of the decoder layers: everything but the embedding table(s)."""
        return self.params - self.embedding_params * (1 if self.tied_embeddings else 2)

    @property
    def streamed_weight_bytes(self) -> int:
        """Weights one step reads: the decoder layers and the LM head."""
        return (self.layer_params + self.embedding_params) * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for every layer: 2 x layers x kv_heads x head_dim x dtype_bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def attn_flops_per_pair(self) -> int:
        """FLOPs for one (query, key) pair across layers: QK^T and PV, 2 FLOPs per MAC each."""
        return 4 * self.layers * self.heads * self.head_dim


@dataclass(frozen=True, slots=True)
class PerfFactors:
    """Per-GPU constants of the model (see module docstring); the same for every model shape."""

    mem_efficiency: float
    """Achieved fraction of datasheet memory bandwidth."""
    compute_efficiency: float
    """Achieved fraction of datasheet dense bf16 FLOP/s."""
    step_overhead_s: float
    """Part of the fixed per-step cost that does not grow with layers (scheduling, sampling)."""
    step_overhead_per_layer_s: float
    """Fixed per-step cost per decoder layer (kernel launches and tails inside a graphed step)."""
    prefill_floor_per_layer_s: float
    """Per layer: the floor of steps that carry prefill tokens (eager kernel launches), in the smooth max."""
    sharpness: float = 3.0
    """Exponent k of the smooth max; large k approaches a hard roofline max."""
    source: str = ""
    """Where these came from (measurement files, GPU)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerfFactors:
        """Build from :meth:`to_dict`'s output; ValueError naming the fields a file lacks."""
        missing = [k for k, f in cls.__dataclass_fields__.items() if k not in data and f.default is MISSING]
        if missing:
            raise ValueError(
                f"performance factors lack {', '.join(missing)} (a file from before the per-layer "
                "terms? refit with models/calibration/measure_gpu.py --fit)"
            )
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


H100_FACTORS = PerfFactors(
    mem_efficiency=0.8268,
    compute_efficiency=0.5731,
    step_overhead_s=0.0001556,
    step_overhead_per_layer_s=0.00005636,
    prefill_floor_per_layer_s=0.0002645,
    sharpness=3.0,
    source="models/calibration/h100.json (joint fit to h100_llama8b_steps.json + h100_llama1b_steps.json)",
)
"""H100 factors; ``tests/unit/test_hardware_perfmodel.py`` checks they match the refit JSON file."""


def factors_for(gpu: GpuProfile, calibrated: Mapping[str, PerfFactors] | None = None) -> PerfFactors:
    """The factors for ``gpu``: its own calibration if given, else the H100 fit (an assumption)."""
    if calibrated and gpu.name in calibrated:
        return calibrated[gpu.name]
    return H100_FACTORS


def smooth_max(k: float, *xs: float) -> float:
    """``(sum x^k)^(1/k)``, scaled by the largest term so large k neither underflows nor overflows."""
    top = max(xs)
    if top <= 0.0:
        return 0.0
    return top * sum((x / top) ** k for x in xs) ** (1.0 / k)


class PerfModel:
    """Step-time, memory and KV predictions for one (model, GPU, factors) triple. Pure; no I/O."""

    __slots__ = (
        "_attn_s_per_pair",
        "_floor_s",
        "_gemm_s_per_logit",
        "_gemm_s_per_token",
        "_k",
        "_kv_s_per_token",
        "_overhead_s",
        "_weights_s",
        "arch",
        "factors",
        "gpu",
    )

    def __init__(self, arch: ModelArch, gpu: GpuProfile, factors: PerfFactors | None = None) -> None:
        self.arch = arch
        self.gpu = gpu
        f = self.factors = factors if factors is not None else factors_for(gpu)
        bw = gpu.memory_bw_bytes_per_s * f.mem_efficiency
        flops = gpu.bf16_dense_flops * f.compute_efficiency
        self._k = f.sharpness
        self._weights_s = arch.streamed_weight_bytes / bw
        self._kv_s_per_token = arch.kv_bytes_per_token / bw
        self._gemm_s_per_token = 2.0 * arch.layer_params / flops
        self._gemm_s_per_logit = 2.0 * arch.embedding_params / flops
        self._attn_s_per_pair = arch.attn_flops_per_pair / flops
        self._overhead_s = f.step_overhead_s + arch.layers * f.step_overhead_per_layer_s
        self._floor_s = arch.layers * f.prefill_floor_per_layer_s

    # ---- memory ---------------------------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        return self.arch.weight_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        return self.arch.kv_bytes_per_token

    def activation_bytes(self, max_num_batched_tokens: int) -> int:
        """Peak activation memory of a step of that many tokens (MLP and QKV intermediates)."""
        a = self.arch
        return max_num_batched_tokens * (2 * a.intermediate + 4 * a.hidden) * a.dtype_bytes

    def kv_budget_bytes(self, gpu_memory_utilization: float, max_num_batched_tokens: int = 8192) -> int:
        """Bytes left for the KV cache (may be negative when the weights do not fit)."""
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        budget = int(self.gpu.memory_bytes * gpu_memory_utilization)
        return (
            budget
            - self.weight_bytes
            - _RUNTIME_RESERVE_BYTES
            - self.activation_bytes(max_num_batched_tokens)
        )

    def kv_capacity_tokens(
        self,
        gpu_memory_utilization: float,
        max_num_batched_tokens: int = 8192,
        block_tokens: int = KV_BLOCK_TOKENS,
    ) -> int:
        """KV cache capacity in tokens (whole ``block_tokens`` blocks); 0 when the model does not fit."""
        free = self.kv_budget_bytes(gpu_memory_utilization, max_num_batched_tokens)
        if free <= 0:
            return 0
        tokens = free // self.kv_bytes_per_token
        return int(tokens // block_tokens * block_tokens)

    # ---- time -----------------------------------------------------------------------------------
    def step_time_s(
        self,
        *,
        decode_seqs: int = 0,
        decode_context_tokens: int = 0,
        prefill_tokens: int = 0,
        prefill_context_tokens: int = 0,
        prefill_attn_pairs: int = 0,
        sampled_tokens: int | None = None,
    ) -> float:
        """Time of one engine step from aggregate counts (the hot path of the simulator).

        ``decode_seqs`` sequences decode one token each over ``decode_context_tokens`` cached tokens
        in total; ``prefill_tokens`` new prompt tokens are computed in chunks that read
        ``prefill_context_tokens`` already-cached tokens in total and form ``prefill_attn_pairs``
        causal (query, key) pairs (see :func:`chunk_attn_pairs`). ``sampled_tokens`` positions get
        logits (default: one per decode, plus one when the step carries prefill). An empty step costs 0.
        """
        new_tokens = decode_seqs + prefill_tokens
        if new_tokens <= 0:
            return 0.0
        if sampled_tokens is None:
            sampled_tokens = decode_seqs + (1 if prefill_tokens > 0 else 0)
        k = self._k
        gemm = smooth_max(
            k,
            self._weights_s,
            self._gemm_s_per_token * new_tokens + self._gemm_s_per_logit * sampled_tokens,
        )
        attn = smooth_max(
            k,
            self._kv_s_per_token * (decode_context_tokens + prefill_context_tokens + new_tokens),
            self._attn_s_per_pair * (decode_context_tokens + prefill_attn_pairs),
        )
        if prefill_tokens > 0:
            return self._overhead_s + smooth_max(k, self._floor_s, gemm + attn)
        return self._overhead_s + gemm + attn

    def decode_step_time_s(self, context_lens: Sequence[int]) -> float:
        """One decode step for ``len(context_lens)`` sequences attending over those cached lengths."""
        return self.step_time_s(decode_seqs=len(context_lens), decode_context_tokens=sum(context_lens))

    def decode_step_time_uniform_s(self, batch: int, context_tokens: int) -> float:
        """One decode step for ``batch`` sequences that each attend over ``context_tokens``."""
        return self.step_time_s(decode_seqs=batch, decode_context_tokens=batch * context_tokens)

    def prefill_time_s(self, prompt_lens: Sequence[int], *, logits_every_position: bool = False) -> float:
        """One forward pass over whole prompts (no chunking, nothing cached).

        vLLM computes logits at each prompt's last position; ``logits_every_position`` prices the LM
        head at every position instead (what ``models/calibration/measure_gpu.py`` ran).
        """
        total = sum(prompt_lens)
        return self.step_time_s(
            prefill_tokens=total,
            prefill_attn_pairs=sum(chunk_attn_pairs(0, p) for p in prompt_lens),
            sampled_tokens=total if logits_every_position else len(prompt_lens),
        )

    def mixed_step_time_s(
        self, decode_context_lens: Sequence[int], prefill_chunks: Sequence[tuple[int, int]]
    ) -> float:
        """A chunked-prefill step: decodes at those contexts plus ``(start, num_tokens)`` chunks."""
        return self.step_time_s(
            decode_seqs=len(decode_context_lens),
            decode_context_tokens=sum(decode_context_lens),
            prefill_tokens=sum(n for _, n in prefill_chunks),
            prefill_context_tokens=sum(s for s, _ in prefill_chunks),
            prefill_attn_pairs=sum(chunk_attn_pairs(s, n) for s, n in prefill_chunks),
        )

    def chunked_prefill_time_s(self, prompt_tokens: int, chunk_tokens: int, cached_tokens: int = 0) -> float:
        """Time to prefill one prompt alone in chunks of ``chunk_tokens`` (TTFT on an idle engine).

        The first ``cached_tokens`` are already in the KV cache (a prefix-cache hit): only the rest
        is computed, attending over them. At least the last token is always computed.
        """
        total, start = 0.0, min(max(cached_tokens, 0), max(prompt_tokens - 1, 0))
        while start < prompt_tokens:
            n = min(chunk_tokens, prompt_tokens - start)
            total += self.step_time_s(
                prefill_tokens=n,
                prefill_context_tokens=start,
                prefill_attn_pairs=chunk_attn_pairs(start, n),
                sampled_tokens=1 if start + n == prompt_tokens else 0,
            )
            start += n
        return total


def chunk_attn_pairs(start: int, num_tokens: int) -> int:
    """Causal (query, key) pairs of a chunk of ``num_tokens`` queries after ``start`` cached tokens."""
    return num_tokens * start + num_tokens * (num_tokens + 1) // 2
