"""The admission core's wait prediction: sure releases, fair-order work ahead, the drain meter."""

from __future__ import annotations

import math

import pytest

from serving.admission._fair_queue import TenantState
from serving.admission._meters import DrainMeter
from serving.admission._wait import sure_releases, work_ahead_tokens


def poisson_below(n: int, m: float) -> float:
    """P(Poisson(m) < n), summed directly."""
    return sum(math.exp(-m) * m**i / math.factorial(i) for i in range(n))


@pytest.mark.parametrize("expected", [0.5, 2.3, 4.6, 10.0, 57.0, 150.0])
@pytest.mark.parametrize("p", [0.01, 0.05])
def test_sure_releases_is_the_poisson_quantile(expected: float, p: float) -> None:
    n = sure_releases(expected, p)
    assert poisson_below(n, expected) <= p < poisson_below(n + 1, expected)


def test_sure_releases_edges() -> None:
    assert sure_releases(0.0, 0.01) == 0
    assert sure_releases(4.0, 0.01) == 0  # P(no release at all) = 1.8%: not even one is sure
    big = sure_releases(10_000.0, 0.01)  # normal approximation: 10000 - 2.33 x 100
    assert 9_760 <= big <= 9_770
    with pytest.raises(ValueError, match="miss_probability"):
        sure_releases(10.0, 0.0)


def tenant(tid: str, counter: float, queued_tokens: int, weight: float = 1.0) -> TenantState:
    t = TenantState(tenant_id=tid, order=0, weight=weight, counter=counter)
    t.queued_tokens, t.queued_requests = queued_tokens, queued_tokens // 100
    return t


def test_work_ahead_follows_fair_order() -> None:
    a = tenant("a", counter=1000.0, queued_tokens=800)
    b = tenant("b", counter=200.0, queued_tokens=100)
    # b is 800 behind a: fair order serves b's queue and the new request before any of a's.
    assert work_ahead_tokens(b, b.counter, 100, [a, b]) == 200
    # a new request of a waits for a's own queue and for b until b catches up with a (all of it).
    assert work_ahead_tokens(a, a.counter, 100, [a, b]) == 800 + 100 + 100
    # Equal counters: each other tenant is served as much as this one (GPS), up to its queue.
    c = tenant("c", counter=1000.0, queued_tokens=300, weight=2.0)
    assert work_ahead_tokens(a, a.counter, 100, [a, c]) == 800 + 100 + 300
    assert work_ahead_tokens(c, c.counter, 100, [a, c]) == 300 + 100 + 150


def test_drain_counts_openings_per_saturated_second_only() -> None:
    m = DrainMeter(window_s=10.0, prior_tokens_per_s=1.0, horizon_s=1.0)
    m.on_start(50, 100)
    m.advance(0.0, True)
    for i in range(1, 31):  # saturated: one release every 0.1 s
        m.advance(i * 0.1, True)
        m.on_release()
    m.advance(3.0, False)  # saturation ends with the queue empty: an opening; then idle for 100 s
    m.advance(103.0, True)
    m.advance(103.1, False)  # another opening after 0.1 s of saturation
    assert m.rate_tokens_per_s() == pytest.approx(32 / 3.1 * 100)  # idle time does not count
    assert m.mean_cost_tokens() == 100 and m.mean_prompt_tokens() == 50


def test_lumpy_openings_raise_the_dispersion() -> None:
    steady = DrainMeter(window_s=10.0, prior_tokens_per_s=1.0, horizon_s=1.0)
    lumpy = DrainMeter(window_s=10.0, prior_tokens_per_s=1.0, horizon_s=1.0)
    for m in (steady, lumpy):
        m.advance(0.0, True)
    for k in range(1, 401):  # 10 openings per second on average for 40 s
        t = k * 0.1
        steady.advance(t, True)
        steady.on_release()
        lumpy.advance(t, True)
        if k % 20 == 0:  # all at once, every other second
            for _ in range(20):
                lumpy.on_release()
    assert steady.dispersion() == 1.0
    assert lumpy.dispersion() > 5.0
