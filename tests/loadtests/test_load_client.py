"""The open-loop client against a local stub server.

The stub (``loadtests.stub_server``) is a fake OpenAI streaming server on 127.0.0.1: a fake at the
network boundary, standing in for the gateway; the client under test is the real one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from loadtests.client import RunResult, Target, run_plan
from loadtests.plan import build_plan
from loadtests.scenario import Scenario
from loadtests.stub_server import StubConfig, StubState, start_stub


@pytest.fixture
async def stub(request: pytest.FixtureRequest) -> AsyncIterator[tuple[int, StubState]]:
    cfg = getattr(request, "param", None) or StubConfig()
    runner, port, state = await start_stub(cfg, keep_bodies=True)
    try:
        yield port, state
    finally:
        await runner.cleanup()


def _scenario(port: int, **over: object) -> Scenario:
    base: dict[str, object] = {
        "name": "t",
        "target_url": f"http://127.0.0.1:{port}",
        "model": "stub-model",
        "tenants": [{"name": "a", "api_key": "sk-a"}],
        "arrival": {"kind": "constant", "rate_rps": 50},
        "workload": {
            "kind": "synthetic",
            "prompt": {"kind": "fixed", "tokens": 8},
            "output": {"kind": "fixed", "tokens": 5},
        },
        "bounds": {"duration_s": 0.4, "max_requests": 1000, "drain_timeout_s": 5, "request_timeout_s": 5},
    }
    base.update(over)
    return Scenario.model_validate(base)


async def _run(sc: Scenario) -> RunResult:
    keys = {t.name: t.api_key or "" for t in sc.tenants}
    return await run_plan(build_plan(sc), Target(sc.target_url, sc.model, sc.endpoint, keys), sc.bounds)


@pytest.mark.parametrize("stub", [StubConfig(ttft_s=0.5, itl_s=0.01)], indirect=True)
async def test_open_loop_sends_on_schedule_while_responses_are_slow(stub: tuple[int, StubState]) -> None:
    port, state = stub
    result = await _run(_scenario(port))
    assert len(result.records) == state.requests == 20
    arrived = np.array(state.arrivals_s) - state.arrivals_s[0]
    scheduled = np.arange(20) * 0.02
    # Every request reached the server at its time, long before the first response (TTFT 0.5 s) ended.
    assert arrived.max() < 0.5
    assert np.median(np.abs(arrived - scheduled)) < 0.01
    assert np.abs(arrived - scheduled).max() < 0.1
    for r in result.records:
        assert r.ok and r.status == 200 and r.error_code is None
        assert r.lateness_s is not None and r.scheduled_s is not None
        assert r.ttft_s is not None and r.ttft_s >= 0.5
        assert (r.prompt_tokens, r.completion_tokens, r.content_chunks, len(r.itl_s)) == (7, 5, 5, 4)
        assert r.e2e_s is not None and r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 4)
    # The stub waits 10 ms between chunks; client-side gaps jitter around that but cannot shrink on average.
    assert np.mean([g for r in result.records for g in r.itl_s]) >= 0.009
    body: Any = state.bodies[0]
    assert body["max_tokens"] == 5 and body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["model"] == "stub-model"
    assert len(body["messages"][0]["content"].split()) == 8


@pytest.mark.parametrize("stub", [StubConfig(ttft_s=0.03)], indirect=True)
async def test_closed_loop_keeps_concurrency(stub: tuple[int, StubState]) -> None:
    port, _ = stub
    result = await _run(_scenario(port, arrival={"kind": "closed", "concurrency": 3}))
    recs = result.records
    assert len(recs) >= 9 and all(r.ok and r.lateness_s is None for r in recs)
    events = sorted(
        [(r.sent_s, 1) for r in recs] + [(r.sent_s + (r.e2e_s or 0), -1) for r in recs],
        key=lambda e: (e[0], e[1]),
    )
    level = np.cumsum([d for _, d in events])
    assert level.max() == 3
    assert max(r.sent_s for r in recs) < 0.4 + 0.01  # no new request after the duration


@pytest.mark.parametrize("stub", [StubConfig(ttft_s=0.3)], indirect=True)
async def test_refusals_timeouts_and_request_bound(stub: tuple[int, StubState]) -> None:
    port, state = stub
    sc = _scenario(
        port,
        tenants=[{"name": "ok", "api_key": "sk-ok"}, {"name": "refused", "api_key": "sk-refuse-1"}],
        bounds={"duration_s": 0.4, "max_requests": 12, "drain_timeout_s": 5, "request_timeout_s": 0.1},
    )
    result = await _run(sc)
    assert len(result.records) == state.requests == 12
    codes: dict[str, set[tuple[int | None, str | None]]] = {r.tenant: set() for r in result.records}
    for r in result.records:
        assert not r.ok
        codes[r.tenant].add((r.status, r.error_code))
    assert codes == {"ok": {(200, "timeout")}, "refused": {(429, "rate_limited")}}


async def test_completions_endpoint(stub: tuple[int, StubState]) -> None:
    port, state = stub
    result = await _run(_scenario(port, endpoint="completions"))
    assert result.records and all(r.ok and r.completion_tokens == 5 for r in result.records)
    assert isinstance(state.bodies[0]["prompt"], str) and "messages" not in state.bodies[0]


@pytest.mark.parametrize("stub", [StubConfig(ttft_s=30.0)], indirect=True)
async def test_run_stops_by_itself_cancelling_what_does_not_drain(stub: tuple[int, StubState]) -> None:
    port, _ = stub
    sc = _scenario(
        port, bounds={"duration_s": 0.2, "max_requests": 100, "drain_timeout_s": 0.2, "request_timeout_s": 60}
    )
    result = await _run(sc)
    assert len(result.records) == 10
    assert {r.error_code for r in result.records} == {"cancelled"}
    assert result.duration_s < 5.0
