"""Percentile, goodput and fairness arithmetic against numpy on known data."""

from __future__ import annotations

import numpy as np
import pytest

from loadtests.client import RequestRecord
from loadtests.metrics import is_good, jain_index, latency_stats, summarize
from loadtests.scenario import SloSpec


def _rec(
    i: int, tenant: str, ttft: float, e2e: float, out: int, ok: bool = True, code: str | None = None
) -> RequestRecord:
    itl = [(e2e - ttft) / (out - 1)] * (out - 1) if ok else []
    return RequestRecord(
        index=i, tenant=tenant, scheduled_s=i * 0.1, sent_s=i * 0.1 + 0.001, lateness_s=0.001 * (i % 3),
        prompt_tokens_target=10, max_tokens=out, status=200 if ok else 429, ok=ok, error_code=code,
        ttft_s=ttft if ok else None, itl_s=itl, tpot_s=(e2e - ttft) / (out - 1) if ok else None,
        e2e_s=e2e, prompt_tokens=12 if ok else None, completion_tokens=out if ok else None,
        content_chunks=out if ok else 0,
    )  # fmt: skip


def test_latency_stats_match_numpy() -> None:
    data = np.random.default_rng(0).lognormal(-3, 1, size=1001)
    st = latency_stats(data)
    ms = data * 1000
    assert st.count == 1001
    assert st.mean_ms == pytest.approx(ms.mean())
    assert st.median_ms == pytest.approx(np.median(ms))
    assert st.p90_ms == pytest.approx(np.percentile(ms, 90))
    assert st.p99_ms == pytest.approx(np.percentile(ms, 99))
    assert st.max_ms == pytest.approx(ms.max())
    assert latency_stats([]).p99_ms is None


def test_jain_index() -> None:
    assert jain_index([5, 5, 5, 5]) == pytest.approx(1.0)
    assert jain_index([1, 0, 0, 0]) == pytest.approx(0.25)
    x = np.array([1.0, 2.0, 3.0])
    assert jain_index(x.tolist()) == pytest.approx(x.sum() ** 2 / (3 * (x**2).sum()))
    assert jain_index([]) is None and jain_index([0, 0]) is None


def test_goodput_throughput_and_tenants() -> None:
    slo = SloSpec(ttft_ms=100, tpot_ms=20)
    recs = [
        _rec(0, "a", ttft=0.05, e2e=0.05 + 9 * 0.01, out=10),  # good
        _rec(1, "a", ttft=0.20, e2e=0.20 + 9 * 0.01, out=10),  # TTFT too slow
        _rec(2, "b", ttft=0.05, e2e=0.05 + 9 * 0.03, out=10),  # TPOT 30 ms too slow
        _rec(3, "b", ttft=0.08, e2e=0.08 + 19 * 0.02, out=20),  # exactly at the TPOT bound: good
        _rec(4, "b", ttft=0.0, e2e=0.002, out=10, ok=False, code="rate_limited"),
        _rec(5, "a", ttft=0.0, e2e=0.002, out=10, ok=False, code="rate_limited"),
        _rec(6, "a", ttft=0.0, e2e=0.002, out=10, ok=False, code="timeout"),
    ]
    assert [is_good(r, slo) for r in recs] == [True, False, False, True, False, False, False]
    s = summarize(recs, 2.0, slo, {"a": 1.0, "b": 1.0, "idle": 1.0}, offered_rate_rps=3.5)
    assert (s.requests_sent, s.succeeded, s.failed, s.good) == (7, 4, 3, 2)
    assert s.goodput_rps == pytest.approx(1.0)
    assert s.request_throughput_rps == pytest.approx(2.0)
    assert s.total_output_tokens == 50 and s.output_throughput_tps == pytest.approx(25.0)
    assert s.total_token_throughput_tps == pytest.approx((50 + 4 * 12) / 2.0)
    assert s.refusals == {"rate_limited": 2, "timeout": 1}
    tpots = np.array([0.01, 0.01, 0.03, 0.02]) * 1000
    assert s.tpot.mean_ms == pytest.approx(tpots.mean())
    assert s.tpot.p90_ms == pytest.approx(np.percentile(tpots, 90))
    itl = np.array([0.01] * 9 + [0.01] * 9 + [0.03] * 9 + [0.02] * 19) * 1000
    assert s.itl.count == itl.size and s.itl.p99_ms == pytest.approx(np.percentile(itl, 99))
    e2e = np.array([r.e2e_s for r in recs if r.ok]) * 1000
    assert s.e2el.median_ms == pytest.approx(np.median(e2e))
    ta, tb, idle = s.tenants
    assert (ta.tenant, ta.requests, ta.succeeded, ta.good, ta.completion_tokens) == ("a", 4, 2, 1, 20)
    assert ta.refusals == {"rate_limited": 1, "timeout": 1}
    assert tb.service_fraction == pytest.approx(30 / 50)
    assert idle.requests == 0 and idle.completion_tokens == 0
    # Service per share: a=20, b=30, idle=0.
    assert s.jain_service == pytest.approx(jain_index([20, 30, 0]))
    assert s.jain_satisfaction == pytest.approx(jain_index([20 / 40, 30 / 40]))
    assert s.warnings == []


def test_lateness_warning_and_all_failed() -> None:
    recs = [_rec(i, "a", 0.0, 0.001, 5, ok=False, code="x") for i in range(10)]
    for r in recs:
        r.lateness_s = 0.05
    s = summarize(recs, 1.0, SloSpec(), {"a": 1.0})
    assert any("lateness" in w for w in s.warnings)
    assert any("every request failed" in w for w in s.warnings)
    assert s.ttft.count == 0 and s.goodput_rps == 0
