"""Cache-aware routing for agent traffic on a simulated fleet, against cache-blind and prefix-only.

Deterministic simulation (``loadtests/prefix_sim.py``; no gateway, no sleeping, fixed seed): 4 H100
replicas of Llama-3.1-8B with the plan of ``deploy/sim-fleet.yaml`` and vLLM's prefix cache in every
engine; 10 agents with 2,000-token system prompts; sessions of 8 turns (100-token user messages,
150-token answers, 2 s think time) arriving as a Poisson process; goodput counts turns meeting TTFT
<= 500 ms and TPOT <= 50 ms. The cache-blind baseline runs on the same caching engines (every
replica ends up caching every system prompt on its own).

1. sweep the session rate for cache-blind routing: saturation is the first rate where fewer than
   90% of turns are good;
2. at 70% of it: TTFT p50/p99, goodput, hit rate, load balance for the three policies;
3. at saturation, and at 1.2x it: goodput for the three;
4. goodput capacity, as DistServe defines goodput: for each policy, the highest session rate (on a
   0.25 grid from 1 below cache-blind's saturation) at which at least 90% of turns are good;
5. routing cost: CPU per ``PrefixRouter.choose`` with 10,000 cached prefixes indexed.

    .venv/bin/python loadtests/bench_prefix_routing.py [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time

from loadtests.prefix_sim import POLICIES, FleetResult, FleetSpec, simulate
from serving.routing import PrefixRouter

SWEEP = (4.0, 5.0, 6.0, 6.5, 7.0, 7.5, 8.0, 9.0, 10.0, 12.0)


def row(r: FleetResult, base: FleetResult | None) -> str:
    def x(a: float, b: float | None) -> str:
        return f"{b / a:.2f}x" if b is not None and a > 0 else "-"

    return (
        f"| {r.spec.policy} | {r.spec.session_rate:g} | {r.offered_rps:.1f} | {r.goodput_rps:.1f} "
        f"({r.good_ratio:.0%}) | {r.ttft_pct_ms(50):.0f} | {r.ttft_pct_ms(99):.0f} "
        f"| {x(r.ttft_pct_ms(50), base.ttft_pct_ms(50) if base else None)} "
        f"| {x(r.ttft_pct_ms(99), base.ttft_pct_ms(99) if base else None)} "
        f"| {r.goodput_rps / base.goodput_rps if base else 1:.2f}x | {r.hit_rate:.0%} "
        f"| {r.max_over_mean_routed:.2f} | {r.max_over_mean_busy:.2f} |"
    )


HEADER = (
    "| policy | sessions/s | turns/s | goodput turns/s | TTFT p50 ms | TTFT p99 ms | blind/this p50 "
    "| blind/this p99 | goodput vs blind | hit rate | max/mean turns | max/mean busy |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def compare(spec: FleetSpec, rate: float) -> dict[str, FleetResult]:
    out = {p: simulate(dataclasses.replace(spec, policy=p, session_rate=rate)) for p in POLICIES}
    print(HEADER)
    for p in POLICIES:
        print(row(out[p], out["blind"]))
    return out


def capacity(spec: FleetSpec, blind_sat: float) -> None:
    """Each policy's goodput capacity: the most sessions/s (on a 0.25 grid from cache-blind's
    saturation) at which at least 90% of turns are good, and the good turns/s there."""
    print("\n5. goodput capacity (highest load with >= 90% good turns):")
    print("| policy | sessions/s | good turns/s | vs blind |\n|---|---:|---:|---:|")
    base = None
    for p in POLICIES:
        best: FleetResult | None = None
        rate = blind_sat - 1.0
        while rate < 4 * blind_sat:
            r = simulate(dataclasses.replace(spec, policy=p, session_rate=rate))
            if r.good_ratio < 0.9:
                break
            best = r
            rate = round(rate + 0.25, 2)
        if best is None:
            print(f"| {p} | below {blind_sat - 1.0:g} | | |")
            continue
        base = base or best
        print(
            f"| {p} | {best.spec.session_rate:g} | {best.goodput_rps:.1f} "
            f"| {best.goodput_rps / base.goodput_rps:.2f}x |"
        )


def routing_cost(prefixes: int = 10_000, calls: int = 2_000) -> None:
    rng = random.Random(7)
    router = PrefixRouter(16, 4_000_000)
    names = ["r0", "r1", "r2", "r3"]
    systems = [[rng.randrange(128_000) for _ in range(2000)] for _ in range(10)]
    for i in range(prefixes):
        prompt = systems[i % 10] + [rng.randrange(128_000) for _ in range(256)]
        router.index.record(names[i % 4], router.keys(prompt))
    indexed = sum(router.index.num_blocks(n) for n in names)
    prompts = [systems[i % 10] + [rng.randrange(128_000) for _ in range(506)] for i in range(calls)]
    load = dict.fromkeys(names, 8)
    t0 = time.process_time()
    for p in prompts:
        router.hasher.block_hashes(p)
    hash_s = time.process_time() - t0
    t0 = time.process_time()
    for p in prompts:
        router.choose(names, load, p, rng)
    total_s = time.process_time() - t0
    print(
        f"\nrouting cost, {prefixes:,} cached prefixes indexed ({indexed:,} blocks over 4 replicas), "
        f"2,506-token prompts (156 blocks): {total_s / calls * 1e6:.0f} us CPU per choose(), of which "
        f"hashing the prompt {hash_s / calls * 1e6:.0f} us"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs (60 s of arrivals)")
    args = ap.parse_args()
    spec = FleetSpec(arrive_s=60.0, window=(20.0, 60.0)) if args.quick else FleetSpec()
    print(f"fleet: {spec.replicas} x {spec.gpu}, {spec.agents} agents x {spec.system_prompt_tokens}-token system prompts, "
          f"{spec.turns} turns, {spec.answer_tokens}-token answers, think {spec.think_time_s:g} s, seed {spec.seed}; "
          f"SLO TTFT {spec.ttft_slo_ms:g} ms, TPOT {spec.tpot_slo_ms:g} ms")  # fmt: skip
    print("\n1. cache-blind sweep:")
    print("| sessions/s | turns/s | good |\n|---:|---:|---:|")
    sat = None
    for rate in SWEEP:
        r = simulate(dataclasses.replace(spec, policy="blind", session_rate=rate))
        print(f"| {rate:g} | {r.offered_rps:.1f} | {r.good_ratio:.1%} |")
        if r.good_ratio < 0.9:
            sat = rate
            break
    if sat is None:
        raise SystemExit("cache-blind routing did not saturate in the sweep")
    print(f"cache-blind saturation: {sat:g} sessions/s (first rate with < 90% good turns)")
    r70 = round(0.7 * sat, 2)
    print(f"\n2. at 70% of it ({r70:g} sessions/s):")
    at70 = compare(spec, r70)
    print("\nTTFT p50 by turn (ms):")
    print("| policy | " + " | ".join(f"turn {k}" for k in at70["blind"].by_turn_ttft_p50_s) + " |")
    print("|---|" + "---:|" * len(at70["blind"].by_turn_ttft_p50_s))
    for p in POLICIES:
        print(f"| {p} | " + " | ".join(f"{v * 1e3:.0f}" for v in at70[p].by_turn_ttft_p50_s.values()) + " |")
    print(f"\n3. at cache-blind saturation ({sat:g} sessions/s):")
    compare(spec, sat)
    over = round(1.2 * sat, 2)
    print(f"\n4. above it ({over:g} sessions/s, 1.2x):")
    compare(spec, over)
    capacity(spec, sat)
    routing_cost()


if __name__ == "__main__":
    main()
