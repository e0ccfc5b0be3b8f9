"""Engine metrics as vLLM's own Prometheus families: the simulated engine's figures against its
scheduler and the requests' usage, the histogram arithmetic, a vLLM-like registry shipped as it is
(and the simulated engine's families the same as such a registry's), and their export per pool
replica: each family as is, with pool, replica and GPU labels added."""

from __future__ import annotations

import asyncio
import pickle

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client import Histogram as PromHistogram
from prometheus_client.parser import text_string_to_metric_families

from serving.admission import AdmissionStats
from serving.engines import EngineMetrics, MetricFamily, MetricSample
from serving.engines._metrics import (
    E2E_REQUEST_LATENCY_BUCKETS_S,
    INTER_TOKEN_LATENCY_BUCKETS_S,
    TIME_TO_FIRST_TOKEN_BUCKETS_S,
    EngineMetricsRecorder,
    Histogram,
    HistogramSnapshot,
    from_prometheus,
)
from serving.engines.sim import FakeClock, SimEngine
from serving.hardware.plan import EngineSettings
from serving.metrics import BoardCollector, render
from tests.unit.test_sim_engine import H100, LLAMA8B, PERF, Collector, req, run_until, settle

RUNNING, WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
KV_USAGE = "vllm:kv_cache_usage_perc"
TTFT, ITL = "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds"
E2E = "vllm:e2e_request_latency_seconds"


def test_histogram_buckets_are_prometheus_le() -> None:
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(v)
    assert h.snapshot() == HistogramSnapshot((0.1, 1.0), (2, 4), 5, pytest.approx(4.65))
    h.observe(0.2, 3)  # three sequences with one inter-token latency
    assert h.snapshot() == HistogramSnapshot((0.1, 1.0), (2, 7), 8, pytest.approx(5.25))
    with pytest.raises(ValueError):
        Histogram((1.0, 0.5))


def gauges(m: EngineMetrics) -> tuple[float, float, float]:
    return m.total(RUNNING), m.total(WAITING), m.total(KV_USAGE)


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
        served_name="m8b",
    )
    await engine.start()
    idle = engine.engine_metrics()
    assert gauges(idle) == (0, 0, 0.0)
    assert idle.histogram(TTFT) == HistogramSnapshot.empty(TIME_TO_FIRST_TOKEN_BUCKETS_S)
    # labelled as one vLLM engine serving the pool's model is
    assert {s.labels[:2] for f in idle.families for s in f.samples} == {
        (("model_name", "m8b"), ("engine", "0"))
    }

    cs = [Collector(engine, clock, req(f"r{i}", prompt=100, max_tokens=120)) for i in range(4)]
    await settle()
    clock.advance_to_next()  # the first step (three prefills) has ended
    await settle()
    busy = engine.engine_metrics()
    sched = engine._sched
    assert (busy.total(RUNNING), busy.total(WAITING)) == (len(sched.running), len(sched.waiting)) == (3, 1)
    assert busy.total(KV_USAGE) == pytest.approx(1 - sched.free_blocks / sched.num_blocks)
    assert busy.total(KV_USAGE) == pytest.approx(21 / 40)  # 3 x 7 blocks of 16 for 101 tokens
    ttft = busy.histogram(TTFT)
    assert ttft is not None and ttft.count == 3
    assert ttft.sum == pytest.approx(3 * PERF.prefill_time_s([100] * 3))

    await run_until(clock, lambda: all(c.done for c in cs))
    done = engine.engine_metrics()
    usage = [c.chunks[-1][1] for c in cs]
    assert gauges(done) == (0, 0, 0.0)
    assert done.total("vllm:num_preemptions_total") == engine.stats.preemptions > 0
    assert done.total("vllm:prompt_tokens_total") == sum(u.prompt_tokens for u in usage) == 400
    assert done.total("vllm:generation_tokens_total") == sum(u.completion_tokens for u in usage) == 480
    assert done.total("vllm:prefix_cache_queries_total") == engine.stats.prefix_cache.queries
    assert done.total("vllm:prefix_cache_hits_total") == engine.stats.prefix_cache.hits
    # one TTFT and one end-to-end latency per request, an inter-token latency per later token
    ttft, itl, e2e = done.histogram(TTFT), done.histogram(ITL), done.histogram(E2E)
    assert ttft is not None and itl is not None and e2e is not None
    assert (ttft.count, e2e.count, itl.count) == (4, 4, 4 * 119)
    # their times are the tokens' times on the engine's timeline (every request arrived at 50 s)
    first = [c.chunks[0][0] for c in cs]
    last = [c.chunks[-1][0] for c in cs]
    assert ttft.sum == pytest.approx(sum(t - 50.0 for t in first))
    assert e2e.sum == pytest.approx(sum(t - 50.0 for t in last))
    assert itl.sum == pytest.approx(sum(b - a for a, b in zip(first, last, strict=True)))
    assert itl.bounds == INTER_TOKEN_LATENCY_BUCKETS_S
    assert e2e.bounds == E2E_REQUEST_LATENCY_BUCKETS_S
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
    ttft, e2e = m.histogram(TTFT), m.histogram(E2E)
    assert ttft is not None and ttft.count == 1 and e2e is not None and e2e.count == 0
    assert m.total(RUNNING) == 0 and m.total("vllm:generation_tokens_total") >= 1
    await engine.shutdown()


def vllm_like_registry(engines: int = 1) -> CollectorRegistry:
    """A registry holding families as vLLM's PrometheusStatLogger registers them (names, help,
    labels, buckets; one without ``engine``, one with a label of its own, one without
    ``model_name``) with a few figures recorded, and a family that is not vLLM's."""
    reg = CollectorRegistry()
    lbl = ["model_name", "engine"]
    running = Gauge(RUNNING, "Number of requests in model execution batches.", lbl, registry=reg)
    prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", lbl, registry=reg)
    ttft = PromHistogram(
        TTFT, "Histogram of time to first token in seconds.", lbl, buckets=(0.1, 1.0), registry=reg
    )
    success = Counter(
        "vllm:request_success",
        "Count of successfully processed requests.",
        [*lbl, "finished_reason"],
        registry=reg,
    )
    rejected = Counter(
        "vllm:admission_rejections", "Rejected, by reason.", ["model_name", "reason"], registry=reg
    )
    info = Gauge(
        "vllm:cache_config_info",
        "Information of the LLMEngine CacheConfig",
        ["block_size", "engine"],
        registry=reg,
    )
    Gauge("process_open_fds", "Not vLLM's.", registry=reg).set(9)
    rejected.labels("tiny", "queue_full").inc(2)
    for e in range(engines):
        labels = ("tiny", str(e))
        running.labels(*labels).set(3 + e)
        prompt.labels(*labels).inc(100)
        ttft.labels(*labels).observe(0.03)
        ttft.labels(*labels).observe(3.0)
        success.labels(*labels, "stop").inc()
        info.labels("16", str(e)).set(1)
    return reg


def test_vllm_registry_ships_every_vllm_family_as_it_is() -> None:
    reg = vllm_like_registry(engines=2)
    m = from_prometheus(reg.collect())
    want = [f for f in reg.collect() if f.name.startswith("vllm:")]
    assert [(f.name, f.type, f.documentation) for f in m.families] == [
        (f.name, f.type, f.documentation) for f in want
    ]
    for got, fam in zip(m.families, want, strict=True):
        assert [(s.name, dict(s.labels), s.value) for s in got.samples] == [
            (s.name, s.labels, s.value) for s in fam.samples if not s.name.endswith("_created")
        ]
        assert all(not s.name.endswith("_created") for s in got.samples)
    # the engine index and vLLM's other labels are kept; the views sum over them
    assert m.total("vllm:num_requests_running") == 7
    assert m.total("vllm:request_success_total") == 2
    h = m.histogram(TTFT)
    assert h == HistogramSnapshot((0.1, 1.0), (2, 2), 4, pytest.approx(6.06))
    assert m.histogram("vllm:absent") is None and m.total("vllm:absent_total") == 0
    # the wire: a pickle (Ray) gives back equal plain data
    assert pickle.loads(pickle.dumps(m)) == m


def test_sim_families_are_what_a_vllm_registry_would_hold() -> None:
    """The simulated engine's snapshot equals what prometheus_client collects from vLLM's families
    (vLLM's names, help, default buckets, labels model_name and engine 0) fed the same figures."""
    rec = EngineMetricsRecorder("m8b")
    rec.first_token(0.03, 100)
    rec.next_token(0.02, 3)
    rec.finished(2.0)
    got = rec.snapshot(
        running=2,
        waiting=1,
        kv_cache_usage=0.25,
        preemptions=1,
        prefix_cache_queries=100,
        prefix_cache_hits=32,
    )
    reg = CollectorRegistry()
    lbl = {"model_name": "m8b", "engine": "0"}
    for f in got.families[:3]:
        Gauge(f.name, f.documentation, list(lbl), registry=reg).labels(**lbl).set(f.samples[0].value)
    for f in got.families[3:8]:
        Counter(f.name, f.documentation, list(lbl), registry=reg).labels(**lbl).inc(f.samples[0].value)
    hists = {
        TTFT: (TIME_TO_FIRST_TOKEN_BUCKETS_S, [0.03]),
        ITL: (INTER_TOKEN_LATENCY_BUCKETS_S, [0.02] * 3),
        E2E: (E2E_REQUEST_LATENCY_BUCKETS_S, [2.0]),
    }
    for f in got.families[8:]:
        bounds, observed = hists[f.name]
        h = PromHistogram(f.name, f.documentation, list(lbl), buckets=bounds, registry=reg).labels(**lbl)
        for v in observed:
            h.observe(v)
    assert [f.name for f in got.families] == [
        RUNNING,
        WAITING,
        KV_USAGE,
        "vllm:prefix_cache_queries",
        "vllm:prefix_cache_hits",
        "vllm:num_preemptions",
        "vllm:prompt_tokens",
        "vllm:generation_tokens",
        TTFT,
        ITL,
        E2E,
    ]
    assert from_prometheus(reg.collect()) == got
    assert got.total("vllm:generation_tokens_total") == 4 and got.total("vllm:prompt_tokens_total") == 100


def test_exported_per_replica_as_the_engines_families_relabelled() -> None:
    def entry(pool: str, replica: str, gpu: str, em: EngineMetrics | None) -> tuple[str, str, float, dict]:
        payload = {"pool": pool, "accelerator": gpu, "model": "m", "admission": AdmissionStats()}
        return ("pool", f"{pool}/{replica}", 0.1, {**payload, "engine_metrics": em})

    real = from_prometheus(vllm_like_registry(engines=2).collect())
    clash = EngineMetrics(
        (
            MetricFamily(
                RUNNING,
                "counter",
                "another vLLM's type",
                (MetricSample("vllm:num_requests_running_total", (), 5.0),),
            ),
            MetricFamily(
                "vllm:odd",
                "gauge",
                "An engine label named like ours.",
                (MetricSample("vllm:odd", (("pool", "x"),), 1.0),),
            ),
        )
    )
    text = render(
        [
            BoardCollector(
                [
                    entry("cpu", "r1", "CPU", real),
                    entry("cpu", "r2", "CPU", None),
                    entry("h", "r3", "H100", clash),
                ]
            )
        ]
    ).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text) if f.name.startswith("vllm:")}
    # every family of the engine, under its own name, type and help (and no hand-written others)
    assert {n: (f.type, f.documentation) for n, f in fams.items()} == {
        **{f.name: (f.type, f.documentation) for f in real.families},
        "vllm:odd": ("gauge", "An engine label named like ours."),
    }
    # each sample as the engine has it, with pool, replica and gpu added (r2: no engine metrics yet)
    origin = {"pool": "cpu", "replica": "r1", "gpu": "CPU"}
    for f in real.families:
        assert sorted(
            (s.name, tuple(sorted(s.labels.items())), s.value) for s in fams[f.name].samples
        ) == sorted(
            (s.name, tuple(sorted({**dict(s.labels), **origin}.items())), s.value) for s in f.samples
        ), f.name
    buckets = {
        (s.labels["engine"], s.labels["le"]): s.value
        for s in fams[TTFT].samples
        if s.name.endswith("_bucket")
    }
    assert buckets == {(e, le): v for e in "01" for le, v in (("0.1", 1), ("1.0", 1), ("+Inf", 2))}
    # a family of another type under a known name is left out; a clashing engine label is renamed
    assert {s.labels["replica"] for s in fams[RUNNING].samples} == {"r1"}
    (odd,) = fams["vllm:odd"].samples
    assert odd.labels == {"exported_pool": "x", "pool": "h", "replica": "r3", "gpu": "H100"}
