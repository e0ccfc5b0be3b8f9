"""vLLM's engine metrics through the gateway's /metrics: the real vLLM CPU pool's are every family of
vLLM's own Prometheus logger (names, types, help and labels as a logger built here for the same
model exposes them), with pool, replica and gpu added; the simulated pools' (their scheduler) are
some of those families under the same names, types, help, labels and bucket bounds; the token
counters move by exactly what the requests used."""

from __future__ import annotations

import time
from collections import defaultdict

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.pools.loadboard import PUBLISH_INTERVAL_S

pytestmark = pytest.mark.integration

COUNTERS = (
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:num_preemptions",
    "vllm:prompt_tokens",
    "vllm:generation_tokens",
)
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
HISTOGRAMS = (
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
)
# (pool, model, GPU pin): the real vLLM pool and both simulated GPU types
POOLS = (("tiny-cpu", "tiny-llama", None), ("sim-h100", "llama-3.1-8b-instruct", "H100"))
IDLE_POOLS = ("tiny-cpu", "sim-h100", "sim-a10")
MAX_TOKENS = 6


ORIGIN = {"pool", "replica", "gpu"}

Series = dict[tuple[str, str], dict[tuple[str, str], float]]
# by pool: {family: (type, help, label names but le)}
Families = dict[str, dict[str, tuple[str, str, frozenset[str]]]]


def scrape(internal_url: str) -> tuple[Series, dict[tuple[str, str], dict[str, set[str]]], Families]:
    """vllm:* samples as {(sample name, pool): {(replica, gpu): value}} (summed over the engine and
    vLLM's other labels; buckets excluded), the le bounds seen per (histogram, pool) by replica, and
    each pool's families."""
    text = httpx.get(f"{internal_url}/metrics", timeout=30).text
    out: Series = defaultdict(lambda: defaultdict(float))
    les: dict[tuple[str, str], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    fams: Families = defaultdict(dict)
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith("vllm:"):
            continue
        for s in fam.samples:
            lb = s.labels
            assert set(lb) >= ORIGIN, (s.name, lb)
            names = frozenset(lb) - {"le"}
            seen = fams[lb["pool"]].setdefault(fam.name, (fam.type, fam.documentation, names))
            assert seen == (fam.type, fam.documentation, names), (fam.name, seen, lb)
            if "le" in lb:
                les[(fam.name, lb["pool"])][lb["replica"]].add(lb["le"])
                continue
            out[(s.name, lb["pool"])][(lb["replica"], lb["gpu"])] += s.value
    return out, les, fams


def vllm_logger_families(model_path: str) -> dict[str, tuple[str, str, frozenset[str]]]:
    """What vLLM's own Prometheus logger registers for the tiny-cpu pool's engine (its model,
    served name and engine arguments; one engine): {family: (type, help, label names but le)},
    from a logger built in this process as ``AsyncLLM`` builds it in the replica."""
    from prometheus_client import REGISTRY
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.metrics.loggers import PrometheusStatLogger
    from vllm.v1.metrics.prometheus import unregister_vllm_metrics

    args = AsyncEngineArgs(model=model_path, served_model_name=["tiny-llama"], max_num_seqs=64)
    logger = PrometheusStatLogger(args.create_engine_config(UsageContext.OPENAI_API_SERVER), [0])
    logger.log_engine_initialized()  # vllm:cache_config_info
    try:
        return {
            f.name: (f.type, f.documentation, frozenset(k for s in f.samples for k in s.labels) - {"le"})
            for f in REGISTRY.collect()
            if f.name.startswith("vllm:")
        }
    finally:
        unregister_vllm_metrics()


def total(series: Series, name: str, pool: str) -> float:
    return sum(series.get((name, pool), {}).values())


def test_engine_metrics_of_real_and_simulated_pools(
    gateway_url: str, internal_url: str, api_key: str, tiny_model_path: str
) -> None:
    # quiet pools first (nothing from earlier tests still in an engine), then one board beat
    deadline = time.monotonic() + 60
    while True:
        series, _, _ = scrape(internal_url)
        busy = {p: total(series, "vllm:num_requests_running", p) for p in IDLE_POOLS}
        if not any(busy.values()) and all(("vllm:num_requests_running", p) in series for p in IDLE_POOLS):
            break
        assert time.monotonic() < deadline, busy
        time.sleep(0.25)  # polled condition with a deadline
    time.sleep(2 * PUBLISH_INTERVAL_S)  # the board's snapshot period: a beat taken after the last request
    before, _, _ = scrape(internal_url)

    used: dict[str, dict[str, int]] = {}
    with httpx.Client(base_url=gateway_url, timeout=120) as http:
        for pool, model, gpu in POOLS:
            prompt = completion = 0
            for i in range(2):
                headers = {"Authorization": f"Bearer {api_key}", **({"x-tokenweir-gpu": gpu} if gpu else {})}
                body = {"model": model, "prompt": f"engine metrics {i}", "max_tokens": MAX_TOKENS}
                r = http.post("/v1/completions", json={**body, "ignore_eos": True}, headers=headers)
                assert r.status_code == 200, r.text
                assert r.headers["x-tokenweir-pool"] == pool
                prompt += r.json()["usage"]["prompt_tokens"]
                completion += r.json()["usage"]["completion_tokens"]
            used[pool] = {"prompt": prompt, "completion": completion}

    def moved(s: Series) -> bool:
        return all(
            total(s, "vllm:e2e_request_latency_seconds_count", p)
            - total(before, "vllm:e2e_request_latency_seconds_count", p)
            >= 2
            for p in used
        )

    deadline = time.monotonic() + 30
    while not moved(series := scrape(internal_url)[0]):
        assert time.monotonic() < deadline, "engine metrics did not reach /metrics"
        time.sleep(0.25)  # polled condition with a deadline
    after, les, fams = scrape(internal_url)

    # the real pool's families are vLLM's logger's own, every one, with pool, replica and gpu added
    want = vllm_logger_families(tiny_model_path)
    assert fams["tiny-cpu"] == {n: (t, h, lbl | ORIGIN) for n, (t, h, lbl) in want.items()}
    assert len(want) > len(HISTOGRAMS + GAUGES + COUNTERS)  # more than the simulated engine models
    assert want["vllm:prompt_tokens"][2] == {"model_name", "engine"}
    # the simulated pools': the same names, types, help and labels, for the families they model
    for pool in ("sim-h100", "sim-a10"):
        assert set(fams[pool]) == {*GAUGES, *COUNTERS, *HISTOGRAMS}, pool
        assert fams[pool] == {n: fams["tiny-cpu"][n] for n in fams[pool]}, pool

    for pool in IDLE_POOLS:
        names = [*GAUGES, *(f"{c}_total" for c in COUNTERS)]
        names += [f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_count", "_sum")]
        for name in names:
            assert after.get((name, pool)), (name, pool)
        replicas = set(after[("vllm:num_requests_running", pool)])
        assert len(replicas) == 1, replicas  # one replica each: one series, labelled with its GPU type
    assert {gpu for _r, gpu in after[("vllm:prompt_tokens_total", "tiny-cpu")]} == {"CPU"}
    assert {gpu for _r, gpu in after[("vllm:prompt_tokens_total", "sim-a10")]} == {"A10"}
    # model_name is vLLM's served model name (the simulated engine's: the pool's model)
    text = httpx.get(f"{internal_url}/metrics", timeout=30).text
    models = {
        (s.labels["pool"], s.labels["model_name"], s.labels["engine"])
        for f in text_string_to_metric_families(text)
        if f.name == "vllm:prompt_tokens"
        for s in f.samples
    }
    assert models == {
        ("tiny-cpu", "tiny-llama", "0"),
        *((p, "llama-3.1-8b-instruct", "0") for p in ("sim-h100", "sim-a10")),
        ("sim-l40s", "qwen2.5-7b-instruct", "0"),
    }

    for pool, u in used.items():

        def delta(name: str, p: str = pool) -> float:
            return total(after, name, p) - total(before, name, p)

        assert delta("vllm:prompt_tokens_total") == u["prompt"], pool
        assert delta("vllm:generation_tokens_total") == u["completion"] == 2 * MAX_TOKENS, pool
        assert delta("vllm:time_to_first_token_seconds_count") == 2, pool
        assert delta("vllm:e2e_request_latency_seconds_count") == 2, pool
        assert delta("vllm:inter_token_latency_seconds_count") == 2 * (MAX_TOKENS - 1), pool
        assert delta("vllm:prefix_cache_queries_total") == u["prompt"], pool
        assert delta("vllm:e2e_request_latency_seconds_sum") > 0, pool

    # the simulated engine's buckets are vLLM's own
    for h in HISTOGRAMS:
        (real,) = les[(h, "tiny-cpu")].values()
        for pool in ("sim-h100", "sim-a10"):
            (sim,) = les[(h, pool)].values()
            assert sim == real, (h, pool, sorted(sim ^ real))
