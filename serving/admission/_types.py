"""What the admission core answers and reports: decisions, refusals, load snapshots, stats."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class RefusalReason(StrEnum):
    """Why a request was refused (a bounded set: safe as a metric label)."""

    TENANT_QUEUE_FULL = "tenant_queue_full"
    """The tenant (organization) already holds its weighted share of the queue, and the request's
    project cannot make room from its siblings (429)."""
    POOL_QUEUE_FULL = "pool_queue_full"
    """The queue's token or request bound is reached by tenants within their shares (503)."""
    PREDICTED_WAIT = "predicted_wait"
    """The request would wait longer than the queue deadline (429 if the tenant's own backlog is the
    cause, 503 otherwise)."""
    QUEUE_DEADLINE = "queue_deadline"
    """The request waited its whole queue deadline without being released."""
    DISPLACED = "displaced"
    """Pushed out of a full queue by a tenant within its share (the victim's tenant was over its),
    or by a project within its share of its organization's part (the victim's project was over)."""


@dataclass(frozen=True, slots=True)
class Admitted:
    """The request may start now; it counts as in flight."""

    req_id: str


@dataclass(frozen=True, slots=True)
class Queued:
    """The request waits in the fair queue until ``release()`` returns it or it is refused."""

    req_id: str
    deadline_s: float
    """Time (the caller's clock) by which it is released or refused."""


@dataclass(frozen=True, slots=True)
class Refused:
    """The request is refused; everything a ``Retry-After`` and an OpenAI error body need."""

    req_id: str
    reason: RefusalReason
    status_code: int
    """429 (this tenant should slow down) or 503 (the pool is saturated)."""
    retry_after_s: float
    """When a retry is likely to be accepted, from the queue's drain rate."""
    message: str
    queued_tokens: int
    """Tokens queued in the pool when refused."""
    max_queued_tokens: int


Decision = Admitted | Queued | Refused


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """A replica's (or a pool's, merged) load, as the router sees it; at most ~1 s stale."""

    taken_at_s: float
    queued_requests: int
    queued_tokens: int
    """Prompt + max_tokens of the queued requests."""
    in_flight_seqs: int
    in_flight_tokens: int
    """Prompt + generated tokens of the running requests (their KV use)."""
    seq_limit: int
    """The current adaptive in-flight sequence limit."""
    token_limit: int
    """The current adaptive in-flight token limit."""
    kv_capacity_tokens: int
    max_queued_tokens: int
    drain_rate_tokens_per_s: float
    """Queue tokens released per backlogged second (the prior until measured)."""
    recent_ttft_s: float | None = None
    """Mean engine-side TTFT of recently finished requests (None: no data yet)."""
    recent_tpot_s: float | None = None
    """Mean TPOT of recently finished requests (None: no data yet)."""
    replicas: int = 1


def merge_snapshots(snaps: list[LoadSnapshot]) -> LoadSnapshot:
    """One pool-level snapshot from its replicas' (sums of load, oldest time, mean latencies)."""
    if not snaps:
        raise ValueError("merge_snapshots needs at least one snapshot")

    def _mean(xs: list[float | None]) -> float | None:
        vals = [x for x in xs if x is not None]
        return sum(vals) / len(vals) if vals else None

    return LoadSnapshot(
        taken_at_s=min(s.taken_at_s for s in snaps),
        queued_requests=sum(s.queued_requests for s in snaps),
        queued_tokens=sum(s.queued_tokens for s in snaps),
        in_flight_seqs=sum(s.in_flight_seqs for s in snaps),
        in_flight_tokens=sum(s.in_flight_tokens for s in snaps),
        seq_limit=sum(s.seq_limit for s in snaps),
        token_limit=sum(s.token_limit for s in snaps),
        kv_capacity_tokens=sum(s.kv_capacity_tokens for s in snaps),
        max_queued_tokens=sum(s.max_queued_tokens for s in snaps),
        drain_rate_tokens_per_s=sum(s.drain_rate_tokens_per_s for s in snaps),
        recent_ttft_s=_mean([s.recent_ttft_s for s in snaps]),
        recent_tpot_s=_mean([s.recent_tpot_s for s in snaps]),
        replicas=sum(s.replicas for s in snaps),
    )


@dataclass(slots=True)
class TenantStats:
    """One tenant's queue and service at one replica."""

    queued_requests: int = 0
    queued_tokens: int = 0
    in_flight_seqs: int = 0
    served_prompt_tokens: int = 0
    served_completion_tokens: int = 0
    virtual_counter: float = 0.0


@dataclass(slots=True)
class AdmissionStats:
    """Plain numbers for the metrics exporter (gauges now, counters cumulative since start)."""

    queue_depth: int = 0
    queued_tokens: int = 0
    in_flight_seqs: int = 0
    in_flight_tokens: int = 0
    seq_limit: int = 0
    token_limit: int = 0
    drain_rate_tokens_per_s: float = 0.0
    admitted_total: int = 0
    """Requests admitted at once on submit."""
    queued_total: int = 0
    released_total: int = 0
    """Requests released from the queue."""
    refused_total: dict[str, int] = field(default_factory=dict)
    """Refusals by :class:`RefusalReason` value."""
    finished_total: int = 0
    ttft_slo_met_total: int = 0
    """Finished requests whose end-to-end TTFT (queue wait included) met the SLO."""
    tpot_slo_met_total: int = 0
    slo_met_total: int = 0
    """Finished requests that met both SLOs."""
    recent_slo_attainment: float | None = None
    """Share of the last `latency_window` finished requests meeting both SLOs."""
    recent_ttft_s: float | None = None
    recent_tpot_s: float | None = None
    limit_increases_total: int = 0
    limit_decreases_total: int = 0
    tenants: dict[str, TenantStats] = field(default_factory=dict)
