"""Hardware plan: derive a pool's vLLM engine settings from the model, the GPU and the pool's SLOs.

* ``max_num_seqs``: the largest decode batch whose predicted step time (TPOT) at the pool's typical
  context stays within the TPOT SLO and whose KV cache (batch x typical context) fits;
* ``max_num_batched_tokens`` (the chunked-prefill budget): the largest step, in tokens, whose
  predicted time stays within the TPOT SLO: a prefill chunk of that many tokens that already has
  ``typical_prompt_tokens`` cached ahead of it (the costly, late chunk of a typical prompt), rounded
  down to a multiple of 256, at most 8192 (``max_num_seqs`` is capped by it: vLLM requires it);
* ``gpu_memory_utilization``: 0.90 unless given.

Explicit settings override the plan; the predictions are then those of the given settings. The
plan refuses (:class:`PlanError`, numbers in the message) when the weights do not fit, when one
sequence at the typical context does not fit, or when the SLO cannot be met even at batch 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from serving.hardware.catalog import GpuProfile
from serving.hardware.perfmodel import ModelArch, PerfFactors, PerfModel

__all__ = ["EnginePlan", "EngineSettings", "PlanError", "PoolSlo", "plan_engine"]

DEFAULT_GPU_MEMORY_UTILIZATION = 0.90
MAX_NUM_SEQS_CAP = 1024
"""Never plan more concurrent sequences than this (vLLM's sampler and scheduler cost grows)."""
MAX_NUM_BATCHED_TOKENS_CAP = 8192
"""Never plan a larger chunk; the activation reserve is sized for this, so KV does not shrink."""
_CHUNK_ROUND = 256


class PlanError(ValueError):
    """The model cannot be served on this GPU within these SLOs; the message carries the numbers."""

    def __init__(self, message: str, *, model: str, gpu: str) -> None:
        super().__init__(f"{model} on {gpu}: {message}")
        self.model = model
        self.gpu = gpu


@dataclass(frozen=True, slots=True)
class PoolSlo:
    """A pool's latency targets and typical request shape."""

    ttft_slo_ms: float
    tpot_slo_ms: float
    typical_prompt_tokens: int = 1024
    typical_context_tokens: int = 2048
    """Prompt plus output so far, averaged over a request's decode steps."""

    def __post_init__(self) -> None:
        if self.ttft_slo_ms <= 0 or self.tpot_slo_ms <= 0:
            raise ValueError(f"SLOs must be > 0, got ttft={self.ttft_slo_ms} tpot={self.tpot_slo_ms}")
        if self.typical_prompt_tokens < 1 or self.typical_context_tokens < 1:
            raise ValueError("typical prompt and context lengths must be >= 1")


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """The vLLM engine arguments the plan sets (``--max-num-seqs`` etc.)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    gpu_memory_utilization: float


@dataclass(frozen=True, slots=True)
class EnginePlan:
    """Settings plus what the performance model predicts for them."""

    model: str
    gpu: str
    settings: EngineSettings
    kv_capacity_tokens: int
    predicted_tpot_ms: float
    """Decode step time at ``max_num_seqs`` sequences of the typical context."""
    predicted_ttft_ms: float
    """Time to prefill the typical prompt on an idle replica, in chunks of the budget."""
    tokens_per_s: float
    """Decode throughput of one replica at full batch."""
    price_per_hour_relative: float

    @property
    def tokens_per_s_per_price(self) -> float:
        return self.tokens_per_s / self.price_per_hour_relative


def _largest(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """Largest n in [lo, hi] with ok(n) true, for monotone ok (true then false); lo - 1 if none."""
    if not ok(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_engine(
    arch: ModelArch,
    gpu: GpuProfile,
    slo: PoolSlo,
    factors: PerfFactors | None = None,
    *,
    max_num_seqs: int | None = None,
    max_num_batched_tokens: int | None = None,
    gpu_memory_utilization: float | None = None,
) -> EnginePlan:
    """Plan one pool's engine; keyword settings given explicitly override the derived ones."""
    m = PerfModel(arch, gpu, factors)
    util = DEFAULT_GPU_MEMORY_UTILIZATION if gpu_memory_utilization is None else gpu_memory_utilization
    tpot_s, ttft_s = slo.tpot_slo_ms / 1e3, slo.ttft_slo_ms / 1e3
    ctx, prompt = slo.typical_context_tokens, slo.typical_prompt_tokens

    def fail(msg: str) -> PlanError:
        return PlanError(msg, model=arch.name, gpu=gpu.name)

    budget_for_kv = m.kv_budget_bytes(util, max(max_num_batched_tokens or 0, MAX_NUM_BATCHED_TOKENS_CAP))
    if budget_for_kv <= 0:
        need = (m.weight_bytes + m.kv_bytes_per_token * ctx) / 1e9
        raise fail(
            f"weights need {m.weight_bytes / 1e9:.1f} GB (+ runtime reserve), "
            f"{need:.1f} GB with one {ctx}-token context, but {util:.2f} x {gpu.memory_bytes / 1e9:.0f} GB "
            f"= {util * gpu.memory_bytes / 1e9:.1f} GB is available"
        )

    # Chunk budget first (it sizes the activation reserve), then the batch, then the KV capacity.
    if max_num_batched_tokens is None:
        step_ok = lambda n: m.mixed_step_time_s((), ((prompt, n),)) <= tpot_s  # noqa: E731
        chunk = _largest(1, MAX_NUM_BATCHED_TOKENS_CAP, step_ok)
        if chunk < 1:
            floor_ms = m.mixed_step_time_s((), ((prompt, 1),)) * 1e3
            raise fail(f"a 1-token prefill step takes {floor_ms:.1f} ms > TPOT SLO {slo.tpot_slo_ms:g} ms")
        chunk = max(chunk // _CHUNK_ROUND * _CHUNK_ROUND, min(chunk, _CHUNK_ROUND))
    else:
        chunk = max_num_batched_tokens
    kv_tokens = m.kv_capacity_tokens(util, max(chunk, MAX_NUM_BATCHED_TOKENS_CAP))
    if kv_tokens < ctx:
        raise fail(
            f"KV cache holds {kv_tokens} tokens at gpu_memory_utilization {util:.2f} "
            f"({m.kv_bytes_per_token} B/token), less than one {ctx}-token context"
        )

    if max_num_seqs is None:
        tpot_1 = m.decode_step_time_uniform_s(1, ctx)
        if tpot_1 > tpot_s:
            raise fail(
                f"decode at batch 1, context {ctx} takes {tpot_1 * 1e3:.1f} ms > TPOT SLO {slo.tpot_slo_ms:g} ms"
            )
        cap = min(MAX_NUM_SEQS_CAP, kv_tokens // ctx, chunk)
        seqs = _largest(1, max(cap, 1), lambda b: m.decode_step_time_uniform_s(b, ctx) <= tpot_s)
    else:
        seqs = max_num_seqs

    ttft = m.chunked_prefill_time_s(prompt, chunk)
    if ttft > ttft_s and max_num_batched_tokens is None:
        raise fail(
            f"prefilling {prompt} tokens in chunks of {chunk} takes {ttft * 1e3:.0f} ms "
            f"> TTFT SLO {slo.ttft_slo_ms:g} ms (a chunk larger than {chunk} would break TPOT "
            f"{slo.tpot_slo_ms:g} ms)"
        )
    tpot = m.decode_step_time_uniform_s(seqs, ctx)
    return EnginePlan(
        model=arch.name,
        gpu=gpu.name,
        settings=EngineSettings(seqs, chunk, util),
        kv_capacity_tokens=kv_tokens,
        predicted_tpot_ms=tpot * 1e3,
        predicted_ttft_ms=ttft * 1e3,
        tokens_per_s=seqs / tpot,
        price_per_hour_relative=gpu.price_per_hour_relative,
    )
