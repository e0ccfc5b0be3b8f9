"""What the router knows about pools and requests, and what it answers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field


class StepTimePredictor(Protocol):
    """What routing needs from a performance model (``serving.hardware.PerfModel`` satisfies it)."""

    def decode_step_time_uniform_s(self, batch: int, context_tokens: int) -> float:
        """One decode step for ``batch`` sequences that each attend over ``context_tokens``."""
        ...

    def chunked_prefill_time_s(self, prompt_tokens: int, chunk_tokens: int, cached_tokens: int = 0) -> float:
        """Time to prefill one prompt alone in chunks of ``chunk_tokens``."""
        ...


class RouteReason(StrEnum):
    """Why a pool was chosen (a bounded set: safe as a metric label)."""

    CHEAPEST_MEETS_SLO = "cheapest_meets_slo"
    """The cheapest candidate is predicted to meet both SLOs."""
    CHEAPER_POOLS_MISS_SLO = "cheaper_pools_miss_slo"
    """Cheaper candidates are predicted to miss an SLO; this is the cheapest that meets both."""
    FASTEST_NONE_MEET_SLO = "fastest_none_meet_slo"
    """No candidate is predicted to meet both SLOs; this one finishes soonest."""
    NO_LOAD_DATA = "no_load_data"
    """No candidate has a fresh load snapshot; the cheapest was taken."""
    ONLY_CANDIDATE = "only_candidate"
    """One pool serves this model (and GPU pin)."""


class RoutingError(Exception):
    """No pool can take the request (fatal for this request; map to 400/404 at the API)."""


class NoPoolForGpuError(RoutingError):
    """The request pins a GPU type that no pool of its model runs on."""

    def __init__(self, model: str, gpu_type: str, available: list[str]) -> None:
        super().__init__(
            f"no pool serves model {model!r} on GPU type {gpu_type!r}; available: {', '.join(available) or 'none'}"
        )
        self.model = model
        self.gpu_type = gpu_type
        self.available = available


@dataclass(frozen=True, slots=True)
class PoolInfo:
    """A pool as the router sees it: static facts from the config, the catalog and the plan."""

    pool_id: str
    model: str
    gpu_type: str
    price_per_mtok: float
    """Price per million tokens at the plan's throughput (any unit consistent across pools)."""
    predictor: StepTimePredictor
    chunk_tokens: int
    """The engine's ``max_num_batched_tokens`` (prefill chunk)."""
    max_num_seqs: int
    """Per replica; the batch assumed before a snapshot arrives."""
    queue_deadline_s: float
    """The pool's admission queue deadline: a longer predicted wait means a refusal."""
    replicas: int = 1
    prefix_caching: bool = False
    """Whether requests are routed by cached prefix: the engines cache prompt prefixes and there is
    a choice to make (several replicas, or several pools of the model)."""
    block_tokens: int = 16
    """The engines' KV block size (vLLM's ``block_size``: 16 on GPUs, 128 in the CPU build)."""
    kv_capacity_tokens: int = 0
    """KV cache capacity of one replica (the performance model's), bounding its prefix index."""


@dataclass(frozen=True, slots=True)
class RouteRequest:
    model: str
    prompt_tokens: int
    max_tokens: int
    ttft_slo_ms: float
    tpot_slo_ms: float
    pinned_gpu: str | None = None
    """From the ``x-tokenweir-gpu`` header or the tenant's config, when policy allows."""
    cached_tokens: Mapping[str, int] | None = None
    """Per pool: prompt tokens its best replica holds in cache (the prefix index's estimate); the
    predicted TTFT there prefills only the rest."""


@dataclass(frozen=True, slots=True)
class Prediction:
    pool_id: str
    ttft_s: float
    tpot_s: float
    queue_wait_s: float
    meets_slo: bool
    stale: bool
    """True when no fresh snapshot backed it (the pool's planned values were used)."""


@dataclass(frozen=True, slots=True)
class RouteDecision:
    pool_id: str
    reason: RouteReason
    prediction: Prediction
    pinned: bool
    candidates: tuple[Prediction, ...]


class RouterConfig(BaseModel):
    """How the gateway picks a pool."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    slo_margin: float = Field(default=0.9, gt=0, le=1)
    """A pool meets an SLO when its prediction is within this share of the target."""
    stale_after_s: float = Field(default=5.0, gt=0)
    """Snapshots older than this are ignored (the pool counts as without load data)."""
    expected_output_tokens: int = Field(default=192, ge=1)
    """Output length assumed for a request (capped by its ``max_tokens``)."""
    measured_correction_bounds: tuple[float, float] = (0.5, 3.0)
    """Bounds of the factor measured TPOT / predicted TPOT applied to a pool's predictions."""


@dataclass(slots=True)
class RoutingStats:
    """Plain counters for the metrics exporter (pool ids and reasons are bounded sets)."""

    decisions_total: dict[tuple[str, str], int] = field(default_factory=dict)
    """Decisions by (pool_id, reason)."""
    predicted_tpot_s: dict[str, float] = field(default_factory=dict)
    """Last predicted TPOT per pool (at the load of the last decision)."""
    measured_tpot_s: dict[str, float] = field(default_factory=dict)
    """Last measured recent TPOT per pool (from its snapshot)."""
