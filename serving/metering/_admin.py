"""Organization, project, grant and key administration applied to the ledger state (and its
batch), plus loading.

Each method takes its operation's struct (:mod:`._ops`). Validation happens here, before anything
changes: an operation that raises leaves state and batch untouched.
"""

from __future__ import annotations

import json
import re
import secrets

from serving.errors import ConflictError, InvalidInputError, NotFoundError
from serving.tenancy import (
    DEFAULT_PROJECT,
    MAX_CREDITS,
    ApiKeyView,
    GrantCreate,
    GrantView,
    ProjectView,
    TenantLimits,
    TenantView,
    credits_to_ucredits,
    ucredits_to_credits,
)

from ._ops import (
    AddKey,
    CreateGrant,
    CreateProject,
    CreateTenant,
    RevokeKey,
    TopUp,
    UpdateProject,
    UpdateTenant,
)
from ._policy import period_start
from ._state import GrantRecord, KeyRecord, LedgerState, OpenReservation, ProjectRecord, TenantRecord
from ._storage import LoadedRows, dumps_models, dumps_slices

__all__ = ["AdminOps", "grant_view", "key_view", "load_state", "project_view", "tenant_view"]


def tenant_view(t: TenantRecord, ts: float) -> TenantView:
    available = t.available(ts)
    return TenantView(
        tenant_id=t.tenant_id,
        name=t.name,
        weight=t.weight,
        allowed_models=None if t.allowed_models is None else sorted(t.allowed_models),
        credits=ucredits_to_credits(t.balance_ucredits),
        reserved_credits=ucredits_to_credits(t.reserved_ucredits),
        available_credits=ucredits_to_credits(available),
        in_flight=t.in_flight,
        limits=t.limits,
        created_at=t.created_at,
    )


def project_view(p: ProjectRecord) -> ProjectView:
    return ProjectView(
        tenant_id=p.tenant_id,
        project_id=p.project_id,
        name=p.name,
        weight=p.weight,
        allowed_models=None if p.allowed_models is None else sorted(p.allowed_models),
        credit_cap=None if p.cap_ucredits is None else ucredits_to_credits(p.cap_ucredits),
        cap_period=p.cap_period,  # type: ignore[arg-type]
        spent_credits=ucredits_to_credits(p.spent_ucredits),
        period_start=p.period_start,
        reserved_credits=ucredits_to_credits(p.reserved_ucredits),
        in_flight=p.in_flight,
        limits=p.limits,
        created_at=p.created_at,
    )


def grant_view(g: GrantRecord) -> GrantView:
    return GrantView(
        grant_id=g.grant_id,
        tenant_id=g.tenant_id,
        program=g.program,
        credits=ucredits_to_credits(g.ucredits),
        remaining_credits=ucredits_to_credits(g.remaining),
        reserved_credits=ucredits_to_credits(g.reserved),
        written_off_credits=ucredits_to_credits(g.written_off),
        starts_at=g.starts_at,
        expires_at=g.expires_at,
        expired=g.expired,
        note=g.note,
        granted_at=g.granted_at,
    )


def key_view(k: KeyRecord) -> ApiKeyView:
    return ApiKeyView(
        key_id=k.key_id,
        tenant_id=k.tenant_id,
        project_id=k.project_id,
        role=k.role,  # type: ignore[arg-type]
        name=k.name,
        display_prefix=k.display_prefix,
        created_at=k.created_at,
        revoked_at=k.revoked_at,
    )


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-_")[:63] or "tenant"


def _models(models: list[str] | None) -> frozenset[str] | None:
    return None if models is None else frozenset(models)


class AdminOps:
    """Admin mutations on a :class:`LedgerState`."""

    def __init__(self, state: LedgerState) -> None:
        self.s = state

    def tenant(self, tenant_id: str) -> TenantRecord:
        t = self.s.tenants.get(tenant_id)
        if t is None:
            raise NotFoundError(f"No tenant {tenant_id!r}.", param="tenant_id")
        return t

    def project(self, tenant_id: str, project_id: str) -> ProjectRecord:
        p = self.tenant(tenant_id).projects.get(project_id)
        if p is None:
            raise NotFoundError(f"No project {project_id!r} in tenant {tenant_id!r}.", param="project_id")
        return p

    def create_tenant(self, op: CreateTenant, now: float, ts: float) -> TenantView:
        spec = op.spec
        tenant_id = spec.tenant_id or _slug(spec.name)
        if tenant_id in self.s.tenants:
            raise ConflictError(f"Tenant {tenant_id!r} already exists.", param="tenant_id")
        t = TenantRecord(tenant_id, spec.name, spec.weight, _models(spec.allowed_models), 0, spec.limits, ts)
        t.apply_limits(spec.limits, now, self.s.default_limits)
        self.s.tenants[tenant_id] = t
        self.s.batch.insert_row(
            "tenants",
            tenant_id=tenant_id,
            name=spec.name,
            weight=spec.weight,
            allowed_models=dumps_models(spec.allowed_models),
            balance_ucredits=0,
            limits=spec.limits.model_dump_json(),
            created_at=ts,
            updated_at=ts,
        )
        self._new_project(
            t, DEFAULT_PROJECT, "Default project", 1.0, None, TenantLimits(), None, "lifetime", now, ts
        )
        if spec.credits:
            self._grant(
                t, GrantCreate(grant_id="initial", credits=spec.credits, program="initial"), ts, "admin"
            )
        return tenant_view(t, ts)

    def _grant(self, t: TenantRecord, spec: GrantCreate, ts: float, actor: str) -> GrantRecord:
        ucredits = credits_to_ucredits(spec.credits)
        if ucredits <= 0:
            raise InvalidInputError(f"credits must be positive (got {spec.credits}).", param="credits")
        if t.balance_ucredits + ucredits > credits_to_ucredits(MAX_CREDITS):
            # Unbounded, a balance outgrows SQLite's 64-bit integers and the whole commit fails.
            raise InvalidInputError(
                f"a grant of {spec.credits:g} credits would take the balance of {t.tenant_id!r} to "
                f"{ucredits_to_credits(t.balance_ucredits + ucredits):g}, above the maximum of "
                f"{MAX_CREDITS:g} credits.",
                param="credits",
            )
        starts = ts if spec.starts_at is None else spec.starts_at
        if spec.expires_at is not None and spec.expires_at <= starts:
            raise InvalidInputError("expires_at must be after starts_at.", param="expires_at")
        g = GrantRecord(
            spec.grant_id,
            t.tenant_id,
            spec.program,
            ucredits,
            ucredits,
            starts,
            spec.expires_at,
            spec.note,
            ts,
        )
        self.s.add_grant(t, g)
        t.balance_ucredits += ucredits
        t.granted_ucredits += ucredits
        self.s.batch.insert_row(
            "grants",
            tenant_id=t.tenant_id,
            grant_id=g.grant_id,
            program=g.program,
            ucredits=ucredits,
            remaining_ucredits=ucredits,
            written_off_ucredits=0,
            starts_at=starts,
            expires_at=g.expires_at,
            note=g.note,
            granted_at=ts,
        )
        self.s.batch.grant_event(g, "granted", ucredits, ts, None, actor)
        self.s.batch.set_balance(t.tenant_id, t.balance_ucredits)
        if g.expires_at is not None and g.expires_at <= ts:
            self.s.expire_grants(ts)
        return g

    def create_grant(self, op: CreateGrant, ts: float) -> tuple[GrantView, bool]:
        """The grant and whether it is new: a retry with the same id and terms returns the first
        one unchanged (idempotent); the same id with other terms is a conflict."""
        t = self.tenant(op.tenant_id)
        spec = op.spec
        old = t.grants_by_id.get(spec.grant_id)
        if old is not None:
            same = (
                old.ucredits == credits_to_ucredits(spec.credits)
                and old.program == spec.program
                and old.expires_at == spec.expires_at
                and (spec.starts_at is None or old.starts_at == spec.starts_at)
                and old.note == spec.note
            )
            if not same:
                raise ConflictError(
                    f"Grant {spec.grant_id!r} of tenant {t.tenant_id!r} exists with other terms.",
                    param="grant_id",
                )
            return grant_view(old), False
        return grant_view(self._grant(t, spec, ts, op.actor)), True

    def top_up(self, op: TopUp, ts: float) -> TenantView:
        """A grant without expiry (program ``top-up``), under a fresh id."""
        t = self.tenant(op.tenant_id)
        if op.credits <= 0:
            raise InvalidInputError(f"credits must be positive (got {op.credits}).", param="credits")
        spec = GrantCreate(
            grant_id=f"top-up-{secrets.token_hex(6)}", credits=op.credits, program="top-up", note=op.note
        )
        self._grant(t, spec, ts, "admin")
        return tenant_view(t, ts)

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
        self.s.batch.update_row(
            "tenants",
            {"tenant_id": tenant_id},
            name=t.name,
            weight=t.weight,
            allowed_models=dumps_models(models),
            limits=t.limits.model_dump_json(),
            updated_at=ts,
        )
        return tenant_view(t, ts)

    # -- projects ----------------------------------------------------------------------------------
    def _new_project(
        self,
        t: TenantRecord,
        project_id: str,
        name: str,
        weight: float,
        models: list[str] | None,
        limits: TenantLimits,
        cap: int | None,
        period: str,
        now: float,
        ts: float,
    ) -> ProjectRecord:
        p = ProjectRecord(
            t.tenant_id, project_id, name, weight, _models(models), limits, cap, period, 0,
            period_start(ts, period), ts,
        )  # fmt: skip
        p.apply_limits(limits, now, TenantLimits())
        t.projects[project_id] = p
        self.s.batch.insert_row(
            "projects",
            tenant_id=t.tenant_id,
            project_id=project_id,
            name=name,
            weight=weight,
            allowed_models=dumps_models(models),
            limits=limits.model_dump_json(),
            cap_ucredits=cap,
            cap_period=period,
            spent_ucredits=0,
            period_start=p.period_start,
            created_at=ts,
            updated_at=ts,
        )
        return p

    def _check_models(self, t: TenantRecord, models: list[str] | None) -> None:
        if models is not None and t.allowed_models is not None and not set(models) <= t.allowed_models:
            extra = sorted(set(models) - t.allowed_models)
            raise InvalidInputError(
                f"allowed_models must be within the organization's; not allowed to {t.tenant_id!r}: {extra}.",
                param="allowed_models",
            )

    def create_project(self, op: CreateProject, now: float, ts: float) -> ProjectView:
        t = self.tenant(op.tenant_id)
        spec = op.spec
        if spec.project_id in t.projects:
            raise ConflictError(
                f"Project {spec.project_id!r} already exists in {t.tenant_id!r}.", param="project_id"
            )
        self._check_models(t, spec.allowed_models)
        cap = None if spec.credit_cap is None else credits_to_ucredits(spec.credit_cap)
        p = self._new_project(
            t, spec.project_id, spec.name or spec.project_id, spec.weight, spec.allowed_models, spec.limits,
            cap, spec.cap_period, now, ts,
        )  # fmt: skip
        return project_view(p)

    def update_project(self, op: UpdateProject, now: float, ts: float) -> ProjectView:
        t = self.tenant(op.tenant_id)
        p = self.project(op.tenant_id, op.project_id)
        u = op.update
        if u.allow_all_models and u.allowed_models is not None:
            raise InvalidInputError(
                "Give either allowed_models or allow_all_models, not both.", param="allowed_models"
            )
        if u.remove_credit_cap and u.credit_cap is not None:
            raise InvalidInputError(
                "Give either credit_cap or remove_credit_cap, not both.", param="credit_cap"
            )
        self._check_models(t, u.allowed_models)
        if u.name is not None:
            p.name = u.name
        if u.weight is not None:
            p.weight = u.weight
        if u.allow_all_models:
            p.allowed_models = None
        elif u.allowed_models is not None:
            p.allowed_models = frozenset(u.allowed_models)
        if u.remove_credit_cap:
            p.cap_ucredits = None
        elif u.credit_cap is not None:
            p.cap_ucredits = credits_to_ucredits(u.credit_cap)
        if u.cap_period is not None and u.cap_period != p.cap_period:
            p.cap_period, p.spent_ucredits = u.cap_period, 0
            p.period_start = period_start(ts, u.cap_period)
        if u.limits is not None:
            p.apply_limits(u.limits, now, TenantLimits())
        models = None if p.allowed_models is None else sorted(p.allowed_models)
        self.s.batch.update_row(
            "projects",
            {"tenant_id": p.tenant_id, "project_id": p.project_id},
            name=p.name,
            weight=p.weight,
            allowed_models=dumps_models(models),
            limits=p.limits.model_dump_json(),
            cap_ucredits=p.cap_ucredits,
            cap_period=p.cap_period,
            spent_ucredits=p.spent_ucredits,
            period_start=p.period_start,
            updated_at=ts,
        )
        return project_view(p)

    # -- keys --------------------------------------------------------------------------------------
    def add_key(self, op: AddKey, ts: float) -> ApiKeyView:
        self.project(op.tenant_id, op.project_id)
        if op.key_hash in self.s.keys_by_hash or op.key_id in self.s.keys_by_id:
            raise ConflictError("Key already exists.", param="key_id")
        k = KeyRecord(
            op.key_id, op.tenant_id, op.key_hash, op.display_prefix, op.name, ts, None, op.project_id, op.role
        )
        self.s.keys_by_hash[k.key_hash] = k
        self.s.keys_by_id[k.key_id] = k
        self.s.batch.insert_row(
            "api_keys",
            key_id=k.key_id,
            tenant_id=k.tenant_id,
            key_hash=k.key_hash,
            display_prefix=k.display_prefix,
            name=k.name,
            created_at=ts,
            revoked_at=None,
            project_id=k.project_id,
            role=k.role,
        )
        return key_view(k)

    def revoke_key(self, op: RevokeKey, ts: float) -> ApiKeyView:
        key_id = op.key_id
        k = self.s.keys_by_id.get(key_id)
        if k is None or (op.tenant_id is not None and k.tenant_id != op.tenant_id):
            raise NotFoundError(f"No key {key_id!r}.", param="key_id")
        if k.revoked_at is None:
            k.revoked_at = ts
            self.s.batch.update_row("api_keys", {"key_id": key_id}, revoked_at=ts)
        return key_view(k)


def load_state(state: LedgerState, rows: LoadedRows, now: float, ts: float, restart_grace_s: float) -> None:
    """Fill ``state`` from the file. Open reservations come back held (their gateways may still
    settle them) with ``expires_at`` brought forward to at most ``ts + restart_grace_s``. A
    reservation written before grants had slices (schema 1) takes its slices now."""
    for r in rows["tenants"]:
        models = None if r["allowed_models"] is None else frozenset(json.loads(r["allowed_models"]))
        limits = TenantLimits.model_validate_json(r["limits"])
        t = TenantRecord(
            r["tenant_id"], r["name"], r["weight"], models, r["balance_ucredits"], limits, r["created_at"]
        )
        t.apply_limits(limits, now, state.default_limits)
        t.granted_ucredits = r["granted_ucredits"]
        state.tenants[t.tenant_id] = t
    for r in rows["projects"]:
        models = None if r["allowed_models"] is None else frozenset(json.loads(r["allowed_models"]))
        limits = TenantLimits.model_validate_json(r["limits"])
        p = ProjectRecord(
            r["tenant_id"], r["project_id"], r["name"], r["weight"], models, limits, r["cap_ucredits"],
            r["cap_period"], r["spent_ucredits"], r["period_start"], r["created_at"],
        )  # fmt: skip
        p.apply_limits(limits, now, TenantLimits())
        state.tenants[p.tenant_id].projects[p.project_id] = p
    for r in rows["grants"]:
        g = GrantRecord(
            r["grant_id"], r["tenant_id"], r["program"], r["ucredits"], r["remaining_ucredits"],
            r["starts_at"], r["expires_at"], r["note"], r["granted_at"],
            written_off=r["written_off_ucredits"], expired=r["expired_at"] is not None,
        )  # fmt: skip
        state.add_grant(state.tenants[g.tenant_id], g)
    for r in rows["api_keys"]:
        k = KeyRecord(
            r["key_id"], r["tenant_id"], r["key_hash"], r["display_prefix"], r["name"], r["created_at"],
            r["revoked_at"], r["project_id"], r["role"],
        )  # fmt: skip
        state.keys_by_hash[k.key_hash] = k
        state.keys_by_id[k.key_id] = k
    unsliced: list[OpenReservation] = []
    for r in rows["reservations"]:
        o = OpenReservation(
            r["request_id"], r["tenant_id"], r["key_id"], r["model"], r["prompt_tokens"], r["max_tokens"],
            r["reserved_ucredits"], r["reserved_tokens"], r["created_at"],
            min(r["expires_at"], ts + restart_grace_s), now, r["progress_tokens"], project_id=r["project_id"],
        )  # fmt: skip
        t = state.tenants[o.tenant_id]
        if r["slices"] is None:
            unsliced.append(o)
        else:
            o.slices = tuple((gid, int(n)) for gid, n in json.loads(r["slices"]))
            for gid, n in o.slices:
                t.grants_by_id[gid].reserved += n
        state.open[o.request_id] = o
        p = t.projects[o.project_id]
        for level in (t, p):
            level.reserved_ucredits += o.reserved_ucredits
            level.in_flight += 1
    for o in unsliced:  # schema 1: any grant, in charge order (all usable: they never expire)
        t = state.tenants[o.tenant_id]
        o.slices = t.take_slices(min(o.reserved_ucredits, t.available(o.created_at)), o.created_at)
        state.batch.update_row("reservations", {"request_id": o.request_id}, slices=dumps_slices(o.slices))
