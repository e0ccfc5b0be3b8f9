"""The deployment as it runs: the config joined with the model catalog and the hardware plan, once.

:func:`resolve` is the one place that reads the catalog and decides what each pool runs: the catalog
entry after the config's per-model overrides, where its weights and tokenizer come from, the vLLM
arguments (the catalog's per-GPU settings, then the hardware plan's, then the pool's own), the
admission settings, SLOs and price. ``serving.app.build_app`` calls it once and binds the frozen
result into every replica, so gateways and pool replicas only read it: nothing downstream reads
the catalog again, re-plans, or re-validates a dict.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from models.catalog import CATALOG_PATH, ModelEntry, check_source, load_catalog
from serving.admission import AdmissionSettings
from serving.config.loader import ConfigError
from serving.config.schema import (
    GatewayConfig,
    ModelOverride,
    PoolConfig,
    RayConfig,
    SloConfig,
    TokenweirConfig,
)
from serving.hardware import (
    EnginePlan,
    GpuProfile,
    ModelArch,
    PerfModel,
    PlanError,
    PoolSlo,
    plan_engine,
    with_prices,
)
from serving.metering import MeteringConfig
from serving.routing import price_per_mtok

__all__ = ["PLANNED_KEYS", "ResolvedDeployment", "ResolvedModel", "ResolvedPool", "resolve"]

PLANNED_KEYS = ("max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization")
"""The engine arguments the hardware plan derives for GPU pools (explicit ones win)."""


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """A served model as every gateway counts it."""

    entry: ModelEntry
    """The catalog entry with the config's ``models.<name>`` overrides applied."""
    tokenizer_source: str
    """Path, hub id or ``builtin:`` name the gateway tokenizes with; each gateway resolves it on its
    own node (a ``builtin:`` model is built there, in that node's cache)."""


@dataclass(frozen=True, slots=True)
class ResolvedPool:
    """One pool, everything its replicas and the gateway's router need, decided."""

    name: str
    entry: ModelEntry
    """The model's catalog entry after the config's overrides."""
    arch: ModelArch
    """The performance model's view of the model."""
    engine: Literal["vllm", "sim"]
    gpu: GpuProfile
    """The accelerator type, with the config's ``gpu_prices`` applied (its price per GPU-hour)."""
    replicas: int
    gpus_per_replica: int
    """GPUs one replica stands for, real or simulated (0 on CPU)."""
    graceful_shutdown_timeout_s: float
    ray_actor_options: dict[str, Any]
    """CPUs, GPUs and the accelerator pin of a replica (without the runtime environment): vLLM GPU
    pools always, every pool on a cluster (``accelerator_type:<X>``)."""
    weights_source: str
    """Path, hub id or ``builtin:`` name vLLM loads, resolved by each replica on its own node ("" for
    simulated pools)."""
    engine_args: dict[str, Any]
    """vLLM arguments: catalog per-GPU settings, then the plan (GPU pools), then the pool's own."""
    plan: EnginePlan | None
    """The hardware plan (on CPU only its throughput is used, for the price); None if none fits."""
    plan_error: str | None
    """Why a GPU pool has no plan (only with ``resolve(..., require_plans=False)``)."""
    slo: SloConfig
    admission: AdmissionSettings
    price_per_mtok: float
    """Price per million tokens at the planned throughput (0 when unknown); the router's cost."""
    stream_interval_ms: float
    cpu_core_placement: bool
    cpu_model_in_engine_core: bool
    sim_speedup: float
    prefix_routed: bool = False
    """Requests to this pool are routed by cached prefix (its engines cache prefixes,
    ``gateway.prefix_routing`` is on, and there is a choice to make: more than one replica, or
    another pool of the model); only then do its engines publish KV-cache events and the gateway
    hash its prompts."""

    @property
    def model(self) -> str:
        """The served model name."""
        return self.entry.name

    @property
    def accelerator(self) -> str:
        """The accelerator type's catalog name."""
        return self.gpu.name

    @property
    def deployment_name(self) -> str:
        """The Ray Serve deployment of this pool."""
        return f"pool-{self.name}"

    @property
    def block_tokens(self) -> int:
        """The engines' KV block size: ``engine_args.block_size``, else vLLM's default (16 on
        GPUs, 128 in the CPU build)."""
        cpu_build = self.engine == "vllm" and self.accelerator == "CPU"
        return int(self.engine_args.get("block_size") or (128 if cpu_build else 16))

    def kv_capacity_tokens(self, perf: PerfModel) -> int:
        """KV cache tokens of one engine: vLLM's ``num_gpu_blocks_override`` blocks when set, else
        ``perf``'s prediction at ``gpu_memory_utilization`` (what a simulated engine holds and the
        router assumes of a vLLM one)."""
        args = self.engine_args
        blocks = args.get("num_gpu_blocks_override")
        if blocks:
            return int(blocks) * self.block_tokens
        return perf.kv_capacity_tokens(
            float(args.get("gpu_memory_utilization", 0.9)),
            int(args.get("max_num_batched_tokens", 2048)),
            self.block_tokens,
        )


@dataclass(frozen=True, slots=True)
class ResolvedDeployment:
    """The whole deployment: built once in ``build_app``, shipped to every replica."""

    gateway: GatewayConfig
    ray: RayConfig
    metering: MeteringConfig
    """The metering section with its state directory resolved."""
    models: dict[str, ResolvedModel]
    """Served models by name, in pool order."""
    pools: tuple[ResolvedPool, ...]


def resolve(
    cfg: TokenweirConfig, *, require_plans: bool = True, cluster: bool | None = None
) -> ResolvedDeployment:
    """Join ``cfg`` with its catalog and plan every pool; raise :class:`ConfigError` naming the bad
    values (unknown models, GPU pools no plan fits unless ``require_plans`` is false).

    On a cluster (``cluster``; None: ``ray.address`` is set) every pool is pinned to the nodes of
    its accelerator type, simulated and CPU pools included; on the local Ray that ``tokenweir
    serve`` starts, which advertises no accelerator types, only vLLM GPU pools are."""
    catalog = _load_catalog(Path(cfg.catalog) if cfg.catalog else CATALOG_PATH)
    problems = [
        f"pools.{i}.model: unknown model {p.model!r}; the catalog has {sorted(catalog)}"
        for i, p in enumerate(cfg.pools)
        if p.model not in catalog
    ]
    problems += [
        f"models.{name}: not in the catalog {sorted(catalog)}" for name in cfg.models if name not in catalog
    ]
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    entries = {
        m: _deployed_entry(catalog[m], cfg.models.get(m)) for m in dict.fromkeys(p.model for p in cfg.pools)
    }
    gpus = with_prices(cfg.gpu_prices)
    on_cluster = cfg.ray.address is not None if cluster is None else cluster
    pools = tuple(_resolve_pool(p, entries[p.model], gpus[p.accelerator], on_cluster) for p in cfg.pools)
    per_model = Counter(p.model for p in pools)
    pools = tuple(
        dataclasses.replace(
            p,
            prefix_routed=cfg.gateway.prefix_routing
            and bool(p.engine_args.get("enable_prefix_caching", True))
            and (p.replicas > 1 or per_model[p.model] > 1),
        )
        for p in pools
    )
    unplanned = [f"pools.{p.name}: cannot plan: {p.plan_error}" for p in pools if p.plan_error]
    if unplanned and require_plans:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(unplanned))
    models = {m: ResolvedModel(e, _source(e.tokenizer or e.source)) for m, e in entries.items()}
    # Replicas get the admin key's hash, never the key (constructor arguments are kept by Ray).
    return ResolvedDeployment(cfg.gateway, cfg.ray, cfg.metering_config().for_actors(), models, pools)


def _source(source: str) -> str:
    try:
        return check_source(source)
    except ValueError as e:
        raise ConfigError(f"invalid configuration: {e}") from e


def _load_catalog(path: Path) -> dict[str, ModelEntry]:
    try:
        return load_catalog(path)
    except FileNotFoundError as e:
        raise ConfigError(f"catalog file not found: {path}") from e
    except (yaml.YAMLError, ValidationError, TypeError) as e:
        raise ConfigError(f"catalog {path}: invalid: {e}") from e


def _deployed_entry(entry: ModelEntry, override: ModelOverride | None) -> ModelEntry:
    if override is None:
        return entry
    return entry.model_copy(update={k: v for k, v in override.model_dump().items() if v is not None})


def _model_arch(entry: ModelEntry) -> ModelArch:
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


def _resolve_pool(pool: PoolConfig, entry: ModelEntry, gpu: GpuProfile, cluster: bool) -> ResolvedPool:
    cpu = pool.accelerator == "CPU"
    arch = _model_arch(entry)
    explicit = {**entry.engine_args_for(pool.accelerator), **pool.engine_args}
    slo = PoolSlo(
        ttft_slo_ms=pool.slo.ttft_ms,
        tpot_slo_ms=pool.slo.tpot_ms,
        typical_prompt_tokens=min(1024, entry.max_model_len // 2),
        typical_context_tokens=min(2048, entry.max_model_len),
    )
    plan: EnginePlan | None = None
    plan_error: str | None = None
    try:
        plan = plan_engine(arch, gpu, slo, **{k: explicit[k] for k in PLANNED_KEYS if k in explicit})
    except PlanError as e:
        plan_error = None if cpu else str(e)  # a CPU pool takes the catalog's settings; it only lacks a price
    args = entry.engine_args_for(pool.accelerator)
    if plan is not None and not cpu:
        args |= {k: getattr(plan.settings, k) for k in PLANNED_KEYS}
    args |= pool.engine_args
    gpus = 0 if cpu else pool.gpus_per_replica
    if pool.engine == "vllm" and gpus > 1:
        args.setdefault("tensor_parallel_size", gpus)
    options: dict[str, Any] = {"num_cpus": pool.num_cpus}
    if pool.engine == "vllm" and not cpu:
        options["num_gpus"] = pool.gpus_per_replica
        if gpu.ray_accelerator_type is not None:
            options["accelerator_type"] = gpu.ray_accelerator_type
        elif gpu.ray_resource is not None:  # a custom resource the node advertises (`ray start --resources`)
            options["resources"] = {gpu.ray_resource: 0.001}
    elif cluster and gpu.ray_resource is not None:
        # Simulated and CPU pools need no GPU, but on a cluster they run only on nodes of their type
        # too (the ones that advertise `accelerator_type:<X>`), never on whichever node has a CPU free.
        options["resources"] = {gpu.ray_resource: 0.001}
    return ResolvedPool(
        name=pool.name,
        entry=entry,
        arch=arch,
        engine=pool.engine,
        gpu=gpu,
        replicas=pool.replicas,
        gpus_per_replica=gpus,
        graceful_shutdown_timeout_s=pool.graceful_shutdown_timeout_s,
        ray_actor_options=options,
        weights_source=_source(entry.source) if pool.engine == "vllm" else "",
        engine_args=args,
        plan=plan,
        plan_error=plan_error,
        slo=pool.slo,
        admission=pool.admission,
        price_per_mtok=(
            price_per_mtok(gpu.price_per_hour_relative, plan.tokens_per_s, max(gpus, 1))
            if plan is not None and plan.tokens_per_s > 0
            else 0.0
        ),
        stream_interval_ms=pool.stream_interval_ms,
        cpu_core_placement=pool.cpu_core_placement,
        cpu_model_in_engine_core=pool.cpu_model_in_engine_core,
        sim_speedup=pool.sim_speedup,
    )
