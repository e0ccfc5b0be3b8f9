"""Ledger statistics as plain data, and their Prometheus families.

The ledger fills :class:`LedgerStats`; the gateway fetches a snapshot and hands it to
:class:`LedgerCollector`, registered on the gateway's registry. Tenant labels come from the tenant
table, model labels from charged requests of allowed models; nothing comes from request content.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "COMMIT_LATENCY_BOUNDS_S",
    "LOW_CREDIT_RATIOS",
    "LOW_CREDIT_TENANTS",
    "LatencyHistogram",
    "LedgerCollector",
    "LedgerStats",
    "low_credit",
]

COMMIT_LATENCY_BOUNDS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
LOW_CREDIT_TENANTS = 20
"""How many tenants the bounded low-credit gauge names: those with the least of their credits left."""
LOW_CREDIT_RATIOS = (0.01, 0.05, 0.1, 0.25, 0.5)
"""Thresholds of the count gauge ``tokenweir_tenants_below_credit_ratio{ratio=...}`` (share of the
credits granted that is left)."""


@dataclass(slots=True)
class LatencyHistogram:
    """Fixed-bucket histogram (non-cumulative counts; the last bucket is +Inf)."""

    bounds_s: tuple[float, ...] = COMMIT_LATENCY_BOUNDS_S
    counts: list[int] = field(default_factory=lambda: [0] * (len(COMMIT_LATENCY_BOUNDS_S) + 1))
    sum_s: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(self.bounds_s, seconds)] += 1
        self.sum_s += seconds
        self.count += 1


@dataclass(slots=True)
class LedgerStats:
    """One snapshot of the ledger (picklable: it crosses from the ledger actor to the gateway)."""

    tokens_charged: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """(tenant, model, kind) -> tokens; kind is ``prompt`` or ``completion``."""
    refused: dict[tuple[str, str], int] = field(default_factory=dict)
    """(tenant, reason) -> requests refused; tenant ``""`` for unknown keys."""
    credits_remaining: dict[str, float] = field(default_factory=dict)
    credits_reserved: dict[str, float] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    rate_limit_utilisation: dict[tuple[str, str], float] = field(default_factory=dict)
    """(tenant, ``requests``|``tokens``|``concurrency``) -> fraction of the limit in use, 0..1."""
    credits_granted: dict[str, float] = field(default_factory=dict)
    """Credits granted to each tenant since it was created (initial credits and top-ups)."""
    credits_charged: dict[str, float] = field(default_factory=dict)
    """Credits charged to each tenant since the ledger started (a counter)."""
    low_credit: list[tuple[str, float]] = field(default_factory=list)
    """The (at most :data:`LOW_CREDIT_TENANTS`) tenants with the smallest share of their granted
    credits left, as (tenant, remaining / granted): bounded whatever the number of tenants."""
    tenants_below_ratio: dict[float, int] = field(default_factory=dict)
    """For each of :data:`LOW_CREDIT_RATIOS`, how many tenants have less than that share left."""
    commit_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    commits_total: int = 0
    ops_total: int = 0


def low_credit(
    remaining: dict[str, float], granted: dict[str, float], n: int = LOW_CREDIT_TENANTS
) -> tuple[list[tuple[str, float]], dict[float, int]]:
    """The ``n`` tenants with the smallest share of their granted credits left (ties by id), and a
    count of tenants below each of :data:`LOW_CREDIT_RATIOS`. Tenants never granted credits are
    left out (they have no share to run out of)."""
    ratios = sorted((max(0.0, remaining.get(t, 0.0)) / g, t) for t, g in granted.items() if g > 0)
    below = {r: bisect.bisect_left(ratios, (r, "")) for r in LOW_CREDIT_RATIOS}
    return [(t, ratio) for ratio, t in ratios[:n]], below


class LedgerCollector(Collector):
    """A prometheus-client collector over the latest :class:`LedgerStats` (set with :meth:`update`)."""

    def __init__(self, prefix: str = "tokenweir") -> None:
        self.prefix = prefix
        self.stats = LedgerStats()

    def update(self, stats: LedgerStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s, p = self.stats, self.prefix
        tokens = CounterMetricFamily(
            f"{p}_tokens_charged", "Tokens charged.", labels=["tenant", "model", "kind"]
        )
        for (tenant, model, kind), n in sorted(s.tokens_charged.items()):
            tokens.add_metric([tenant, model, kind], n)
        refused = CounterMetricFamily(
            f"{p}_requests_refused", "Requests refused.", labels=["tenant", "reason"]
        )
        for (tenant, reason), n in sorted(s.refused.items()):
            refused.add_metric([tenant, reason], n)
        remaining = GaugeMetricFamily(f"{p}_credits_remaining", "Credit balance.", labels=["tenant"])
        for tenant, v in sorted(s.credits_remaining.items()):
            remaining.add_metric([tenant], v)
        reserved = GaugeMetricFamily(
            f"{p}_credits_reserved", "Credits held by requests in flight.", labels=["tenant"]
        )
        for tenant, v in sorted(s.credits_reserved.items()):
            reserved.add_metric([tenant], v)
        util = GaugeMetricFamily(
            f"{p}_rate_limit_utilisation_ratio",
            "Fraction of a rate limit in use.",
            labels=["tenant", "limit"],
        )
        for (tenant, limit), v in sorted(s.rate_limit_utilisation.items()):
            util.add_metric([tenant, limit], v)
        granted = GaugeMetricFamily(
            f"{p}_credits_granted", "Credits granted (initial credits and top-ups).", labels=["tenant"]
        )
        for tenant, v in sorted(s.credits_granted.items()):
            granted.add_metric([tenant], v)
        charged = CounterMetricFamily(
            f"{p}_credits_charged", "Credits charged since the ledger started.", labels=["tenant"]
        )
        for tenant, v in sorted(s.credits_charged.items()):
            charged.add_metric([tenant], v)
        lowest = GaugeMetricFamily(
            f"{p}_credits_low_remaining_ratio",
            f"Share of granted credits left, for the {LOW_CREDIT_TENANTS} tenants with the least left.",
            labels=["tenant"],
        )
        for tenant, v in s.low_credit:
            lowest.add_metric([tenant], v)
        below = GaugeMetricFamily(
            f"{p}_tenants_below_credit_ratio",
            "Tenants with less than `ratio` of their granted credits left.",
            labels=["ratio"],
        )
        for ratio, n in sorted(s.tenants_below_ratio.items()):
            below.add_metric([str(ratio)], n)
        h = s.commit_latency
        buckets, acc = [], 0
        for bound, n in zip([*map(str, h.bounds_s), "+Inf"], h.counts, strict=True):
            acc += n
            buckets.append((bound, acc))
        latency = HistogramMetricFamily(
            f"{p}_ledger_commit_latency_seconds",
            "Ledger group-commit latency.",
            buckets=buckets,
            sum_value=h.sum_s,
        )
        commits = CounterMetricFamily(f"{p}_ledger_commits", "Ledger group commits.", value=s.commits_total)
        ops = CounterMetricFamily(f"{p}_ledger_operations", "Ledger operations applied.", value=s.ops_total)
        yield from (tokens, refused, remaining, reserved, granted, charged, lowest, below, util)
        yield from (latency, commits, ops)
