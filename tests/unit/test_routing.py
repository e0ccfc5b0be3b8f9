"""Routing choices from load snapshots and a step-time predictor (pure; fake clock)."""

from __future__ import annotations

import pytest

from serving.admission import LoadSnapshot
from serving.hardware import ModelArch, PerfModel, get_gpu
from serving.routing import (
    NoPoolForGpuError,
    PoolInfo,
    Router,
    RouteReason,
    RouteRequest,
    RoutingError,
    price_per_mtok,
)


class LinearPredictor:
    """Stand-in step-time model: base + per_seq x batch; prefill at a fixed rate."""

    def __init__(self, base_s: float, per_seq_s: float, prefill_tok_per_s: float) -> None:
        self.base_s, self.per_seq_s, self.rate = base_s, per_seq_s, prefill_tok_per_s

    def decode_step_time_uniform_s(self, batch: int, context_tokens: int) -> float:
        return self.base_s + self.per_seq_s * batch

    def chunked_prefill_time_s(self, prompt_tokens: int, chunk_tokens: int, cached_tokens: int = 0) -> float:
        return (prompt_tokens - cached_tokens) / self.rate


CHEAP = PoolInfo("cheap", "m", "L20", 1.0, LinearPredictor(0.020, 0.0002, 20_000), 512, 64, 1.0)
FAST = PoolInfo("fast", "m", "H100", 3.0, LinearPredictor(0.008, 0.0001, 100_000), 2048, 256, 1.0)
REQ = RouteRequest("m", prompt_tokens=256, max_tokens=256, ttft_slo_ms=1000.0, tpot_slo_ms=50.0)


def snap(now: float, in_flight: int, limit: int, queued: int = 0, tpot: float | None = None) -> LoadSnapshot:
    return LoadSnapshot(
        taken_at_s=now,
        queued_requests=queued,
        queued_tokens=queued * 512,
        in_flight_seqs=in_flight,
        in_flight_tokens=in_flight * 400,
        seq_limit=limit,
        token_limit=100_000,
        kv_capacity_tokens=200_000,
        max_queued_tokens=1_000_000,
        drain_rate_tokens_per_s=5_000.0,
        recent_tpot_s=tpot,
    )


def test_cheapest_pool_that_meets_the_slo() -> None:
    r = Router([FAST, CHEAP])
    r.update_snapshot("cheap", snap(0.0, 10, 64))
    r.update_snapshot("fast", snap(0.0, 10, 256))
    d = r.route(REQ, 0.5)
    assert d.pool_id == "cheap" and d.reason is RouteReason.CHEAPEST_MEETS_SLO
    assert d.prediction.tpot_s == pytest.approx(0.020 + 0.0002 * 11)
    assert {p.pool_id for p in d.candidates} == {"cheap", "fast"}


def test_spills_to_the_dearer_pool_when_the_cheap_one_would_miss() -> None:
    r = Router([FAST, CHEAP])
    r.update_snapshot("cheap", snap(0.0, 64, 64, queued=40))  # at its limit with a queue: long wait
    r.update_snapshot("fast", snap(0.0, 10, 256))
    d = r.route(REQ, 0.5)
    assert d.pool_id == "fast" and d.reason is RouteReason.CHEAPER_POOLS_MISS_SLO
    cheap = next(p for p in d.candidates if p.pool_id == "cheap")
    assert cheap.queue_wait_s == pytest.approx((40 * 512 + 512) / 5000.0) and not cheap.meets_slo


def test_measured_tpot_corrects_the_model() -> None:
    r = Router([FAST, CHEAP])
    # The cheap pool measures 2x the model's TPOT: 2 x 24 ms = 48 ms misses the 50 ms SLO's margin.
    r.update_snapshot("cheap", snap(0.0, 20, 64, tpot=2 * (0.020 + 0.0002 * 20)))
    r.update_snapshot("fast", snap(0.0, 10, 256))
    d = r.route(REQ, 0.5)
    assert d.pool_id == "fast"
    cheap = next(p for p in d.candidates if p.pool_id == "cheap")
    assert cheap.tpot_s == pytest.approx(2 * (0.020 + 0.0002 * 21))


def test_fastest_when_no_pool_meets_the_slo() -> None:
    r = Router([FAST, CHEAP])
    r.update_snapshot("cheap", snap(0.0, 64, 64, queued=200))
    r.update_snapshot("fast", snap(0.0, 256, 256, queued=30))
    d = r.route(REQ, 0.5)
    assert d.pool_id == "fast" and d.reason is RouteReason.FASTEST_NONE_MEET_SLO
    assert not any(p.meets_slo for p in d.candidates)


def test_pinned_gpu_is_honoured_and_an_unknown_pin_is_an_error() -> None:
    r = Router([FAST, CHEAP])
    r.update_snapshot("cheap", snap(0.0, 0, 64))
    r.update_snapshot("fast", snap(0.0, 0, 256))
    d = r.route(RouteRequest("m", 256, 256, 1000.0, 50.0, pinned_gpu="h100"), 0.1)
    assert d.pool_id == "fast" and d.pinned and d.reason is RouteReason.ONLY_CANDIDATE
    with pytest.raises(NoPoolForGpuError, match="A10") as ei:
        r.route(RouteRequest("m", 256, 256, 1000.0, 50.0, pinned_gpu="A10"), 0.1)
    assert ei.value.available == ["H100", "L20"]
    with pytest.raises(RoutingError):
        r.route(RouteRequest("other", 256, 256, 1000.0, 50.0), 0.1)


def test_without_fresh_snapshots_the_cheapest_is_taken() -> None:
    r = Router([FAST, CHEAP])
    assert r.route(REQ, 0.0).reason is RouteReason.NO_LOAD_DATA
    r.update_snapshot("cheap", snap(0.0, 64, 64, queued=200))
    r.update_snapshot("fast", snap(0.0, 0, 256))
    assert r.route(REQ, 1.0).pool_id == "fast"
    # 10 s later both snapshots are stale: they are ignored.
    d = r.route(REQ, 10.0)
    assert d.pool_id == "cheap" and d.reason is RouteReason.NO_LOAD_DATA


def test_burst_between_snapshots_spills_once_the_cheap_pool_fills() -> None:
    r = Router([FAST, CHEAP])
    r.update_snapshot("cheap", snap(0.0, 60, 64))
    r.update_snapshot("fast", snap(0.0, 0, 256))
    pools = [r.route(REQ, 0.1 + i * 0.001).pool_id for i in range(10)]
    # 4 fit under the limit of 64; 4 more wait in its queue within the TTFT SLO (the pending ones
    # drain at 5000 tokens/s); after that the predicted TTFT misses and the burst spills over.
    assert pools == ["cheap"] * 8 + ["fast"] * 2
    # A newer snapshot covers the routed requests: the pending load is dropped.
    r.update_snapshot("cheap", snap(0.2, 10, 64))
    assert r.route(REQ, 0.25).pool_id == "cheap"
    st = r.stats().decisions_total
    assert st[("cheap", "cheapest_meets_slo")] == 9 and sum(st.values()) == 11


def test_with_the_performance_model_a_tight_tpot_goes_to_the_h100() -> None:
    arch = ModelArch("llama-8b", 8_030_261_248, 32, 4096, 32, 8, 128, 14336, 128256)
    a10, h100 = PerfModel(arch, get_gpu("A10")), PerfModel(arch, get_gpu("H100"))
    pools = [
        PoolInfo("a10", "m", "A10", price_per_mtok(0.2, 1000.0), a10, 256, 48, 1.0),
        PoolInfo("h100", "m", "H100", price_per_mtok(1.0, 20_000.0), h100, 2048, 256, 1.0),
    ]
    assert pools[0].price_per_mtok > pools[1].price_per_mtok  # A10 is dearer per token here
    r = Router(pools)
    r.update_snapshot("a10", snap(0.0, 4, 48))
    r.update_snapshot("h100", snap(0.0, 4, 256))
    # The A10 decodes an 8B model in ~35 ms a step: a 30 ms TPOT SLO rules it out anyway.
    d = r.route(RouteRequest("m", 256, 256, 1000.0, 30.0), 0.1)
    assert d.pool_id == "h100"
    a10_pred = next(p for p in d.candidates if p.pool_id == "a10")
    assert 0.030 < a10_pred.tpot_s < 0.05


def test_a_pools_cached_prefix_counts_in_its_predicted_ttft() -> None:
    """A long prompt misses the cheap pool's TTFT SLO cold, so the fast pool takes it; with most of
    it cached on a cheap replica, only the rest is prefilled there, and the cheap pool meets it."""
    router = Router([CHEAP, FAST])
    long = RouteRequest("m", prompt_tokens=24_000, max_tokens=16, ttft_slo_ms=1000.0, tpot_slo_ms=50.0)
    now = 100.0
    for p in (CHEAP, FAST):
        router.update_snapshot(p.pool_id, snap(now, 1, 64))
    cold = router.route(long, now)
    assert cold.pool_id == "fast" and cold.reason is RouteReason.CHEAPER_POOLS_MISS_SLO
    warm_req = RouteRequest("m", 24_000, 16, 1000.0, 50.0, cached_tokens={"cheap": 20_480, "fast": 0})
    warm = router.route(warm_req, now)
    assert warm.pool_id == "cheap" and warm.reason is RouteReason.CHEAPEST_MEETS_SLO
    assert warm.prediction.ttft_s < router.predict(CHEAP, long, now).ttft_s / 5
