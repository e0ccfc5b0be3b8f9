"""``python -m loadtests`` end to end against the stub server: result files, meter check, exit codes.

The stub (``loadtests.stub_server``) runs in a thread on 127.0.0.1; it is a fake at the network
boundary standing in for the gateway (inference, ``/v1/usage``, the admin API).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from loadtests.cli import main, shipped_scenarios
from loadtests.scenario import ScenarioError, load_scenario
from loadtests.stub_server import StubConfig, StubState, start_stub


@contextlib.contextmanager
def stub_thread(cfg: StubConfig) -> Iterator[tuple[int, StubState]]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)
        box["runner"], box["port"], box["state"] = loop.run_until_complete(start_stub(cfg))
        ready.set()
        loop.run_forever()
        loop.run_until_complete(box["runner"].cleanup())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(10), "stub did not start"
    try:
        yield box["port"], box["state"]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def _write(tmp: Path, port: int, **over: Any) -> Path:
    doc: dict[str, Any] = {
        "name": "unit",
        "target_url": f"http://127.0.0.1:{port}",
        "model": "stub",
        "seed": 3,
        "tenants": [
            {"name": "alpha", "api_key": "sk-alpha", "share": 2},
            {"name": "beta", "api_key": "sk-beta"},
        ],
        "arrival": {"kind": "poisson", "rate_rps": 40},
        "workload": {
            "kind": "synthetic",
            "prompt": {"kind": "fixed", "tokens": 8},
            "output": {"kind": "fixed", "tokens": 6},
        },
        "slo": {"ttft_ms": 1000},
        "bounds": {"duration_s": 0.5, "max_requests": 30, "drain_timeout_s": 5, "request_timeout_s": 5},
    }
    doc.update(over)
    path = tmp / f"{doc['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_run_writes_results_with_the_numbers(tmp_path: Path) -> None:
    with stub_thread(StubConfig()) as (port, state):
        out = tmp_path / "run"
        assert main(["run", str(_write(tmp_path, port)), "--out", str(out), "--no-progress"]) == 0
    for name in (
        "requests.jsonl",
        "summary.json",
        "report.md",
        "latency_cdf.png",
        "throughput.png",
        "tenant_tokens.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "latency_cdf.png").read_bytes()[:4] == b"\x89PNG"
    lines = (out / "requests.jsonl").read_text().splitlines()
    doc = json.loads((out / "summary.json").read_text())
    s = doc["summary"]
    assert len(lines) == s["requests_sent"] == s["succeeded"] == state.requests
    assert s["total_output_tokens"] == 6 * s["succeeded"]
    assert s["good"] == s["succeeded"]
    assert {t["tenant"] for t in s["tenants"]} == {"alpha", "beta"}
    md = (out / "report.md").read_text()
    assert f"| Request throughput (req/s) | {s['request_throughput_rps']:.2f} |" in md
    assert f"| Total generated tokens | {s['total_output_tokens']} |" in md
    assert f"{s['ttft']['p99_ms']:.2f}" in md
    # Meter check: the stub's /v1/usage charged exactly what the client saw.
    meter = {m["tenant"]: m for m in doc["meter"]}
    alpha = [json.loads(x) for x in lines if json.loads(x)["tenant"] == "alpha"]
    assert meter["alpha"]["client_tokens"] == sum(r["prompt_tokens"] + r["completion_tokens"] for r in alpha)
    assert all(m["diff_tokens"] == 0 for m in doc["meter"])
    assert "Meter agrees with the client on every tenant." in md


def test_meter_mismatch_and_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("loadtests.runner._METER_SETTLE_S", 0.2)
    with stub_thread(StubConfig(meter_skew_tokens=1)) as (port, _):
        assert (
            main(["run", str(_write(tmp_path, port)), "--out", str(tmp_path / "skew"), "--no-progress"]) == 0
        )
    doc = json.loads((tmp_path / "skew" / "summary.json").read_text())
    for m in doc["meter"]:
        sent = sum(t["succeeded"] for t in doc["summary"]["tenants"] if t["tenant"] == m["tenant"])
        assert m["diff_tokens"] == sent
    assert "**Meter and client disagree**" in (tmp_path / "skew" / "report.md").read_text()
    with stub_thread(StubConfig(usage_endpoint=False)) as (port, _):
        assert (
            main(["run", str(_write(tmp_path, port)), "--out", str(tmp_path / "none"), "--no-progress"]) == 0
        )
    assert (
        "meter check unavailable: GET /v1/usage answered 404" in (tmp_path / "none" / "report.md").read_text()
    )


def test_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    remote = _write(tmp_path, 1, name="remote", target_url="http://10.1.2.3:8000")
    assert main(["run", str(remote), "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "--allow-remote" in capsys.readouterr().err
    bad = _write(tmp_path, 1, name="bad", surprise=1)
    assert main(["run", str(bad), "--out", str(tmp_path / "b")]) == 2
    assert "surprise" in capsys.readouterr().err
    with stub_thread(StubConfig()) as (port, _):
        refused = _write(tmp_path, port, name="refused", tenants=[{"name": "x", "api_key": "sk-refuse-x"}])
        assert main(["run", str(refused), "--out", str(tmp_path / "x"), "--no-progress"]) == 1
    s = json.loads((tmp_path / "x" / "summary.json").read_text())["summary"]
    assert s["refusals"] == {"rate_limited": s["requests_sent"]} and s["requests_sent"] > 0


def test_sweep_compare_and_admin_provisioning(tmp_path: Path) -> None:
    with stub_thread(StubConfig()) as (port, state):
        sweep = _write(
            tmp_path, port, name="sweep",
            tenants=[{"name": "made", "create_body": {"weight": 2}}, {"name": "given", "api_key": "sk-given"}],
            admin={"api_key": "${LOADTEST_UNIT_ADMIN:-sk-admin}"},
            sweep={"parameter": "rate", "values": [10, 30]},
        )  # fmt: skip
        assert main(["run", str(sweep), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
        assert list(state.tenants.values()) == ["made"]
        assert "sk-made-t1" in state.charged
        assert (
            main(
                [
                    "run",
                    str(_write(tmp_path, port)),
                    "--out",
                    str(tmp_path / "a"),
                    "--no-progress",
                    "--label",
                    "A",
                ]
            )
            == 0
        )
    points = json.loads((tmp_path / "s" / "sweep.json").read_text())["points"]
    assert [p["value"] for p in points] == [10, 30]
    assert (tmp_path / "s" / "sweep_goodput.png").stat().st_size > 0
    assert "# Sweep: sweep over rate" in (tmp_path / "s" / "report.md").read_text()
    a, b = (tmp_path / "s" / p["dir"] for p in points)
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert "# Comparison: sweep@10 vs sweep@30" in md
    sa = json.loads((a / "summary.json").read_text())["summary"]
    assert f"| Successful requests | {sa['succeeded']} |" in md
    assert (tmp_path / "cmp" / "compare_cdf.png").exists()


def test_shipped_scenarios_validate_and_overrides_apply(tmp_path: Path) -> None:
    names = set(shipped_scenarios())
    assert {"smoke", "fairness", "overload", "sim-fleet", "peer-compare"} <= names
    for path in shipped_scenarios().values():
        sc = load_scenario(path)
        assert sc.bounds.duration_s <= 3600 and sc.bounds.max_requests >= 1
    smoke = load_scenario(shipped_scenarios()["smoke"], ["bounds.duration_s=5", "tenants.0.share=3"])
    assert smoke.bounds.duration_s == 5 and smoke.tenants[0].share == 3
    assert smoke.model == "tiny-llama" and smoke.target_url == "http://127.0.0.1:8000"
    with pytest.raises(ScenarioError, match="duration_s"):
        load_scenario(shipped_scenarios()["smoke"], ["bounds.duration_s=100000"])
    with pytest.raises(ScenarioError, match="bounds"):
        load_scenario(_write(tmp_path, 1, name="nobounds", bounds=None))
    with pytest.raises(ScenarioError, match="NOPE_UNSET"):
        load_scenario(_write(tmp_path, 1, name="env", model="${NOPE_UNSET}"))


def test_meter_check_groups_tenants_that_share_a_key(tmp_path: Path) -> None:
    """The README's example gives both smoke tenants one key: the gateway charges the key once, so
    the check compares that charge with the sum of both tenants' tokens, not with each tenant's."""
    shared = [
        {"name": "alpha", "api_key": "sk-shared", "share": 2},
        {"name": "beta", "api_key": "sk-shared"},
        {"name": "gamma", "api_key": "sk-gamma"},
    ]
    with stub_thread(StubConfig()) as (port, state):
        path = _write(tmp_path, port, name="shared", tenants=shared)
        assert main(["run", str(path), "--out", str(tmp_path / "shared"), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "shared" / "summary.json").read_text())
    rows = {m["tenant"]: m for m in doc["meter"]}
    assert set(rows) == {"alpha + beta", "gamma"}
    assert rows["alpha + beta"]["tenants"] == ["alpha", "beta"]
    charged = state.charged["sk-shared"]
    assert rows["alpha + beta"]["gateway_tokens"] == charged["prompt_tokens"] + charged["completion_tokens"]
    per_tenant = {t["tenant"]: t for t in doc["summary"]["tenants"]}
    both = sum(per_tenant[t]["prompt_tokens"] + per_tenant[t]["completion_tokens"] for t in ("alpha", "beta"))
    assert per_tenant["alpha"]["succeeded"] > 0 and per_tenant["beta"]["succeeded"] > 0
    assert rows["alpha + beta"]["client_tokens"] == both
    assert all(m["diff_tokens"] == 0 for m in doc["meter"])
    md = (tmp_path / "shared" / "report.md").read_text()
    assert "Meter agrees with the client on every tenant." in md
    assert "| alpha + beta |" in md and "share an API key" in md
