"""An engine's own metrics as plain data: vLLM's Prometheus families, shipped as they are.

A pool replica ships one :class:`EngineMetrics` per load-board publication; the gateway's exporter
(``serving.metrics``) emits each of its families as is, with ``pool``, ``replica`` and ``gpu``
added to every sample's labels. Why families and not figures: the exposition is then vLLM's own
(every ``vllm:*`` family its logger registers, its names, types, help, labels and bucket bounds,
``custom_histogram_buckets`` and a new vLLM's families included), with nothing copied by hand that
could drift from it.

* The vLLM engine fills it from its Prometheus logger's registry in the replica's process
  (:func:`from_prometheus`): every ``vllm:*`` family, every sample with its labels (vLLM's
  ``model_name`` and ``engine`` among them) and value. Only the ``_created`` samples are left out
  (registration times, which the text format turns into extra gauge series; Prometheus does not
  read them there).
* The simulated engine, vLLM's stand-in, builds the same structure (:class:`EngineMetricsRecorder`)
  for the families it can model, under vLLM 0.32's names, help and default buckets, labelled
  ``model_name`` and ``engine="0"`` as one vLLM engine is.

Bounded: vLLM's families are fixed when its logger starts, and their label values are the served
model name, the engine index (data-parallel rank) and vLLM's enums, so a payload holds at most
vLLM's families x engines samples (a few hundred per engine), never request data.

What the simulated figures mean is vLLM v1's (0.32):

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
from typing import Any, Literal, cast, get_args

from prometheus_client.utils import floatToGoString

__all__ = [
    "E2E_REQUEST_LATENCY_BUCKETS_S",
    "INTER_TOKEN_LATENCY_BUCKETS_S",
    "TIME_TO_FIRST_TOKEN_BUCKETS_S",
    "VLLM_PREFIX",
    "EngineMetrics",
    "EngineMetricsRecorder",
    "Histogram",
    "HistogramSnapshot",
    "MetricFamily",
    "MetricSample",
    "MetricType",
    "from_prometheus",
]

VLLM_PREFIX = "vllm:"
"""The families a replica ships: vLLM's own."""

MetricType = Literal[
    "counter", "gauge", "histogram", "gaugehistogram", "summary", "info", "stateset", "unknown"
]
"""A family's type, as ``prometheus_client`` names it (vLLM's logger uses the first three)."""
_TYPES: frozenset[str] = frozenset(get_args(MetricType))
_CREATED = "_created"


@dataclass(frozen=True, slots=True)
class MetricSample:
    """One sample as the engine's registry exposes it: its full name (``vllm:prompt_tokens_total``,
    ``vllm:time_to_first_token_seconds_bucket``), its labels in the engine's order (a bucket's
    ``le`` among them, as the exposition writes it) and its value."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    def __reduce__(self) -> tuple[Any, ...]:  # positional on the wire: smaller pickles
        return (MetricSample, (self.name, self.labels, self.value))


@dataclass(frozen=True, slots=True)
class MetricFamily:
    """One Prometheus family: ``name`` without a counter's ``_total``, as ``prometheus_client``
    collects it."""

    name: str
    type: MetricType
    documentation: str
    samples: tuple[MetricSample, ...]

    def __reduce__(self) -> tuple[Any, ...]:
        return (MetricFamily, (self.name, self.type, self.documentation, self.samples))


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


@dataclass(frozen=True, slots=True)
class EngineMetrics:
    """One engine's families at one moment (gauges) and since it started (counters, histograms),
    what a replica ships and the exporter emits. ``family``, ``total`` and ``histogram`` read it
    back (tests and tools; Tokenweir's routing and admission use their own figures)."""

    families: tuple[MetricFamily, ...]

    def family(self, name: str) -> MetricFamily | None:
        return next((f for f in self.families if f.name == name), None)

    def total(self, sample: str) -> float:
        """The sum of the samples named ``sample`` (over engines and any other label); 0 if none."""
        return sum(s.value for f in self.families for s in f.samples if s.name == sample)

    def histogram(self, name: str) -> HistogramSnapshot | None:
        """Histogram ``name`` summed over its series (engines share their bucket bounds)."""
        fam = self.family(name)
        if fam is None or fam.type != "histogram":
            return None
        buckets: dict[float, float] = {}
        count = total = 0.0
        for s in fam.samples:
            if s.name == f"{name}_bucket":
                le = float(dict(s.labels)["le"])
                if not math.isinf(le):
                    buckets[le] = buckets.get(le, 0.0) + s.value
            elif s.name == f"{name}_count":
                count += s.value
            elif s.name == f"{name}_sum":
                total += s.value
        bounds = tuple(sorted(buckets))
        return HistogramSnapshot(bounds, tuple(int(buckets[b]) for b in bounds), int(count), total)


def from_prometheus(families: Iterable[Any]) -> EngineMetrics:
    """Every ``vllm:*`` family among ``families`` (``prometheus_client`` metric families, as a
    registry collects them in the engine's process), with its samples as they are but for
    ``_created``. Equal names and label sets are one object each, so a pickle holds them once."""
    out = []
    shared: dict[Any, Any] = {}
    for fam in families:
        if not fam.name.startswith(VLLM_PREFIX) or fam.type not in _TYPES:
            continue
        created = f"{fam.name}{_CREATED}"
        samples = []
        for s in fam.samples:
            if s.name == created:
                continue
            labels = tuple(shared.setdefault(kv, kv) for kv in s.labels.items())
            samples.append(
                MetricSample(
                    shared.setdefault(s.name, s.name), shared.setdefault(labels, labels), float(s.value)
                )
            )
        out.append(MetricFamily(fam.name, cast(MetricType, fam.type), fam.documentation, tuple(samples)))
    return EngineMetrics(tuple(out))


# ---- the simulated engine's stand-in for vLLM's logger ----------------------------------------------

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

# The families the simulated engine models, with vLLM 0.32's help (vllm/v1/metrics/loggers.py);
# the live test compares names, types and help with the real engine's.
_HELP = {
    "vllm:num_requests_running": "Number of requests in model execution batches.",
    "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
    "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
    "vllm:prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
    "vllm:prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
    "vllm:num_preemptions": "Cumulative number of preemption from the engine.",
    "vllm:prompt_tokens": "Number of prefill tokens processed.",
    "vllm:generation_tokens": "Number of generation tokens processed.",
    "vllm:time_to_first_token_seconds": "Histogram of time to first token in seconds.",
    "vllm:inter_token_latency_seconds": "Histogram of inter-token latency in seconds.",
    "vllm:e2e_request_latency_seconds": "Histogram of e2e request latency in seconds.",
}


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


class EngineMetricsRecorder:
    """The per-request figures a scheduler does not keep (token counters and latency histograms),
    fed with times on the engine's own clock, and :meth:`snapshot`: them with the scheduler's
    figures as vLLM's logger would expose them. Pure: no clock, no I/O."""

    __slots__ = ("_labels", "e2e", "generation_tokens", "itl", "prompt_tokens", "ttft")

    def __init__(self, model_name: str) -> None:
        self._labels: tuple[tuple[str, str], ...] = (("model_name", model_name), ("engine", "0"))
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
        """These counters with the scheduler's own figures, as vLLM's families."""
        gauges = {
            "vllm:num_requests_running": running,
            "vllm:num_requests_waiting": waiting,
            "vllm:kv_cache_usage_perc": kv_cache_usage,
        }
        counters = {
            "vllm:prefix_cache_queries": prefix_cache_queries,
            "vllm:prefix_cache_hits": prefix_cache_hits,
            "vllm:num_preemptions": preemptions,
            "vllm:prompt_tokens": self.prompt_tokens,
            "vllm:generation_tokens": self.generation_tokens,
        }
        hists = {
            "vllm:time_to_first_token_seconds": self.ttft,
            "vllm:inter_token_latency_seconds": self.itl,
            "vllm:e2e_request_latency_seconds": self.e2e,
        }
        lb = self._labels
        fams = [self._family(n, "gauge", (MetricSample(n, lb, float(v)),)) for n, v in gauges.items()]
        fams += [
            self._family(n, "counter", (MetricSample(f"{n}_total", lb, float(v)),))
            for n, v in counters.items()
        ]
        fams += [self._family(n, "histogram", self._histogram(n, h.snapshot())) for n, h in hists.items()]
        return EngineMetrics(tuple(fams))

    @staticmethod
    def _family(name: str, typ: MetricType, samples: tuple[MetricSample, ...]) -> MetricFamily:
        return MetricFamily(name, typ, _HELP[name], samples)

    def _histogram(self, name: str, h: HistogramSnapshot) -> tuple[MetricSample, ...]:
        lb = self._labels
        les = [*(floatToGoString(b) for b in h.bounds), "+Inf"]
        counts = [*h.counts, h.count]
        buckets = [
            MetricSample(f"{name}_bucket", (*lb, ("le", le)), float(n))
            for le, n in zip(les, counts, strict=True)
        ]
        return (
            *buckets,
            MetricSample(f"{name}_count", lb, float(h.count)),
            MetricSample(f"{name}_sum", lb, h.sum),
        )
