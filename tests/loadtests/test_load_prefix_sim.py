"""The agent-fleet simulation behind bench_prefix_routing.py: a short deterministic run in which
cache-aware routing beats cache-blind routing on the same caching engines."""

from __future__ import annotations

import dataclasses

from loadtests.prefix_sim import FleetSpec, simulate


def test_fleet_simulation_cache_aware_beats_cache_blind() -> None:
    spec = FleetSpec(session_rate=7.0, arrive_s=30.0, window=(10.0, 30.0), seed=3)
    blind, aware = simulate(dataclasses.replace(spec, policy="blind")), simulate(spec)
    assert blind.turns > 200 and abs(aware.turns - blind.turns) < 0.1 * blind.turns
    assert blind.unfinished == aware.unfinished == 0
    assert aware.hit_rate > blind.hit_rate + 0.05
    assert aware.ttft_pct_ms(50) < blind.ttft_pct_ms(50) and aware.ttft_pct_ms(99) < blind.ttft_pct_ms(99)
    assert aware.max_over_mean_routed <= 1.5
    assert simulate(spec) == aware  # deterministic for a seed
