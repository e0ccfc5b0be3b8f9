"""A client that drops a stream aborts its generation in vLLM at once; concurrent streams all
finish and leave nothing in flight."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from serving.engines.cpu_placement import ENGINE_CORE_PREFIX, WORKER_PREFIX, pids_titled

pytestmark = pytest.mark.integration
MODEL = "tiny-llama"


def _pool_stats(url: str) -> dict:
    return httpx.get(f"{url}/internal/pools", timeout=10).json()["tiny-cpu"]


def _wait_for(cond, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last={last!r}")


def test_client_disconnect_aborts_generation(gateway_url: str, internal_url: str, api_key: str) -> None:
    before = _pool_stats(internal_url)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "long"}],
        "max_tokens": 2000,
        "ignore_eos": True,
        "stream": True,
    }
    seen = 0
    with (
        httpx.Client(timeout=60) as c,
        c.stream(
            "POST",
            f"{gateway_url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {api_key}"},
        ) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen += 1
                if seen == 5:
                    running = _pool_stats(internal_url)["num_unfinished"]
                    assert running >= 1
                    break
    # The connection is closed here. The engine's own count of unfinished requests must fall back
    # long before 2000 tokens could have been generated, and the replica must record an abort.
    t0 = time.monotonic()
    after = _wait_for(
        lambda: (
            (s := _pool_stats(internal_url))["num_unfinished"] == 0
            and s["requests_aborted"] > before["requests_aborted"]
            and s
        ),
        timeout_s=20,
        what="the engine to drop the aborted request",
    )
    assert after["gateway_in_flight"] == 0
    assert time.monotonic() - t0 < 20


def test_a_non_streamed_request_is_aborted_when_its_client_hangs_up(
    gateway_url: str, internal_url: str, api_key: str
) -> None:
    """No response is on its way yet, so only the connection says the client left: the gateway
    watches it and aborts the generation (charging what was produced), not at the 2000th token."""
    before = _pool_stats(internal_url)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "long"}],
        "max_tokens": 2000,
        "ignore_eos": True,
    }
    with httpx.Client(timeout=httpx.Timeout(60, read=0.5)) as c, pytest.raises(httpx.ReadTimeout):
        c.post(
            f"{gateway_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {api_key}"}
        )
    # The client gave up after 0.5 s and closed the connection.
    after = _wait_for(
        lambda: (
            (s := _pool_stats(internal_url))["num_unfinished"] == 0
            and s["requests_aborted"] > before["requests_aborted"]
            and s
        ),
        timeout_s=20,
        what="the engine to drop the abandoned request",
    )
    assert after["gateway_in_flight"] == 0


async def test_concurrent_streams_all_complete(gateway_url: str, internal_url: str, api_key: str) -> None:
    client = openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key=api_key, max_retries=0, timeout=120)

    async def one(i: int) -> int:
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"request {i}"}],
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        usage = None
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
        assert usage is not None
        return usage.completion_tokens

    before = _pool_stats(internal_url)["requests_total"]
    counts = await asyncio.gather(*(one(i) for i in range(24)))
    assert counts == [24] * 24
    await client.close()
    stats = _pool_stats(internal_url)
    assert stats["num_unfinished"] == 0 and stats["gateway_in_flight"] == 0
    # Every request reached the pool on the token channel (its one data path), each exactly once.
    assert stats["requests_total"] - before == 24


def test_sse_framing_on_the_wire(gateway_url: str, api_key: str) -> None:
    body = {"model": MODEL, "prompt": "weir", "max_tokens": 3, "stream": True, "ignore_eos": True}
    raw = httpx.post(
        f"{gateway_url}/v1/completions", json=body, timeout=60, headers={"Authorization": f"Bearer {api_key}"}
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(p["object"] == "text_completion" for p in payloads)
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"


def test_cpu_engine_runs_the_model_in_its_engine_core_apart_from_serving(
    gateway_url: str, internal_url: str
) -> None:
    """On vLLM's CPU build the pool runs the model in the engine-core process (no worker process),
    with the OpenMP threads vLLM would give a worker; the engine core's threads stay on those cores
    and the pool replica and the same-node gateways on the others (serving/engines/cpu_placement.py)."""
    import os

    stats = _pool_stats(internal_url)
    assert pids_titled(WORKER_PREFIX) == []
    engines = pids_titled(ENGINE_CORE_PREFIX)
    assert len(engines) == 1
    raw_env = Path(f"/proc/{engines[0]}/environ").read_bytes().decode(errors="replace")
    environ = dict(line.split("=", 1) for line in raw_env.split("\0") if "=" in line)
    if stats["engine_cores"] is None:  # vLLM bound no cores (one core, or all of them): nothing moved
        pytest.skip(
            f"vLLM bound the model to no subset of the cores ({environ.get('OMP_NUM_THREADS')} threads)"
        )
    model_cores = set(stats["engine_cores"])
    assert environ.get("OMP_NUM_THREADS") == str(len(model_cores))
    threads = [int(t) for t in os.listdir(f"/proc/{engines[0]}/task")]
    assert all(os.sched_getaffinity(t) == model_cores for t in threads)
    pool = [os.sched_getaffinity(pid) for pid in pids_titled("ray::ServeReplica:tokenweir:pool-tiny-cpu")]
    gateways = [os.sched_getaffinity(pid) for pid in pids_titled("ray::ServeReplica:tokenweir:gateway")]
    assert len(pool) == 1 and len(gateways) == 2
    assert all(not (c & model_cores) for c in pool + gateways), (pool, gateways)
