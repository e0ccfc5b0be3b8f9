"""From config + catalog to what a pool replica runs: the model entry as deployed, its architecture
for the performance model, and the engine settings the hardware plan derives (explicit
``engine_args`` win)."""

from __future__ import annotations

from typing import Any

from models.catalog import ModelEntry
from serving.config.schema import ModelOverride, PoolConfig
from serving.hardware import EnginePlan, ModelArch, PoolSlo, get_gpu, plan_engine, with_prices

PLANNED_KEYS = ("max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization")


def deployed_entry(entry: ModelEntry, override: ModelOverride | None) -> ModelEntry:
    """The catalog entry with the config's per-model overrides applied."""
    if override is None:
        return entry
    changes: dict[str, Any] = {k: v for k, v in override.model_dump().items() if v is not None}
    return entry.model_copy(update=changes)


def model_arch(entry: ModelEntry) -> ModelArch:
    """The performance model's view of a catalog entry."""
    a = entry.arch
    return ModelArch(
        name=entry.name,
        params=a.params,
        layers=a.layers,
        hidden=a.hidden,
        heads=a.heads,
        kv_heads=a.kv_heads,
        head_dim=a.head_dim,
        intermediate=a.intermediate,
        vocab=a.vocab,
        dtype_bytes=a.dtype_bytes,
    )


def plan_pool(pool: PoolConfig, entry: ModelEntry, gpu_prices: dict[str, float] | None = None) -> EnginePlan:
    """The hardware plan for a GPU pool (raises PlanError with the numbers when it cannot work)."""
    gpu = with_prices(gpu_prices)[pool.accelerator] if gpu_prices else get_gpu(pool.accelerator)
    explicit = {**entry.engine_args_for(pool.accelerator), **pool.engine_args}
    slo = PoolSlo(
        ttft_slo_ms=pool.slo.ttft_ms,
        tpot_slo_ms=pool.slo.tpot_ms,
        typical_prompt_tokens=min(1024, entry.max_model_len // 2),
        typical_context_tokens=min(2048, entry.max_model_len),
    )
    return plan_engine(
        model_arch(entry),
        gpu,
        slo,
        **{k: explicit[k] for k in PLANNED_KEYS if k in explicit},
    )


def engine_args(pool: PoolConfig, entry: ModelEntry) -> dict[str, Any]:
    """vLLM arguments: catalog per-GPU settings, the plan (GPU pools), then the pool's own."""
    args = entry.engine_args_for(pool.accelerator)
    if pool.accelerator != "CPU":
        s = plan_pool(pool, entry).settings
        args = {**args, **{k: getattr(s, k) for k in PLANNED_KEYS}}
    return {**args, **pool.engine_args}
