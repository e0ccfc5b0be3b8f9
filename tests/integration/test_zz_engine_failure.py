"""An engine that dies mid-service: the gateway answers with an OpenAI-shaped 503 (never a
traceback) and keeps serving its own endpoints. Runs last in the session: it kills vLLM's engine
process for real (SIGKILL), and the pool replica is replaced by Serve's health check afterwards."""

from __future__ import annotations

import os
import signal

import httpx
import psutil
import pytest

pytestmark = pytest.mark.integration


def _engine_core_pids() -> list[int]:
    pids = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            name = p.info["name"] or ""
            cmd = " ".join(p.info["cmdline"] or [])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "EngineCore" in name or "EngineCore" in cmd:
            pids.append(p.info["pid"])
    return pids


def test_engine_death_gives_openai_error_and_gateway_stays_up(gateway_url: str, api_key: str) -> None:
    pids = _engine_core_pids()
    assert pids, "no vLLM EngineCore process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4}
    r = httpx.post(
        f"{gateway_url}/v1/chat/completions",
        json=body,
        timeout=120,
        headers={"Authorization": f"Bearer {api_key}"},
    )
    assert r.status_code in (500, 503), r.text
    err = r.json()["error"]
    assert err["type"] == "server_error"
    assert "Traceback" not in r.text
    assert r.headers.get("x-request-id")
    # The gateway itself is alive and says the pool is not ready.
    assert httpx.get(f"{gateway_url}/healthz", timeout=10).status_code == 200
    assert httpx.get(f"{gateway_url}/v1/models", timeout=10).status_code == 200
