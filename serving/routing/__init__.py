"""Hardware-aware routing across pools of one model on different GPU types: the cheapest pool
predicted to meet the SLOs, else the fastest; then a replica within the pool. Pure policy, the
clock passed in. Within a pool, replicas are chosen by cached prefix under a load bound
(:class:`PrefixRouter`), and a pool's predicted TTFT prefills only what its best replica has not
cached."""

from serving.routing._prefix import (
    PrefixIndex,
    PrefixRouter,
    PrefixRoutingStats,
    PromptBlocks,
    ReplicaChoice,
    ReplicaReason,
)
from serving.routing._replica import pick_replica
from serving.routing._router import Router, price_per_mtok
from serving.routing._types import (
    NoPoolForGpuError,
    PoolInfo,
    Prediction,
    RouteDecision,
    RouterConfig,
    RouteReason,
    RouteRequest,
    RoutingError,
    RoutingStats,
    StepTimePredictor,
)

__all__ = [
    "NoPoolForGpuError",
    "PoolInfo",
    "Prediction",
    "PrefixIndex",
    "PrefixRouter",
    "PrefixRoutingStats",
    "PromptBlocks",
    "ReplicaChoice",
    "ReplicaReason",
    "RouteDecision",
    "RouteReason",
    "RouteRequest",
    "Router",
    "RouterConfig",
    "RoutingError",
    "RoutingStats",
    "StepTimePredictor",
    "pick_replica",
    "price_per_mtok",
]
