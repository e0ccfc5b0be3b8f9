"""The load-test harness's `smoke` scenario end to end against the live gateway (what CI runs):
two tenants with their own keys, Poisson traffic for 30 s, and the meter check against /v1/usage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _tenant_key(live: dict) -> str:
    admin = httpx.Client(
        base_url=live["url"], headers={"Authorization": f"Bearer {live['admin_key']}"}, timeout=30
    )
    tid = "smoke-" + uuid.uuid4().hex[:8]
    assert (
        admin.post(
            "/admin/v1/tenants", json={"tenant_id": tid, "name": tid, "credits": 10_000_000}
        ).status_code
        == 201
    )
    r = admin.post(f"/admin/v1/tenants/{tid}/keys", json={"name": "smoke"})
    assert r.status_code == 201
    return str(r.json()["api_key"])


def test_smoke_scenario_runs_and_the_meter_agrees(live: dict, tmp_path: Path) -> None:
    env = dict(os.environ, TOKENWEIR_SMOKE_KEY_A=_tenant_key(live), TOKENWEIR_SMOKE_KEY_B=_tenant_key(live))
    out = tmp_path / "smoke"
    cmd = [
        sys.executable,
        "-m",
        "loadtests",
        "run",
        "smoke",
        "--target",
        live["url"],
        "--out",
        str(out),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((out / "summary.json").read_text())
    summary = doc["summary"]
    assert summary["succeeded"] >= 20 and summary["failed"] == 0, summary
    assert doc["meter"] is not None, doc["meter_unavailable"]
    assert {r["tenant"] for r in doc["meter"]} == {"tenant-a", "tenant-b"}
    for row in doc["meter"]:
        assert row["diff_tokens"] == 0, row  # the gateway charged exactly what the client saw
        assert row["client_tokens"] > 0
    assert (out / "report.md").exists() and list(out.glob("*.png"))
