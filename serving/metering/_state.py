"""The ledger's in-memory state and its enforcement: exact because one writer owns it.

Every operation is applied here synchronously, in arrival order, and appends its row changes to the
current :class:`~._store.WriteBatch`. Operations arrive as the structs of :mod:`._ops`, as the
gateway built them. Clock-free: callers pass ``now`` (monotonic, for buckets) and ``ts``
(wall clock, for records).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import msgspec

from serving.tenancy import TenantLimits

from ._budget import TokenBudget
from ._ops import Refusal, Reservation, Reserve, Settle, Settlement
from ._policy import ModelPrice, TokenBucket, bucket_rate, rate_limit_headers, retry_headers
from ._store import WriteBatch

__all__ = ["LedgerState", "OpenReservation", "TenantRecord"]

RECENT_SETTLED = 200_000
_EWMA_ALPHA = 0.1


@dataclass(slots=True)
class TenantRecord:
    tenant_id: str
    name: str
    weight: float
    allowed_models: frozenset[str] | None
    balance_ucredits: int
    limits: TenantLimits
    created_at: float
    reserved_ucredits: int = 0
    in_flight: int = 0
    rpm: TokenBucket | None = None
    tpm: TokenBucket | None = None
    ewma_duration_s: float = 1.0
    granted_ucredits: int = 0
    """Credits granted since creation (initial credits and top-ups), for the low-credit metrics."""

    def apply_limits(self, limits: TenantLimits, now: float, defaults: TenantLimits) -> None:
        """Set the tenant's limits; RPM and TPM it leaves unset come from ``defaults``."""
        self.limits = limits
        self.rpm = _bucket(self.rpm, limits.rpm if limits.rpm is not None else defaults.rpm, now)
        self.tpm = _bucket(self.tpm, limits.tpm if limits.tpm is not None else defaults.tpm, now)


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


@dataclass(slots=True)
class Counters:
    """Plain-data counters the metrics exporter reads."""

    tokens: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """(tenant, model, "prompt"|"completion") -> tokens charged."""
    refused: dict[tuple[str, str], int] = field(default_factory=dict)
    """(tenant or "", reason) -> requests refused."""
    credits: dict[str, int] = field(default_factory=dict)
    """tenant -> micro-credits charged."""


class LedgerState:
    """Tenants, keys, open reservations and buckets; the single place where quota is decided."""

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
        """RPM/TPM of tenants that set none (so every tenant's responses carry x-ratelimit-*)."""
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

    def price(self, model: str) -> ModelPrice:
        return self.prices.get(model, self.default_price)

    def take_batch(self) -> WriteBatch:
        batch, self.batch = self.batch, WriteBatch()
        return batch

    # -- reserve -----------------------------------------------------------------------------------
    def _refuse(self, kind: str, message: str, tenant: str = "", **kw: object) -> Refusal:
        key = (tenant, kind if kind != "rate_limit_exceeded" else f"rate_limit_{kw.get('limit')}")
        self.counters.refused[key] = self.counters.refused.get(key, 0) + 1
        return Refusal(kind, message, tenant, **kw)  # type: ignore[arg-type]

    def _rate_refusal(
        self, t: TenantRecord, limit: str, message: str, retry_s: float | None, now: float
    ) -> Refusal:
        headers = rate_limit_headers(t.rpm, t.tpm, now)
        if retry_s is not None:
            headers.update(retry_headers(retry_s))
        return self._refuse(
            "rate_limit_exceeded", message, t.tenant_id, limit=limit, retry_after_s=retry_s, headers=headers
        )

    def reserve(self, op: Reserve, now: float, ts: float, lease: int | None = None) -> Reservation | Refusal:
        """Check key, model, size, RPM, concurrency, TPM and credits; take them all or nothing.

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
        t = self.tenants[key.tenant_id]
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
        if t.allowed_models is not None and model not in t.allowed_models:
            return self._refuse(
                "model_not_allowed", f"The model `{model}` is not available to this API key.", t.tenant_id
            )
        price = self.price(model)
        available = t.balance_ucredits - t.reserved_ucredits
        cap = t.limits.max_tokens_per_request
        budget = TokenBudget.from_reservation(prompt_tokens, op.max_tokens, op.model_max_len)
        if budget.over_cap(cap):
            return self._refuse(
                "invalid_max_tokens",
                f"max_tokens {op.max_tokens} exceeds this tenant's limit of {cap}.",
                t.tenant_id,
            )
        effective = budget.grant(
            default_tokens=self.default_max_tokens,
            cap=cap,
            tpm_capacity=None if t.tpm is None else t.tpm.capacity,
            affordable_tokens=price.affordable_completion_tokens(
                available - price.prompt_cost(prompt_tokens)
            ),
        )
        if t.rpm is not None and not t.rpm.has_capacity(1, now):
            return self._rate_refusal(
                t,
                "requests",
                f"Rate limit reached: {t.rpm.capacity} requests per minute.",
                t.rpm.retry_after_s(1, now),
                now,
            )
        mc = t.limits.max_concurrency
        if mc is not None and t.in_flight >= mc:
            # No bucket here: with k requests in flight, the first one ends after about mean/k.
            wait_s = max(0.05, t.ewma_duration_s / max(1, t.in_flight))
            return self._rate_refusal(
                t, "concurrency", f"Concurrency limit reached: {mc} requests in flight.", wait_s, now
            )
        tokens = prompt_tokens + effective
        if t.tpm is not None and not t.tpm.has_capacity(tokens, now):
            retry = t.tpm.retry_after_s(tokens, now)
            msg = (
                f"Rate limit reached: {t.tpm.capacity} tokens per minute; this request needs {tokens}."
                if retry is not None
                else f"Request too large: needs {tokens} tokens, above the limit of {t.tpm.capacity} tokens per minute."
            )
            return self._rate_refusal(t, "tokens", msg, retry, now)
        cost = price.prompt_cost(prompt_tokens) + price.completion_cost(effective)
        if cost > available:
            return self._refuse(
                "insufficient_quota",
                f"You exceeded your current quota: this request needs {cost / 1e6:g} credits,"
                f" {max(0, available) / 1e6:g} are available.",
                t.tenant_id,
            )
        if t.rpm is not None:
            t.rpm.consume(1, now)
        if t.tpm is not None:
            t.tpm.consume(tokens, now)
        t.reserved_ucredits += cost
        t.in_flight += 1
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
        )
        self.open[request_id] = r
        self.batch.open_reservation(
            (
                request_id,
                t.tenant_id,
                key.key_id,
                model,
                prompt_tokens,
                effective,
                cost,
                tokens,
                ts,
                r.expires_at,
            )
        )
        return self._reservation(r, t, now)

    def _reservation(self, r: OpenReservation, t: TenantRecord, now: float) -> Reservation:
        return Reservation(
            r.request_id,
            r.tenant_id,
            r.key_id,
            r.model,
            r.prompt_tokens,
            r.max_tokens,
            r.reserved_ucredits,
            t.weight,
            bucket_rate(t.rpm, t.tpm, now),
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
        """Charge the usage (capped at the reservation), release the rest. Idempotent by request id.

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
        price = self.price(r.model)
        p_cost = price.prompt_cost(prompt_tokens)
        c_cost = price.completion_cost(completion_tokens)
        charged = min(p_cost + c_cost, r.reserved_ucredits)
        t.balance_ucredits -= charged
        t.reserved_ucredits -= r.reserved_ucredits
        t.in_flight -= 1
        if t.tpm is not None:
            unused = r.reserved_tokens - prompt_tokens - completion_tokens
            if unused > 0:
                t.tpm.refund(unused, now)
        t.ewma_duration_s += _EWMA_ALPHA * (max(0.0, now - r.started) - t.ewma_duration_s)
        c = self.counters.tokens
        for kind, n in (("prompt", prompt_tokens), ("completion", completion_tokens)):
            k = (t.tenant_id, r.model, kind)
            c[k] = c.get(k, 0) + n
        cc = self.counters.credits
        cc[t.tenant_id] = cc.get(t.tenant_id, 0) + charged
        self.recent_settled[request_id] = charged
        if len(self.recent_settled) > RECENT_SETTLED:
            self.recent_settled.popitem(last=False)
        event = (
            request_id,
            t.tenant_id,
            r.key_id,
            r.model,
            op.pool,
            op.gpu_type,
            prompt_tokens,
            completion_tokens,
            min(p_cost, charged),
            charged - min(p_cost, charged),
            charged,
            r.created_at,
            ts,
            op.outcome,
        )
        self.batch.close_reservation(request_id, event, t.tenant_id, t.balance_ucredits)
        return Settlement(request_id, charged, r.reserved_ucredits - charged)

    def end_lease(self, lease: int, expires_at: float) -> int:
        """Bring the expiry of the reservations ``lease`` holds forward to ``expires_at``."""
        n = 0
        for r in self.open.values():
            if r.lease == lease:
                r.expires_at = min(r.expires_at, expires_at)
                n += 1
        return n

    def expire(self, now: float, ts: float) -> list[Settlement]:
        """Resolve reservations past ``expires_at`` by the crash rule: charge the prompt and the
        completion tokens of the last progress record if there is one, else release everything."""
        return [
            self.settle(
                Settle(r.request_id, 0, 0, "expired_released")
                if r.progress_tokens is None
                else Settle(r.request_id, r.prompt_tokens, r.progress_tokens, "expired_charged"),
                now,
                ts,
            )
            for r in [r for r in self.open.values() if r.expires_at <= ts]
        ]
