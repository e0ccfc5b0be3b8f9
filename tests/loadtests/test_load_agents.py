"""Agent workloads: sessions planned per agent, run turn by turn against a simulated pool (the real
SimEngine with its prefix cache behind a local OpenAI-shaped server), and the report's cache hit
rate, TTFT by turn and good sessions. Bounded: the engine runs 20x faster than the H100 it models."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests.cli import shipped_scenarios
from loadtests.plan import PlannedSession, build_plan
from loadtests.report import read_records
from loadtests.runner import run_scenario
from loadtests.scenario import Scenario, ScenarioError, load_scenario
from loadtests.sim_server import SimServerConfig, chat_token_ids, start_sim_server


def scenario(port: int, **over: object) -> Scenario:
    base: dict[str, object] = {
        "name": "agents-test",
        "target_url": f"http://127.0.0.1:{port}",
        "metrics_url": f"http://127.0.0.1:{port}/metrics",
        "model": "sim",
        "tenants": [{"name": "a", "api_key": "sk-a"}],
        "arrival": {"kind": "closed", "concurrency": 3},
        "workload": {
            "kind": "agent",
            "agents": 3,
            "system_prompt_tokens": 600,
            "turns": 3,
            "user": {"kind": "fixed", "tokens": 20},
            "output": {"kind": "fixed", "tokens": 8},
            "think_time_s": 0.02,
        },
        "slo": {"ttft_ms": 5000},
        "bounds": {"duration_s": 20, "max_requests": 9, "drain_timeout_s": 10, "request_timeout_s": 10},
    }
    base.update(over)
    return Scenario.model_validate(base)


def test_sessions_share_one_system_prompt_per_agent_and_are_seeded() -> None:
    sc = scenario(1, arrival={"kind": "poisson", "rate_rps": 5})
    plan = build_plan(sc)
    sessions = plan.open_requests
    assert sessions and all(isinstance(s, PlannedSession) for s in sessions)
    assert [s.agent for s in sessions[:6]] == ["a/0", "a/1", "a/2", "a/0", "a/1", "a/2"]  # type: ignore[union-attr]
    by_agent: dict[str, set[str]] = {}
    for s in sessions:
        assert isinstance(s, PlannedSession)
        by_agent.setdefault(s.agent, set()).add(s.system_prompt)
        assert len(s.user_prompts) == len(s.max_tokens) == 3 and s.max_tokens == (8, 8, 8)
        assert s.think_time_s == 0.02 and len(s.system_prompt.split()) == 600
    assert all(len(p) == 1 for p in by_agent.values())  # one system prompt per agent ...
    assert len({next(iter(p)) for p in by_agent.values()}) == 3  # ... and a different one each
    assert build_plan(sc).open_requests == sessions  # the same seed, the same sessions
    with pytest.raises(ScenarioError, match="need endpoint 'chat'"):
        load_scenario_dict({**sc.model_dump(), "endpoint": "completions"})


def load_scenario_dict(d: dict[str, object]) -> Scenario:
    try:
        return Scenario.model_validate(d)
    except Exception as e:
        raise ScenarioError(str(e)) from e


@pytest.fixture
def sim_port() -> Iterator[int]:
    """A simulated H100 replica (prefix caching on) behind an OpenAI-shaped server, in its own thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner, port, engine = asyncio.run_coroutine_threadsafe(
        start_sim_server(SimServerConfig(speedup=20.0)), loop
    ).result(timeout=10)
    try:
        yield port
    finally:

        async def stop() -> None:
            await runner.cleanup()
            await engine.shutdown()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_agent_sessions_against_a_simulated_pool(sim_port: int, tmp_path: Path) -> None:
    outcome = run_scenario(scenario(sim_port), tmp_path / "run", progress=False)
    recs = read_records(tmp_path / "run" / "requests.jsonl")
    assert len(recs) == 9 and all(r.ok for r in recs), [r.error_message for r in recs if not r.ok]
    sessions: dict[int, list] = {}
    for r in recs:
        sessions.setdefault(r.session, []).append(r)  # type: ignore[arg-type]
    assert len(sessions) == 3 and {r.agent for r in recs} == {"a/0", "a/1", "a/2"}
    for turns in sessions.values():
        t1, t2, t3 = sorted(turns, key=lambda r: r.turn)
        assert (t1.turn, t2.turn, t3.turn) == (1, 2, 3)
        # The conversation grows by the previous answer (8 words) and the next 20-word user message,
        # each behind its role marker; the server's prompt counts say so.
        assert t2.prompt_tokens == t1.prompt_tokens + 1 + 8 + 1 + 20
        assert t3.prompt_tokens == t2.prompt_tokens + 1 + 8 + 1 + 20
        # Each agent's first turn misses; later turns hit every full block of the previous prompt
        # up to where it ended (its last token, the generation marker, differs).
        assert t1.cached_tokens == 0
        assert t2.cached_tokens == (t1.prompt_tokens - 1) // 16 * 16
        assert t3.cached_tokens == (t2.prompt_tokens - 1) // 16 * 16
    doc = json.loads((tmp_path / "run" / "summary.json").read_text())
    a = doc["summary"]["agents"]
    prompt, cached = sum(r.prompt_tokens for r in recs), sum(r.cached_tokens for r in recs)
    assert a["sessions"] == 3 and a["agents"] == 3 and a["good_sessions"] == 3
    assert a["cache_hit_rate"] == pytest.approx(cached / prompt)
    # The engine's own counters saw exactly these lookups.
    assert (a["server_prefix_cache_queries"], a["server_prefix_cache_hits"]) == (prompt, cached)
    assert [t["turn"] for t in a["turns"]] == [1, 2, 3]
    assert [t["ttft"]["count"] for t in a["turns"]] == [3, 3, 3]
    assert a["turns"][0]["cache_hit_rate"] == 0 and a["turns"][2]["cache_hit_rate"] > 0.9
    md = outcome.report.read_text()
    assert "## Agent sessions" in md and "| turn | sent | ok | good |" in md


def test_template_and_shipped_agent_scenario() -> None:
    a = chat_token_ids([{"role": "system", "content": "x y"}, {"role": "user", "content": "z"}])
    b = chat_token_ids(
        [
            {"role": "system", "content": "x y"},
            {"role": "user", "content": "z"},
            {"role": "assistant", "content": "w"},
            {"role": "user", "content": "v"},
        ]
    )
    assert b[: len(a) - 1] == a[:-1] and len(a) == 1 + 2 + 1 + 1 + 1
    sc = load_scenario(shipped_scenarios()["agents"])
    assert sc.workload.kind == "agent" and sc.workload.agents == 10  # type: ignore[union-attr]
    assert sc.workload.system_prompt_tokens == 2000 and sc.workload.turns == 8  # type: ignore[union-attr]
