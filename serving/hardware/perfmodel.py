"""A pure performance model of one transformer decoder on one accelerator: bytes, KV capacity, step times.

Every engine step (decode, prefill, or vLLM's mixed chunked-prefill step) is priced by the same
roofline with fitted efficiencies::

    t = overhead + smax(host_floor, bytes / (mem_eff * BW), flops / (compute_eff * FLOPS))
    smax(x, y, z) = (x^k + y^k + z^k)^(1/k)          (a smooth max; k = ``sharpness``, 3 by default)

* bytes = weights, plus the KV cache read by attention, plus the KV written for the new tokens;
* flops = 2 x params per new token, plus 4 x layers x heads x head_dim per (query, key) pair;
* ``host_floor`` applies only to steps carrying prefill tokens: the reference measurements ran
  prefill eagerly (kernel launches bound short prompts) and decode in CUDA graphs.

The four factors are fitted by :func:`calibrate` to measured step times (relative least squares,
Levenberg-Marquardt in numpy). The H100 fit lives in ``models/calibration/h100.json`` and in
:data:`H100_FACTORS`. Cards without their own measurements reuse the H100 efficiencies against
their own datasheet ceilings (:func:`factors_for`); that is an assumption, not a measurement.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from serving.hardware.catalog import GpuProfile

__all__ = [
    "H100_FACTORS",
    "ModelArch",
    "PerfFactors",
    "PerfModel",
    "StepSample",
    "calibrate",
    "factors_for",
    "samples_from_table",
]

_KV_BLOCK_TOKENS = 16
"""vLLM's default KV block size; capacity is rounded down to whole blocks."""
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

    def __post_init__(self) -> None:
        for f in ("params", "layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
            if getattr(self, f) <= 0:
                raise ValueError(f"ModelArch.{f} must be > 0, got {getattr(self, f)}")
        if self.dtype_bytes not in (1, 2, 4):
            raise ValueError(f"ModelArch.dtype_bytes must be 1, 2 or 4, got {self.dtype_bytes}")

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights at ``dtype_bytes`` each."""
        return self.params * self.dtype_bytes

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
    """Fitted efficiencies of the roofline (see module docstring)."""

    mem_efficiency: float
    """Achieved fraction of datasheet memory bandwidth."""
    compute_efficiency: float
    """Achieved fraction of datasheet dense bf16 FLOP/s."""
    step_overhead_s: float
    """Fixed time added to every step (scheduling, sampling, launch of a graphed step)."""
    prefill_host_floor_s: float
    """Floor of steps that carry prefill tokens (host-bound kernel launches), inside the smooth max."""
    sharpness: float = 3.0
    """Exponent k of the smooth max; large k approaches a hard roofline max."""
    source: str = ""
    """Where these came from (measurement file, GPU)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PerfFactors:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


H100_FACTORS = PerfFactors(
    mem_efficiency=0.8151,
    compute_efficiency=0.6204,
    step_overhead_s=0.001564,
    prefill_host_floor_s=0.008532,
    sharpness=3.0,
    source="models/calibration/h100.json (fit to h100_llama8b_steps.json, all 20 points)",
)
"""H100 factors; ``tests/unit/test_hardware_perfmodel.py`` checks they match the refit JSON file."""


def factors_for(gpu: GpuProfile, calibrated: Mapping[str, PerfFactors] | None = None) -> PerfFactors:
    """The factors for ``gpu``: its own calibration if given, else the H100 fit (an assumption)."""
    if calibrated and gpu.name in calibrated:
        return calibrated[gpu.name]
    return H100_FACTORS


class PerfModel:
    """Step-time, memory and KV predictions for one (model, GPU, factors) triple. Pure; no I/O."""

    __slots__ = ("_bw", "_flops", "_k", "arch", "factors", "gpu")

    def __init__(self, arch: ModelArch, gpu: GpuProfile, factors: PerfFactors | None = None) -> None:
        self.arch = arch
        self.gpu = gpu
        self.factors = factors if factors is not None else factors_for(gpu)
        self._bw = gpu.memory_bw_bytes_per_s * self.factors.mem_efficiency
        self._flops = gpu.bf16_dense_flops * self.factors.compute_efficiency
        self._k = self.factors.sharpness

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

    def kv_capacity_tokens(self, gpu_memory_utilization: float, max_num_batched_tokens: int = 8192) -> int:
        """KV cache capacity in tokens (whole 16-token blocks); 0 when the model does not fit."""
        free = self.kv_budget_bytes(gpu_memory_utilization, max_num_batched_tokens)
        if free <= 0:
            return 0
        tokens = free // self.kv_bytes_per_token
        return int(tokens // _KV_BLOCK_TOKENS * _KV_BLOCK_TOKENS)

    # ---- time -----------------------------------------------------------------------------------
    def step_time_s(
        self,
        *,
        decode_seqs: int = 0,
        decode_context_tokens: int = 0,
        prefill_tokens: int = 0,
        prefill_context_tokens: int = 0,
        prefill_attn_pairs: int = 0,
    ) -> float:
        """Time of one engine step from aggregate counts (the hot path of the simulator).

        ``decode_seqs`` sequences decode one token each over ``decode_context_tokens`` cached tokens
        in total; ``prefill_tokens`` new prompt tokens are computed in chunks that read
        ``prefill_context_tokens`` already-cached tokens in total and form ``prefill_attn_pairs``
        causal (query, key) pairs (see :func:`chunk_attn_pairs`). An empty step costs 0.
        """
        new_tokens = decode_seqs + prefill_tokens
        if new_tokens <= 0:
            return 0.0
        a = self.arch
        kv_tokens = decode_context_tokens + prefill_context_tokens + new_tokens
        mem_s = (a.weight_bytes + kv_tokens * a.kv_bytes_per_token) / self._bw
        flops = 2.0 * a.params * new_tokens + a.attn_flops_per_pair * (
            decode_context_tokens + prefill_attn_pairs
        )
        comp_s = flops / self._flops
        floor_s = self.factors.prefill_host_floor_s if prefill_tokens > 0 else 0.0
        # Smooth max, scaled by the largest term so large k neither underflows nor overflows.
        top, k = max(mem_s, comp_s, floor_s), self._k
        acc = (mem_s / top) ** k + (comp_s / top) ** k + (floor_s / top) ** k
        return self.factors.step_overhead_s + top * acc ** (1.0 / k)

    def decode_step_time_s(self, context_lens: Sequence[int]) -> float:
        """One decode step for ``len(context_lens)`` sequences attending over those cached lengths."""
        return self.step_time_s(decode_seqs=len(context_lens), decode_context_tokens=sum(context_lens))

    def decode_step_time_uniform_s(self, batch: int, context_tokens: int) -> float:
        """One decode step for ``batch`` sequences that each attend over ``context_tokens``."""
        return self.step_time_s(decode_seqs=batch, decode_context_tokens=batch * context_tokens)

    def prefill_time_s(self, prompt_lens: Sequence[int]) -> float:
        """One forward pass over whole prompts (no chunking, nothing cached)."""
        return self.step_time_s(
            prefill_tokens=sum(prompt_lens),
            prefill_attn_pairs=sum(chunk_attn_pairs(0, p) for p in prompt_lens),
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

    def chunked_prefill_time_s(self, prompt_tokens: int, chunk_tokens: int) -> float:
        """Time to prefill one prompt alone in chunks of ``chunk_tokens`` (TTFT on an idle engine)."""
        total, start = 0.0, 0
        while start < prompt_tokens:
            n = min(chunk_tokens, prompt_tokens - start)
            total += self.mixed_step_time_s((), ((start, n),))
            start += n
        return total


def chunk_attn_pairs(start: int, num_tokens: int) -> int:
    """Causal (query, key) pairs of a chunk of ``num_tokens`` queries after ``start`` cached tokens."""
    return num_tokens * start + num_tokens * (num_tokens + 1) // 2


# ---- calibration --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepSample:
    """One measured step: ``batch`` sequences each at ``tokens`` (decode context or prompt length)."""

    kind: Literal["decode", "prefill"]
    batch: int
    tokens: int
    step_s: float


def samples_from_table(table: Mapping[str, Any]) -> list[StepSample]:
    """Samples from a measurement table in the format of ``h100_llama8b_steps.json``."""
    out = [
        StepSample("decode", int(r["batch"]), int(r["ctx"]), float(r["step_ms"]) / 1e3)
        for r in table["decode"]
    ]
    out += [
        StepSample("prefill", int(r["batch"]), int(r["prompt"]), float(r["ms"]) / 1e3)
        for r in table["prefill"]
    ]
    return out


def _features(arch: ModelArch, gpu: GpuProfile, s: StepSample) -> tuple[float, float, bool]:
    """(memory seconds at peak bandwidth, compute seconds at peak FLOP/s, carries prefill)."""
    new = s.batch if s.kind == "decode" else s.batch * s.tokens
    ctx = s.batch * s.tokens if s.kind == "decode" else 0
    pairs = ctx if s.kind == "decode" else s.batch * chunk_attn_pairs(0, s.tokens)
    mem_s = (arch.weight_bytes + (ctx + new) * arch.kv_bytes_per_token) / gpu.memory_bw_bytes_per_s
    flops = 2.0 * arch.params * new + arch.attn_flops_per_pair * pairs
    return mem_s, flops / gpu.bf16_dense_flops, s.kind == "prefill"


def calibrate(
    arch: ModelArch,
    gpu: GpuProfile,
    samples: Sequence[StepSample],
    *,
    sharpness: float = 3.0,
    source: str = "",
    max_iter: int = 200,
) -> PerfFactors:
    """Fit the four factors to measured steps by least squares on relative error.

    Needs samples that separate the terms: decode at several batches and contexts, and prefill
    at short and long prompts (the short ones pin ``prefill_host_floor_s``). Parameters are fitted in
    log space (so they stay positive) with a damped Gauss-Newton (Levenberg-Marquardt) loop.
    """
    if len(samples) < 4:
        raise ValueError(f"calibration needs at least 4 samples, got {len(samples)}")
    feats = np.array([_features(arch, gpu, s) for s in samples], dtype=float)
    mem, comp, pre = feats[:, 0], feats[:, 1], feats[:, 2]
    y = np.array([s.step_s for s in samples], dtype=float)
    k = sharpness

    def residuals(theta: np.ndarray) -> np.ndarray:
        inv_mem, inv_comp, t0, floor = np.exp(theta)
        acc = (inv_mem * mem) ** k + (inv_comp * comp) ** k + pre * floor**k
        pred: np.ndarray = t0 + acc ** (1.0 / k)
        return np.asarray((pred - y) / y)

    theta = np.log(np.array([1.25, 1.6, 1e-3, 5e-3]))
    lam, converged = 1e-3, False
    r = residuals(theta)
    cost = float(r @ r)
    for _ in range(max_iter):
        jac = np.empty((len(y), theta.size))
        for j in range(theta.size):
            step = np.zeros_like(theta)
            step[j] = 1e-6
            jac[:, j] = (residuals(theta + step) - r) / 1e-6
        jtj, jtr = jac.T @ jac, jac.T @ r
        improved = False
        while lam < 1e10:
            delta = np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-12), -jtr)
            cand = theta + delta
            r_c = residuals(cand)
            cost_c = float(r_c @ r_c)
            if cost_c < cost:
                theta, r, lam, improved = cand, r_c, max(lam / 10, 1e-9), True
                converged = cost - cost_c < 1e-14
                cost = cost_c
                break
            lam *= 10
        if not improved or converged:
            break
    inv_mem, inv_comp, t0, floor = (float(v) for v in np.exp(theta))
    if not all(math.isfinite(v) for v in (inv_mem, inv_comp, t0, floor)):
        raise ValueError("calibration diverged; check the samples")
    return PerfFactors(
        mem_efficiency=1.0 / inv_mem,
        compute_efficiency=1.0 / inv_comp,
        step_overhead_s=t0,
        prefill_host_floor_s=floor,
        sharpness=sharpness,
        source=source,
    )
