"""Hardware-aware routing across pools of one model on different GPU types: the cheapest pool
predicted to meet the SLOs, else the fastest; pure policy, the clock passed in."""

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
    "RouteDecision",
    "RouteReason",
    "RouteRequest",
    "Router",
    "RouterConfig",
    "RoutingError",
    "RoutingStats",
    "StepTimePredictor",
    "price_per_mtok",
]
