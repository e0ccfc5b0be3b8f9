"""Tenant and key administration applied to the ledger state (and its batch), plus loading.

Each method takes its operation's struct (:mod:`._ops`). Validation happens here, before anything
changes: an operation that raises leaves state and batch untouched.
"""

from __future__ import annotations

import json
import re
import sqlite3

from serving.errors import ConflictError, InvalidInputError, NotFoundError
from serving.tenancy import (
    MAX_CREDITS,
    ApiKeyView,
    TenantLimits,
    TenantView,
    credits_to_ucredits,
    ucredits_to_credits,
)

from ._ops import AddKey, CreateTenant, RevokeKey, TopUp, UpdateTenant
from ._state import KeyRecord, LedgerState, OpenReservation, TenantRecord
from ._store import dumps_models

__all__ = ["AdminOps", "load_state"]


def tenant_view(t: TenantRecord) -> TenantView:
    return TenantView(
        tenant_id=t.tenant_id,
        name=t.name,
        weight=t.weight,
        allowed_models=None if t.allowed_models is None else sorted(t.allowed_models),
        credits=ucredits_to_credits(t.balance_ucredits),
        reserved_credits=ucredits_to_credits(t.reserved_ucredits),
        available_credits=ucredits_to_credits(t.balance_ucredits - t.reserved_ucredits),
        in_flight=t.in_flight,
        limits=t.limits,
        created_at=t.created_at,
    )


def key_view(k: KeyRecord) -> ApiKeyView:
    return ApiKeyView(
        key_id=k.key_id,
        tenant_id=k.tenant_id,
        name=k.name,
        display_prefix=k.display_prefix,
        created_at=k.created_at,
        revoked_at=k.revoked_at,
    )


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-_")[:63] or "tenant"


class AdminOps:
    """Admin mutations on a :class:`LedgerState`."""

    def __init__(self, state: LedgerState) -> None:
        self.s = state

    def tenant(self, tenant_id: str) -> TenantRecord:
        t = self.s.tenants.get(tenant_id)
        if t is None:
            raise NotFoundError(f"No tenant {tenant_id!r}.", param="tenant_id")
        return t

    def create_tenant(self, op: CreateTenant, now: float, ts: float) -> TenantView:
        spec = op.spec
        tenant_id = spec.tenant_id or _slug(spec.name)
        if tenant_id in self.s.tenants:
            raise ConflictError(f"Tenant {tenant_id!r} already exists.", param="tenant_id")
        balance = credits_to_ucredits(spec.credits)
        t = TenantRecord(
            tenant_id,
            spec.name,
            spec.weight,
            None if spec.allowed_models is None else frozenset(spec.allowed_models),
            balance,
            spec.limits,
            ts,
        )
        t.apply_limits(spec.limits, now, self.s.default_limits)
        self.s.tenants[tenant_id] = t
        self.s.batch.statements.append(
            (
                "INSERT INTO tenants VALUES (?,?,?,?,?,?,?,?)",
                (
                    tenant_id,
                    spec.name,
                    spec.weight,
                    dumps_models(spec.allowed_models),
                    balance,
                    spec.limits.model_dump_json(),
                    ts,
                    ts,
                ),
            )
        )
        if balance:
            self._grant(tenant_id, balance, "initial credits", ts)
        return tenant_view(t)

    def _grant(self, tenant_id: str, ucredits: int, note: str, ts: float) -> None:
        self.s.tenants[tenant_id].granted_ucredits += ucredits
        self.s.batch.statements.append(
            (
                "INSERT INTO credit_grants (tenant_id, ucredits, note, granted_at) VALUES (?,?,?,?)",
                (tenant_id, ucredits, note, ts),
            )
        )

    def update_tenant(self, op: UpdateTenant, now: float, ts: float) -> TenantView:
        tenant_id, u = op.tenant_id, op.update
        t = self.tenant(tenant_id)
        if u.allow_all_models and u.allowed_models is not None:
            raise InvalidInputError(
                "Give either allowed_models or allow_all_models, not both.", param="allowed_models"
            )
        if u.name is not None:
            t.name = u.name
        if u.weight is not None:
            t.weight = u.weight
        if u.allow_all_models:
            t.allowed_models = None
        elif u.allowed_models is not None:
            t.allowed_models = frozenset(u.allowed_models)
        if u.limits is not None:
            t.apply_limits(u.limits, now, self.s.default_limits)
        models = None if t.allowed_models is None else sorted(t.allowed_models)
        self.s.batch.statements.append(
            (
                "UPDATE tenants SET name=?, weight=?, allowed_models=?, limits=?, updated_at=? WHERE tenant_id=?",
                (t.name, t.weight, dumps_models(models), t.limits.model_dump_json(), ts, tenant_id),
            )
        )
        return tenant_view(t)

    def top_up(self, op: TopUp, ts: float) -> TenantView:
        t = self.tenant(op.tenant_id)
        ucredits = credits_to_ucredits(op.credits)
        if ucredits <= 0:
            raise InvalidInputError(f"credits must be positive (got {op.credits}).", param="credits")
        if t.balance_ucredits + ucredits > credits_to_ucredits(MAX_CREDITS):
            # Unbounded, a balance outgrows SQLite's 64-bit integers and the whole commit fails.
            raise InvalidInputError(
                f"a top-up of {op.credits:g} credits would take the balance of {t.tenant_id!r} to "
                f"{ucredits_to_credits(t.balance_ucredits + ucredits):g}, above the maximum of "
                f"{MAX_CREDITS:g} credits.",
                param="credits",
            )
        t.balance_ucredits += ucredits
        self._grant(t.tenant_id, ucredits, op.note, ts)
        self.s.batch.set_balance(t.tenant_id, t.balance_ucredits)
        return tenant_view(t)

    def add_key(self, op: AddKey, ts: float) -> ApiKeyView:
        self.tenant(op.tenant_id)
        if op.key_hash in self.s.keys_by_hash or op.key_id in self.s.keys_by_id:
            raise ConflictError("Key already exists.", param="key_id")
        k = KeyRecord(op.key_id, op.tenant_id, op.key_hash, op.display_prefix, op.name, ts)
        self.s.keys_by_hash[k.key_hash] = k
        self.s.keys_by_id[k.key_id] = k
        row = (k.key_id, k.tenant_id, k.key_hash, k.display_prefix, k.name, ts)
        self.s.batch.statements.append(("INSERT INTO api_keys VALUES (?,?,?,?,?,?,NULL)", row))
        return key_view(k)

    def revoke_key(self, op: RevokeKey, ts: float) -> ApiKeyView:
        key_id = op.key_id
        k = self.s.keys_by_id.get(key_id)
        if k is None:
            raise NotFoundError(f"No key {key_id!r}.", param="key_id")
        if k.revoked_at is None:
            k.revoked_at = ts
            self.s.batch.statements.append(("UPDATE api_keys SET revoked_at=? WHERE key_id=?", (ts, key_id)))
        return key_view(k)


def load_state(
    state: LedgerState,
    rows: tuple[list[sqlite3.Row], list[sqlite3.Row], list[sqlite3.Row]],
    now: float,
    ts: float,
    restart_grace_s: float,
) -> None:
    """Fill ``state`` from the file. Open reservations come back held (their gateways may still
    settle them) with ``expires_at`` brought forward to at most ``ts + restart_grace_s``."""
    tenants, keys, reservations = rows
    for r in tenants:
        models = None if r["allowed_models"] is None else frozenset(json.loads(r["allowed_models"]))
        limits = TenantLimits.model_validate_json(r["limits"])
        t = TenantRecord(
            r["tenant_id"], r["name"], r["weight"], models, r["balance_ucredits"], limits, r["created_at"]
        )
        t.apply_limits(limits, now, state.default_limits)
        t.granted_ucredits = r["granted_ucredits"]
        state.tenants[t.tenant_id] = t
    for r in keys:
        k = KeyRecord(
            r["key_id"],
            r["tenant_id"],
            r["key_hash"],
            r["display_prefix"],
            r["name"],
            r["created_at"],
            r["revoked_at"],
        )
        state.keys_by_hash[k.key_hash] = k
        state.keys_by_id[k.key_id] = k
    for r in reservations:
        o = OpenReservation(
            r["request_id"],
            r["tenant_id"],
            r["key_id"],
            r["model"],
            r["prompt_tokens"],
            r["max_tokens"],
            r["reserved_ucredits"],
            r["reserved_tokens"],
            r["created_at"],
            min(r["expires_at"], ts + restart_grace_s),
            now,
            r["progress_tokens"],
        )
        state.open[o.request_id] = o
        t = state.tenants[o.tenant_id]
        t.reserved_ucredits += o.reserved_ucredits
        t.in_flight += 1
