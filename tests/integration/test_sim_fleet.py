"""A two-type simulated fleet (H100 and A10 pools of an 8B model on the performance model) served
through the real gateway: routing, GPU pinning, exact usage, and a complete /metrics."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from serving.pools.loadboard import PUBLISH_INTERVAL_S

pytestmark = pytest.mark.integration
MODEL = "llama-3.1-8b-instruct"


@pytest.fixture(scope="module")
def client(gateway_url: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=api_key, max_retries=0, timeout=60)


def test_fleet_models_and_exact_usage(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list().data}
    assert {MODEL, "tiny-llama"} <= ids
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello fleet"}],
        max_tokens=20,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 20
    assert r.choices[0].message.content


def test_streaming_from_simulated_pool(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL,
            prompt="tell me",
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].usage.completion_tokens == 12
    assert "".join(c.choices[0].text for c in chunks if c.choices)


@pytest.mark.parametrize(("gpu", "pool"), [("A10", "sim-a10"), ("H100", "sim-h100")])
def test_gpu_pinning_header(gateway_url: str, api_key: str, gpu: str, pool: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    r = httpx.post(
        f"{gateway_url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {api_key}", "x-tokenweir-gpu": gpu},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-tokenweir-pool"] == pool and r.headers["x-tokenweir-gpu"] == gpu


def test_pin_to_absent_gpu_is_400(gateway_url: str, api_key: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    r = httpx.post(
        f"{gateway_url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {api_key}", "x-tokenweir-gpu": "L20"},
        timeout=60,
    )
    assert r.status_code == 400
    assert "L20" in r.json()["error"]["message"]


def test_cheaper_pool_serves_light_load(internal_url: str, client: openai.OpenAI) -> None:
    """At light load both pools meet the SLO; the router picks the cheaper price per token."""
    # Light load means idle pools: wait out what earlier tests left in flight, then one board
    # publication so that the gateway's snapshots show it.
    deadline = time.monotonic() + 60
    while True:
        pools = httpx.get(f"{internal_url}/internal/pools", timeout=10).json()
        busy = {
            n: (p.get("queue_depth"), p.get("in_flight_seqs"))
            for n, p in pools.items()
            if n.startswith("sim-")
        }
        if all(v == (0, 0) for v in busy.values()):
            break
        assert time.monotonic() < deadline, busy
        time.sleep(0.1)  # polled condition
    time.sleep(2 * PUBLISH_INTERVAL_S)  # the board's snapshot period, not a guess at a condition
    for _ in range(4):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4)
    metrics = httpx.get(f"{internal_url}/metrics", timeout=30).text
    decisions = [ln for ln in metrics.splitlines() if ln.startswith("tokenweir_routing_decisions_total{")]
    assert decisions, metrics[:2000]
    assert any('reason="cheapest_meets_slo"' in ln or 'reason="no_load_data"' in ln for ln in decisions), (
        decisions
    )


def test_metrics_cover_pools_gateways_and_ledger(internal_url: str, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3)

    deadline = time.monotonic() + 10
    text = ""
    while time.monotonic() < deadline:
        text = httpx.get(f"{internal_url}/metrics", timeout=30).text
        if 'tokenweir_pool_seq_limit{gpu="A10"' in text and "tokenweir_requests_total" in text:
            break
        time.sleep(0.5)
    for family in (
        "tokenweir_pool_seq_limit",
        "tokenweir_pool_queue_depth",
        "tokenweir_tenant_served_tokens_total",
        "tokenweir_requests_total",
        "tokenweir_tokens_charged_total",
        "tokenweir_credits_remaining",
        "vllm:prefix_cache_queries_total",  # the simulated engines' prefix-cache counters
        "vllm:prefix_cache_hits_total",
    ):
        assert family in text, family
    assert 'tenant="demo"' in text
    assert 'gpu="A10"' in text and 'gpu="H100"' in text and 'gpu="CPU"' in text


def test_a_repeated_prompt_is_streamed_with_its_cached_tokens(gateway_url: str, api_key: str) -> None:
    """The simulated engine's prefix cache (16-token blocks) reports hits as vLLM's do, in the final
    usage chunk of a stream; the router sends the repeat to the replica that holds the prefix."""
    client = openai.OpenAI(
        base_url=f"{gateway_url}/v1",
        api_key=api_key,
        max_retries=0,
        timeout=60,
        default_headers={"x-tokenweir-gpu": "H100"},
    )
    prompt = " ".join(f"agent-{i}" for i in range(200))
    cached = []
    for _ in range(2):
        chunks = list(
            client.completions.create(
                model=MODEL,
                prompt=prompt,
                max_tokens=2,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )
        usage = chunks[-1].usage
        assert usage is not None and usage.prompt_tokens > 64
        cached.append(usage.prompt_tokens_details.cached_tokens)
    assert cached[1] >= 64 and cached[1] % 16 == 0, cached
