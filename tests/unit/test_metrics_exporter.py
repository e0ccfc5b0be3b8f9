"""The /metrics exposition: per-origin series (no pre-summed counters that drop when a replica goes),
the configured pools' series, and the ledger's bounded low-credit and run-out gauges (the burn rate
behind them with a hand-moved clock) on a real SQLite ledger."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.admission import AdmissionStats
from serving.config import parse_config, resolve
from serving.metering import LedgerClient, Meter, MeteringConfig
from serving.metering._client import LocalTransport
from serving.metering._core import LedgerCore
from serving.metering._policy import BURN_RATE_TAU_S, BurnRate
from serving.metering._stats import (
    LOW_CREDIT_RATIOS,
    RUN_OUT_HORIZONS_H,
    LedgerCollector,
    LedgerStats,
    low_credit,
    run_out,
)
from serving.metrics import BoardCollector, GatewayStats, render
from serving.tenancy import TenantCreate, TopUp

MODEL = "llama-3.1-8b-instruct"


def samples(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(ss: dict, name: str, **labels: str) -> float:
    return ss[(name, frozenset(labels.items()))]


def deployment():  # type: ignore[no-untyped-def]
    cfg = parse_config(
        {
            "models": {MODEL: {"tokenizer": "builtin:tiny-llama"}},
            "pools": [
                {"name": "h", "model": MODEL, "accelerator": "H100", "engine": "sim", "replicas": 2},
                {
                    "name": "a",
                    "model": MODEL,
                    "accelerator": "A10",
                    "engine": "sim",
                    "slo": {"ttft_ms": 500, "tpot_ms": 40, "attainment_target": 0.95},
                },
            ],
        }
    )
    return resolve(cfg)


def pool_entry(pool: str, gpu: str, replica: str, finished: int) -> tuple[str, str, float, dict]:
    st = AdmissionStats(
        finished_total=finished, slo_met_total=finished - 1, refused_total={"pool_queue_full": 2}
    )
    return ("pool", f"{pool}/{replica}", 0.1, {"pool": pool, "accelerator": gpu, "admission": st})


def test_pools_configured_ready_and_priced() -> None:
    dep = deployment()
    entries = [pool_entry("h", "H100", "r1", 5)]  # one of h's two replicas publishes; a has none
    ss = samples(render([BoardCollector(entries, dep.pools)]))
    assert value(ss, "tokenweir_pool_replicas_desired", pool="h", gpu="H100") == 2
    assert value(ss, "tokenweir_pool_replicas_ready", pool="h", gpu="H100") == 1
    assert value(ss, "tokenweir_pool_replicas_ready", pool="a", gpu="A10") == 0  # still a series
    assert value(ss, "tokenweir_pool_slo_ttft_seconds", pool="a", gpu="A10") == 0.5
    assert value(ss, "tokenweir_pool_slo_tpot_seconds", pool="a", gpu="A10") == 0.04
    assert value(ss, "tokenweir_pool_slo_attainment_target_ratio", pool="a", gpu="A10") == 0.95
    assert value(ss, "tokenweir_pool_slo_attainment_target_ratio", pool="h", gpu="H100") == 0.9
    h100 = next(p for p in dep.pools if p.name == "h").gpu.price_per_hour_relative
    assert value(ss, "tokenweir_pool_cost_per_hour", pool="h", gpu="H100") == 2 * h100
    assert value(ss, "tokenweir_pool_info", pool="a", gpu="A10", model=MODEL, engine="sim") == 1
    lbl = {"pool": "h", "replica": "r1", "gpu": "H100"}
    assert value(ss, "tokenweir_pool_finished_total", **lbl) == 5
    assert value(ss, "tokenweir_pool_slo_met_total", **lbl) == 4
    assert value(ss, "tokenweir_pool_refused_total", **lbl, reason="pool_queue_full") == 2
    # every reason is there from the start, so the first refusals are an increase rate() sees
    assert value(ss, "tokenweir_pool_refused_total", **lbl, reason="predicted_wait") == 0
    assert value(ss, "tokenweir_pool_refused_total", **lbl, reason="tenant_queue_full") == 0


def test_gateway_series_keep_their_replica() -> None:
    """Two gateway replicas: one series each, so a replica leaving ends its series instead of
    lowering a summed counter (which rate() would take for a reset and count again)."""
    g1, g2 = GatewayStats(), GatewayStats()
    g1.count(MODEL, "h", "ok", 10, 0.2)
    g2.count(MODEL, "h", "ok", 7, 0.4)
    g2.count(MODEL, "h", "ok", 3, None)
    g2.routing_total = {("h", "only_candidate"): 2}
    g2.prefix_total = {("h", "prefix_hit"): 5, ("h", "least_loaded"): 1}
    g2.prefix_tokens = {"h": (4000, 3200, 17)}
    entries = [("gateway", "g1", 0.1, g1), ("gateway", "g2", 0.1, g2)]
    ss = samples(render([BoardCollector(entries)]))
    assert value(ss, "tokenweir_requests_total", gateway="g1", model=MODEL, pool="h", outcome="ok") == 1
    assert value(ss, "tokenweir_requests_total", gateway="g2", model=MODEL, pool="h", outcome="ok") == 2
    assert value(ss, "tokenweir_completion_tokens_total", gateway="g2", model=MODEL, pool="h") == 10
    assert value(ss, "tokenweir_ttft_seconds_count", gateway="g2", pool="h") == 1
    assert value(ss, "tokenweir_ttft_seconds_sum", gateway="g2", pool="h") == 0.4
    assert (
        value(ss, "tokenweir_routing_decisions_total", gateway="g2", pool="h", reason="only_candidate") == 2
    )
    assert (
        value(ss, "tokenweir_prefix_routing_requests_total", gateway="g2", pool="h", reason="prefix_hit") == 5
    )
    assert value(ss, "tokenweir_prefix_routing_prompt_tokens_total", gateway="g2", pool="h") == 4000
    assert value(ss, "tokenweir_prefix_routing_predicted_cached_tokens_total", gateway="g2", pool="h") == 3200
    assert value(ss, "tokenweir_prefix_cache_event_frames_total", gateway="g2", pool="h") == 17
    ss1 = samples(render([BoardCollector(entries[:1])]))  # g2 gone: g1's series are unchanged
    assert value(ss1, "tokenweir_requests_total", gateway="g1", model=MODEL, pool="h", outcome="ok") == 1
    assert ("tokenweir_ttft_seconds_count", frozenset({"gateway": "g2", "pool": "h"}.items())) not in ss1


def test_low_credit_is_bounded_and_counts_below_each_ratio() -> None:
    granted = {f"t{i:04d}": 100.0 for i in range(5000)}
    remaining = {t: float(i % 100) for i, t in enumerate(sorted(granted))}  # 50 tenants per ratio step
    granted["never"] = 0.0  # no share to run out of: left out
    remaining["never"] = 0.0
    lowest, below = low_credit(remaining, granted, n=20)
    assert len(lowest) == 20
    assert all(r == 0.0 for _t, r in lowest)  # 50 tenants have nothing left; 20 of them are named
    assert lowest == sorted(lowest)
    assert below == {r: 50 * round(r * 100) for r in LOW_CREDIT_RATIOS}
    assert low_credit({"x": -5.0}, {"x": 10.0}) == ([("x", 0.0)], dict.fromkeys(LOW_CREDIT_RATIOS, 1))


def test_burn_rate_is_a_decayed_rate_that_goes_idle() -> None:
    tau = BURN_RATE_TAU_S
    b = BurnRate()
    assert b.per_s(0.0) == 0.0
    for i in range(int(10 * tau)):  # 1,000 micro-credits a second for ten time constants
        b.add(1000.0, float(i))
    assert b.per_s(10 * tau) == pytest.approx(1000.0, rel=1e-3)  # steady state: the true rate
    assert b.per_s(11 * tau) == pytest.approx(1000.0 / math.e, rel=1e-3)  # an hour idle: 1/e of it
    assert b.per_s(30 * tau) == 0.0  # a decayed sum below one micro-credit reads as idle
    fresh = BurnRate()
    for i in range(int(tau)):  # a steady rate begun an hour ago reads 1 - 1/e of it: never above
        fresh.add(1000.0, 1e6 + i)
    assert fresh.per_s(1e6 + tau) == pytest.approx(1000.0 * (1 - 1 / math.e), rel=1e-3)
    late = BurnRate()
    late.add(5e6, 100.0)
    late.add(5e6, 50.0)  # out of order: counted at the latest time seen
    assert late.per_s(100.0) == pytest.approx(1e7 / tau)


def test_run_out_ranks_5000_organizations_bounded_and_counts_each_horizon() -> None:
    """Every organization is ranked (none is tracked here); 20 are named, the counts cover all."""
    orgs = [f"org-{i:04d}" for i in range(5000)]
    remaining = dict.fromkeys(orgs, 100.0)
    # org-i has 10 * (i + 1) minutes of credits left: 6 within 1 h, 36 within 6 h, 144 within a day
    burn = {t: 100.0 / (600.0 * (i + 1)) for i, t in enumerate(orgs)}
    burn["org-0042"] = 0.0  # idle: never runs out
    remaining["broke"], burn["broke"] = -3.0, 1.0  # overdrawn and still burning: out already
    burn["no-balance-series"] = 1.0  # no balance known: out already
    soonest, within = run_out(remaining, burn)
    assert len(soonest) == 20
    assert soonest[:2] == [("broke", 0.0), ("no-balance-series", 0.0)]
    assert [t for t, _ in soonest[2:5]] == ["org-0000", "org-0001", "org-0002"]
    assert soonest[2][1] == pytest.approx(600.0)
    assert [s for _, s in soonest] == sorted(s for _, s in soonest)
    # a horizon counts those strictly within it (org-0005 has exactly 1 h left)
    assert within == {1: 2 + 5, 6: 2 + 35, 24: 2 + 143 - 1, 72: 2 + 431 - 1}  # org-0042 is idle
    assert set(within) == set(RUN_OUT_HORIZONS_H)
    stats = LedgerStats(run_out=soonest, tenants_running_out=within)
    collector = LedgerCollector()
    collector.update(stats)
    ss = samples(render([collector]))
    named = {dict(k[1])["tenant"] for k in ss if k[0] == "tokenweir_credits_run_out_seconds"}
    assert len(named) == 20 and "org-0000" in named
    assert value(ss, "tokenweir_credits_run_out_seconds", tenant="org-0000") == pytest.approx(600.0)
    assert value(ss, "tokenweir_tenants_running_out", within="24h") == 144
    assert {dict(k[1])["within"] for k in ss if k[0] == "tokenweir_tenants_running_out"} == {
        "1h",
        "6h",
        "24h",
        "72h",
    }
    assert run_out({}, {}) == ([], dict.fromkeys(RUN_OUT_HORIZONS_H, 0))


async def test_ledger_exports_granted_charged_and_low_credit(tmp_path: Path) -> None:
    """Granted credits follow creation and top-ups, survive a restart (from the grants table), and
    the charged counter equals the usage the ledger recorded."""
    cfg = MeteringConfig(state_dir=tmp_path)
    core = LedgerCore(cfg)
    await core.start()
    client = LedgerClient(LocalTransport(core))
    meter = Meter(client)
    await client.create_tenant(TenantCreate(tenant_id="rich", name="rich", credits=1000))
    await client.create_tenant(TenantCreate(tenant_id="poor", name="poor", credits=10))
    await client.top_up("poor", TopUp(credits=10))
    key = (await client.create_key("poor")).api_key
    r = await meter.authorize(key, MODEL, 10, 5, "req-1")
    s = await meter.settle(r, 10, 5)
    st = await client.stats()
    assert st.credits_granted == {"rich": 1000.0, "poor": 20.0}
    assert st.credits_charged == {"rich": 0.0, "poor": s.charged_ucredits / 1_000_000}
    assert st.low_credit[0] == ("poor", (20 - s.charged_ucredits / 1_000_000) / 20)
    # the burn rate behind the run-out gauge: this one charge, decayed over milliseconds
    charged = s.charged_ucredits / 1_000_000
    ((who, left_s),) = st.run_out
    assert who == "poor" and left_s == pytest.approx((20 - charged) / (charged / BURN_RATE_TAU_S), rel=1e-3)
    collector = LedgerCollector()
    collector.update(st)
    ss = samples(render([collector]))
    assert value(ss, "tokenweir_credits_granted", tenant="poor") == 20
    assert value(ss, "tokenweir_credits_charged_total", tenant="poor") == s.charged_ucredits / 1_000_000
    assert value(ss, "tokenweir_credits_low_remaining_ratio", tenant="rich") == 1.0
    poor_left = 1 - s.charged_ucredits / 1_000_000 / 20
    assert 0 < poor_left < 1
    for ratio in LOW_CREDIT_RATIOS:
        assert value(ss, "tokenweir_tenants_below_credit_ratio", ratio=str(ratio)) == (poor_left < ratio)
    await core.close()
    core2 = LedgerCore(cfg)
    await core2.start()
    st2 = await LedgerClient(LocalTransport(core2)).stats()
    assert st2.credits_granted == {"rich": 1000.0, "poor": 20.0}
    assert st2.credits_charged == {"rich": 0.0, "poor": 0.0}  # a counter: it starts again with the ledger
    await core2.close()
