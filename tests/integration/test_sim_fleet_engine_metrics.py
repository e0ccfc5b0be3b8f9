"""vLLM's engine metrics through the gateway's /metrics, from the real vLLM CPU pool (read from vLLM's
own Prometheus logger in the replica) and from the simulated pools (their scheduler), under the same
names, labels and bucket bounds; the token counters move by exactly what the requests used."""

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


Series = dict[tuple[str, str], dict[tuple[str, str], float]]


def scrape(internal_url: str) -> tuple[Series, dict[tuple[str, str], dict[str, set[str]]]]:
    """vllm:* samples as {(sample name, pool): {(replica, gpu): value}} (buckets summed over le
    excluded), and the le bounds seen per (histogram, pool) by label."""
    text = httpx.get(f"{internal_url}/metrics", timeout=30).text
    out: Series = defaultdict(dict)
    les: dict[tuple[str, str], dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith("vllm:"):
            continue
        for s in fam.samples:
            lb = s.labels
            assert {"model_name", "pool", "replica", "gpu"} <= set(lb), (s.name, lb)
            if "le" in lb:
                les[(fam.name, lb["pool"])][lb["replica"]].add(lb["le"])
                continue
            out[(s.name, lb["pool"])][(lb["replica"], lb["gpu"])] = s.value
    return out, les


def total(series: Series, name: str, pool: str) -> float:
    return sum(series.get((name, pool), {}).values())


def test_engine_metrics_of_real_and_simulated_pools(
    gateway_url: str, internal_url: str, api_key: str
) -> None:
    # quiet pools first (nothing from earlier tests still in an engine), then one board beat
    deadline = time.monotonic() + 60
    while True:
        series, _ = scrape(internal_url)
        busy = {p: total(series, "vllm:num_requests_running", p) for p in IDLE_POOLS}
        if not any(busy.values()) and all(("vllm:num_requests_running", p) in series for p in IDLE_POOLS):
            break
        assert time.monotonic() < deadline, busy
        time.sleep(0.25)  # polled condition with a deadline
    time.sleep(2 * PUBLISH_INTERVAL_S)  # the board's snapshot period: a beat taken after the last request
    before, _ = scrape(internal_url)

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
    after, les = scrape(internal_url)

    for pool in IDLE_POOLS:
        names = [*GAUGES, *(f"{c}_total" for c in COUNTERS)]
        names += [f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_count", "_sum")]
        for name in names:
            assert after.get((name, pool)), (name, pool)
        replicas = set(after[("vllm:num_requests_running", pool)])
        assert len(replicas) == 1, replicas  # one replica each: one series, labelled with its GPU type
    assert {gpu for _r, gpu in after[("vllm:prompt_tokens_total", "tiny-cpu")]} == {"CPU"}
    assert {gpu for _r, gpu in after[("vllm:prompt_tokens_total", "sim-a10")]} == {"A10"}

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
