"""Deterministic benchmark of the batching core and the router on simulated engines (simulated time).

A discrete-event simulation: each replica is the simulated engine's own continuous-batching
scheduler (``serving.engines._sim_sched.SimScheduler``: chunked prefill, KV blocks, recompute
preemption) priced step by step by the performance model (``PerfModel.step_time_s``), behind the
real admission core (``serving.admission.AdmissionCore``) or, for the baseline, behind nothing (vLLM
at its default ``max_num_seqs``/``max_num_batched_tokens``, unbounded waiting queue). Nothing
sleeps; a run of 90 simulated seconds takes about a second of CPU.

Workload: an 8B model (Llama-3.1-8B shape), Poisson arrivals, log-normal prompts (median 256) and
outputs (median 192), sigma 0.8, ``max_tokens`` 1024; SLOs TTFT 1500 ms (end to end, queue included)
and TPOT 60 ms. Goodput is DistServe's: requests per second that meet both SLOs.

Rows: goodput of the adaptive limit against the best of a sweep of fixed limits and against no
limit (1.5x saturation); TPOT p99 of admitted requests and how quickly the excess is refused (the
share of refusals decided within 50 ms of arrival) at 2x; fairness between tenants on one L20 (flat,
and between organizations and their projects); and
routing on 1 H100 + 3 L20 against round-robin across the pools, at loads both serve within the
SLOs (cost per million tokens at equal attainment) and above (attainment).

    .venv/bin/python loadtests/bench_batching.py [--gpus H20,H100,L20,A10] [--quick]
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass

from loadtests.batching_sim import (
    ARRIVE_S,
    FAST_REFUSAL_S,
    LLAMA8B,
    TPOT_SLO_MS,
    TTFT_SLO_MS,
    WINDOW,
    Replica,
    Req,
    make_replica,
    plan_for,
    saturation,
    simulate,
    workload,
)
from serving.admission import merge_snapshots
from serving.hardware import PerfModel, get_gpu
from serving.routing import PoolInfo, Router, RouteRequest, price_per_mtok

# ---- single-replica scenarios --------------------------------------------------------------------------


@dataclass
class RunResult:
    goodput_rps: float
    tpot_p99_ms: float
    ttft_p99_ms: float
    refused: int
    refused_fast: int
    """Refusals decided within ``FAST_REFUSAL_S`` of arrival (simulated time)."""
    refusal_p99_ms: float
    submit_refuse_us_p99: float
    finished: int
    limit_end: int


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def fast_refusals(refused: list[Req]) -> int:
    """How many of these refusals were decided within ``FAST_REFUSAL_S`` of the request's arrival."""
    return sum(1 for r in refused if r.refused_t is not None and r.refused_t - r.arrival <= FAST_REFUSAL_S)


def run_single(gpu: str, limit: str, load_x: float, seed: int = 1) -> RunResult:
    plan = plan_for(gpu)
    sat_rps, _ = saturation(gpu, plan)
    rep = make_replica(gpu, plan, limit)
    reqs = workload({"t": load_x * sat_rps}, seed=seed)
    simulate([rep], reqs, lambda r, now: rep)
    win = [r for r in reqs if WINDOW[0] <= r.arrival < WINDOW[1]]
    good = sum(r.met_slo() for r in win)
    admitted = [r for r in win if r.refused is None and r.finish_t is not None]
    refused = [r for r in win if r.refused is not None]
    return RunResult(
        goodput_rps=good / (WINDOW[1] - WINDOW[0]),
        tpot_p99_ms=pct([r.tpot_s * 1e3 for r in admitted if r.tpot_s is not None], 0.99),
        ttft_p99_ms=pct([(r.first_t - r.arrival) * 1e3 for r in admitted if r.first_t is not None], 0.99),
        refused=len(refused),
        refused_fast=fast_refusals(refused),
        refusal_p99_ms=pct([((r.refused_t or 0) - r.arrival) * 1e3 for r in refused], 0.99),
        submit_refuse_us_p99=pct([ns / 1e3 for ns in rep.refuse_ns], 0.99),
        finished=len(admitted),
        limit_end=rep.core.seq_limit if rep.core else -1,
    )


# ---- fairness -------------------------------------------------------------------------------------------


def run_fairness(
    gpu: str, rates_x: dict[str, float], weights: dict[str, float]
) -> tuple[dict[str, int], dict[str, float], float]:
    """Served tokens (prompt + completion) per tenant over 60 s, each tenant's TTFT p99 (ms), and
    the share of refusals decided within ``FAST_REFUSAL_S`` of arrival."""
    plan = plan_for(gpu)
    sat_rps, _ = saturation(gpu, plan)
    rep = make_replica(gpu, plan, "adaptive")
    reqs = workload({t: x * sat_rps for t, x in rates_x.items()}, weights, seed=7)
    served: dict[str, int] = {}

    def tick(now: float) -> None:
        if abs(now - ARRIVE_S) < 0.5 and rep.core is not None:
            served.update(
                {
                    t: s.served_prompt_tokens + s.served_completion_tokens
                    for t, s in rep.core.stats().tenants.items()
                }
            )

    simulate([rep], reqs, lambda r, now: rep, on_tick=tick)
    ttft = {
        t: pct([(r.first_t - r.arrival) * 1e3 for r in reqs if r.tenant == t and r.first_t is not None], 0.99)
        for t in rates_x
    }
    refused = [r for r in reqs if r.refused is not None]
    return served, ttft, fast_refusals(refused) / len(refused) if refused else 1.0


def run_hierarchical(
    gpu: str, rates_x: dict[str, float], project_weights: dict[str, float]
) -> tuple[dict[str, int], dict[str, int], float]:
    """Hierarchical fairness: served tokens per organization (the admission core's counts) and per
    ``org/project`` sender (prompt of each started request plus its reported output) over 60 s,
    and the share of refusals decided within ``FAST_REFUSAL_S`` of arrival."""
    plan = plan_for(gpu)
    sat_rps, _ = saturation(gpu, plan)
    rep = make_replica(gpu, plan, "adaptive")
    reqs = workload({t: x * sat_rps for t, x in rates_x.items()}, seed=7, project_weights=project_weights)
    orgs: dict[str, int] = {}
    projects: dict[str, int] = {}

    def tick(now: float) -> None:
        if abs(now - ARRIVE_S) < 0.5 and rep.core is not None:
            orgs.update(
                {
                    t: s.served_prompt_tokens + s.served_completion_tokens
                    for t, s in rep.core.stats().tenants.items()
                }
            )
            for r in reqs:
                if r.first_t is not None:
                    key = f"{r.tenant}/{r.project}"
                    projects[key] = projects.get(key, 0) + r.prompt + r.reported

    simulate([rep], reqs, lambda r, now: rep, on_tick=tick)
    refused = [r for r in reqs if r.refused is not None]
    return orgs, projects, fast_refusals(refused) / len(refused) if refused else 1.0


# ---- routing on a two-type fleet -------------------------------------------------------------------------


def run_fleet(policy: str, fleet: dict[str, int], load_x: float, seed: int = 3) -> tuple[float, float, float]:
    """(cost per million tokens, SLO attainment, total tokens) for "cost" or "round_robin" routing.

    Cost counts GPU time while a replica holds work (busy seconds x its price per hour): idle replicas
    cost nothing (scaled to zero or lent out), so work sent to the cheaper-per-token pool saves money.
    """
    reps: list[Replica] = []
    pools: list[PoolInfo] = []
    by_pool: dict[str, list[Replica]] = {}
    total_sat = 0.0
    for gpu, n in fleet.items():
        plan = plan_for(gpu)
        total_sat += n * saturation(gpu, plan)[0]
        by_pool[gpu] = [make_replica(gpu, plan, "adaptive", pool=gpu) for _ in range(n)]
        reps += by_pool[gpu]
        core0 = by_pool[gpu][0].core
        assert core0 is not None
        pools.append(
            PoolInfo(
                pool_id=gpu,
                model="m",
                gpu_type=gpu,
                price_per_mtok=price_per_mtok(get_gpu(gpu).price_per_hour_relative, plan.tokens_per_s),
                predictor=PerfModel(LLAMA8B, get_gpu(gpu)),
                chunk_tokens=plan.settings.max_num_batched_tokens,
                max_num_seqs=plan.settings.max_num_seqs,
                queue_deadline_s=core0.config.queue_deadline_s,
                replicas=n,
            )
        )
    router = Router(pools)
    rng = random.Random(seed)
    rr = [0]
    names = list(fleet)

    def pick(pool: str) -> Replica:
        cands = by_pool[pool]
        if len(cands) == 1:
            return cands[0]
        a, b = rng.sample(cands, 2)  # power of two choices within the pool
        return a if a.load() <= b.load() else b

    def route(r: Req, now: float) -> Replica:
        if policy == "round_robin":
            rr[0] += 1
            return pick(names[rr[0] % len(names)])
        d = router.route(RouteRequest("m", r.prompt, r.max_tokens, TTFT_SLO_MS, TPOT_SLO_MS), now)
        return pick(d.pool_id)

    def tick(now: float) -> None:
        for pool, rs in by_pool.items():
            router.update_snapshot(pool, merge_snapshots([x.core.snapshot(now) for x in rs if x.core]))

    reqs = workload({"t": load_x * total_sat}, seed=seed)
    simulate(reps, reqs, route, on_tick=tick)
    win = [r for r in reqs if WINDOW[0] <= r.arrival < WINDOW[1]]
    tokens = sum(r.prompt + r.generated for r in reqs if r.finish_t is not None)
    cost = sum(x.busy_s * x.price_per_hour / 3600.0 for x in reps)
    return cost / tokens * 1e6, sum(r.met_slo() for r in win) / len(win), tokens


# ---- report ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="H20,H100,L20,A10")
    ap.add_argument("--quick", action="store_true", help="fewer fixed limits in the sweep")
    args = ap.parse_args()
    rows: list[tuple[str, str, str, bool]] = []
    t_start = time.process_time()
    for gpu in args.gpus.split(","):
        plan = plan_for(gpu)
        sat, b_est = saturation(gpu, plan)
        fracs = (0.5, 0.8, 1.0, 1.25, 1.6) if args.quick else (0.4, 0.6, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0)
        grid = sorted({max(1, min(plan.settings.max_num_seqs, round(b_est * f))) for f in fracs})
        fixed = {n: run_single(gpu, f"fixed:{n}", 1.5) for n in grid}
        best_n = max(fixed, key=lambda n: fixed[n].goodput_rps)
        ada = run_single(gpu, "adaptive", 1.5)
        none = run_single(gpu, "none", 1.5)
        over = run_single(gpu, "adaptive", 2.0)
        print(
            f"{gpu}: plan max_num_seqs={plan.settings.max_num_seqs} chunk={plan.settings.max_num_batched_tokens} "
            f"kv={plan.kv_capacity_tokens}; saturation {sat:.2f} req/s at batch ~{b_est}; "
            f"fixed sweep goodput "
            + ", ".join(f"{n}:{r.goodput_rps:.2f}" for n, r in fixed.items())
            + f"; adaptive {ada.goodput_rps:.2f} (limit {ada.limit_end}); no limit {none.goodput_rps:.2f}"
        )
        best = fixed[best_n].goodput_rps
        rows.append(
            (
                f"{gpu} goodput adaptive / best fixed (N={best_n})",
                f"{ada.goodput_rps / best:.2f}",
                ">= 0.90",
                ada.goodput_rps >= 0.9 * best,
            )
        )
        ratio = ada.goodput_rps / none.goodput_rps if none.goodput_rps > 0 else math.inf
        rows.append((f"{gpu} goodput adaptive / no limit @1.5x sat", f"{ratio:.2f}", ">= 1.30", ratio >= 1.3))
        rows.append(
            (
                f"{gpu} TPOT p99 admitted @2x sat (ms)",
                f"{over.tpot_p99_ms:.1f}",
                f"<= {TPOT_SLO_MS:.0f}",
                over.tpot_p99_ms <= TPOT_SLO_MS,
            )
        )
        fast = over.refused_fast / over.refused if over.refused else 1.0
        rows.append(
            (
                f"{gpu} refusals @2x: share within 50 ms of arrival; decision p99 (us CPU)",
                f"{fast:.3f}; {over.submit_refuse_us_p99:.0f}",
                ">= 0.99; < 50000",
                fast >= 0.99 and over.submit_refuse_us_p99 < 50_000,
            )
        )
    gpu = "L20"
    served, ttft, fast = run_fairness(gpu, {"a": 8.0, "b": 0.8, "c": 0.05}, {})
    diff = abs(served["a"] - served["b"]) / max(served["a"], served["b"])
    rows.append(
        (
            f"fairness 10x sender: |a-b|/max served tokens (refusals within 50 ms: {fast:.3f})",
            f"{diff:.3f}",
            "<= 0.10",
            diff <= 0.10,
        )
    )
    rows.append(
        (
            "fairness light tenant TTFT p99 (ms)",
            f"{ttft['c']:.0f}",
            f"<= {TTFT_SLO_MS:.0f}",
            ttft["c"] <= TTFT_SLO_MS,
        )
    )
    served, _, fast = run_fairness(gpu, {"a": 2.0, "b": 2.0}, {"a": 3.0, "b": 1.0})
    ratio = served["a"] / served["b"]
    rows.append(
        (
            f"fairness weights 3:1: served ratio (refusals within 50 ms: {fast:.3f})",
            f"{ratio:.2f}",
            "3 +/- 0.3",
            abs(ratio - 3) <= 0.3,
        )
    )
    # Two organizations of equal weight, each sending 2x what the replica serves: A through two
    # projects weighted 3:1 that send alike, B through one.
    orgs, projects, fast = run_hierarchical(gpu, {"A/a1": 1.0, "A/a2": 1.0, "B/b": 2.0}, {"A/a1": 3.0})
    ratio = orgs["A"] / orgs["B"]
    rows.append(
        (
            f"fairness org A (2 projects) / org B (1), equal weights: served ratio (refusals within 50 ms: {fast:.3f})",
            f"{ratio:.2f}",
            "1 +/- 0.1",
            abs(ratio - 1) <= 0.1,
        )
    )
    ratio = projects["A/a1"] / projects["A/a2"]
    rows.append(
        (
            "fairness projects 3:1 within org A: served ratio",
            f"{ratio:.2f}",
            "3 +/- 0.3",
            abs(ratio - 3) <= 0.3,
        )
    )
    fleet = {"H100": 1, "L20": 3}
    # Equal attainment: loads that round-robin also serves within the SLOs (its half of the traffic
    # on the L20 pool stays under that pool's capacity); the saving counts only if both attain the
    # same (within 0.01).
    for load in (0.2, 0.3):
        c_cost, c_att, _ = run_fleet("cost", fleet, load)
        r_cost, r_att, _ = run_fleet("round_robin", fleet, load)
        saving = 1 - c_cost / r_cost
        rows.append(
            (
                f"routing {fleet} @{load:.1f}x: cost/Mtok saving vs RR (attain {c_att:.3f} vs {r_att:.3f})",
                f"{saving:.2f}",
                ">= 0.20, attain within 0.01",
                saving >= 0.2 and abs(c_att - r_att) <= 0.01,
            )
        )
    # Above that, round-robin overloads the L20 pool: the router must keep the SLOs it misses.
    for load in (0.5, 0.7):
        c_cost, c_att, _ = run_fleet("cost", fleet, load)
        r_cost, r_att, _ = run_fleet("round_robin", fleet, load)
        rows.append(
            (
                f"routing {fleet} @{load:.1f}x: attainment vs RR (cost/Mtok saving {1 - c_cost / r_cost:.2f})",
                f"{c_att:.3f} vs {r_att:.3f}",
                ">= RR's",
                c_att >= r_att,
            )
        )
    w = max(len(r[0]) for r in rows)
    print()
    print(f"{'metric'.ljust(w)}  {'value':>14}  {'goal':<28}  ok")
    for name, val, goal, ok in rows:
        print(f"{name.ljust(w)}  {val:>14}  {goal:<28}  {'yes' if ok else 'NO'}")
    print(
        f"\n(CPU time {time.process_time() - t_start:.0f} s; SLOs TTFT {TTFT_SLO_MS:.0f} ms, TPOT {TPOT_SLO_MS:.0f} ms)"
    )


if __name__ == "__main__":
    main()
