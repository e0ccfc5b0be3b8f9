"""The typed configuration: one YAML file, validated by pydantic (every field documented).

This is what the operator writes, checked on its own (no file is read here); the model catalog and
the hardware plan join it in :mod:`serving.config.resolved`, which turns it into the one object the
replicas run from.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from serving.admission import AdmissionSettings
from serving.hardware import CATALOG
from serving.metering import MeteringConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    _REMOVED: ClassVar[dict[str, str]] = {}
    """Keys of earlier releases and what replaces each: an old config fails naming it."""

    @model_validator(mode="before")
    @classmethod
    def _no_removed_keys(cls, v: Any) -> Any:
        if isinstance(v, dict):
            gone = [f"`{k}` was removed: {cls._REMOVED[k]}" for k in v if k in cls._REMOVED]
            if gone:
                raise ValueError("; ".join(gone))
        return v


class GatewayConfig(_Strict):
    """The HTTP ingress."""

    host: str = "127.0.0.1"
    """Address the gateway replicas listen on (each binds it with SO_REUSEPORT); `node`: each
    replica binds its own Ray node's address (a cluster, where replicas run on many machines)."""
    port: int = Field(default=8000, ge=1, le=65535)
    """TCP port of the OpenAI-compatible API."""
    replicas: int = Field(default=1, ge=1, le=64)
    """Gateway (ingress) replicas; each tokenizes, meters and relays streams."""
    num_cpus: float = Field(default=0.0, ge=0)
    """Logical CPUs Ray reserves per gateway replica (0 lets it share a small machine)."""
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    """Largest accepted request body; larger ones get 413."""
    request_timeout_s: float = Field(default=600.0, gt=0)
    """Longest a whole request may take; then the gateway aborts it (503, or an SSE error event)."""
    first_token_timeout_s: float = Field(default=120.0, gt=0)
    """Longest the gateway waits for a pool's first chunk before giving up with 503."""
    max_ongoing_requests: int = Field(default=1024, ge=1)
    """Requests one gateway replica serves at once; beyond it the replica answers 503 `overloaded`."""
    fair_gate: bool = True
    """When this replica's event loop is saturated, requests wait at a per-organization fair gate
    (VTC by served tokens, before their body is read) instead of in the loop's FIFO, so a tenant's
    share of a saturated gateway does not follow its concurrency (`serving/admission/_gate.py`)."""
    fair_gate_min_requests: int = Field(default=16, ge=1)
    """The fair gate always lets at least this many requests in at once."""
    fair_gate_timeout_s: float = Field(default=30.0, gt=0)
    """Longest a request waits at the fair gate; then 503 `gateway_busy` with `Retry-After`."""
    client_stall_timeout_s: float = Field(default=30.0, gt=0)
    """Longest a streamed response may wait on a client that stopped reading; then the stream ends
    as a disconnect (aborted at the pool, charged what was produced)."""
    read_timeout_s: float = Field(default=15.0, gt=0)
    """Longest a client may take to send a request's headers and body; then 408 and the connection closes."""
    access_log: bool = True
    """One JSON line per request to the replica's log (logger ``tokenweir.access``; fields in
    ``serving/gateway/access_log.py``); API keys never appear in it."""
    access_log_file: str | None = None
    """Also append the access lines to this file (mode 0600), e.g. for a log shipper."""
    otel_endpoint: str | None = Field(default=None, pattern=r"^https?://[^\s/]+(/\S*)?$")
    """OTLP/HTTP (protobuf) traces endpoint, the full path (e.g. `http://127.0.0.1:4318/v1/traces`):
    each request's span goes there, in batches sent off the event loop
    (``serving/gateway/tracing.py``; the `otel` extra). None: no tracing; the exporter is not imported."""
    otel_service_name: str = Field(default="tokenweir", min_length=1)
    """The spans' `service.name` (their `service.instance.id` is the gateway replica's id)."""
    otel_batch_delay_ms: float = Field(default=5000.0, gt=0, le=600_000)
    """Longest an ended span waits in its replica's queue before a batch is sent (OpenTelemetry's
    `BatchSpanProcessor` schedule delay; 512 queued spans are sent at once)."""
    internal_host: str = "127.0.0.1"
    """Address of the operator's listener (`/metrics`, `/internal/pools`, a deep `/readyz`): the
    node's address (or `node`, as for `host`) for a Prometheus elsewhere; never the public one
    unless a firewall guards the port."""
    internal_port: int = Field(default=9464, ge=1, le=65535)
    """Port of the operator's listener (each gateway replica on a node shares it)."""
    allow_gpu_pinning: bool = True
    """Whether a request may pin a GPU type with the `x-tokenweir-gpu` header."""
    node_resource: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:/-]{1,128}$")
    """A custom Ray resource each gateway replica takes one unit of, so gateways run only on the
    nodes started with it, the ones a load balancer sends clients to (`ray start --resources
    '{"tokenweir_gateway": 2}'`: up to two gateways there). None: any node."""
    prefix_routing: bool = True
    """Within a pool whose engines cache prefixes, send a request to the replica holding most of its
    prompt (within a load bound); false: the less loaded of two random replicas (cache-blind)."""
    prefix_cache_scope: Literal["fleet", "organization"] = "fleet"
    """Who shares cached prompt prefixes in the engines: `fleet`, every request (most hits);
    `organization`, only requests of one organization (each carries vLLM's `cache_salt`, derived
    from its organization by the gateway), for operators whose tenants must not share KV blocks."""

    _REMOVED: ClassVar[dict[str, str]] = {
        "token_channel": "the token channel is the only data path between gateways and pools (delete the key)",
    }

    @field_validator("otel_endpoint")
    @classmethod
    def _otel_installed(cls, v: str | None) -> str | None:
        if v is not None:
            import importlib.util

            try:
                found = all(
                    importlib.util.find_spec(m) is not None
                    for m in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http")
                )
            except ModuleNotFoundError:  # a parent package is missing
                found = False
            if not found:
                raise ValueError(
                    "OTLP export needs OpenTelemetry's SDK and OTLP/HTTP exporter: "
                    "pip install 'tokenweir[otel]'"
                )
        return v

    @field_validator("node_resource")
    @classmethod
    def _custom_resource(cls, v: str | None) -> str | None:
        if v is not None and v.upper() in _RAY_BUILTIN_RESOURCES:
            raise ValueError(f"{v!r} is a Ray built-in resource; name a custom one (e.g. tokenweir_gateway)")
        return v


_RAY_BUILTIN_RESOURCES = frozenset({"CPU", "GPU", "MEMORY", "OBJECT_STORE_MEMORY"})


class SloConfig(_Strict):
    """Latency targets of a pool."""

    ttft_ms: float = Field(default=2000.0, gt=0)
    """Time-to-first-token target, milliseconds."""
    tpot_ms: float = Field(default=100.0, gt=0)
    """Time-per-output-token target, milliseconds."""
    attainment_target: float = Field(default=0.9, gt=0, le=1)
    """Share of finished requests that should meet both targets (exported as
    `tokenweir_pool_slo_attainment_target_ratio`; the pool's SLO alert fires below it)."""


class PoolConfig(_Strict):
    """One model on one accelerator type with N replicas."""

    name: str = Field(pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$")
    """Pool name; also the Ray Serve deployment name suffix."""
    model: str
    """Served model name; must be in the model catalog."""
    accelerator: str = "CPU"
    """Accelerator type (H20, H100, H200, L20, L40S, A10, A100-80GB or CPU)."""
    engine: Literal["vllm", "sim"] = "vllm"
    """`vllm`: real vLLM AsyncLLM in the replica; `sim`: the simulated engine on the performance model."""
    replicas: int = Field(default=1, ge=1, le=1024)
    """Replicas of this pool (each holds one engine)."""
    gpus_per_replica: int = Field(default=1, ge=0, le=16)
    """GPUs each replica takes (tensor parallel size); ignored on CPU and for `sim`."""
    num_cpus: float = Field(default=0.0, ge=0)
    """Logical CPUs Ray reserves per replica."""
    graceful_shutdown_timeout_s: float = Field(default=20.0, ge=1, le=3600)
    """On a redeploy or scale-down, how long a replica's running streams may take to finish (it takes
    no new ones); then they end with an error and are charged what they produced."""
    stream_interval_ms: float = Field(default=0.0, ge=0, le=1000)
    """Hold a stream's tokens this long to send several per message (0: send each step's at once)."""
    engine_args: dict[str, Any] = Field(default_factory=dict)
    """vLLM engine arguments; override the catalog's per-GPU settings and the hardware plan."""
    cpu_core_placement: bool = True
    """For `engine: vllm` on `CPU`: put vLLM's engine core on the cores its model worker is bound to,
    and this pool's replica and same-node gateways on the other cores (`serving/engines/cpu_placement.py`)."""
    cpu_model_in_engine_core: bool = True
    """For `engine: vllm` on `CPU` with one device: run the model in vLLM's engine-core process with
    the threads and cores vLLM would give its worker process, instead of the separate worker the CPU
    build starts (the two busy-wait on each other every step). `false` keeps the worker process;
    ignored when `engine_args` names a `distributed_executor_backend`."""
    sim_speedup: float = Field(default=1.0, gt=0)
    """For `engine: sim`: how much faster than real time the simulated engine runs."""
    slo: SloConfig = SloConfig()
    """Latency targets used by planning and admission."""
    admission: AdmissionSettings = AdmissionSettings()
    """The admission core's settings (queue bounds and deadline, limit steering, fair-share prices)."""

    _REMOVED: ClassVar[dict[str, str]] = {
        "max_ongoing_requests": "requests reach pools on the token channel, not through Ray Serve; "
        "the replica's admission core bounds them (`admission.max_queued_requests`, `engine_args.max_num_seqs`)",
    }

    @field_validator("admission", mode="before")
    @classmethod
    def _admission_keys_set_elsewhere(cls, v: Any, info: ValidationInfo) -> Any:
        moved = (
            [f"`{k}` is set by {_SET_ELSEWHERE[k]}" for k in v if k in _SET_ELSEWHERE]
            if isinstance(v, dict)
            else []
        )
        if moved:
            raise ValueError(f"pools.{info.data.get('name')}.admission: " + "; ".join(moved))
        return v


_SET_ELSEWHERE = {
    "max_num_seqs": "`engine_args.max_num_seqs` (GPU pools: the hardware plan)",
    "kv_capacity_tokens": "the engine's KV cache (`engine_args.gpu_memory_utilization`, `kv_cache_space_gib` on CPU)",
    "ttft_slo_ms": "`slo.ttft_ms`",
    "tpot_slo_ms": "`slo.tpot_ms`",
}
"""Admission bounds that come from the engine and the pool's SLOs, and where to set them instead."""


class RayConfig(_Strict):
    """How `tokenweir serve` reaches Ray."""

    address: str | None = None
    """None: start a local Ray; `auto` or `ray://...`: join an existing cluster."""
    num_cpus: int | None = Field(default=None, ge=1)
    """Logical CPUs of a locally started Ray (None: Ray's own count, at least 4)."""
    namespace: str = "tokenweir"
    """Ray namespace of the application."""


class ModelOverride(_Strict):
    """Per-deployment changes to a catalog entry."""

    tokenizer: str | None = None
    """Tokenizer source to count prompts with (e.g. `builtin:tiny-llama` for simulated pools without hub access)."""
    max_model_len: int | None = Field(default=None, ge=16)
    """A shorter context than the catalog's."""


class TokenweirConfig(_Strict):
    """The whole configuration."""

    gateway: GatewayConfig = GatewayConfig()
    """The HTTP ingress."""
    ray: RayConfig = RayConfig()
    """Ray connection."""
    state_dir: str = "~/.cache/tokenweir/state"
    """Directory of durable state (the ledger's SQLite file)."""
    catalog: str | None = None
    """Path of a model catalog file (None: the one shipped in `models/catalog.yaml`)."""
    metering: MeteringConfig = MeteringConfig()
    """Tenant keys, credits, rate limits and the ledger (on by default)."""
    models: dict[str, ModelOverride] = Field(default_factory=dict)
    """Per-model overrides of catalog entries, keyed by served name."""
    gpu_prices: dict[str, float] = Field(default_factory=dict)
    """Relative price per GPU-hour by accelerator type, overriding the catalog's (H100 = 1.0)."""
    pools: list[PoolConfig] = Field(min_length=1)
    """Model pools; at least one."""

    @model_validator(mode="after")
    def _check_pools(self) -> TokenweirConfig:
        g = self.gateway
        if (g.internal_host, g.internal_port) == (g.host, g.port):
            raise ValueError("gateway.internal_port: the operator's listener needs its own address or port")
        names = [p.name for p in self.pools]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pools: duplicate pool names {dupes}")
        for i, pool in enumerate(self.pools):
            if pool.accelerator not in CATALOG:
                raise ValueError(
                    f"pools.{i}.accelerator: unknown accelerator {pool.accelerator!r}; known: {sorted(CATALOG)}"
                )
            if pool.engine == "sim" and pool.accelerator == "CPU":
                raise ValueError(f"pools.{i}: a simulated pool needs a GPU accelerator type, got 'CPU'")
        for gpu, price in self.gpu_prices.items():
            if gpu not in CATALOG or price <= 0:
                raise ValueError(f"gpu_prices.{gpu}: unknown accelerator or non-positive price ({price!r})")
        return self

    def metering_config(self) -> MeteringConfig:
        """The metering section with its state directory resolved."""
        from pathlib import Path

        state = self.metering.state_dir or Path(self.state_dir)
        return self.metering.model_copy(update={"state_dir": Path(state).expanduser()})
