"""Summaries of a run, with the definitions of ``vllm bench serve`` plus tenant-level service.

* request / output / total token throughput: successful requests (their tokens) per second of run;
* TTFT, TPOT (``(e2e - ttft) / (completion_tokens - 1)``), ITL (every gap between text chunks) and
  E2EL: mean, median, p90, p99 (numpy's linear percentiles), in milliseconds, successful requests only;
* goodput: successful requests meeting every SLO that is set, per second;
* per tenant: requests, failures, tokens served, share of service, goodput; refusals by reason;
* Jain's fairness index over tenants' tokens per unit of share, and over tenants' served/asked ratios;
* agent sessions: prefix-cache hit rate (``cached_tokens`` / ``prompt_tokens`` from the responses'
  usage, and the server's ``vllm:prefix_cache_*`` counters when read), TTFT and goodput by turn, and
  good sessions (every turn sent, successful and within the SLOs).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from loadtests.client import RequestRecord
from loadtests.scenario import SloSpec

__all__ = [
    "LATENESS_WARN_P99_MS",
    "AgentSummary",
    "LatencyStats",
    "RunSummary",
    "TenantSummary",
    "TurnSummary",
    "agent_summary",
    "is_good",
    "jain_index",
    "latency_stats",
    "summarize",
]

LATENESS_WARN_P99_MS = 5.0
"""Above this p99 send lateness, the client (not the server) may be limiting the offered load."""
PERCENTILES = (50.0, 90.0, 99.0)


@dataclass(frozen=True, slots=True)
class LatencyStats:
    """Distribution of one latency, in milliseconds."""

    count: int
    mean_ms: float | None
    median_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None


def latency_stats(values_s: Sequence[float] | np.ndarray) -> LatencyStats:
    """Mean, median, p90, p99 and max of ``values_s`` (seconds), reported in ms."""
    a = np.asarray(values_s, dtype=float) * 1000.0
    if a.size == 0:
        return LatencyStats(0, None, None, None, None, None)
    p50, p90, p99 = np.percentile(a, PERCENTILES)
    return LatencyStats(int(a.size), float(a.mean()), float(p50), float(p90), float(p99), float(a.max()))


def jain_index(values: Sequence[float]) -> float | None:
    """Jain's fairness index ``(sum x)^2 / (n * sum x^2)``: 1 when equal, 1/n when one takes all."""
    x = np.asarray(values, dtype=float)
    if x.size == 0 or not np.any(x):
        return None
    return float(x.sum() ** 2 / (x.size * np.square(x).sum()))


def is_good(rec: RequestRecord, slo: SloSpec) -> bool:
    """Successful and within every SLO that is set (as vLLM: value <= bound)."""
    if not rec.ok:
        return False
    if slo.ttft_ms is not None and (rec.ttft_s is None or rec.ttft_s * 1e3 > slo.ttft_ms):
        return False
    if slo.tpot_ms is not None and rec.tpot_s is not None and rec.tpot_s * 1e3 > slo.tpot_ms:
        return False
    return not (slo.e2e_ms is not None and (rec.e2e_s is None or rec.e2e_s * 1e3 > slo.e2e_ms))


@dataclass(frozen=True, slots=True)
class TenantSummary:
    """Service one tenant got."""

    tenant: str
    share: float
    requests: int
    succeeded: int
    failed: int
    good: int
    prompt_tokens: int
    completion_tokens: int
    asked_completion_tokens: int
    """Sum of ``max_tokens`` over the tenant's sent requests."""
    output_throughput_tps: float
    goodput_rps: float
    service_fraction: float
    """The tenant's part of all completion tokens served."""
    ttft: LatencyStats
    tpot: LatencyStats
    e2el: LatencyStats
    refusals: dict[str, int]


@dataclass(frozen=True, slots=True)
class TurnSummary:
    """The k-th turns of every agent session."""

    turn: int
    requests: int
    succeeded: int
    good: int
    prompt_tokens: int
    cached_tokens: int | None
    """Sum over the turns whose usage reported it; None when none did."""
    cache_hit_rate: float | None
    goodput_rps: float
    ttft: LatencyStats


@dataclass(frozen=True, slots=True)
class AgentSummary:
    """Agent sessions: cache hits, TTFT and goodput by turn, sessions done within the SLOs."""

    sessions: int
    agents: int
    good_sessions: int
    """Sessions whose every planned turn was sent, succeeded and met the SLOs."""
    cache_hit_rate: float | None
    """Cached / prompt tokens over the successful turns whose usage reported ``cached_tokens``."""
    server_cache_hit_rate: float | None
    """The increase of ``vllm:prefix_cache_hits`` over that of ``vllm:prefix_cache_queries``."""
    server_prefix_cache_queries: float | None
    server_prefix_cache_hits: float | None
    turns: list[TurnSummary]


@dataclass(frozen=True, slots=True)
class RunSummary:
    """Everything the report shows about one run (or one sweep point)."""

    duration_s: float
    send_window_s: float
    offered_rate_rps: float | None
    requests_sent: int
    succeeded: int
    failed: int
    good: int
    request_throughput_rps: float
    output_throughput_tps: float
    total_token_throughput_tps: float
    goodput_rps: float
    total_input_tokens: int
    total_output_tokens: int
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats
    lateness: LatencyStats
    refusals: dict[str, int]
    """Failures by error code."""
    tenants: list[TenantSummary]
    jain_service: float | None
    """Over completion tokens / share per tenant."""
    jain_satisfaction: float | None
    """Over completion tokens served / asked per tenant."""
    slo: dict[str, float | None]
    warnings: list[str] = field(default_factory=list)
    agents: AgentSummary | None = None
    """Present when the run had agent sessions."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tenant(
    name: str, share: float, recs: list[RequestRecord], slo: SloSpec, dur: float, total_out: int
) -> TenantSummary:
    ok = [r for r in recs if r.ok]
    out = sum(r.completion_tokens or 0 for r in ok)
    good = sum(is_good(r, slo) for r in recs)
    return TenantSummary(
        tenant=name,
        share=share,
        requests=len(recs),
        succeeded=len(ok),
        failed=len(recs) - len(ok),
        good=good,
        prompt_tokens=sum(r.prompt_tokens or 0 for r in ok),
        completion_tokens=out,
        asked_completion_tokens=sum(r.max_tokens for r in recs),
        output_throughput_tps=out / dur if dur > 0 else 0.0,
        goodput_rps=good / dur if dur > 0 else 0.0,
        service_fraction=out / total_out if total_out else 0.0,
        ttft=latency_stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot=latency_stats([r.tpot_s for r in ok if r.tpot_s is not None]),
        e2el=latency_stats([r.e2e_s for r in ok if r.e2e_s is not None]),
        refusals=dict(Counter(r.error_code or "unknown" for r in recs if not r.ok)),
    )


def _rate(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def agent_summary(
    records: Sequence[RequestRecord],
    duration_s: float,
    slo: SloSpec,
    planned_turns: dict[str, int],
    server: tuple[float, float] | None = None,
) -> AgentSummary | None:
    """The agent part of a run (None without sessions); ``planned_turns`` by tenant, ``server`` the
    increases of the server's (queries, hits) counters."""
    recs = [r for r in records if r.session is not None]
    if not recs:
        return None
    sessions: dict[int, list[RequestRecord]] = {}
    for r in recs:
        sessions.setdefault(r.session or 0, []).append(r)
    good_sessions = sum(
        len(rs) == planned_turns.get(rs[0].tenant, len(rs)) and all(is_good(r, slo) for r in rs)
        for rs in sessions.values()
    )
    turns = []
    for k in sorted({r.turn or 0 for r in recs}):
        mine = [r for r in recs if r.turn == k]
        ok = [r for r in mine if r.ok]
        told = [r for r in ok if r.cached_tokens is not None]
        cached = sum(r.cached_tokens or 0 for r in told) if told else None
        good = sum(is_good(r, slo) for r in mine)
        turns.append(
            TurnSummary(
                turn=k,
                requests=len(mine),
                succeeded=len(ok),
                good=good,
                prompt_tokens=sum(r.prompt_tokens or 0 for r in ok),
                cached_tokens=cached,
                cache_hit_rate=_rate(cached or 0, sum(r.prompt_tokens or 0 for r in told)) if told else None,
                goodput_rps=good / duration_s if duration_s > 0 else 0.0,
                ttft=latency_stats([r.ttft_s for r in ok if r.ttft_s is not None]),
            )
        )
    told = [r for r in recs if r.ok and r.cached_tokens is not None]
    hit_rate = (
        _rate(sum(r.cached_tokens or 0 for r in told), sum(r.prompt_tokens or 0 for r in told))
        if told
        else None
    )
    return AgentSummary(
        sessions=len(sessions),
        agents=len({r.agent for r in recs}),
        good_sessions=good_sessions,
        cache_hit_rate=hit_rate,
        server_cache_hit_rate=_rate(server[1], server[0]) if server else None,
        server_prefix_cache_queries=server[0] if server else None,
        server_prefix_cache_hits=server[1] if server else None,
        turns=turns,
    )


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    slo: SloSpec,
    shares: dict[str, float],
    *,
    send_window_s: float | None = None,
    offered_rate_rps: float | None = None,
    planned_turns: dict[str, int] | None = None,
    server_prefix_cache: tuple[float, float] | None = None,
) -> RunSummary:
    """The run's summary; ``shares`` lists every tenant (those that sent nothing count as zero)."""
    ok = [r for r in records if r.ok]
    dur = duration_s if duration_s > 0 else float("nan")
    total_in = sum(r.prompt_tokens or 0 for r in ok)
    total_out = sum(r.completion_tokens or 0 for r in ok)
    good = sum(is_good(r, slo) for r in records)
    by_tenant: dict[str, list[RequestRecord]] = {name: [] for name in shares}
    for r in records:
        by_tenant.setdefault(r.tenant, []).append(r)
    tenants = [
        _tenant(name, shares.get(name, 1.0), recs, slo, duration_s, total_out)
        for name, recs in by_tenant.items()
    ]
    lateness = latency_stats([r.lateness_s for r in records if r.lateness_s is not None])
    warnings: list[str] = []
    if lateness.p99_ms is not None and lateness.p99_ms > LATENESS_WARN_P99_MS:
        warnings.append(
            f"client send lateness p99 is {lateness.p99_ms:.1f} ms (> {LATENESS_WARN_P99_MS} ms): the load "
            "generator, not the server, may be limiting the offered load"
        )
    if not ok and records:
        warnings.append("every request failed")
    sat = [t.completion_tokens / t.asked_completion_tokens for t in tenants if t.asked_completion_tokens]
    return RunSummary(
        duration_s=duration_s,
        send_window_s=send_window_s if send_window_s is not None else duration_s,
        offered_rate_rps=offered_rate_rps,
        requests_sent=len(records),
        succeeded=len(ok),
        failed=len(records) - len(ok),
        good=good,
        request_throughput_rps=len(ok) / dur,
        output_throughput_tps=total_out / dur,
        total_token_throughput_tps=(total_in + total_out) / dur,
        goodput_rps=good / dur,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        ttft=latency_stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot=latency_stats([r.tpot_s for r in ok if r.tpot_s is not None]),
        itl=latency_stats([g for r in ok for g in r.itl_s]),
        e2el=latency_stats([r.e2e_s for r in ok if r.e2e_s is not None]),
        lateness=lateness,
        refusals=dict(Counter(r.error_code or "unknown" for r in records if not r.ok)),
        tenants=tenants,
        jain_service=jain_index([t.completion_tokens / t.share for t in tenants]),
        jain_satisfaction=jain_index(sat),
        slo={"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "e2e_ms": slo.e2e_ms},
        warnings=warnings,
        agents=agent_summary(records, duration_s, slo, planned_turns or {}, server_prefix_cache),
    )
