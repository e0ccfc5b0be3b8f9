"""The discrete-event simulation behind ``bench_batching.py``: workload, replicas (the simulated
engine's scheduler priced by the performance model, behind the real admission core or behind
nothing) and the event loop. Simulated time only; nothing sleeps."""

from __future__ import annotations

import heapq
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from serving.admission import AdmissionConfig, AdmissionCore, Admitted, Refused
from serving.engines._sim_sched import SeqStatus, SimScheduler, SimSeq
from serving.hardware import EnginePlan, ModelArch, PerfModel, PoolSlo, get_gpu, plan_engine

LLAMA8B = ModelArch("llama-3.1-8b", 8_030_261_248, 32, 4096, 32, 8, 128, 14336, 128256, 2)
TTFT_SLO_MS = 1500.0
TPOT_SLO_MS = 60.0
ARRIVE_S = 60.0
WINDOW = (10.0, 60.0)
"""Goodput counts requests arriving in this window (after warm-up)."""
UNTIL_S = 120.0
FAST_REFUSAL_S = 0.050
"""A refusal counts as quick when decided within this of the request's arrival (simulated time)."""
REPORT_EVERY_TOKENS = 8
"""Tokens are fed back to the admission core in chunks, as a streaming replica would."""


def vllm_defaults(gpu: str) -> tuple[int, int]:
    """vLLM 0.32's defaults for the OpenAI server: (max_num_seqs, max_num_batched_tokens)."""
    big = get_gpu(gpu).memory_bytes >= 70 * 2**30 and "A100" not in gpu
    return (1024, 8192) if big else (256, 2048)


# ---- requests and workload ---------------------------------------------------------------------------


class Req:
    __slots__ = (
        "arrival",
        "finish_t",
        "first_t",
        "generated",
        "max_tokens",
        "out_len",
        "project",
        "project_weight",
        "prompt",
        "refused",
        "refused_t",
        "reported",
        "rid",
        "tenant",
        "weight",
    )

    def __init__(
        self, rid: str, tenant: str, weight: float, arrival: float, prompt: int, out_len: int
    ) -> None:
        self.rid, self.tenant, self.weight, self.arrival = rid, tenant, weight, arrival
        self.project: str | None = None
        self.project_weight = 1.0
        self.prompt, self.out_len, self.max_tokens = prompt, out_len, 1024
        self.generated = self.reported = 0
        self.first_t: float | None = None
        self.finish_t: float | None = None
        self.refused: Refused | None = None
        self.refused_t: float | None = None

    @property
    def tpot_s(self) -> float | None:
        if self.finish_t is None or self.first_t is None or self.generated < 2:
            return None
        return (self.finish_t - self.first_t) / (self.generated - 1)

    def met_slo(self) -> bool:
        tpot = self.tpot_s
        return (
            self.first_t is not None
            and self.finish_t is not None
            and (self.first_t - self.arrival) * 1e3 <= TTFT_SLO_MS
            and (tpot is None or tpot * 1e3 <= TPOT_SLO_MS)
        )


def workload(
    rates: dict[str, float],
    weights: dict[str, float] | None = None,
    seed: int = 1,
    arrive_s: float = ARRIVE_S,
    project_weights: dict[str, float] | None = None,
) -> list[Req]:
    """Requests per sender of ``rates`` (requests/s): a tenant, or ``"org/project"`` for a project
    of an organization; ``weights`` by tenant (organization), ``project_weights`` by sender."""
    rng = random.Random(seed)
    out: list[Req] = []
    for tenant in sorted(rates):
        t, i = 0.0, 0
        while rates[tenant] > 0:
            t += rng.expovariate(rates[tenant])
            if t >= arrive_s:
                break
            p = int(min(4096, max(16, rng.lognormvariate(math.log(256), 0.8))))
            o = int(min(1024, max(8, rng.lognormvariate(math.log(192), 0.8))))
            org, _, project = tenant.partition("/")
            r = Req(f"{tenant}-{i}", org, (weights or {}).get(org, 1.0), t, p, o)
            if project:
                r.project, r.project_weight = project, (project_weights or {}).get(tenant, 1.0)
            out.append(r)
            i += 1
    out.sort(key=lambda r: r.arrival)
    return out


# ---- replicas and the event loop ------------------------------------------------------------------------


@dataclass
class Replica:
    sched: SimScheduler
    model: PerfModel
    core: AdmissionCore | None
    pool: str = "pool"
    price_per_hour: float = 1.0
    busy_s: float = 0.0
    step_end: float | None = None
    batch: object = None
    refuse_ns: list[int] = field(default_factory=list)

    def load(self) -> int:
        return (
            len(self.sched.running)
            + len(self.sched.waiting)
            + (self.core.queued_requests if self.core else 0)
        )


def make_replica(gpu: str, plan: EnginePlan, limit: str, pool: str = "pool") -> Replica:
    """``limit``: "adaptive", "fixed:N" or "none" (vLLM defaults, no admission core)."""
    model = PerfModel(LLAMA8B, get_gpu(gpu))
    s = plan.settings
    if limit == "none":
        seqs, chunk = vllm_defaults(gpu)
        sched = SimScheduler(
            max_num_seqs=seqs, max_num_batched_tokens=chunk, kv_capacity_tokens=plan.kv_capacity_tokens
        )
        return Replica(sched, model, None, pool, get_gpu(gpu).price_per_hour_relative)
    sched = SimScheduler(
        max_num_seqs=s.max_num_seqs,
        max_num_batched_tokens=s.max_num_batched_tokens,
        kv_capacity_tokens=plan.kv_capacity_tokens,
    )
    kw: dict[str, object] = {}
    if limit.startswith("fixed:"):
        n = int(limit.split(":")[1])
        kw = {"max_num_seqs": n, "min_num_seqs": n, "initial_num_seqs": n}
    cfg = AdmissionConfig.model_validate(
        {
            "max_num_seqs": s.max_num_seqs,
            "kv_capacity_tokens": plan.kv_capacity_tokens,
            "ttft_slo_ms": TTFT_SLO_MS,
            "tpot_slo_ms": TPOT_SLO_MS,
            # The prior drain rate: the plan's request rate in queue tokens (prompt + max_tokens).
            "prior_drain_tokens_per_s": saturation(gpu, plan)[0] * (256 + 1024),
            **kw,
        }
    )
    return Replica(sched, model, AdmissionCore(cfg), pool, get_gpu(gpu).price_per_hour_relative)


def simulate(
    reps: list[Replica],
    reqs: list[Req],
    route: Callable[[Req, float], Replica],
    on_tick: Callable[[float], None] | None = None,
    until_s: float = UNTIL_S,
) -> None:
    by_rid = {r.rid: r for r in reqs}
    heap: list[tuple[float, int, int]] = [(r.arrival, 1, i) for i, r in enumerate(reqs)]
    if on_tick is not None:
        heap.append((0.0, 2, 0))
    heapq.heapify(heap)
    left = len(reqs)

    def start(rep: Replica, r: Req) -> None:
        rep.sched.add(SimSeq(owner=r, index=0, prompt_len=r.prompt, max_tokens=r.out_len))

    def service(rep: Replica, now: float) -> None:
        if rep.core is None:
            return
        for rid, refusal in rep.core.expire(now):
            by_rid[rid].refused, by_rid[rid].refused_t = refusal, now
        for rid in rep.core.release(now):
            start(rep, by_rid[rid])

    def kick(rep: Replica, idx: int, now: float) -> None:
        if rep.step_end is None and rep.sched.has_work():
            rep.batch = b = rep.sched.schedule()
            dt = rep.model.step_time_s(**b.perf_args())
            rep.busy_s += dt
            rep.step_end = now + dt
            heapq.heappush(heap, (rep.step_end, 0, idx))

    index = {id(rep): i for i, rep in enumerate(reps)}
    while heap:
        now, kind, i = heapq.heappop(heap)
        if now > until_s:
            break
        if kind == 2:
            assert on_tick is not None
            on_tick(now)
            if left or any(rep.sched.has_work() for rep in reps):
                heapq.heappush(heap, (now + 1.0, 2, 0))
            continue
        if kind == 1:
            left -= 1
            r = reqs[i]
            rep = route(r, now)
            if rep.core is None:
                start(rep, r)
            else:
                t0 = time.perf_counter_ns()
                d = rep.core.submit(
                    r.rid, r.tenant, r.weight, r.prompt, r.max_tokens, now, r.project, r.project_weight
                )
                if isinstance(d, Refused):
                    rep.refuse_ns.append(time.perf_counter_ns() - t0)
                    r.refused, r.refused_t = d, now
                elif isinstance(d, Admitted):
                    start(rep, r)
                service(rep, now)
            kick(rep, index[id(rep)], now)
            continue
        rep = reps[i]
        rep.step_end = None
        core = rep.core
        for seq in rep.sched.postprocess(rep.batch):  # type: ignore[arg-type]
            r = seq.owner
            r.generated = seq.num_output
            if r.first_t is None:
                r.first_t = now
            done = seq.status is SeqStatus.FINISHED
            if core is not None and (
                done or r.reported == 0 or r.generated - r.reported >= REPORT_EVERY_TOKENS
            ):
                core.on_tokens(r.rid, r.generated - r.reported, now)
                r.reported = r.generated
            if done:
                r.finish_t = now
                if core is not None:
                    core.on_finish(r.rid, r.prompt, r.generated, now)
        service(rep, now)
        kick(rep, i, now)


# ---- plans and analytic saturation ---------------------------------------------------------------------


_PLANS: dict[str, EnginePlan] = {}
_SAT: dict[str, tuple[float, int]] = {}


def plan_for(gpu: str) -> EnginePlan:
    if gpu not in _PLANS:
        slo = PoolSlo(TTFT_SLO_MS, TPOT_SLO_MS, typical_prompt_tokens=256, typical_context_tokens=512)
        _PLANS[gpu] = plan_engine(LLAMA8B, get_gpu(gpu), slo)
    return _PLANS[gpu]


def saturation(gpu: str, plan: EnginePlan) -> tuple[float, int]:
    """(requests/s, batch): the most a replica serves within the TPOT SLO on this workload (analytic).

    At batch B each step decodes B sequences and prefills B x P/O prompt tokens (P, O: mean prompt
    and output of the workload); the step must stay within 90% of the TPOT SLO and fit the chunk
    budget and the KV cache.
    """
    if gpu in _SAT:
        return _SAT[gpu]
    sample = workload({"x": 1000.0}, arrive_s=5.0, seed=99)
    p = statistics.fmean(r.prompt for r in sample)
    o = statistics.fmean(r.out_len for r in sample)
    m = PerfModel(LLAMA8B, get_gpu(gpu))
    best = (0.0, 1)
    for b in range(1, plan.settings.max_num_seqs + 1):
        pf = b * p / o
        if b + pf > plan.settings.max_num_batched_tokens or b * (p + o) > plan.kv_capacity_tokens:
            break
        step = m.step_time_s(
            decode_seqs=b,
            decode_context_tokens=int(b * (p + o / 2)),
            prefill_tokens=int(pf),
            prefill_context_tokens=int(pf * p / 2),
            prefill_attn_pairs=int(pf * p / 2),
        )
        if step * 1e3 > 0.9 * TPOT_SLO_MS:
            break
        rps = b / (o * step)
        if rps > best[0]:
            best = (rps, b)
    _SAT[gpu] = best
    return best
