"""Arrival processes and plans: rates and dispersion, checked statistically with fixed seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loadtests.arrivals import arrival_times
from loadtests.plan import build_plan
from loadtests.scenario import (
    ClosedLoopArrival,
    ConstantArrival,
    GammaArrival,
    PoissonArrival,
    RampArrival,
    Scenario,
)


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def test_constant_is_evenly_spaced_from_zero() -> None:
    t = arrival_times(ConstantArrival(rate_rps=10), 2.0, 1000, _rng())
    assert t.size == 20
    assert t[0] == 0.0
    np.testing.assert_allclose(np.diff(t), 0.1)


@pytest.mark.parametrize("rate", [5.0, 200.0])
def test_poisson_rate_and_unit_cv(rate: float) -> None:
    duration = 20_000 / rate
    t = arrival_times(PoissonArrival(rate_rps=rate), duration, 10**6, _rng(1))
    gaps = np.diff(t)
    assert t.size == pytest.approx(20_000, rel=0.03)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.04)
    # Counts per unit window are Poisson: variance equals mean (index of dispersion ~ 1).
    counts = np.bincount((t * rate / 10).astype(int))[:-1]
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize(("burstiness", "cv"), [(0.25, 2.0), (4.0, 0.5)])
def test_gamma_dispersion_follows_burstiness(burstiness: float, cv: float) -> None:
    t = arrival_times(GammaArrival(rate_rps=50, burstiness=burstiness), 400.0, 10**6, _rng(2))
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.06)


def test_ramp_follows_the_integrated_rate() -> None:
    # Rate 0 -> 100/s over 100 s: 5000 expected, 1250 in the first half, 3750 in the second.
    spec = RampArrival(start_rate_rps=0, end_rate_rps=100, poisson=True)
    t = arrival_times(spec, 100.0, 10**6, _rng(3))
    assert t.size == pytest.approx(5000, rel=0.04)
    assert (t < 50).sum() == pytest.approx(1250, rel=0.08)
    assert np.all(np.diff(t) >= 0)
    assert t.max() < 100.0
    det = arrival_times(RampArrival(start_rate_rps=20, end_rate_rps=20, poisson=False), 10.0, 10**6, _rng())
    np.testing.assert_allclose(np.diff(det), 0.05)


def test_decreasing_ramp() -> None:
    t = arrival_times(RampArrival(start_rate_rps=100, end_rate_rps=0, poisson=False), 10.0, 10**6, _rng())
    assert t.size == pytest.approx(500, abs=2)
    assert (t < 5).sum() == pytest.approx(375, abs=2)


def test_bounds_and_determinism() -> None:
    spec = PoissonArrival(rate_rps=100)
    assert arrival_times(spec, 100.0, 37, _rng()).size == 37
    np.testing.assert_array_equal(
        arrival_times(spec, 5.0, 10**6, _rng(9)), arrival_times(spec, 5.0, 10**6, _rng(9))
    )
    with pytest.raises(TypeError):
        arrival_times(ClosedLoopArrival(concurrency=2), 1.0, 10, _rng())


def _scenario(**over: object) -> Scenario:
    base: dict[str, object] = {
        "name": "t",
        "target_url": "http://127.0.0.1:9",
        "model": "m",
        "seed": 5,
        "tenants": [{"name": "a", "api_key": "k", "share": 3}, {"name": "b", "api_key": "k", "share": 1}],
        "arrival": {"kind": "poisson", "rate_rps": 100},
        "workload": {
            "kind": "synthetic",
            "prompt": {"kind": "uniform", "min_tokens": 10, "max_tokens": 20},
            "output": {
                "kind": "lognormal",
                "median_tokens": 30,
                "sigma": 1.0,
                "min_tokens": 5,
                "max_tokens": 60,
            },
        },
        "bounds": {"duration_s": 40, "max_requests": 100_000},
    }
    base.update(over)
    return Scenario.model_validate(base)


def test_plan_splits_the_stream_by_share_and_is_reproducible() -> None:
    plan = build_plan(_scenario())
    tenants = np.array([r.tenant for r in plan.open_requests])
    assert (tenants == "a").mean() == pytest.approx(0.75, abs=0.02)
    assert plan.offered_rate_rps == 100
    times = [float(r.send_at_s or 0.0) for r in plan.open_requests]
    assert times == sorted(times)
    outs = np.array([r.max_tokens for r in plan.open_requests])
    assert outs.min() >= 5 and outs.max() <= 60
    assert np.median(outs) == pytest.approx(30, abs=2)
    words = [len(r.prompt.split()) for r in plan.open_requests]
    assert words == [r.prompt_tokens_target for r in plan.open_requests]
    assert min(words) >= 10 and max(words) <= 20
    again = build_plan(_scenario())
    assert [(r.tenant, r.send_at_s, r.prompt) for r in again.open_requests[:50]] == [
        (r.tenant, r.send_at_s, r.prompt) for r in plan.open_requests[:50]
    ]
    other = build_plan(_scenario(seed=6))
    assert other.open_requests[1].prompt != plan.open_requests[1].prompt


def test_plan_own_arrivals_closed_streams_and_caps() -> None:
    sc = _scenario(
        tenants=[
            {"name": "a", "api_key": "k"},
            {"name": "b", "api_key": "k", "arrival": {"kind": "constant", "rate_rps": 10}},
            {"name": "c", "api_key": "k", "arrival": {"kind": "closed", "concurrency": 4}},
        ],
        bounds={"duration_s": 10, "max_requests": 500},
    )
    plan = build_plan(sc)
    by = {n: sum(r.tenant == n for r in plan.open_requests) for n in "abc"}
    # a (Poisson 100/s) and b (constant 10/s) merge in time order; the bound keeps the earliest 500.
    assert len(plan.open_requests) == 500
    last = plan.open_requests[-1].send_at_s
    assert last is not None and 4.0 < last < 5.0
    assert by["b"] == int(last * 10) + 1 and by["c"] == 0
    assert plan.offered_rate_rps is None  # a closed-loop stream makes the offered rate server-dependent
    [stream] = plan.closed_streams
    assert stream.concurrency == 4
    first = [next(stream.requests) for _ in range(200)]
    assert {r.tenant for r in first} == {"c"} and all(r.send_at_s is None for r in first)


def test_prompts_cut_to_exact_length_with_a_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from loadtests.workload import WORDS

    # A small byte-level BPE (like the tiny model's) where most words take several tokens.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS)] * 3, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    sc = _scenario(
        workload={
            "kind": "synthetic",
            "prompt": {"kind": "uniform", "min_tokens": 20, "max_tokens": 200},
            "output": {"kind": "fixed", "tokens": 4},
            "tokenizer": str(tmp_path),
        },
        bounds={"duration_s": 1, "max_requests": 50},
    )
    plan = build_plan(sc)
    for r in plan.open_requests:
        n = len(tok.encode(r.prompt, add_special_tokens=False).ids)
        assert abs(n - r.prompt_tokens_target) <= 1
