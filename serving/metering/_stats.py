"""Ledger statistics as plain data, and their Prometheus families.

The ledger fills :class:`LedgerStats`; the gateway fetches a snapshot and hands it to
:class:`LedgerCollector`, registered on the gateway's registry. Tenant labels come from the tenant
table, model labels from charged requests of allowed models; nothing comes from request content.

Credit alerts must see every organization, yet per-organization series exist only for the tracked
ones (:func:`fold_tenants`). So the ledger, which sees all of them, ranks them itself and exports a
bounded few: the :data:`LOW_CREDIT_TENANTS` with the least share of their credits left and the
:data:`RUN_OUT_TENANTS` that run out soonest at their burn rate (any organization, tracked or not),
with counts over all of them below each ratio and within each horizon. That is at most 40 tenant
series plus 9 counts however many organizations there are.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.tenancy import OTHER_TENANTS

__all__ = [
    "COMMIT_LATENCY_BOUNDS_S",
    "LOW_CREDIT_RATIOS",
    "LOW_CREDIT_TENANTS",
    "RUN_OUT_HORIZONS_H",
    "RUN_OUT_TENANTS",
    "LatencyHistogram",
    "LedgerCollector",
    "LedgerStats",
    "fold_tenants",
    "low_credit",
    "run_out",
]

COMMIT_LATENCY_BOUNDS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
LOW_CREDIT_TENANTS = 20
"""How many tenants the bounded low-credit gauge names: those with the least of their credits left."""
LOW_CREDIT_RATIOS = (0.01, 0.05, 0.1, 0.25, 0.5)
"""Thresholds of the count gauge ``tokenweir_tenants_below_credit_ratio{ratio=...}`` (share of the
credits granted that is left)."""
RUN_OUT_TENANTS = 20
"""How many tenants the bounded run-out gauge names: those that run out of credits soonest at their
burn rate."""
RUN_OUT_HORIZONS_H = (1, 6, 24, 72)
"""Horizons, in hours, of the count gauge ``tokenweir_tenants_running_out{within="24h"}``."""


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
    run_out: list[tuple[str, float]] = field(default_factory=list)
    """The (at most :data:`RUN_OUT_TENANTS`) tenants that run out of credits soonest at their
    decayed burn rate, as (tenant, seconds left): every organization is ranked, tracked or not."""
    tenants_running_out: dict[int, int] = field(default_factory=dict)
    """For each of :data:`RUN_OUT_HORIZONS_H`, how many tenants run out within that many hours."""
    commit_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    commits_total: int = 0
    ops_total: int = 0
    writes_total: dict[str, int] = field(default_factory=dict)
    """Operations that changed the ledger, by kind (``reserve``, ``settle``, ``progress``,
    ``admin``, ``release``): a ``release`` (a settlement that charged nothing, e.g. a pool's
    refusal) rides on the next commit; the others are answered once durable."""
    labelled_tenants: frozenset[str] | None = None
    """Organizations with their own ``tenant`` label; the others are summed under
    :data:`OTHER_TENANTS` (None: every one is labelled)."""
    aggregated_tenants: int = 0
    """How many organizations are summed under :data:`OTHER_TENANTS`."""


def low_credit(
    remaining: dict[str, float], granted: dict[str, float], n: int = LOW_CREDIT_TENANTS
) -> tuple[list[tuple[str, float]], dict[float, int]]:
    """The ``n`` tenants with the smallest share of their granted credits left (ties by id), and a
    count of tenants below each of :data:`LOW_CREDIT_RATIOS`. Tenants never granted credits are
    left out (they have no share to run out of)."""
    ratios = sorted((max(0.0, remaining.get(t, 0.0)) / g, t) for t, g in granted.items() if g > 0)
    below = {r: bisect.bisect_left(ratios, (r, "")) for r in LOW_CREDIT_RATIOS}
    return [(t, ratio) for ratio, t in ratios[:n]], below


def run_out(
    remaining: dict[str, float], burn_per_s: dict[str, float], n: int = RUN_OUT_TENANTS
) -> tuple[list[tuple[str, float]], dict[int, int]]:
    """The ``n`` tenants with the fewest seconds of credits left at their burn rate (remaining
    credits, at least 0, over credits per second; ties by id), and a count of tenants that run out
    within each of :data:`RUN_OUT_HORIZONS_H`. Tenants burning nothing are left out (they never run
    out). Pure: O(tenants log tenants), a few milliseconds at 5,000 organizations."""
    left = sorted((max(0.0, remaining.get(t, 0.0)) / r, t) for t, r in burn_per_s.items() if r > 0)
    within = {h: bisect.bisect_left(left, (h * 3600.0, "")) for h in RUN_OUT_HORIZONS_H}
    return [(t, seconds) for seconds, t in left[:n]], within


def fold_tenants(s: LedgerStats, tracked: frozenset[str] | None, budget: int) -> LedgerStats:
    """``s`` with per-organization series only for ``tracked`` organizations (None: every one) and
    at most ``budget`` per-organization series in all: organizations are labelled in id order while
    their series fit; the rest are summed under :data:`OTHER_TENANTS` (counters and balances add up;
    rate-limit utilisation, a per-limit ratio, is not exported for them). Pure; bounded output
    whatever the number of organizations."""
    per: dict[str, int] = {}
    for tenant, *_ in s.tokens_charged:
        per[tenant] = per.get(tenant, 0) + 1
    for tenant, _ in s.refused:
        per[tenant] = per.get(tenant, 0) + 1
    for tenant, _ in s.rate_limit_utilisation:
        per[tenant] = per.get(tenant, 0) + 1
    for tenant in s.credits_remaining:
        per[tenant] = per.get(tenant, 0) + 5  # remaining, reserved, granted, charged, in flight
    labelled: set[str] = {""}  # unknown keys' refusals
    used = 0
    for tenant in sorted(t for t in per if t and (tracked is None or t in tracked)):
        if used + per[tenant] > budget:
            break
        labelled.add(tenant)
        used += per[tenant]
    if len(labelled) == len(per) + ("" not in per):
        return s

    def lbl(t: str) -> str:
        return t if t in labelled else OTHER_TENANTS

    def fold1(d: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out[lbl(k)] = out.get(lbl(k), 0) + v
        return out

    def fold_first(d: dict[tuple[str, ...], int]) -> dict[tuple[str, ...], int]:
        out: dict[tuple[str, ...], int] = {}
        for k, v in d.items():
            kk = (lbl(k[0]), *k[1:])
            out[kk] = out.get(kk, 0) + v
        return out

    return LedgerStats(
        tokens_charged=fold_first(s.tokens_charged),  # type: ignore[arg-type]
        refused=fold_first(s.refused),  # type: ignore[arg-type]
        credits_remaining=fold1(s.credits_remaining),
        credits_reserved=fold1(s.credits_reserved),
        in_flight=fold1(s.in_flight),
        rate_limit_utilisation={k: v for k, v in s.rate_limit_utilisation.items() if k[0] in labelled},
        credits_granted=fold1(s.credits_granted),
        credits_charged=fold1(s.credits_charged),
        low_credit=s.low_credit,
        tenants_below_ratio=s.tenants_below_ratio,
        run_out=s.run_out,
        tenants_running_out=s.tenants_running_out,
        commit_latency=s.commit_latency,
        commits_total=s.commits_total,
        ops_total=s.ops_total,
        writes_total=s.writes_total,
        labelled_tenants=frozenset(labelled - {""}),
        aggregated_tenants=sum(1 for t in s.credits_remaining if t not in labelled),
    )


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
        soonest = GaugeMetricFamily(
            f"{p}_credits_run_out_seconds",
            f"Seconds until the credits run out at the decayed burn rate (about the last hour's),"
            f" for the {RUN_OUT_TENANTS} tenants that run out soonest, tracked or not.",
            labels=["tenant"],
        )
        for tenant, v in s.run_out:
            soonest.add_metric([tenant], v)
        running_out = GaugeMetricFamily(
            f"{p}_tenants_running_out",
            "Tenants whose credits run out `within` that many hours at their decayed burn rate.",
            labels=["within"],
        )
        for hours, n in sorted(s.tenants_running_out.items()):
            running_out.add_metric([f"{hours}h"], n)
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
        writes = CounterMetricFamily(
            f"{p}_ledger_writes",
            "Ledger operations that changed it, by kind; a release (a settlement that charged nothing,"
            " e.g. a pool refusal) rides on the next commit, the others are answered once durable.",
            labels=["kind"],
        )
        for kind in ("reserve", "settle", "progress", "admin", "release"):
            writes.add_metric([kind], s.writes_total.get(kind, 0))
        aggregated = GaugeMetricFamily(
            f"{p}_metrics_tenants_aggregated",
            f'Organizations without their own tenant label (summed under tenant="{OTHER_TENANTS}").',
            value=s.aggregated_tenants,
        )
        yield from (tokens, refused, remaining, reserved, granted, charged, util, aggregated)
        yield from (lowest, below, soonest, running_out)
        yield from (latency, commits, ops, writes)
