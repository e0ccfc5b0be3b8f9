"""The ops tier: a real Prometheus (Debian's package) with the shipped scrape configuration and rules,
scraping the live gateway while it serves a known load, queried over Prometheus's HTTP API.

- a tenant's token and credit counters in Prometheus equal what the ledger charged it;
- one target for the whole fleet, every gateway replica's series under its own label;
- every recording rule produces series and every rule evaluates without error; the load makes the
  credit-low alert go pending for the tenant it leaves short;
- the overloaded pool's engine preempts (vllm:num_preemptions_total rises) with its KV cache over 90%
  full, and the shipped TokenweirKVCacheNearFull alert goes pending for that replica alone;
- every query of every panel of deploy/grafana/tokenweir.json returns data (no padding allowed),
  and the panels are drawn from those results (set TOKENWEIR_DASHBOARD_PNG=docs/dashboard.png to
  refresh the README's picture).

The load covers what the panels show: two simulated GPU types, streamed and not, quota and
rate-limit refusals at the ledger, admission refusals, SLO misses and KV-cache preemptions at the
overloaded `sim-l40s` pool (tests/conftest.py). Alone: `flock /tmp/tw-integration.lock .venv/bin/python -m pytest -m ops`
(about a minute, half of it the live deployment's start).
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from loadtests.dashboard import grafana_expr, load_panels, padding, query_range, render_png

pytestmark = [pytest.mark.integration, pytest.mark.ops]

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
LLAMA = "llama-3.1-8b-instruct"  # the simulated H100 and A10 pools
QWEN = "qwen2.5-7b-instruct"  # the overloaded simulated L40S pool
MAX_TOKENS = 16
SCRAPE_S = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 45.0, every_s: float = 0.25) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            print(f"{what}: {time.monotonic() - t0:.1f} s")
            return last
        time.sleep(every_s)  # polled condition with a deadline
    pytest.fail(f"timed out waiting for {what} (last: {last!r})")


class Prom:
    """Prometheus's HTTP API."""

    def __init__(self, base_url: str) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=15)

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
        body = self.http.get("/api/v1/query", params=params).json()
        assert body["status"] == "success", (expr, body)
        return list(body["data"]["result"])

    def value(self, expr: str, at: float | None = None) -> float | None:
        res = self.query(expr, at)
        assert len(res) <= 1, (expr, res)
        return float(res[0]["value"][1]) if res else None


@pytest.fixture(scope="module")
def prometheus(live: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prom]:
    """Debian's Prometheus on a free 127.0.0.1 port and a temporary TSDB, configured from
    deploy/prometheus/prometheus.yml with only the target and the intervals changed."""
    exe = shutil.which("prometheus")
    assert exe, "prometheus is missing: run deploy/setup.sh (Debian's prometheus package)"
    d = tmp_path_factory.mktemp("prometheus")
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval=f"{SCRAPE_S:g}s", evaluation_interval=f"{SCRAPE_S:g}s")
    (job,) = cfg["scrape_configs"]
    job["scrape_timeout"] = f"{SCRAPE_S:g}s"
    job["static_configs"] = [{"targets": [live["internal_url"].removeprefix("http://")]}]
    cfg["rule_files"] = [str(PROM / f) for f in cfg["rule_files"]]
    (d / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = (d / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            exe,
            f"--config.file={d / 'prometheus.yml'}",
            f"--storage.tsdb.path={d / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prom = Prom(f"http://127.0.0.1:{port}")

    def ready() -> bool:
        assert proc.poll() is None, (d / "prometheus.log").read_text()
        try:
            return prom.http.get("/-/ready").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for("Prometheus to start", ready, timeout_s=30)
        wait_for("the first scrape", lambda: prom.value('up{job="tokenweir"}') == 1)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@dataclass
class Load:
    start: float
    end: float = 0.0
    ok: dict[str, int] = field(default_factory=dict)
    """Successful requests per tenant."""
    completion: dict[str, int] = field(default_factory=dict)
    """Completion tokens of those (``ignore_eos``: exactly their ``max_tokens``)."""
    refused: dict[str, dict[int, int]] = field(default_factory=dict)
    """Refused requests per tenant, by HTTP status."""
    initial_credits: dict[str, float] = field(default_factory=dict)
    admission_refused: dict[str, int] = field(default_factory=dict)
    """Of ``refused``, those refused at a pool's admission (the rest at the ledger)."""


def _tenant(admin: httpx.Client, load: Load, tid: str, credits: float, **limits: int) -> str:
    r = admin.post(
        "/admin/v1/tenants", json={"tenant_id": tid, "name": tid, "credits": credits, "limits": limits}
    )
    assert r.status_code == 201, r.text
    k = admin.post(f"/admin/v1/tenants/{tid}/keys", json={"name": "ops"})
    assert k.status_code == 201, k.text
    load.initial_credits[tid] = credits
    load.ok[tid], load.completion[tid], load.refused[tid] = 0, 0, {}
    return str(k.json()["api_key"])


async def _send(
    http: httpx.AsyncClient, load: Load, tid: str, key: str, model: str, i: int, stream: bool
) -> None:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": stream,
        **({"stream_options": {"include_usage": True}} if stream else {}),
    }
    if i % 2:
        body["messages"] = [{"role": "user", "content": f"ops request {i}: tell me about weirs"}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = f"ops request {i}: once upon a time"
        path = "/v1/completions"
    r = await http.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
    if r.status_code == 200:
        assert "[DONE]" in r.text if stream else r.json()["usage"]["completion_tokens"] == MAX_TOKENS
        load.ok[tid] += 1
        load.completion[tid] += MAX_TOKENS
    else:
        assert r.status_code in (429, 503), r.text
        assert r.json()["error"]["code"], r.text
        load.refused[tid][r.status_code] = load.refused[tid].get(r.status_code, 0) + 1


def _ledger_usage(admin: httpx.Client, tid: str) -> dict[str, float]:
    """The tenant's usage log. Requests refused at a pool's admission are settled too (nothing
    produced), so ``served`` counts the rows with completion tokens."""
    rows = admin.get("/admin/v1/usage", params={"tenant_id": tid, "format": "json"}).json()
    return {
        "prompt": sum(r["prompt_tokens"] for r in rows),
        "completion": sum(r["completion_tokens"] for r in rows),
        "credits": sum(r["ucredits"] for r in rows) / 1_000_000,
        "served": sum(1 for r in rows if r["completion_tokens"]),
    }


def _scraped(prom: Prom, admin: httpx.Client, load: Load) -> Callable[[], bool]:
    """Prometheus holds every ops tenant's latest ledger totals: credits charged equal the usage
    log, refusals equal what the clients got."""

    def check() -> bool:
        for tid in load.ok:
            want = _ledger_usage(admin, tid)
            got = prom.value(f'sum(tokenweir_credits_charged_total{{tenant="{tid}"}})')
            if want["credits"] and (got is None or abs(got - want["credits"]) > 1e-6):
                return False
            ledger_refused = sum(load.refused[tid].values()) - load.admission_refused.get(tid, 0)
            got_refused = prom.value(f'sum(tokenweir_requests_refused_total{{tenant="{tid}"}})') or 0
            if got_refused != ledger_refused:
                return False
            served = prom.value(
                f'sum(tokenweir_tenant_served_tokens_total{{tenant="{tid}", kind="completion"}})'
            )
            if want["completion"] and served != want["completion"]:
                return False  # the pools publish what they served on their own beat
        return True

    return check


KV_LONG = (4200, 250)
"""Prompt words (about one token each) and completion tokens of the request that holds the KV cache."""
KV_SHORT = (300, 100)
"""The same of the request beside it, which the engine preempts."""


async def _kv_pressure(url: str, load: Load, tid: str, key: str, first: int) -> None:
    """sim-l40s holds 288 KV blocks (4,608 tokens) and admits two sequences up to all of them
    (``kv_admit_fraction`` 1, ``min_num_seqs`` 2: tests/conftest.py). A 4,200-token prompt is
    streamed; once its first token is out (prefilled: 263 blocks), a 300-token one joins it (19 of
    the 25 blocks left: admission counts tokens, not the room they need to grow). Decoding side by
    side they need a block more than there is after about 50 tokens each: the engine preempts the
    newer one (recompute), and the long one alone keeps the cache over 90% full for the 4 s to its
    last token while the preempted one waits for room; then that one is prefilled again and
    finishes. Both are charged exactly."""
    async with httpx.AsyncClient(
        base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}
    ) as http:

        async def short() -> None:
            words, max_tokens = KV_SHORT
            body = {"model": QWEN, "prompt": f"{first} kv " + "weir " * words, "max_tokens": max_tokens}
            r = await http.post("/v1/completions", json=body | {"ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == max_tokens

        words, max_tokens = KV_LONG
        body = {
            "model": QWEN,
            "prompt": f"{first} " + "weir " * words,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        joined: asyncio.Task[None] | None = None
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            lines: list[str] = []
            async for line in r.aiter_lines():
                if not line:
                    continue  # between events
                lines.append(line)
                if joined is None and line.startswith("data: {"):
                    joined = asyncio.get_running_loop().create_task(short())
        assert joined is not None and lines[-1] == "data: [DONE]", lines[-3:]
        await joined
    load.ok[tid] += 2
    load.completion[tid] += KV_LONG[1] + KV_SHORT[1]


@pytest.fixture(scope="module")
def load(live: dict, prometheus: Prom) -> Load:
    """Three phases of known requests, each waited for in Prometheus, so that every counter the
    rules read (refusals included) has a sample before it increases."""
    admin = httpx.Client(base_url=live["url"], headers={"Authorization": f"Bearer {live['admin_key']}"})
    load = Load(start=time.time())
    rich = _tenant(admin, load, "ops-rich", 1_000_000)
    rpm = _tenant(admin, load, "ops-rpm", 10_000, rpm=2)

    async def phase(jobs: list[tuple[str, str, str, int, bool]], concurrent: bool) -> None:
        async with httpx.AsyncClient(base_url=live["url"], timeout=120) as http:
            coros = [_send(http, load, tid, key, model, i, stream) for tid, key, model, i, stream in jobs]
            if concurrent:
                await asyncio.gather(*coros)
            else:
                for c in coros:
                    await c

    def burst(first: int, kv: bool = False) -> None:
        """sim-l40s: one long prompt alone (4,000 tokens in chunks of 256: its prefill alone misses
        the TTFT target of 200 ms; a new first word each time, so no prefix-cache hit), with ``kv``
        a second request beside it that overfills the KV cache (:func:`_kv_pressure`); then 14 at
        once on two sequences and two queue places: most are refused at admission."""

        async def long_prompt() -> None:
            async with httpx.AsyncClient(base_url=live["url"], timeout=120) as http:
                body = {
                    "model": QWEN,
                    "prompt": f"{first} " + "weir " * 4000,
                    "max_tokens": MAX_TOKENS,
                    "ignore_eos": True,
                }
                r = await http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {rich}"})
                assert r.status_code == 200, r.text
                load.ok["ops-rich"] += 1
                load.completion["ops-rich"] += MAX_TOKENS

        asyncio.run(_kv_pressure(live["url"], load, "ops-rich", rich, first) if kv else long_prompt())
        before = sum(load.refused["ops-rich"].values())
        asyncio.run(phase([("ops-rich", rich, QWEN, first + i, i % 2 == 0) for i in range(14)], True))
        load.admission_refused["ops-rich"] = load.admission_refused.get("ops-rich", 0) + (
            sum(load.refused["ops-rich"].values()) - before
        )

    scraped = _scraped(prometheus, admin, load)
    asyncio.run(phase([("ops-rich", rich, LLAMA, i, i % 3 == 0) for i in range(6)], concurrent=True))
    wait_for("phase 1 in Prometheus", scraped)
    asyncio.run(phase([("ops-rich", rich, LLAMA, i, i % 3 == 0) for i in range(6, 14)], concurrent=True))
    # ops-poor gets room for exactly two requests like rich's cheapest (a completion with a
    # one-digit id) and two credits more: the third is refused and 2 of its credits are left.
    rows = admin.get("/admin/v1/usage", params={"tenant_id": "ops-rich", "format": "json"}).json()
    cost = min(r["ucredits"] for r in rows) / 1_000_000
    poor = _tenant(admin, load, "ops-poor", 2 * cost + 2)
    wait_for(
        "ops-poor's counters", lambda: prometheus.query('tokenweir_credits_charged_total{tenant="ops-poor"}')
    )
    asyncio.run(phase([("ops-poor", poor, LLAMA, i, False) for i in (0, 2, 4)], concurrent=False))
    asyncio.run(phase([("ops-rpm", rpm, LLAMA, i, True) for i in range(3)], concurrent=False))
    burst(100, kv=True)
    wait_for("phase 2 in Prometheus", scraped)
    asyncio.run(phase([("ops-poor", poor, LLAMA, 10 + i, False) for i in range(2)], concurrent=False))
    asyncio.run(phase([("ops-rpm", rpm, LLAMA, 10 + i, True) for i in range(2)], concurrent=False))
    burst(200)
    load.end = time.time()
    wait_for("phase 3 in Prometheus", scraped)
    assert load.ok["ops-poor"] == 2 and load.refused["ops-poor"] == {429: 3}, load
    assert load.ok["ops-rpm"] == 2 and load.refused["ops-rpm"] == {429: 3}, load
    # refused at sim-l40s's admission: 503 (queue full) or 429 (the tenant's share of it)
    assert load.admission_refused["ops-rich"] >= 8, load
    if os.environ.get("TOKENWEIR_DASHBOARD_PNG"):
        _picture_load(live, admin, load)
    return load


def _picture_load(live: dict, admin: httpx.Client, load: Load) -> None:
    """For the README's picture only (TOKENWEIR_DASHBOARD_PNG set): two more tenants for a minute
    of varying traffic, so the panels show curves rather than a few seconds. Other tenants than
    the ones the tests check, and paced arrivals (a load shape, not a wait for a condition)."""
    acme = _tenant(admin, load, "acme", 30_000)
    globex = _tenant(admin, load, "globex", 100_000, rpm=40)

    async def run() -> None:
        async with httpx.AsyncClient(base_url=live["url"], timeout=120) as http:
            for second in range(60):
                k = 2 + int(3 * (1 + math.sin(second / 6)))
                jobs = [_send(http, load, "acme", acme, LLAMA, second * 10 + i, i % 2 == 0) for i in range(k)]
                jobs += [_send(http, load, "globex", globex, LLAMA, second * 10 + i, True) for i in range(2)]
                if second % 15 == 5:
                    jobs += [_send(http, load, "acme", acme, QWEN, second * 10 + i, False) for i in range(10)]
                await asyncio.gather(*jobs, asyncio.sleep(1.0))

    asyncio.run(run())
    load.end = time.time()


def test_tenant_counters_equal_what_the_ledger_charged(live: dict, prometheus: Prom, load: Load) -> None:
    admin = httpx.Client(base_url=live["url"], headers={"Authorization": f"Bearer {live['admin_key']}"})
    for tid, served in load.ok.items():
        usage = _ledger_usage(admin, tid)
        assert usage["served"] == served, (tid, usage, load)
        assert usage["completion"] == load.completion[tid]  # ignore_eos: exactly max_tokens each
        by_kind = {
            r["metric"]["kind"]: float(r["value"][1])
            for r in prometheus.query(f'sum by (kind) (tokenweir_tokens_charged_total{{tenant="{tid}"}})')
        }
        assert by_kind == {"prompt": usage["prompt"], "completion": usage["completion"]}, tid
        charged = prometheus.value(f'tokenweir_credits_charged_total{{tenant="{tid}"}}')
        assert charged == pytest.approx(usage["credits"], abs=1e-6), tid
        remaining = prometheus.value(f'tokenweir_credits_remaining{{tenant="{tid}"}}')
        assert remaining == pytest.approx(load.initial_credits[tid] - usage["credits"], abs=1e-6), tid
        granted = prometheus.value(f'tokenweir_credits_granted{{tenant="{tid}"}}')
        assert granted == load.initial_credits[tid]
        # the pools served (engine count) what the ledger charged
        served_completion = prometheus.value(
            f'sum(tokenweir_tenant_served_tokens_total{{tenant="{tid}", kind="completion"}})'
        )
        assert served_completion == usage["completion"], tid
    refused = {
        (r["metric"]["tenant"], r["metric"]["reason"]): float(r["value"][1])
        for r in prometheus.query('tokenweir_requests_refused_total{tenant=~"ops-.*"}')
    }
    assert refused == {
        ("ops-poor", "insufficient_quota"): 3,
        ("ops-rpm", "rate_limit_requests"): 3,
    }


def test_one_target_for_the_fleet_and_series_per_gateway_replica(prometheus: Prom) -> None:
    targets = prometheus.http.get("/api/v1/targets").json()["data"]["activeTargets"]
    assert [t["labels"]["job"] for t in targets] == ["tokenweir"]
    assert prometheus.value('count(up{job="tokenweir"})') == 1
    # the live deployment has two gateway replicas: each has its own series
    assert prometheus.value("count(tokenweir_gateway_in_flight)") == 2
    assert prometheus.value("count(count by (gateway) (tokenweir_requests_total))") == 2
    assert prometheus.value('count(tokenweir_pool_info{engine="sim"})') == 3
    assert prometheus.value('tokenweir_pool_replicas_ready{pool="sim-l40s"}') == 1
    # every pool replica's engine metrics, once: the vLLM pool's and the simulated ones'
    assert prometheus.value("count(vllm:num_requests_running)") == 4
    gpus = {r["metric"]["gpu"] for r in prometheus.query("vllm:kv_cache_usage_perc")}
    assert gpus == {"CPU", "H100", "A10", "L40S"}


def test_recording_rules_produce_series_and_every_rule_is_healthy(prometheus: Prom, load: Load) -> None:
    records = [
        r["record"]
        for g in yaml.safe_load((PROM / "rules" / "recording.yml").read_text())["groups"]
        for r in g["rules"]
    ]
    for name in dict.fromkeys(records):
        wait_for(f"series of {name}", lambda n=name: prometheus.query(n))
    # the load shows up where it should
    assert prometheus.value('tokenweir:refusals:rate5m{stage="ledger", reason="insufficient_quota"}') > 0
    assert prometheus.value('tokenweir:refusals:rate5m{stage="ledger", reason="rate_limit_requests"}') > 0
    assert prometheus.value('sum(tokenweir:refusals:rate5m{stage="admission"})') > 0
    assert prometheus.value('tokenweir:pool_slo_attainment:ratio_rate5m{pool="sim-l40s"}') < 0.9
    assert prometheus.value('tokenweir:tenant_tokens_charged:rate5m{tenant="ops-rich"}') > 0
    assert prometheus.value('tokenweir:credits_hours_left:rate1h{tenant="ops-poor"}') > 0
    gpus = {r["metric"]["gpu"] for r in prometheus.query("tokenweir:gpu_tokens_served:rate5m")}
    assert {"H100", "L40S"} <= gpus
    # every rule evaluates cleanly on real series (no join with duplicates, no bad template)
    groups = prometheus.http.get("/api/v1/rules").json()["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len(records) + len(
        yaml.safe_load((PROM / "rules" / "alerts.yml").read_text())["groups"][0]["rules"]
    )
    bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not bad, bad
    # ops-poor is left with 2 credits of its ~60: its low-credit alert is pending (for: 5m)
    wait_for(
        "the credits-low alert for ops-poor",
        lambda: prometheus.query('ALERTS{alertname="TokenweirTenantCreditsLow", tenant="ops-poor"}'),
    )
    assert not prometheus.query('ALERTS{alertname="TokenweirTenantCreditsLow", tenant="ops-rich"}')
    # and at its burn rate it runs out within minutes: the ledger's own projection, which ranks every
    # organization (tracked or not), puts its run-out alert pending (for: 15m)
    wait_for(
        "the run-out alert for ops-poor",
        lambda: prometheus.query('ALERTS{alertname="TokenweirTenantCreditsRunningOut", tenant="ops-poor"}'),
    )


def test_the_engine_preempts_with_its_kv_cache_near_full_and_the_kv_alert_goes_pending(
    prometheus: Prom, load: Load
) -> None:
    """vLLM's own engine metrics, as Prometheus scraped them while :func:`_kv_pressure` ran, and the
    shipped TokenweirKVCacheNearFull rule evaluated on them live (not a copy with a shorter
    ``for``): its condition held, so the alert went pending (``for: 5m`` keeps it from firing
    within the test; promtool's unit tests in deploy/prometheus/tests see it fire)."""
    window = f"{math.ceil(time.time() - load.start) + 5}s"
    preempted = {
        r["metric"]["pool"]: float(r["value"][1])
        for r in prometheus.query("sum by (pool) (vllm:num_preemptions_total)")
    }
    before = prometheus.value('sum(vllm:num_preemptions_total{pool="sim-l40s"})', at=load.start)
    assert before == 0 and preempted["sim-l40s"] >= 1, (before, preempted)
    assert {p for p, n in preempted.items() if n} == {"sim-l40s"}, preempted
    fullest = {
        r["metric"]["pool"]: float(r["value"][1])
        for r in prometheus.query(f"max by (pool) (max_over_time(vllm:kv_cache_usage_perc[{window}]))")
    }
    print(f"preemptions {preempted}, fullest KV cache {fullest}")
    assert fullest["sim-l40s"] > 0.9, fullest
    assert all(v < 0.9 for p, v in fullest.items() if p != "sim-l40s"), fullest
    # the rule's two halves at once, on the scraped series: near full while preemptions rise
    both = prometheus.query(
        f"max_over_time((max by (pool, gpu, replica) (vllm:kv_cache_usage_perc) > 0.9 and on (pool, gpu, replica)"
        f" sum by (pool, gpu, replica) (rate(vllm:num_preemptions_total[5m])) > 0)[{window}:1s])"
    )
    assert [r["metric"]["pool"] for r in both] == ["sim-l40s"], both
    # the shipped alert, evaluated by this Prometheus: pending for the sim-l40s replica alone
    alerts = prometheus.query(
        f'max_over_time(ALERTS{{alertname="TokenweirKVCacheNearFull", alertstate="pending"}}[{window}])'
    )
    assert [(r["metric"]["pool"], r["metric"]["gpu"]) for r in alerts] == [("sim-l40s", "L40S")], alerts


def test_every_dashboard_panel_has_data(prometheus: Prom, load: Load, tmp_path: Path) -> None:
    panels = load_panels()
    # every recorded series the panels read has been evaluated at least once by now
    wait_for("the recorded series", lambda: prometheus.query("tokenweir:credits_hours_left:rate1h"))
    end = time.time()
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    empty = []
    for p in panels:
        for t in p.targets:
            assert not padding(t.expr), (p.title, t.expr)
            res = query_range(prometheus.http, grafana_expr(t.expr, "15s"), load.start - 5, end, SCRAPE_S)
            if not any(s["values"] for s in res):
                empty.append((p.title, t.expr))
            results[(p.title, t.ref)] = res
    assert not empty, empty

    def points(title: str, ref: str, **labels: str) -> list[float]:
        return [
            float(v)
            for s in results[(title, ref)]
            if labels.items() <= s["metric"].items()
            for _, v in s["values"]
            if not math.isnan(float(v))
        ]

    # the panels of the load's trouble show it, not just a flat line: refusals at both stages, a
    # pool below its SLO target, a KV cache over 90% full and preemptions
    assert max(points("Refusals/s by reason", "A", stage="ledger")) > 0
    assert max(points("Refusals/s by reason", "A", stage="admission")) > 0
    assert min(points("SLO attainment against target", "A", pool="sim-l40s")) < 0.9
    assert max(points("Engine KV cache usage and preemptions", "A", pool="sim-l40s")) > 0.9
    assert max(points("Engine KV cache usage and preemptions", "B", pool="sim-l40s")) > 0
    out = Path(os.environ.get("TOKENWEIR_DASHBOARD_PNG") or tmp_path / "dashboard.png")
    render_png(panels, results, out, "Tokenweir dashboard: the ops tier's load, from Prometheus")
    assert out.stat().st_size > 20_000
