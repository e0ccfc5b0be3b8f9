"""Engines a pool replica can drive: vLLM (``vllm_engine``) and the simulated engine (``sim``)."""

from serving.engines._metrics import EngineMetrics, HistogramSnapshot, MetricFamily, MetricSample
from serving.engines.base import (
    ChoiceDelta,
    Engine,
    EngineCapacity,
    EngineChunk,
    EngineDeadError,
    EngineError,
    EngineRequest,
    SamplingSpec,
    TokenLogprob,
)

__all__ = [
    "ChoiceDelta",
    "Engine",
    "EngineCapacity",
    "EngineChunk",
    "EngineDeadError",
    "EngineError",
    "EngineMetrics",
    "EngineRequest",
    "HistogramSnapshot",
    "MetricFamily",
    "MetricSample",
    "SamplingSpec",
    "TokenLogprob",
]
