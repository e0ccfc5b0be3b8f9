"""Chaos on the live deployment: ``kill -9`` of a gateway replica and of a pool replica mid-stream.

Runs near the end of the integration session (it kills replicas of the shared deployment and waits
for Serve to replace them). Each test prints requests sent / served / failed / refunded and checks
the ledger's books for its own tenant straight from the SQLite file:

* a gateway replica killed mid-stream: its streams break; the ledger notices the dropped
  connection (its reservations are leased to it) and, ``metering.lease_grace_s`` later, charges
  each the prompt and the tokens of its last progress record (recorded once a second); nothing
  stays reserved; streams on the other replica finish untouched;
* a pool replica killed mid-stream: each of its streams ends with an OpenAI error event and is
  charged exactly what it produced; a request that has no first token yet is retried on another
  pool; requests to other pools are unaffected.

Alone: ``pytest -m chaos`` (~1.5 min, most of it the session's deployment).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.chaos]
MODEL = "llama-3.1-8b-instruct"
U = 1_000_000


def _admin(live: dict) -> httpx.Client:
    return httpx.Client(
        base_url=live["url"], headers={"Authorization": f"Bearer {live['admin_key']}"}, timeout=60
    )


def _tenant(live: dict, credits: float) -> tuple[str, str]:
    tid = "chaos-" + uuid.uuid4().hex[:8]
    with _admin(live) as a:
        assert (
            a.post("/admin/v1/tenants", json={"tenant_id": tid, "name": tid, "credits": credits}).status_code
            == 201
        )
        return tid, a.post(f"/admin/v1/tenants/{tid}/keys", json={}).json()["api_key"]


def _actor_pids(class_part: str) -> list[int]:
    """Process ids of this session's live actors whose class name contains ``class_part`` (from the
    GCS actor table: the state API needs the dashboard, which the tests do not start)."""
    from ray._private.state import actors

    return [
        int(a["Pid"])
        for a in actors().values()
        if a["State"] == "ALIVE" and class_part in (a.get("ActorClassName") or "")
    ]


class Stream:
    """One streamed request on its own connection, recording what the client saw."""

    def __init__(self) -> None:
        self.request_id: str | None = None
        self.events = 0
        self.status = "pending"
        self.error: dict[str, Any] | None = None
        self.http_status: int | None = None

    async def run(self, url: str, key: str, body: dict, headers: dict[str, str] | None = None) -> None:
        h = {"Authorization": f"Bearer {key}", **(headers or {})}
        try:
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(60, connect=10)) as c,
                c.stream("POST", f"{url}/v1/chat/completions", json=body, headers=h) as r,
            ):
                self.http_status = r.status_code
                if r.status_code != 200:
                    self.status = "refused"
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    obj = json.loads(line[6:])
                    if "error" in obj:
                        self.error, self.status = obj["error"], "error"
                        return
                    self.request_id = self.request_id or obj["id"].split("-", 1)[1]
                    self.events += 1
                self.status = "done"
        except (httpx.HTTPError, ConnectionError):
            self.status = "broken"


def _events(state_dir: str, tenant: str) -> dict[str, tuple[str, int, int, int]]:
    """Per request: (outcome, prompt tokens, completion tokens, micro-credits charged less what the
    default price charges for those tokens: 0 when the charge is exact)."""
    with sqlite3.connect(f"file:{Path(state_dir) / 'ledger.sqlite3'}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT request_id, outcome, prompt_tokens, completion_tokens, cached_tokens, ucredits"
            " FROM usage_events WHERE tenant_id = ?",
            (tenant,),
        ).fetchall()
    # A credit per token, half of one per prompt token found in the engine's prefix cache.
    return {r: (o, p, c, u - ((p - k + c) * U + k * U // 2)) for r, o, p, c, k, u in rows}


def _books(state_dir: str, tenant: str) -> tuple[int, int, int, int]:
    """(balance, granted, charged, open reservations) of one tenant, from the file."""
    with sqlite3.connect(f"file:{Path(state_dir) / 'ledger.sqlite3'}?mode=ro", uri=True) as db:
        (balance,) = db.execute(
            "SELECT balance_ucredits FROM tenants WHERE tenant_id = ?", (tenant,)
        ).fetchone()
        (granted,) = db.execute(
            "SELECT coalesce(sum(ucredits), 0) FROM grants WHERE tenant_id = ?", (tenant,)
        ).fetchone()
        (charged,) = db.execute(
            "SELECT coalesce(sum(ucredits), 0) FROM usage_events WHERE tenant_id = ?", (tenant,)
        ).fetchone()
        (held,) = db.execute("SELECT count(*) FROM reservations WHERE tenant_id = ?", (tenant,)).fetchone()
    return balance, granted, charged, held


def _wait_settled(live: dict, tenant: str, timeout_s: float) -> float:
    t0 = time.monotonic()
    with _admin(live) as a:
        while time.monotonic() - t0 < timeout_s:
            try:
                v = a.get(f"/admin/v1/tenants/{tenant}").json()
                if v["in_flight"] == 0 and v["reserved_credits"] == 0:
                    return time.monotonic() - t0
            except (httpx.HTTPError, KeyError, ValueError):
                pass  # the answering gateway replica may be the one being replaced
            time.sleep(0.2)
    raise AssertionError(f"tenant {tenant} still holds reservations after {timeout_s} s")


def _report(name: str, streams: list[Stream], events: dict, books: tuple[int, int, int, int]) -> None:
    by: dict[str, int] = {}
    for s in streams:
        by[s.status] = by.get(s.status, 0) + 1
    refunded = sum(1 for o, *_ in events.values() if o == "expired_released")
    balance, granted, charged, held = books
    print(
        f"\n[{name}] sent {len(streams)} served {by.get('done', 0)} failed "
        f"{len(streams) - by.get('done', 0)} ({by}) refunded {refunded}; ledger: granted {granted / U:g} "
        f"= balance {balance / U:g} + charged {charged / U:g}; reservations left {held}"
    )


async def _until(cond, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, "timed out"
        await asyncio.sleep(0.05)


async def test_kill_9_gateway_replica_mid_stream_charges_progress(live: dict) -> None:
    from serving.cli import runtime

    url, state = live["url"], live["state_dir"]
    tenant, key = _tenant(live, 1_000_000)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "a long answer"}],
        "max_tokens": 3500,
        "stream": True,
        "ignore_eos": True,
    }
    streams = [Stream() for _ in range(12)]  # own connections: spread over both gateway replicas
    tasks = [asyncio.create_task(s.run(url, key, body, {"x-tokenweir-gpu": "A10"})) for s in streams]
    await _until(lambda: all(s.events > 0 for s in streams), 120)
    await asyncio.sleep(2.5)  # past the first progress flushes
    pids = _actor_pids("gateway")
    assert len(pids) == 2, pids
    os.kill(pids[0], signal.SIGKILL)
    killed_at = time.monotonic()
    await asyncio.gather(*tasks)
    broken = [s for s in streams if s.status == "broken"]
    done = [s for s in streams if s.status == "done"]
    assert broken and len(broken) + len(done) == len(streams), [s.status for s in streams]

    _wait_settled(live, tenant, timeout_s=30)
    took = time.monotonic() - killed_at
    events = _events(state, tenant)
    books = _books(state, tenant)
    _report("gateway kill -9", streams, events, books)
    print(f"[gateway kill -9] every reservation resolved within {took:.1f} s of the kill")
    for s in broken:
        outcome, _prompt, completion, off = events[s.request_id]  # type: ignore[index]
        assert outcome == "expired_charged", (outcome, completion)  # from its progress records
        assert 0 < completion < 3500 and off == 0
    for s in done:
        outcome, _prompt, completion, off = events[s.request_id]  # type: ignore[index]
        assert (outcome, completion, off) == ("completed", 3500, 0)
    balance, granted, charged, held = books
    assert balance == granted - charged and held == 0
    runtime.wait_ready(url, timeout_s=120)  # Serve has replaced the replica
    await _until(lambda: len(_actor_pids("gateway")) == 2, 120)


async def test_kill_9_pool_replica_mid_stream_exact_charge_and_retry(live: dict) -> None:
    from serving.cli import runtime

    url, state = live["url"], live["state_dir"]
    tenant, key = _tenant(live, 1_000_000)
    long = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "a long answer"}],
        "max_tokens": 3500,
        "stream": True,
        "ignore_eos": True,
    }
    streams = [Stream() for _ in range(6)]
    tasks = [asyncio.create_task(s.run(url, key, long, {"x-tokenweir-gpu": "A10"})) for s in streams]
    await _until(lambda: all(s.events > 0 or s.status != "pending" for s in streams), 180)
    assert all(s.events > 0 for s in streams), [(s.status, s.http_status, s.error) for s in streams]
    pids = _actor_pids("sim-a10")
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    # Unpinned requests right after the kill: served (by the H100 pool), retried if they were sent
    # to the dead replica before their first token.
    short = {**long, "max_tokens": 8}
    after = [Stream() for _ in range(6)]
    await asyncio.gather(*tasks, *(s.run(url, key, short) for s in after))
    assert all(s.status == "error" for s in streams), [(s.status, s.error) for s in streams]
    assert all(s.error and s.error["code"] == "service_unavailable" for s in streams)
    assert all(s.status == "done" for s in after), [(s.status, s.http_status) for s in after]
    # One dead pool does not make the gateway unready (what Kubernetes probes); all-pools does.
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
    pools = httpx.get(f"{url}/readyz/pools", timeout=10)
    assert pools.status_code == 503 and "sim-a10" in pools.text, pools.text

    _wait_settled(live, tenant, timeout_s=30)
    events = _events(state, tenant)
    books = _books(state, tenant)
    _report("pool kill -9", streams + after, events, books)
    for s in streams:  # charged exactly what was produced before the replica died
        outcome, _prompt, completion, off = events[s.request_id]  # type: ignore[index]
        assert outcome == "error" and 0 < completion < 3500 and off == 0
    for s in after:
        outcome, _prompt, completion, off = events[s.request_id]  # type: ignore[index]
        assert (outcome, completion, off) == ("completed", 8, 0)
    balance, granted, charged, held = books
    assert balance == granted - charged and held == 0
    runtime.wait_ready(url, timeout_s=180)  # Serve replaces the pool replica
