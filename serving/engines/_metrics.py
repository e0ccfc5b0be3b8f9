"""An engine's own metrics as plain data, under vLLM's names and meanings (``vllm:*``).

A pool replica ships one :class:`EngineMetrics` per load-board publication; the gateway's exporter
renders it as vLLM's Prometheus logger would, labelled with the pool, replica and GPU type
(``serving.metrics``). The vLLM engine fills it from its own Prometheus logger's registry in the
replica's process (:func:`from_prometheus`, what vLLM's ``get_metrics_snapshot()`` reads); the
simulated engine from its scheduler and a :class:`EngineMetricsRecorder` it feeds step by step,
with vLLM's bucket boundaries, so a simulated fleet reads like a real one.

What each figure means is vLLM v1's (0.32):

* ``num_requests_running`` / ``num_requests_waiting``: sequences in the scheduler's running list
  and queue (vLLM schedules each of ``n`` choices as its own request);
* ``kv_cache_usage_perc``: the share of KV blocks not free (a cached block nobody holds is free),
  0..1 despite the name;
* ``num_preemptions``: sequences preempted (recompute), cumulative;
* ``prompt_tokens``: prompt tokens of sequences that produced their first token (cached ones
  included); ``generation_tokens``: tokens sampled;
* ``prefix_cache_queries`` / ``prefix_cache_hits``: prompt tokens looked up / found cached;
* ``time_to_first_token_seconds``: arrival to first token, one observation per sequence;
  ``inter_token_latency_seconds``: between consecutive tokens of a sequence, one per token after
  the first; ``e2e_request_latency_seconds``: arrival to the last token of a sequence that
  finished in the engine (``stop`` or ``length``; an abort is not observed, as in vLLM).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "E2E_REQUEST_LATENCY_BUCKETS_S",
    "INTER_TOKEN_LATENCY_BUCKETS_S",
    "TIME_TO_FIRST_TOKEN_BUCKETS_S",
    "VLLM_SAMPLE_NAMES",
    "EngineMetrics",
    "EngineMetricsRecorder",
    "Histogram",
    "HistogramSnapshot",
    "from_prometheus",
]

# vLLM 0.32's defaults (vllm/v1/metrics/buckets.py); the live test compares them with the real
# engine's exposition.
TIME_TO_FIRST_TOKEN_BUCKETS_S: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
INTER_TOKEN_LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_REQUEST_LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """A Prometheus histogram's state: ``counts[i]`` observations were <= ``bounds[i]``
    (cumulative, as exposed), ``count`` in all (the ``+Inf`` bucket)."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    count: int
    sum: float

    @classmethod
    def empty(cls, bounds: tuple[float, ...]) -> HistogramSnapshot:
        return cls(bounds, (0,) * len(bounds), 0, 0.0)


class Histogram:
    """Observations into fixed buckets (Prometheus's ``le``: a value equal to a bound is in it)."""

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"bucket bounds must be increasing: {bounds}")
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # per bucket, the last one +Inf
        self._sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        """Record ``value`` (``n`` times)."""
        self._counts[bisect_left(self._bounds, value)] += n
        self._sum += value * n

    def snapshot(self) -> HistogramSnapshot:
        cumulative, n = [], 0
        for c in self._counts[:-1]:
            n += c
            cumulative.append(n)
        return HistogramSnapshot(self._bounds, tuple(cumulative), n + self._counts[-1], self._sum)


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """One engine's figures at one moment (gauges) and since it started (counters, histograms)."""

    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage_perc: float
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    time_to_first_token_seconds: HistogramSnapshot
    inter_token_latency_seconds: HistogramSnapshot
    e2e_request_latency_seconds: HistogramSnapshot


class EngineMetricsRecorder:
    """The per-request figures of :class:`EngineMetrics` that a scheduler does not keep (token
    counters and latency histograms), fed with times on the engine's own clock. Pure: no clock,
    no I/O."""

    __slots__ = ("e2e", "generation_tokens", "itl", "prompt_tokens", "ttft")

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.ttft = Histogram(TIME_TO_FIRST_TOKEN_BUCKETS_S)
        self.itl = Histogram(INTER_TOKEN_LATENCY_BUCKETS_S)
        self.e2e = Histogram(E2E_REQUEST_LATENCY_BUCKETS_S)

    def first_token(self, ttft_s: float, prompt_tokens: int) -> None:
        """A sequence sampled its first token ``ttft_s`` after it arrived."""
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += 1
        self.ttft.observe(ttft_s)

    def next_token(self, itl_s: float, n: int = 1) -> None:
        """``n`` sequences each sampled another token ``itl_s`` after their previous one."""
        self.generation_tokens += n
        self.itl.observe(itl_s, n)

    def finished(self, e2e_s: float) -> None:
        """A sequence finished in the engine (stop or length) ``e2e_s`` after it arrived."""
        self.e2e.observe(e2e_s)

    def snapshot(
        self,
        *,
        running: int,
        waiting: int,
        kv_cache_usage: float,
        preemptions: int,
        prefix_cache_queries: int,
        prefix_cache_hits: int,
    ) -> EngineMetrics:
        """These counters with the scheduler's own figures."""
        return EngineMetrics(
            num_requests_running=running,
            num_requests_waiting=waiting,
            kv_cache_usage_perc=kv_cache_usage,
            num_preemptions=preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            prefix_cache_queries=prefix_cache_queries,
            prefix_cache_hits=prefix_cache_hits,
            time_to_first_token_seconds=self.ttft.snapshot(),
            inter_token_latency_seconds=self.itl.snapshot(),
            e2e_request_latency_seconds=self.e2e.snapshot(),
        )


_GAUGES = {
    "vllm:num_requests_running": "num_requests_running",
    "vllm:num_requests_waiting": "num_requests_waiting",
    "vllm:kv_cache_usage_perc": "kv_cache_usage_perc",
}
_COUNTERS = {
    "vllm:num_preemptions": "num_preemptions",
    "vllm:prompt_tokens": "prompt_tokens",
    "vllm:generation_tokens": "generation_tokens",
    "vllm:prefix_cache_queries": "prefix_cache_queries",
    "vllm:prefix_cache_hits": "prefix_cache_hits",
}
_HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": ("time_to_first_token_seconds", TIME_TO_FIRST_TOKEN_BUCKETS_S),
    "vllm:inter_token_latency_seconds": ("inter_token_latency_seconds", INTER_TOKEN_LATENCY_BUCKETS_S),
    "vllm:e2e_request_latency_seconds": ("e2e_request_latency_seconds", E2E_REQUEST_LATENCY_BUCKETS_S),
}
VLLM_SAMPLE_NAMES: frozenset[str] = frozenset(
    [*_GAUGES, *(f"{n}_total" for n in _COUNTERS)]
    + [f"{n}{suffix}" for n in _HISTOGRAMS for suffix in ("_bucket", "_count", "_sum")]
)
"""The samples of vLLM's Prometheus logger that :class:`EngineMetrics` holds (for
``REGISTRY.restricted_registry``: a scrape of those alone)."""


def from_prometheus(families: Iterable[Any]) -> EngineMetrics:
    """:class:`EngineMetrics` from metric families of vLLM's Prometheus logger, as
    ``prometheus_client`` collects them in the engine's process (``vllm:*`` names, labels
    ``model_name`` and ``engine``). Summed over vLLM's engine indexes (data parallel); the KV
    usage is the fullest engine's. Bucket bounds are the engine's own (its
    ``custom_histogram_buckets`` included). A figure the registry lacks is 0."""
    kw: dict[str, Any] = {k: 0 for k in (*_GAUGES.values(), *_COUNTERS.values())}
    kw["kv_cache_usage_perc"] = 0.0
    for key, bounds in _HISTOGRAMS.values():
        kw[key] = HistogramSnapshot.empty(bounds)
    for fam in families:
        name = fam.name
        if name in _GAUGES or name in _COUNTERS:
            key = _GAUGES.get(name) or _COUNTERS[name]
            wanted = name if name in _GAUGES else f"{name}_total"
            for s in fam.samples:
                if s.name != wanted:
                    continue
                if key == "kv_cache_usage_perc":
                    kw[key] = max(kw[key], float(s.value))
                else:
                    kw[key] += int(s.value)
        elif name in _HISTOGRAMS:
            key = _HISTOGRAMS[name][0]
            per_engine: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
            for s in fam.samples:
                labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
                h = per_engine.setdefault(labels, {"buckets": [], "count": 0, "sum": 0.0})
                if s.name == f"{name}_bucket":
                    le = float(s.labels["le"])
                    if not math.isinf(le):
                        h["buckets"].append((le, int(s.value)))
                elif s.name == f"{name}_count":
                    h["count"] = int(s.value)
                elif s.name == f"{name}_sum":
                    h["sum"] = float(s.value)
            merged: HistogramSnapshot | None = None
            for h in per_engine.values():
                finite = sorted(h["buckets"])
                one = HistogramSnapshot(
                    tuple(b for b, _ in finite), tuple(n for _, n in finite), h["count"], h["sum"]
                )
                if merged is None:
                    merged = one
                else:  # engines of one vLLM share their bucket bounds
                    merged = HistogramSnapshot(
                        merged.bounds,
                        tuple(a + b for a, b in zip(merged.counts, one.counts, strict=True)),
                        merged.count + one.count,
                        merged.sum + one.sum,
                    )
            if merged is not None:
                kw[key] = merged
    return EngineMetrics(**kw)
