"""The ledger's in-memory state and its enforcement: exact because one writer owns it.

Every operation is applied here synchronously, in arrival order, and appends its row changes to the
current :class:`~._storage.WriteBatch`. Operations arrive as the structs of :mod:`._ops`, as the
gateway built them. Clock-free: callers pass ``now`` (monotonic, for buckets) and ``ts``
(wall clock, for records, grant validity and cap periods).

Two levels: an organization (:class:`TenantRecord`) holds the credits, as grants, and its own
limits; a project (:class:`ProjectRecord`) holds keys, an optional credit cap and its own limits.
A reservation takes both levels or neither. Its credits are *slices* of the organization's grants,
the grant that expires first first; settling charges the slices in that order and releases the
rest. A grant that expires writes off what no reservation holds at once, and the released part of a
slice that outlived its grant when that reservation settles.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import msgspec

from serving.tenancy import DEFAULT_PROJECT, TenantLimits

from ._budget import TokenBudget
from ._ops import Refusal, Reservation, Reserve, Settle, Settlement
from ._policy import (
    BurnRate,
    ModelPrice,
    TokenBucket,
    bucket_rate,
    period_start,
    rate_limit_headers,
    retry_headers,
    utc_day,
)
from ._storage import WriteBatch

__all__ = ["GrantRecord", "LedgerState", "OpenReservation", "ProjectRecord", "TenantRecord"]

RECENT_SETTLED = 200_000
_EWMA_ALPHA = 0.1
_NEVER = math.inf
_PERIOD_NAMES = {"daily": "day", "monthly": "month"}

Slices = tuple[tuple[str, int], ...]
"""``(grant_id, ucredits)`` held by one reservation, in the order they are charged."""


@dataclass(slots=True)
class GrantRecord:
    """Credits from one program; ``remaining`` includes what reservations hold (``reserved``)."""

    grant_id: str
    tenant_id: str
    program: str
    ucredits: int
    remaining: int
    starts_at: float
    expires_at: float | None
    note: str
    granted_at: float
    reserved: int = 0
    written_off: int = 0
    expired: bool = False

    @property
    def order(self) -> tuple[float, float, str]:
        """Charged first: the soonest expiry, then the oldest grant."""
        return (_NEVER if self.expires_at is None else self.expires_at, self.granted_at, self.grant_id)

    def usable(self, ts: float) -> bool:
        return not self.expired and self.starts_at <= ts and (self.expires_at is None or ts < self.expires_at)


def _apply_limits(
    level: TenantRecord | ProjectRecord, limits: TenantLimits, now: float, defaults: TenantLimits
) -> None:
    """Set a level's limits; RPM and TPM left unset come from ``defaults``."""
    level.limits = limits
    level.rpm = _bucket(level.rpm, limits.rpm if limits.rpm is not None else defaults.rpm, now)
    level.tpm = _bucket(level.tpm, limits.tpm if limits.tpm is not None else defaults.tpm, now)


@dataclass(slots=True)
class ProjectRecord:
    tenant_id: str
    project_id: str
    name: str
    weight: float
    allowed_models: frozenset[str] | None
    limits: TenantLimits
    cap_ucredits: int | None
    cap_period: str
    spent_ucredits: int
    period_start: float
    created_at: float
    reserved_ucredits: int = 0
    in_flight: int = 0
    rpm: TokenBucket | None = None
    tpm: TokenBucket | None = None
    ewma_duration_s: float = 1.0

    @property
    def label(self) -> str:
        return f"project '{self.tenant_id}/{self.project_id}'"

    def apply_limits(self, limits: TenantLimits, now: float, defaults: TenantLimits) -> None:
        _apply_limits(self, limits, now, defaults)

    def roll_period(self, ts: float) -> bool:
        """Start a new cap period if ``ts`` is past the current one; True when it did."""
        start = period_start(ts, self.cap_period)
        if start > self.period_start:
            self.period_start, self.spent_ucredits = start, 0
            return True
        return False

    def cap_left(self) -> int | None:
        if self.cap_ucredits is None:
            return None
        return self.cap_ucredits - self.spent_ucredits - self.reserved_ucredits


@dataclass(slots=True)
class TenantRecord:
    """An organization."""

    tenant_id: str
    name: str
    weight: float
    allowed_models: frozenset[str] | None
    balance_ucredits: int
    """What its grants have left (``sum(remaining)``, reserved credits included)."""
    limits: TenantLimits
    created_at: float
    reserved_ucredits: int = 0
    in_flight: int = 0
    rpm: TokenBucket | None = None
    tpm: TokenBucket | None = None
    ewma_duration_s: float = 1.0
    granted_ucredits: int = 0
    """Credits granted since creation, for the low-credit metrics."""
    burn: BurnRate = field(default_factory=BurnRate)
    """Micro-credits charged per second, decayed (in memory only), for the run-out metrics."""
    grants: list[GrantRecord] = field(default_factory=list)
    """Soonest expiry first (:attr:`GrantRecord.order`)."""
    grants_by_id: dict[str, GrantRecord] = field(default_factory=dict)
    projects: dict[str, ProjectRecord] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"organization '{self.tenant_id}'"

    def apply_limits(self, limits: TenantLimits, now: float, defaults: TenantLimits) -> None:
        _apply_limits(self, limits, now, defaults)

    def add_grant(self, g: GrantRecord) -> None:
        self.grants_by_id[g.grant_id] = g
        self.grants.append(g)
        self.grants.sort(key=lambda x: x.order)

    def available(self, ts: float) -> int:
        """Credits a new reservation may take now: usable grants less what is held of them."""
        return sum(g.remaining - g.reserved for g in self.grants if g.usable(ts))

    def take_slices(self, cost: int, ts: float) -> Slices:
        """Hold ``cost`` (at most :meth:`available`) of the usable grants, soonest expiry first."""
        out: list[tuple[str, int]] = []
        left = cost
        for g in self.grants:
            if left <= 0:
                break
            if not g.usable(ts):
                continue
            take = min(left, g.remaining - g.reserved)
            if take > 0:
                g.reserved += take
                out.append((g.grant_id, take))
                left -= take
        assert left <= 0, "take_slices past available()"
        return tuple(out)


def _bucket(old: TokenBucket | None, capacity: int | None, now: float) -> TokenBucket | None:
    if capacity is None:
        return None
    if old is None:
        return TokenBucket(capacity, now)
    old.resize(capacity, now)
    return old


@dataclass(slots=True)
class KeyRecord:
    key_id: str
    tenant_id: str
    key_hash: str
    display_prefix: str
    name: str
    created_at: float
    revoked_at: float | None = None
    project_id: str = DEFAULT_PROJECT
    role: str = "member"


@dataclass(slots=True)
class OpenReservation:
    request_id: str
    tenant_id: str
    key_id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    reserved_ucredits: int
    reserved_tokens: int
    created_at: float
    expires_at: float
    started: float
    """Monotonic time of the reservation (``now`` at reserve, or at load after a restart)."""
    progress_tokens: int | None = None
    lease: int | None = None
    """The ledger connection that holds it (None: in-process, or loaded after a restart)."""
    project_id: str = DEFAULT_PROJECT
    slices: Slices = ()


@dataclass(slots=True)
class Counters:
    """Plain-data counters the metrics exporter reads."""

    tokens: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """(tenant, model, "prompt"|"completion") -> tokens charged."""
    refused: dict[tuple[str, str], int] = field(default_factory=dict)
    """(tenant or "", reason) -> requests refused."""
    credits: dict[str, int] = field(default_factory=dict)
    """tenant -> micro-credits charged."""
    written_off: dict[str, int] = field(default_factory=dict)
    """tenant -> micro-credits of expired grants written off."""


def _least(*values: int | None) -> int | None:
    present = [v for v in values if v is not None]
    return min(present) if present else None


class LedgerState:
    """Organizations, projects, grants, keys, open reservations and buckets; the single place where
    quota is decided."""

    def __init__(
        self,
        prices: dict[str, ModelPrice],
        default_price: ModelPrice,
        default_max_tokens: int,
        reservation_ttl_s: float,
        default_limits: TenantLimits | None = None,
    ) -> None:
        self.prices = prices
        self.default_limits = default_limits or TenantLimits()
        """RPM/TPM of organizations that set none (so every response carries x-ratelimit-*)."""
        self.default_price = default_price
        self.default_max_tokens = default_max_tokens
        self.reservation_ttl_s = reservation_ttl_s
        self.tenants: dict[str, TenantRecord] = {}
        self.keys_by_hash: dict[str, KeyRecord] = {}
        self.keys_by_id: dict[str, KeyRecord] = {}
        self.open: dict[str, OpenReservation] = {}
        self.recent_settled: OrderedDict[str, int] = OrderedDict()
        self.counters = Counters()
        self.batch = WriteBatch()
        self.expiries: list[tuple[float, str, str]] = []
        """Heap of ``(expires_at, tenant_id, grant_id)`` of grants that will expire."""

    def price(self, model: str) -> ModelPrice:
        return self.prices.get(model, self.default_price)

    def take_batch(self) -> WriteBatch:
        batch, self.batch = self.batch, WriteBatch()
        return batch

    def add_grant(self, t: TenantRecord, g: GrantRecord) -> None:
        t.add_grant(g)
        if g.expires_at is not None and not g.expired:
            heapq.heappush(self.expiries, (g.expires_at, t.tenant_id, g.grant_id))

    # -- reserve -----------------------------------------------------------------------------------
    def _refuse(self, kind: str, message: str, tenant: str = "", **kw: object) -> Refusal:
        key = (tenant, kind if kind != "rate_limit_exceeded" else f"rate_limit_{kw.get('limit')}")
        self.counters.refused[key] = self.counters.refused.get(key, 0) + 1
        return Refusal(kind, message, tenant, **kw)  # type: ignore[arg-type]

    def _rate_refusal(
        self,
        t: TenantRecord,
        level: TenantRecord | ProjectRecord,
        limit: str,
        message: str,
        retry_s: float | None,
        now: float,
    ) -> Refusal:
        headers = rate_limit_headers(level.rpm, level.tpm, now)
        if retry_s is not None:
            headers.update(retry_headers(retry_s))
        return self._refuse(
            "rate_limit_exceeded",
            f"{message} ({level.label})",
            t.tenant_id,
            limit=limit,
            retry_after_s=retry_s,
            headers=headers,
        )

    def reserve(self, op: Reserve, now: float, ts: float, lease: int | None = None) -> Reservation | Refusal:
        """Check key, model, size, RPM, concurrency, TPM and credits at the project and at its
        organization; take them all or nothing.

        A refusal for a known tenant carries its ``x-ratelimit-*`` headers, as a success does.
        ``lease``: the connection that will settle it (a resent reserve moves it to the new one)."""
        res = self._reserve(op, now, ts, lease)
        if isinstance(res, Refusal) and res.tenant_id in self.tenants:
            t = self.tenants[res.tenant_id]
            headers = {**rate_limit_headers(t.rpm, t.tpm, now), **res.headers}
            res = msgspec.structs.replace(res, headers=headers)
        return res

    def _reserve(self, op: Reserve, now: float, ts: float, lease: int | None) -> Reservation | Refusal:
        request_id, model, prompt_tokens = op.request_id, op.model, op.prompt_tokens
        key = self.keys_by_hash.get(op.key_hash)
        if key is None or key.revoked_at is not None:
            return self._refuse("invalid_api_key", "Incorrect API key provided.")
        if key.role != "member":
            return self._refuse(
                "invalid_api_key",
                "This is an organization admin key: it manages projects and keys and cannot make "
                "requests; use a project's key.",
            )
        t = self.tenants[key.tenant_id]
        p = t.projects[key.project_id]
        existing = self.open.get(request_id)
        if existing is not None:
            if existing.tenant_id != t.tenant_id:
                return self._refuse("duplicate_request", f"request id {request_id!r} is in use", t.tenant_id)
            existing.lease = lease
            return self._reservation(existing, t, now)
        if request_id in self.recent_settled:
            return self._refuse(
                "duplicate_request", f"request id {request_id!r} was already settled", t.tenant_id
            )
        for level in (t, p):
            if level.allowed_models is not None and model not in level.allowed_models:
                return self._refuse(
                    "model_not_allowed", f"The model `{model}` is not available to this API key.", t.tenant_id
                )
        if p.cap_ucredits is not None and p.roll_period(ts):
            self.batch.set_project(p.tenant_id, p.project_id, p.spent_ucredits, p.period_start)
        price = self.price(model)
        org_left = t.available(ts)
        cap_left = p.cap_left()
        budget = TokenBudget.from_reservation(prompt_tokens, op.max_tokens, op.model_max_len)
        for level in (t, p):
            cap = level.limits.max_tokens_per_request
            if budget.over_cap(cap):
                return self._refuse(
                    "invalid_max_tokens",
                    f"max_tokens {op.max_tokens} exceeds the limit of {cap} of this {level.label}.",
                    t.tenant_id,
                )
        left = org_left if cap_left is None else min(org_left, cap_left)
        effective = budget.grant(
            default_tokens=self.default_max_tokens,
            cap=_least(t.limits.max_tokens_per_request, p.limits.max_tokens_per_request),
            tpm_capacity=_least(
                None if t.tpm is None else t.tpm.capacity, None if p.tpm is None else p.tpm.capacity
            ),
            affordable_tokens=price.affordable_completion_tokens(left - price.prompt_cost(prompt_tokens)),
        )
        tokens = prompt_tokens + effective
        for level in (p, t):  # the project's own limits first: they are the tighter ones
            if (refused := self._check_rates(t, level, tokens, now)) is not None:
                return refused
        cost = price.prompt_cost(prompt_tokens) + price.completion_cost(effective)
        if cost > org_left:
            return self._refuse(
                "insufficient_quota",
                f"You exceeded your current quota: this request needs {cost / 1e6:g} credits,"
                f" {max(0, org_left) / 1e6:g} are available to {t.label}.",
                t.tenant_id,
            )
        if cap_left is not None and cost > cap_left:
            return self._refuse(
                "insufficient_quota",
                f"You exceeded your current quota: this request needs {cost / 1e6:g} credits,"
                f" {max(0, cap_left) / 1e6:g} are left of the credit cap of {p.label}"
                + ("" if p.cap_period == "lifetime" else f" this {_PERIOD_NAMES[p.cap_period]}")
                + ".",
                t.tenant_id,
            )
        for level in (t, p):
            if level.rpm is not None:
                level.rpm.consume(1, now)
            if level.tpm is not None:
                level.tpm.consume(tokens, now)
            level.reserved_ucredits += cost
            level.in_flight += 1
        slices = t.take_slices(cost, ts)
        r = OpenReservation(
            request_id,
            t.tenant_id,
            key.key_id,
            model,
            prompt_tokens,
            effective,
            cost,
            tokens,
            ts,
            ts + self.reservation_ttl_s,
            now,
            lease=lease,
            project_id=p.project_id,
            slices=slices,
        )
        self.open[request_id] = r
        self.batch.open_reservation(r)
        return self._reservation(r, t, now)

    def _check_rates(
        self, t: TenantRecord, level: TenantRecord | ProjectRecord, tokens: int, now: float
    ) -> Refusal | None:
        if level.rpm is not None and not level.rpm.has_capacity(1, now):
            return self._rate_refusal(
                t,
                level,
                "requests",
                f"Rate limit reached: {level.rpm.capacity} requests per minute.",
                level.rpm.retry_after_s(1, now),
                now,
            )
        mc = level.limits.max_concurrency
        if mc is not None and level.in_flight >= mc:
            # No bucket here: with k requests in flight, the first one ends after about mean/k.
            wait_s = max(0.05, level.ewma_duration_s / max(1, level.in_flight))
            return self._rate_refusal(
                t, level, "concurrency", f"Concurrency limit reached: {mc} requests in flight.", wait_s, now
            )
        if level.tpm is not None and not level.tpm.has_capacity(tokens, now):
            retry = level.tpm.retry_after_s(tokens, now)
            cap = level.tpm.capacity
            msg = (
                f"Rate limit reached: {cap} tokens per minute; this request needs {tokens}."
                if retry is not None
                else f"Request too large: needs {tokens} tokens, above the limit of {cap} tokens per minute."
            )
            return self._rate_refusal(t, level, "tokens", msg, retry, now)
        return None

    def _reservation(self, r: OpenReservation, t: TenantRecord, now: float) -> Reservation:
        p = t.projects[r.project_id]
        return Reservation(
            r.request_id,
            r.tenant_id,
            r.key_id,
            r.model,
            r.prompt_tokens,
            r.max_tokens,
            r.reserved_ucredits,
            t.weight,
            bucket_rate(p.rpm or t.rpm, p.tpm or t.tpm, now),
            project_id=p.project_id,
            project_weight=p.weight,
        )

    # -- progress and settle -----------------------------------------------------------------------
    def progress(self, request_id: str, completion_tokens: int) -> bool:
        """Record tokens produced so far (used only if the request's settlement never arrives)."""
        r = self.open.get(request_id)
        if r is None:
            return False
        r.progress_tokens = completion_tokens
        self.batch.record_progress(request_id, completion_tokens)
        return True

    def settle(self, op: Settle, now: float, ts: float, settled_charge: int | None = None) -> Settlement:
        """Charge the usage (capped at the reservation) to the project and the organization's grant
        slices, release the rest. Idempotent by request id.

        ``settled_charge`` is the caller's look-up in the durable log for ids no longer in memory.
        """
        request_id, prompt_tokens, completion_tokens = op.request_id, op.prompt_tokens, op.completion_tokens
        r = self.open.pop(request_id, None)
        if r is None:
            charged = self.recent_settled.get(request_id, settled_charge)
            if charged is None:
                return Settlement(request_id, 0, 0, unknown=True)
            return Settlement(request_id, charged, 0, duplicate=True)
        t = self.tenants[r.tenant_id]
        p = t.projects[r.project_id]
        price = self.price(r.model)
        cached_tokens = min(max(op.cached_tokens, 0), prompt_tokens)
        p_cost = price.prompt_cost(prompt_tokens, cached_tokens)
        c_cost = price.completion_cost(completion_tokens)
        charged = min(p_cost + c_cost, r.reserved_ucredits)
        self._charge_slices(t, r, charged, ts)
        t.balance_ucredits -= charged
        if charged:
            t.burn.add(charged, now)
        unused = r.reserved_tokens - prompt_tokens - completion_tokens
        duration = max(0.0, now - r.started)
        for level in (t, p):
            level.reserved_ucredits -= r.reserved_ucredits
            level.in_flight -= 1
            if level.tpm is not None and unused > 0:
                level.tpm.refund(unused, now)
            level.ewma_duration_s += _EWMA_ALPHA * (duration - level.ewma_duration_s)
        p.spent_ucredits += charged
        if p.cap_ucredits is not None:
            self.batch.set_project(p.tenant_id, p.project_id, p.spent_ucredits, p.period_start)
        c = self.counters.tokens
        for kind, n in (("prompt", prompt_tokens), ("completion", completion_tokens)):
            k = (t.tenant_id, r.model, kind)
            c[k] = c.get(k, 0) + n
        cc = self.counters.credits
        cc[t.tenant_id] = cc.get(t.tenant_id, 0) + charged
        self.recent_settled[request_id] = charged
        if len(self.recent_settled) > RECENT_SETTLED:
            self.recent_settled.popitem(last=False)
        p_charged = min(p_cost, charged)
        event = (
            request_id,
            t.tenant_id,
            r.key_id,
            r.model,
            op.pool,
            op.gpu_type,
            prompt_tokens,
            completion_tokens,
            p_charged,
            charged - p_charged,
            charged,
            r.created_at,
            ts,
            op.outcome,
            r.project_id,
            cached_tokens,
        )
        self.batch.close_reservation(request_id, event, utc_day(ts), t.tenant_id, t.balance_ucredits)
        return Settlement(request_id, charged, r.reserved_ucredits - charged)

    def _charge_slices(self, t: TenantRecord, r: OpenReservation, charged: int, ts: float) -> None:
        """Charge ``charged`` to the reservation's slices in order and release the rest; the
        released part of a slice whose grant has expired meanwhile is written off."""
        left = charged
        for grant_id, held in r.slices:
            g = t.grants_by_id[grant_id]
            take = min(held, left)
            left -= take
            g.reserved -= held
            g.remaining -= take
            if g.expired and held > take:
                self._write_off(t, g, held - take, ts, r.request_id)
            self.batch.set_grant(g)

    def _write_off(
        self, t: TenantRecord, g: GrantRecord, ucredits: int, ts: float, request_id: str | None
    ) -> None:
        g.remaining -= ucredits
        g.written_off += ucredits
        t.balance_ucredits -= ucredits
        wo = self.counters.written_off
        wo[t.tenant_id] = wo.get(t.tenant_id, 0) + ucredits
        self.batch.grant_event(g, "written_off", ucredits, ts, request_id)
        self.batch.set_balance(t.tenant_id, t.balance_ucredits)

    def end_lease(self, lease: int, expires_at: float) -> int:
        """Bring the expiry of the reservations ``lease`` holds forward to ``expires_at``."""
        n = 0
        for r in self.open.values():
            if r.lease == lease:
                r.expires_at = min(r.expires_at, expires_at)
                n += 1
        return n

    def expire(self, now: float, ts: float) -> list[Settlement]:
        """Resolve reservations past ``expires_at`` by the crash rule (charge the prompt and the
        completion tokens of the last progress record if there is one, else release everything),
        and expire grants past their ``expires_at`` (write off what no reservation holds)."""
        done = [
            self.settle(
                Settle(r.request_id, 0, 0, "expired_released")
                if r.progress_tokens is None
                else Settle(r.request_id, r.prompt_tokens, r.progress_tokens, "expired_charged"),
                now,
                ts,
            )
            for r in [r for r in self.open.values() if r.expires_at <= ts]
        ]
        self.expire_grants(ts)
        return done

    def expire_grants(self, ts: float) -> int:
        """Expire every grant due by ``ts``; returns how many."""
        n = 0
        while self.expiries and self.expiries[0][0] <= ts:
            _, tenant_id, grant_id = heapq.heappop(self.expiries)
            t = self.tenants.get(tenant_id)
            g = None if t is None else t.grants_by_id.get(grant_id)
            if t is None or g is None or g.expired:
                continue
            g.expired = True
            self._write_off(t, g, g.remaining - g.reserved, ts, None)
            self.batch.set_grant(g)
            n += 1
        return n
