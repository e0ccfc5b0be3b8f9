"""Prometheus exposition from plain-data stats (the hot paths only fill dataclasses and dicts).

``/metrics`` on any gateway replica is complete: pool replicas and gateway replicas publish their
stats to the load board, the ledger keeps tenant accounting; a scrape renders all of it. Labels are
bounded: pools and replicas by the deployment, tenants by the tenant table, reasons by enums.

**One scrape for the fleet.** The board and the ledger are singletons, so every gateway replica
renders the same fleet-wide exposition: Prometheus scrapes exactly one target (any replica; see
``deploy/prometheus/``) and a second target would double every sum. Each series still names its
origin (``replica`` for a pool replica, ``gateway`` for a gateway replica) instead of being summed
here, so a replica that goes away is a series that ends, not a counter that drops (which
``rate()`` would read as a reset and count twice).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from serving.admission import GateStats, RefusalReason
from serving.config.resolved import ResolvedPool
from serving.engines import EngineMetrics
from serving.tenancy import OTHER_TENANTS

P = "tokenweir"
_REFUSAL_REASONS = tuple(r.value for r in RefusalReason)


@dataclass
class GatewayStats:
    """One gateway replica's counters (cumulative since it started)."""

    requests_total: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """By (model, pool, outcome)."""
    completion_tokens_total: dict[tuple[str, str], int] = field(default_factory=dict)
    """Streamed/returned completion tokens by (model, pool)."""
    ttft_seconds_sum: dict[str, float] = field(default_factory=dict)
    ttft_seconds_count: dict[str, int] = field(default_factory=dict)
    """Gateway-side time to first token by pool (sum and count, for a mean rate)."""
    routing_total: dict[tuple[str, str], int] = field(default_factory=dict)
    """Routing decisions by (pool, reason)."""
    prefix_total: dict[tuple[str, str], int] = field(default_factory=dict)
    """Replica choices by cached prefix by (pool, reason: prefix_hit, spill, least_loaded)."""
    prefix_tokens: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    """By pool: (prompt tokens routed, of them predicted cached, KV-cache event frames applied)."""
    in_flight: int = 0
    gate: GateStats | None = None
    """The replica's fair gate (None: an older replica)."""
    loop_demand: float = 0.0
    """Share of wall time the replica's event loop ran or waited to run (last sample)."""

    def count(
        self, model: str, pool: str, outcome: str, completion_tokens: int, ttft_s: float | None
    ) -> None:
        """Record one finished request."""
        k = (model, pool, outcome)
        self.requests_total[k] = self.requests_total.get(k, 0) + 1
        kt = (model, pool)
        self.completion_tokens_total[kt] = self.completion_tokens_total.get(kt, 0) + completion_tokens
        if ttft_s is not None:
            self.ttft_seconds_sum[pool] = self.ttft_seconds_sum.get(pool, 0.0) + ttft_s
            self.ttft_seconds_count[pool] = self.ttft_seconds_count.get(pool, 0) + 1


class BoardCollector(Collector):
    """Metric families from load-board payloads (``pool`` and ``gateway`` entries) and, given the
    deployment's pools, what each pool should be (replicas, SLO targets, price)."""

    def __init__(
        self,
        entries: Iterable[tuple[str, str, float, Any]],
        pools: Sequence[ResolvedPool] = (),
        tenants: frozenset[str] | None = None,
    ) -> None:
        self.entries = list(entries)
        self.pools = tuple(pools)
        self.tenants = tenants
        """Organizations labelled on their own (the ledger's metrics budget); None: every one."""

    def collect(self) -> Iterator[Metric]:
        pools = [(k, p) for kind, k, _a, p in self.entries if kind == "pool"]
        gateways = [(k, p) for kind, k, _a, p in self.entries if kind == "gateway"]
        yield from _deployment_families(self.pools, [p for _k, p in pools])
        yield from _pool_families(pools, self.tenants)
        yield from _engine_families(pools)
        yield from _gateway_families(gateways)


def _deployment_families(pools: Sequence[ResolvedPool], live: list[dict[str, Any]]) -> Iterator[Metric]:
    """The configured pools, whether their replicas are there, and their targets: a pool whose every
    replica is gone still has these series (at 0 ready), which is what its alert needs."""
    lbl = ["pool", "gpu"]
    info = GaugeMetricFamily(
        f"{P}_pool_info", "A configured pool (always 1).", labels=["pool", "gpu", "model", "engine"]
    )
    desired = GaugeMetricFamily(f"{P}_pool_replicas_desired", "Replicas the config asks for.", labels=lbl)
    ready = GaugeMetricFamily(
        f"{P}_pool_replicas_ready",
        "Replicas publishing their load (engine started) within the load board's expiry.",
        labels=lbl,
    )
    ttft = GaugeMetricFamily(f"{P}_pool_slo_ttft_seconds", "The pool's TTFT target.", labels=lbl)
    tpot = GaugeMetricFamily(f"{P}_pool_slo_tpot_seconds", "The pool's TPOT target.", labels=lbl)
    target = GaugeMetricFamily(
        f"{P}_pool_slo_attainment_target_ratio",
        "Share of requests that should meet both targets.",
        labels=lbl,
    )
    cost = GaugeMetricFamily(
        f"{P}_pool_cost_per_hour",
        "Price of the pool's GPUs per hour (replicas x GPUs x the catalog's or `gpu_prices` price).",
        labels=lbl,
    )
    up: dict[str, int] = defaultdict(int)
    for p in live:
        up[p["pool"]] += 1
    for pool in pools:
        labels = [pool.name, pool.accelerator]
        info.add_metric([*labels, pool.model, pool.engine], 1.0)
        desired.add_metric(labels, float(pool.replicas))
        ready.add_metric(labels, float(up[pool.name]))
        ttft.add_metric(labels, pool.slo.ttft_ms / 1000.0)
        tpot.add_metric(labels, pool.slo.tpot_ms / 1000.0)
        target.add_metric(labels, pool.slo.attainment_target)
        gpus = pool.replicas * pool.gpus_per_replica
        cost.add_metric(labels, gpus * pool.gpu.price_per_hour_relative)
    yield from (info, desired, ready, ttft, tpot, target, cost)


def _pool_families(
    pools: list[tuple[str, dict[str, Any]]], tenants: frozenset[str] | None = None
) -> Iterator[Metric]:
    lbl = ["pool", "replica", "gpu"]
    gauges = {
        "queue_depth": GaugeMetricFamily(
            f"{P}_pool_queue_depth", "Requests waiting for admission.", labels=lbl
        ),
        "queued_tokens": GaugeMetricFamily(
            f"{P}_pool_queued_tokens", "Prompt+max tokens queued.", labels=lbl
        ),
        "in_flight_seqs": GaugeMetricFamily(
            f"{P}_pool_in_flight_seqs", "Sequences in the engine.", labels=lbl
        ),
        "in_flight_tokens": GaugeMetricFamily(
            f"{P}_pool_in_flight_tokens", "KV tokens in flight.", labels=lbl
        ),
        "seq_limit": GaugeMetricFamily(
            f"{P}_pool_seq_limit", "Adaptive in-flight sequence limit.", labels=lbl
        ),
        "token_limit": GaugeMetricFamily(
            f"{P}_pool_token_limit", "Adaptive in-flight token limit.", labels=lbl
        ),
        "recent_slo_attainment": GaugeMetricFamily(
            f"{P}_pool_slo_attainment_ratio", "Share of recent requests meeting both SLOs.", labels=lbl
        ),
        "recent_tpot_s": GaugeMetricFamily(
            f"{P}_pool_measured_tpot_seconds", "Recent mean TPOT.", labels=lbl
        ),
        "recent_ttft_s": GaugeMetricFamily(
            f"{P}_pool_measured_ttft_seconds", "Recent mean TTFT.", labels=lbl
        ),
    }
    counters = {
        "admitted_total": CounterMetricFamily(f"{P}_pool_admitted", "Requests admitted at once.", labels=lbl),
        "released_total": CounterMetricFamily(
            f"{P}_pool_released", "Requests released from the queue.", labels=lbl
        ),
        "finished_total": CounterMetricFamily(f"{P}_pool_finished", "Requests finished.", labels=lbl),
        "slo_met_total": CounterMetricFamily(
            f"{P}_pool_slo_met", "Finished requests meeting both SLOs.", labels=lbl
        ),
        "ttft_slo_met_total": CounterMetricFamily(
            f"{P}_pool_ttft_slo_met",
            "Finished requests meeting the TTFT SLO (queue wait included).",
            labels=lbl,
        ),
        "tpot_slo_met_total": CounterMetricFamily(
            f"{P}_pool_tpot_slo_met", "Finished requests meeting the TPOT SLO.", labels=lbl
        ),
        "queued_total": CounterMetricFamily(
            f"{P}_pool_queued", "Requests that waited in the admission queue.", labels=lbl
        ),
    }
    refused = CounterMetricFamily(f"{P}_pool_refused", "Admission refusals.", labels=[*lbl, "reason"])
    t_lbl = ["pool", "tenant"]
    t_queued = GaugeMetricFamily(f"{P}_tenant_queued_tokens", "Tokens a tenant has queued.", labels=t_lbl)
    t_served = CounterMetricFamily(
        f"{P}_tenant_served_tokens", "Tokens served to a tenant.", labels=[*t_lbl, "kind"]
    )
    tenant_queued: dict[tuple[str, str], float] = defaultdict(float)
    tenant_served: dict[tuple[str, str, str], float] = defaultdict(float)
    for key, p in pools:
        labels = [p["pool"], key.split("/", 1)[-1], p["accelerator"]]
        st = p["admission"]
        for name, fam in gauges.items():
            v = getattr(st, name, None)
            if v is not None:
                fam.add_metric(labels, float(v))
        for name, cfam in counters.items():
            cfam.add_metric(labels, float(getattr(st, name, 0)))
        # every reason from the start (a bounded enum): a counter that first appears at its
        # value after a burst of refusals would show no increase to rate()
        for reason in _REFUSAL_REASONS:
            refused.add_metric([*labels, reason], float(st.refused_total.get(reason, 0)))
        for tid, ts in st.tenants.items():
            tenant = tid if tenants is None or tid in tenants else OTHER_TENANTS
            tenant_queued[(p["pool"], tenant)] += ts.queued_tokens
            tenant_served[(p["pool"], tenant, "prompt")] += ts.served_prompt_tokens
            tenant_served[(p["pool"], tenant, "completion")] += ts.served_completion_tokens
    for (pool, tenant), v in sorted(tenant_queued.items()):
        t_queued.add_metric([pool, tenant], v)
    for (pool, tenant, kind), v in sorted(tenant_served.items()):
        t_served.add_metric([pool, tenant, kind], v)
    yield from gauges.values()
    yield from counters.values()
    yield refused
    yield t_queued
    yield t_served


_ENGINE_ORIGIN = ("pool", "replica", "gpu")


def _engine_families(pools: list[tuple[str, dict[str, Any]]]) -> Iterator[Metric]:
    """Each pool replica's engine families (:class:`~serving.engines.EngineMetrics`: vLLM's
    logger's own, or the simulated engine's under vLLM's names) emitted as they are, every sample
    relabelled with the replica's ``pool``, ``replica`` and ``gpu`` on top of its engine's labels
    (``model_name``, ``engine``, ...). An engine label of one of those names is kept as
    ``exported_<name>``, as Prometheus relabels a scraped target's. A family is one per name: the
    first replica's type and help, a replica whose family of that name has another type (another
    vLLM) is left out of it. Replicas are bounded by the deployment, samples by each engine."""
    fams: dict[str, Metric] = {}
    for key, p in pools:
        em: EngineMetrics | None = p.get("engine_metrics")
        if em is None:
            continue
        origin = dict(zip(_ENGINE_ORIGIN, (p["pool"], key.split("/", 1)[-1], p["accelerator"]), strict=True))
        for f in em.families:
            out = fams.get(f.name)
            if out is None:
                out = fams[f.name] = Metric(f.name, f.documentation, f.type)
            elif out.type != f.type:
                continue
            for s in f.samples:
                labels = {f"exported_{k}" if k in origin else k: v for k, v in s.labels}
                out.add_sample(s.name, {**labels, **origin}, s.value)
    yield from fams.values()


def _gateway_families(gateways: list[tuple[str, GatewayStats]]) -> Iterator[Metric]:
    """Each gateway replica's counters under its own ``gateway`` label (sum them in PromQL)."""
    req = CounterMetricFamily(
        f"{P}_requests", "Requests finished by the gateways.", labels=["gateway", "model", "pool", "outcome"]
    )
    tok = CounterMetricFamily(
        f"{P}_completion_tokens", "Completion tokens returned.", labels=["gateway", "model", "pool"]
    )
    ttft = SummaryMetricFamily(
        f"{P}_ttft_seconds", "Gateway-side time to first token.", labels=["gateway", "pool"]
    )
    route = CounterMetricFamily(
        f"{P}_routing_decisions", "Routing decisions.", labels=["gateway", "pool", "reason"]
    )
    inflight = GaugeMetricFamily(
        f"{P}_gateway_in_flight", "Requests in flight at a gateway replica.", labels=["gateway"]
    )
    gate_limit = GaugeMetricFamily(
        f"{P}_gateway_gate_limit", "Requests the replica's fair gate lets in at once.", labels=["gateway"]
    )
    gate_waiting = GaugeMetricFamily(
        f"{P}_gateway_gate_waiting", "Requests waiting at the replica's fair gate.", labels=["gateway"]
    )
    gate_inside = GaugeMetricFamily(
        f"{P}_gateway_gate_inside",
        "Requests past the replica's fair gate (being read, metered or streamed).",
        labels=["gateway"],
    )
    gate_waited = CounterMetricFamily(
        f"{P}_gateway_gate_waited",
        "Requests that waited at the fair gate before passing.",
        labels=["gateway"],
    )
    gate_refused = CounterMetricFamily(
        f"{P}_gateway_gate_refused",
        "Requests the fair gate refused (503 gateway_busy: too many waiting, or waited too long).",
        labels=["gateway"],
    )
    prefix_req = CounterMetricFamily(
        f"{P}_prefix_routing_requests",
        "Replica choices by cached prefix, by reason (prefix_hit, spill, least_loaded).",
        labels=["gateway", "pool", "reason"],
    )
    prefix_prompt = CounterMetricFamily(
        f"{P}_prefix_routing_prompt_tokens",
        "Prompt tokens routed by cached prefix.",
        labels=["gateway", "pool"],
    )
    prefix_pred = CounterMetricFamily(
        f"{P}_prefix_routing_predicted_cached_tokens",
        "Of those, tokens the router predicted in the chosen replica's cache (compare vllm:prefix_cache_hits).",
        labels=["gateway", "pool"],
    )
    prefix_events = CounterMetricFamily(
        f"{P}_prefix_cache_event_frames",
        "KV-cache event frames from the pool's replicas applied to the router's index.",
        labels=["gateway", "pool"],
    )
    demand = GaugeMetricFamily(
        f"{P}_gateway_loop_demand_ratio",
        "Share of wall time the replica's event loop ran or waited to run (1: saturated).",
        labels=["gateway"],
    )
    for gw, g in sorted(gateways, key=lambda e: e[0]):
        gs = getattr(g, "gate", None)
        if gs is not None:
            gate_limit.add_metric([gw], float(gs.limit))
            gate_waiting.add_metric([gw], float(gs.waiting))
            gate_inside.add_metric([gw], float(gs.past))
            gate_waited.add_metric([gw], float(gs.waited_total))
            gate_refused.add_metric([gw], float(gs.refused_total))
            demand.add_metric([gw], float(getattr(g, "loop_demand", 0.0)))
        for k3, v in sorted(g.requests_total.items()):
            req.add_metric([gw, *k3], v)
        for k2, v in sorted(g.completion_tokens_total.items()):
            tok.add_metric([gw, *k2], v)
        for pool, n in sorted(g.ttft_seconds_count.items()):
            ttft.add_metric([gw, pool], count_value=n, sum_value=g.ttft_seconds_sum.get(pool, 0.0))
        for kr, v in sorted(g.routing_total.items()):
            route.add_metric([gw, *kr], v)
        for kr, v in sorted(getattr(g, "prefix_total", {}).items()):
            prefix_req.add_metric([gw, *kr], v)
        for pool, (prompt, predicted, frames) in sorted(getattr(g, "prefix_tokens", {}).items()):
            prefix_prompt.add_metric([gw, pool], prompt)
            prefix_pred.add_metric([gw, pool], predicted)
            prefix_events.add_metric([gw, pool], frames)
        inflight.add_metric([gw], float(g.in_flight))
    yield from (
        req,
        tok,
        ttft,
        route,
        prefix_req,
        prefix_prompt,
        prefix_pred,
        prefix_events,
        inflight,
        gate_limit,
        gate_waiting,
        gate_inside,
        gate_waited,
        gate_refused,
        demand,
    )


def render(collectors: Iterable[Collector]) -> bytes:
    """The text exposition of the given collectors (a fresh registry per scrape)."""
    reg = CollectorRegistry(auto_describe=False)
    for c in collectors:
        reg.register(c)
    return generate_latest(reg)
