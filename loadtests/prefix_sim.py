"""The discrete-event simulation behind ``bench_prefix_routing.py``: agent sessions on a fleet of
simulated replicas (the simulated engine's scheduler with vLLM's prefix cache, priced by the
performance model), routed per turn by a replica policy that sees what a gateway sees (its own
open requests per replica). Simulated time only, deterministic for a seed; nothing sleeps.

Workload: ``agents`` agents, each with its own system prompt; sessions arrive as a Poisson process
(agents drawn at random) and run ``turns`` turns: turn k's prompt is turn k-1's prompt, its answer
and a new user message; the next turn arrives ``think_time_s`` after the answer's last token.
Token ids are unique per system prompt, user message and answer, so only true prefixes match.

Policies (one per replica choice): ``blind``, the less loaded of two random replicas (what
Tokenweir did before: cache-blind, though the engines still cache what reaches them); ``prefix``,
the replica holding the longest prefix, load ignored; ``aware``, :class:`serving.routing.PrefixRouter`
(longest prefix among replicas within the load bound) on its own estimate of what each replica
holds; ``events``, the same router with its index fed by the replicas' KV-cache events (the block
pools' stores and evictions, applied at the end of each step: the live gateway gets them within
10 ms more).
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from serving.engines._sim_sched import SeqStatus, SimScheduler, SimSeq
from serving.hardware import KV_BLOCK_TOKENS, ModelArch, PerfModel, PoolSlo, get_gpu, plan_engine
from serving.kvcache import BlockHasher, CacheEventLog
from serving.routing import PrefixRouter, pick_replica

__all__ = ["LLAMA8B", "FleetResult", "FleetSpec", "simulate"]

LLAMA8B = ModelArch("llama-3.1-8b", 8_030_261_248, 32, 4096, 32, 8, 128, 14336, 128256, 2)
POLICIES = ("blind", "prefix", "aware", "events")


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """One simulated run."""

    policy: str = "aware"
    replicas: int = 4
    gpu: str = "H100"
    agents: int = 10
    system_prompt_tokens: int = 2000
    turns: int = 8
    user_tokens: int = 100
    answer_tokens: int = 150
    think_time_s: float = 2.0
    session_rate: float = 1.0
    """Sessions started per second (Poisson)."""
    arrive_s: float = 120.0
    """Sessions start during [0, arrive_s); all of them run to the end."""
    window: tuple[float, float] = (30.0, 120.0)
    """Turns arriving in this window are measured (after warm-up)."""
    ttft_slo_ms: float = 500.0
    tpot_slo_ms: float = 50.0
    seed: int = 1
    load_bound: float = 1.25
    load_slack: int = 2


@dataclass(slots=True)
class _Turn:
    session: int
    turn: int
    prompt: list[int]
    arrival: float
    replica: int = -1
    first_t: float | None = None
    finish_t: float | None = None
    cached_tokens: int = 0


@dataclass(slots=True)
class FleetResult:
    """What the run measured (turns arriving in the window)."""

    spec: FleetSpec
    turns: int
    good: int
    ttft_s: list[float]
    tpot_s: list[float]
    prompt_tokens: int
    cached_tokens: int
    routed: list[int]
    """Turns per replica (in the window)."""
    busy_s: list[float]
    """Model time per replica over the whole run."""
    unfinished: int
    by_turn_ttft_p50_s: dict[int, float] = field(default_factory=dict)

    @property
    def window_s(self) -> float:
        return self.spec.window[1] - self.spec.window[0]

    @property
    def offered_rps(self) -> float:
        return self.turns / self.window_s

    @property
    def goodput_rps(self) -> float:
        return self.good / self.window_s

    @property
    def good_ratio(self) -> float:
        return self.good / self.turns if self.turns else 0.0

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def ttft_pct_ms(self, q: float) -> float:
        return float(np.percentile(self.ttft_s, q) * 1e3) if self.ttft_s else float("nan")

    @property
    def max_over_mean_routed(self) -> float:
        mean = sum(self.routed) / len(self.routed)
        return max(self.routed) / mean if mean else 0.0

    @property
    def max_over_mean_busy(self) -> float:
        mean = sum(self.busy_s) / len(self.busy_s)
        return max(self.busy_s) / mean if mean else 0.0


def _chooser(
    spec: FleetSpec, capacity_blocks: int, rng: random.Random
) -> tuple[Callable[[list[int], list[int]], int], PrefixRouter | None]:
    names = [str(i) for i in range(spec.replicas)]
    if spec.policy == "blind":

        def blind(prompt: list[int], load: list[int]) -> int:
            picked = pick_replica(names, dict(zip(names, load, strict=True)), rng)
            return int(picked or 0)

        return blind, None
    if spec.policy not in POLICIES:
        raise ValueError(f"unknown policy {spec.policy!r}; known: {POLICIES}")
    bound = float("inf") if spec.policy == "prefix" else spec.load_bound
    router = PrefixRouter(KV_BLOCK_TOKENS, capacity_blocks, load_bound=bound, load_slack=spec.load_slack)

    def aware(prompt: list[int], load: list[int]) -> int:
        choice = router.choose(names, dict(zip(names, load, strict=True)), prompt, rng)
        assert choice is not None
        return int(choice.replica)

    return aware, router


def simulate(spec: FleetSpec) -> FleetResult:
    """Run one fleet to the end of its last session."""
    arch, gpu = LLAMA8B, get_gpu(spec.gpu)
    plan = plan_engine(arch, gpu, PoolSlo(2000, 50))  # the settings deploy/sim-fleet.yaml gets
    perf = PerfModel(arch, gpu)
    kv = plan.kv_capacity_tokens
    scheds = [
        SimScheduler(
            max_num_seqs=plan.settings.max_num_seqs,
            max_num_batched_tokens=plan.settings.max_num_batched_tokens,
            kv_capacity_tokens=kv,
        )
        for _ in range(spec.replicas)
    ]
    rng = random.Random(spec.seed)
    choose, router = _chooser(spec, kv // KV_BLOCK_TOKENS, random.Random(spec.seed + 1))
    fed = router if spec.policy == "events" else None
    if fed is not None:
        for s in scheds:
            s.pool.events = CacheEventLog()
    hasher = BlockHasher(KV_BLOCK_TOKENS)
    ids = itertools.count(10_000_000)
    systems = [[next(ids) for _ in range(spec.system_prompt_tokens)] for _ in range(spec.agents)]
    load = [0] * spec.replicas
    busy = [0.0] * spec.replicas
    stepping: list[object | None] = [None] * spec.replicas
    events: list[tuple[float, int, str, object]] = []
    seq_no = itertools.count()
    done: list[_Turn] = []

    def push(t: float, kind: str, payload: object) -> None:
        heapq.heappush(events, (t, next(seq_no), kind, payload))

    def fresh(n: int) -> list[int]:
        return [next(ids) for _ in range(n)]

    t, sid = 0.0, 0
    while True:
        t += rng.expovariate(spec.session_rate)
        if t >= spec.arrive_s:
            break
        agent = rng.randrange(spec.agents)
        push(t, "turn", _Turn(sid, 1, [*systems[agent], *fresh(spec.user_tokens)], t))
        sid += 1

    def start_step(r: int, now: float) -> None:
        batch = scheds[r].schedule()
        if not batch.items:
            stepping[r] = None
            return
        dur = perf.step_time_s(**batch.perf_args())
        busy[r] += dur
        stepping[r] = batch
        push(now + dur, "step", r)

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "turn":
            assert isinstance(payload, _Turn)
            r = choose(payload.prompt, load)
            payload.replica = r
            load[r] += 1
            seq = SimSeq(
                owner=payload,
                index=0,
                prompt_len=len(payload.prompt),
                max_tokens=spec.answer_tokens,
                block_hashes=hasher.block_hashes(payload.prompt),
            )
            scheds[r].add(seq)
            if stepping[r] is None:
                start_step(r, now)
            continue
        assert isinstance(payload, int)
        r = payload
        batch = stepping[r]
        produced = scheds[r].postprocess(batch)  # type: ignore[arg-type]
        if fed is not None and scheds[r].pool.events:
            assert scheds[r].pool.events is not None
            fed.index.apply(str(r), *scheds[r].pool.events.drain())
        for seq in produced:
            turn: _Turn = seq.owner
            if turn.first_t is None:
                turn.first_t = now
                turn.cached_tokens = seq.cached_tokens
            if seq.status is SeqStatus.FINISHED:
                turn.finish_t = now
                load[r] -= 1
                done.append(turn)
                if turn.turn < spec.turns:
                    prompt = [*turn.prompt, *fresh(spec.answer_tokens), *fresh(spec.user_tokens)]
                    push(
                        now + spec.think_time_s,
                        "turn",
                        _Turn(turn.session, turn.turn + 1, prompt, now + spec.think_time_s),
                    )
        start_step(r, now)

    lo, hi = spec.window
    measured = [x for x in done if lo <= x.arrival < hi]
    ttft = [x.first_t - x.arrival for x in measured if x.first_t is not None]
    tpot = [
        (x.finish_t - x.first_t) / (spec.answer_tokens - 1)
        for x in measured
        if x.first_t is not None and x.finish_t is not None and spec.answer_tokens > 1
    ]
    good = sum(
        1
        for x in measured
        if x.first_t is not None
        and x.finish_t is not None
        and (x.first_t - x.arrival) * 1e3 <= spec.ttft_slo_ms
        and (
            spec.answer_tokens < 2
            or (x.finish_t - x.first_t) / (spec.answer_tokens - 1) * 1e3 <= spec.tpot_slo_ms
        )
    )
    routed = [0] * spec.replicas
    for x in measured:
        routed[x.replica] += 1
    by_turn: dict[int, list[float]] = {}
    for x in measured:
        if x.first_t is not None:
            by_turn.setdefault(x.turn, []).append(x.first_t - x.arrival)
    return FleetResult(
        spec=spec,
        turns=len(measured),
        good=good,
        ttft_s=ttft,
        tpot_s=tpot,
        prompt_tokens=sum(len(x.prompt) for x in measured),
        cached_tokens=sum(x.cached_tokens for x in measured),
        routed=routed,
        busy_s=busy,
        unfinished=sum(s.has_work() for s in scheds),
        by_turn_ttft_p50_s={k: float(np.median(v)) for k, v in sorted(by_turn.items())},
    )
