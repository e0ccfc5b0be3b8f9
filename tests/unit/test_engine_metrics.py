"""Engine metrics under vLLM's names: the simulated engine's figures against its scheduler and the
requests' usage, the histogram arithmetic, vLLM's registry read as the vLLM engine reads it, and
their export per pool replica with vLLM's names, help and buckets."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client import Histogram as PromHistogram
from prometheus_client.parser import text_string_to_metric_families

from serving.admission import AdmissionStats
from serving.engines import EngineMetrics
from serving.engines._metrics import (
    E2E_REQUEST_LATENCY_BUCKETS_S,
    INTER_TOKEN_LATENCY_BUCKETS_S,
    TIME_TO_FIRST_TOKEN_BUCKETS_S,
    VLLM_SAMPLE_NAMES,
    Histogram,
    HistogramSnapshot,
    from_prometheus,
)
from serving.engines.sim import FakeClock, SimEngine
from serving.hardware.plan import EngineSettings
from serving.metrics import BoardCollector, render
from tests.unit.test_sim_engine import H100, LLAMA8B, PERF, Collector, req, run_until, settle

ENGINE_NAMES = {
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:time_to_first_token_seconds_count",
    "vllm:time_to_first_token_seconds_sum",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:inter_token_latency_seconds_count",
    "vllm:inter_token_latency_seconds_sum",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_count",
    "vllm:e2e_request_latency_seconds_sum",
}


def test_histogram_buckets_are_prometheus_le() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(v)
    assert h.snapshot() == HistogramSnapshot((0.1, 1.0), (2, 4), 5, pytest.approx(4.65))
    h.observe(0.2, 3)  # three sequences with one inter-token latency
    assert h.snapshot() == HistogramSnapshot((0.1, 1.0), (2, 7), 8, pytest.approx(5.25))
    with pytest.raises(ValueError):
        Histogram((1.0, 0.5))


async def test_sim_figures_follow_its_scheduler_and_the_requests_usage() -> None:
    clock = FakeClock(50.0)
    # 40 KV blocks, three sequences at a time: the fourth request waits, and the three running
    # ones outgrow the cache (3 x (100 + 120) tokens need 42 blocks of 16): preemptions.
    engine = SimEngine(
        LLAMA8B,
        H100,
        EngineSettings(3, 2048, 0.9),
        clock=clock,
        kv_capacity_tokens=640,
        max_model_len=400,
        eos_mean_tokens=None,
    )
    await engine.start()
    idle = engine.engine_metrics()
    assert (idle.num_requests_running, idle.num_requests_waiting, idle.kv_cache_usage_perc) == (0, 0, 0.0)
    assert idle.time_to_first_token_seconds == HistogramSnapshot.empty(TIME_TO_FIRST_TOKEN_BUCKETS_S)

    cs = [Collector(engine, clock, req(f"r{i}", prompt=100, max_tokens=120)) for i in range(4)]
    await settle()
    clock.advance_to_next()  # the first step (three prefills) has ended
    await settle()
    busy = engine.engine_metrics()
    sched = engine._sched
    assert (busy.num_requests_running, busy.num_requests_waiting) == (len(sched.running), len(sched.waiting))
    assert (busy.num_requests_running, busy.num_requests_waiting) == (3, 1)
    assert busy.kv_cache_usage_perc == pytest.approx(1 - sched.free_blocks / sched.num_blocks)
    assert busy.kv_cache_usage_perc == pytest.approx(21 / 40)  # 3 x 7 blocks of 16 for 101 tokens
    assert busy.time_to_first_token_seconds.count == 3
    assert busy.time_to_first_token_seconds.sum == pytest.approx(3 * PERF.prefill_time_s([100] * 3))

    await run_until(clock, lambda: all(c.done for c in cs))
    done = engine.engine_metrics()
    usage = [c.chunks[-1][1] for c in cs]
    assert (done.num_requests_running, done.num_requests_waiting, done.kv_cache_usage_perc) == (0, 0, 0.0)
    assert done.num_preemptions == engine.stats.preemptions > 0
    assert done.prompt_tokens == sum(u.prompt_tokens for u in usage) == 400
    assert done.generation_tokens == sum(u.completion_tokens for u in usage) == 480
    assert done.prefix_cache_queries == engine.stats.prefix_cache.queries
    assert done.prefix_cache_hits == engine.stats.prefix_cache.hits
    # one TTFT and one end-to-end latency per request, an inter-token latency per later token
    assert done.time_to_first_token_seconds.count == 4
    assert done.e2e_request_latency_seconds.count == 4
    assert done.inter_token_latency_seconds.count == 4 * 119
    # their times are the tokens' times on the engine's timeline (every request arrived at 50 s)
    first = [c.chunks[0][0] for c in cs]
    last = [c.chunks[-1][0] for c in cs]
    assert done.time_to_first_token_seconds.sum == pytest.approx(sum(t - 50.0 for t in first))
    assert done.e2e_request_latency_seconds.sum == pytest.approx(sum(t - 50.0 for t in last))
    assert done.inter_token_latency_seconds.sum == pytest.approx(
        sum(b - a for a, b in zip(first, last, strict=True))
    )
    assert done.inter_token_latency_seconds.bounds == INTER_TOKEN_LATENCY_BUCKETS_S
    assert done.e2e_request_latency_seconds.bounds == E2E_REQUEST_LATENCY_BUCKETS_S
    await engine.shutdown()


async def test_sim_abort_is_not_a_finished_request() -> None:
    clock = FakeClock()
    engine = SimEngine(LLAMA8B, H100, EngineSettings(8, 2048, 0.9), clock=clock, eos_mean_tokens=None)
    await engine.start()
    stream = engine.generate(req("a", prompt=100, max_tokens=50))
    task = asyncio.get_running_loop().create_task(anext(stream))
    await run_until(clock, task.done)
    await stream.aclose()  # aborted after its first token
    m = engine.engine_metrics()
    assert m.time_to_first_token_seconds.count == 1 and m.e2e_request_latency_seconds.count == 0
    assert m.num_requests_running == 0 and m.generation_tokens >= 1
    await engine.shutdown()


def vllm_like_registry(engines: int = 1) -> CollectorRegistry:
    """A registry holding what vLLM's PrometheusStatLogger registers (names, labels, buckets),
    with a few figures recorded, plus a vLLM family EngineMetrics does not hold."""
    reg = CollectorRegistry()
    lbl = ["model_name", "engine"]
    running = Gauge("vllm:num_requests_running", "r", lbl, registry=reg)
    usage = Gauge("vllm:kv_cache_usage_perc", "u", lbl, registry=reg)
    prompt = Counter("vllm:prompt_tokens", "p", lbl, registry=reg)
    ttft = PromHistogram(
        "vllm:time_to_first_token_seconds", "t", lbl, buckets=TIME_TO_FIRST_TOKEN_BUCKETS_S, registry=reg
    )
    Counter("vllm:request_success", "s", [*lbl, "finished_reason"], registry=reg)
    for e in range(engines):
        labels = ("tiny", str(e))
        running.labels(*labels).set(3 + e)
        usage.labels(*labels).set(0.25 * (e + 1))
        prompt.labels(*labels).inc(100)
        ttft.labels(*labels).observe(0.03)
        ttft.labels(*labels).observe(3.0)
    return reg


def test_vllm_registry_reads_as_engine_metrics() -> None:
    reg = vllm_like_registry()
    m = from_prometheus(reg.restricted_registry(VLLM_SAMPLE_NAMES).collect())
    assert (m.num_requests_running, m.kv_cache_usage_perc, m.prompt_tokens) == (3, 0.25, 100)
    assert m.num_requests_waiting == 0 and m.generation_tokens == 0  # not registered: 0
    h = m.time_to_first_token_seconds
    assert h.bounds == TIME_TO_FIRST_TOKEN_BUCKETS_S and h.count == 2 and h.sum == pytest.approx(3.03)
    assert h.counts[TIME_TO_FIRST_TOKEN_BUCKETS_S.index(0.04)] == 1
    assert h.counts[TIME_TO_FIRST_TOKEN_BUCKETS_S.index(5.0)] == 2
    assert m.e2e_request_latency_seconds == HistogramSnapshot.empty(E2E_REQUEST_LATENCY_BUCKETS_S)
    # data parallel: summed over engines, the KV usage of the fullest
    dp = from_prometheus(vllm_like_registry(engines=2).collect())
    assert (dp.num_requests_running, dp.kv_cache_usage_perc, dp.prompt_tokens) == (7, 0.5, 200)
    assert dp.time_to_first_token_seconds.count == 4


def metrics(**kw: object) -> EngineMetrics:
    base: dict[str, object] = {
        "num_requests_running": 2,
        "num_requests_waiting": 1,
        "kv_cache_usage_perc": 0.5,
        "num_preemptions": 4,
        "prompt_tokens": 300,
        "generation_tokens": 360,
        "prefix_cache_queries": 300,
        "prefix_cache_hits": 120,
        "time_to_first_token_seconds": HistogramSnapshot((0.1, 1.0), (1, 3), 3, 1.2),
        "inter_token_latency_seconds": HistogramSnapshot.empty(INTER_TOKEN_LATENCY_BUCKETS_S),
        "e2e_request_latency_seconds": HistogramSnapshot.empty(E2E_REQUEST_LATENCY_BUCKETS_S),
    }
    return EngineMetrics(**{**base, **kw})  # type: ignore[arg-type]


def test_exported_per_replica_under_vllms_names_and_labels() -> None:
    def entry(replica: str, em: EngineMetrics | None) -> tuple[str, str, float, dict]:
        payload = {"pool": "h", "accelerator": "H100", "model": "m", "admission": AdmissionStats()}
        return ("pool", f"h/{replica}", 0.1, {**payload, "engine_metrics": em})

    text = render([BoardCollector([entry("r1", metrics()), entry("r2", None)])]).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("vllm:")}
    assert fams["vllm:kv_cache_usage_perc"].documentation == "KV-cache usage. 1 means 100 percent usage."
    assert fams["vllm:time_to_first_token_seconds"].type == "histogram"
    got = {(s.name, frozenset(s.labels.items())): s.value for f in fams.values() for s in f.samples}
    assert {name for name, _ in got} == ENGINE_NAMES
    # one replica (r2 has no engine metrics yet), labelled as vLLM's series plus pool, replica, gpu
    labels = {"model_name": "m", "pool": "h", "replica": "r1", "gpu": "H100"}
    assert {lb for _, lb in got if "le" not in dict(lb)} == {frozenset(labels.items())}
    assert got[("vllm:num_requests_waiting", frozenset(labels.items()))] == 1
    assert got[("vllm:num_preemptions_total", frozenset(labels.items()))] == 4
    assert got[("vllm:prefix_cache_hits_total", frozenset(labels.items()))] == 120
    buckets = {
        dict(lb)["le"]: v for (n, lb), v in got.items() if n == "vllm:time_to_first_token_seconds_bucket"
    }
    assert buckets == {"0.1": 1, "1.0": 3, "+Inf": 3}
