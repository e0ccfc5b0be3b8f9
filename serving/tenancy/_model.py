"""Organizations, their projects, keys and credit grants as the admin API and the ledger exchange them.

Two levels: a *tenant* is an **organization** (a business or an institution: weight, allowed models,
limits, the credit balance its grants make up); its **projects** (a developer or a team) hold the
keys, and each may have its own credit cap, limits and allowed models within the organization's.
Every organization has a project ``default``. Credits arrive as **grants** (amount, program,
start, expiry); a charge consumes the grant that expires first.

Credits cross this boundary as floats (``credits``); the ledger keeps integer micro-credits
(``1 credit = 1_000_000 ucredits``) so that charges add up exactly.
"""

from __future__ import annotations

import re
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "DEFAULT_PROJECT",
    "MAX_CREDITS",
    "OTHER_TENANTS",
    "UCREDITS_PER_CREDIT",
    "ApiKeyView",
    "CapPeriod",
    "CreatedApiKey",
    "GrantCreate",
    "GrantView",
    "KeyCreate",
    "KeyOwner",
    "KeyRole",
    "Page",
    "ProjectCreate",
    "ProjectUpdate",
    "ProjectUsage",
    "ProjectView",
    "RateLimitState",
    "TenantCreate",
    "TenantLimits",
    "TenantUpdate",
    "TenantView",
    "TopUp",
    "UsageQuery",
    "UsageRow",
    "UsageSummary",
    "credits_to_ucredits",
    "ucredits_to_credits",
]

UCREDITS_PER_CREDIT = 1_000_000
_TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_GRANT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
OTHER_TENANTS = "_other"
"""The ``tenant`` metrics label of every organization the metrics budget does not label on its own
(not a valid tenant id, so it cannot collide with one)."""
DEFAULT_PROJECT = "default"
"""The project every organization has (keys made without a project, and migrated tenants' keys)."""
CapPeriod = Literal["lifetime", "daily", "monthly"]
"""How a project's credit cap resets: never, at 00:00 UTC, or on the 1st of the month (UTC)."""
KeyRole = Literal["member", "admin"]
"""``member``: makes inference requests for its project. ``admin``: an organization admin key, for
the admin API on its own organization only (never accepted for inference)."""
T = TypeVar("T")
MAX_CREDITS = 1e12
"""The largest balance a tenant may hold, and so the largest grant (its micro-credits fit SQLite's
64-bit integers with room to spare)."""


def credits_to_ucredits(credits: float) -> int:
    """Credits (float) to integer micro-credits, rounded to the nearest micro-credit."""
    return round(credits * UCREDITS_PER_CREDIT)


def ucredits_to_credits(ucredits: int) -> float:
    """Integer micro-credits to credits."""
    return ucredits / UCREDITS_PER_CREDIT


class TenantLimits(BaseModel):
    """Per-tenant limits; ``None`` means unlimited."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rpm: int | None = Field(default=None, ge=1, le=10_000_000)
    """Requests per minute (token bucket, capacity ``rpm``, refilled at ``rpm/60`` per second)."""
    tpm: int | None = Field(default=None, ge=1, le=10_000_000_000)
    """Tokens per minute; a request takes ``prompt + max_tokens`` and gets the unused part back."""
    max_concurrency: int | None = Field(default=None, ge=1, le=1_000_000)
    """Requests in flight at once (open reservations)."""
    max_tokens_per_request: int | None = Field(default=None, ge=1, le=10_000_000)
    """Cap on a request's ``max_tokens``; also the default when a request omits it."""


class TenantCreate(BaseModel):
    """Body of ``POST /admin/v1/tenants``."""

    model_config = ConfigDict(extra="forbid")

    tenant_id: str | None = None
    """Lower-case id (``[a-z0-9][a-z0-9_-]{0,62}``); generated from the name when absent."""
    name: str = Field(min_length=1, max_length=200)
    """Human-readable name."""
    weight: float = Field(default=1.0, gt=0, le=1000)
    """Share of capacity under contention (the pools' fair queue uses it)."""
    allowed_models: list[str] | None = None
    """Models the tenant may call; ``None`` allows every served model."""
    credits: float = Field(default=0.0, ge=0, le=MAX_CREDITS)
    """Initial credit balance."""
    limits: TenantLimits = Field(default_factory=TenantLimits)
    """Rate and size limits."""

    @field_validator("tenant_id")
    @classmethod
    def _check_id(cls, value: str | None) -> str | None:
        if value is not None and not _TENANT_ID.match(value):
            raise ValueError(f"tenant_id {value!r} must match {_TENANT_ID.pattern}")
        return value


class TenantUpdate(BaseModel):
    """Body of ``PATCH /admin/v1/tenants/{id}``: only the fields given change."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=200)
    """New name."""
    weight: float | None = Field(default=None, gt=0, le=1000)
    """New weight."""
    allowed_models: list[str] | None = None
    """New model allow-list (an empty list forbids every model)."""
    allow_all_models: bool = False
    """Set to true to clear the allow-list (every model allowed)."""
    limits: TenantLimits | None = None
    """Replacement limits (the whole object)."""


class TopUp(BaseModel):
    """Body of ``POST /admin/v1/tenants/{id}/credits``."""

    model_config = ConfigDict(extra="forbid")

    credits: float = Field(gt=0, le=MAX_CREDITS)
    """Credits to add (strictly positive)."""
    note: str = Field(default="", max_length=500)
    """Free text kept with the grant (invoice number, reason)."""


class KeyCreate(BaseModel):
    """Body of ``POST /admin/v1/tenants/{id}/keys`` (optional: an empty body names the key "")."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="", max_length=200)
    """A label for the key (shown in listings)."""
    project_id: str = DEFAULT_PROJECT
    """The project whose requests the key makes (and whose cap and limits apply)."""
    role: KeyRole = "member"
    """``admin`` mints an organization admin key instead (no inference; admin API on its own
    organization)."""

    @field_validator("project_id")
    @classmethod
    def _check_project(cls, value: str) -> str:
        return _check_slug("project_id", value)


def _check_slug(name: str, value: str) -> str:
    if not _TENANT_ID.match(value):
        raise ValueError(f"{name} {value!r} must match {_TENANT_ID.pattern}")
    return value


class ProjectCreate(BaseModel):
    """Body of ``POST /admin/v1/tenants/{id}/projects``."""

    model_config = ConfigDict(extra="forbid")

    project_id: str
    """Lower-case id, unique within the organization."""
    name: str = Field(default="", max_length=200)
    weight: float = Field(default=1.0, gt=0, le=1000)
    """Share of the organization's capacity under contention (fair queue within the organization)."""
    allowed_models: list[str] | None = None
    """Models within the organization's; ``None``: every model the organization may use."""
    credit_cap: float | None = Field(default=None, ge=0, le=MAX_CREDITS)
    """Most credits the project may spend per ``cap_period``; ``None``: only the organization's
    balance limits it."""
    cap_period: CapPeriod = "lifetime"
    limits: TenantLimits = Field(default_factory=TenantLimits)
    """The project's own RPM/TPM/concurrency/size limits (the organization's apply as well)."""

    @field_validator("project_id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        return _check_slug("project_id", value)


class ProjectUpdate(BaseModel):
    """Body of ``PATCH /admin/v1/tenants/{id}/projects/{project}``: only the fields given change."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, max_length=200)
    weight: float | None = Field(default=None, gt=0, le=1000)
    allowed_models: list[str] | None = None
    allow_all_models: bool = False
    """Set to true to clear the project's allow-list (the organization's applies)."""
    credit_cap: float | None = Field(default=None, ge=0, le=MAX_CREDITS)
    remove_credit_cap: bool = False
    """Set to true to remove the cap."""
    cap_period: CapPeriod | None = None
    limits: TenantLimits | None = None


class ProjectView(BaseModel):
    """A project as the admin API shows it."""

    tenant_id: str
    project_id: str
    name: str
    weight: float
    allowed_models: list[str] | None
    credit_cap: float | None
    cap_period: CapPeriod
    spent_credits: float
    """Charged in the current cap period (since creation for ``lifetime``)."""
    period_start: float
    reserved_credits: float
    in_flight: int
    limits: TenantLimits
    created_at: float


class GrantCreate(BaseModel):
    """Body of ``POST /admin/v1/tenants/{id}/grants`` (the platform admin only)."""

    model_config = ConfigDict(extra="forbid")

    grant_id: str
    """Chosen by the caller: a retry with the same id and body returns the first grant (idempotent);
    the same id with another body is 409."""
    credits: float = Field(gt=0, le=MAX_CREDITS)
    program: str = Field(min_length=1, max_length=200)
    """The credit program (``innovation-lab``, ``university-partnership``, ``paid-plan``...)."""
    starts_at: float | None = Field(default=None, ge=0, le=1e11)
    """Unix time from which the credits may be used (default: now)."""
    expires_at: float | None = Field(default=None, ge=0, le=1e11)
    """Unix time at which the unused remainder is written off (default: never)."""
    note: str = Field(default="", max_length=500)

    @field_validator("grant_id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not _GRANT_ID.match(value):
            raise ValueError(f"grant_id {value!r} must match {_GRANT_ID.pattern}")
        return value


class GrantView(BaseModel):
    """A grant and what is left of it."""

    grant_id: str
    tenant_id: str
    program: str
    credits: float
    remaining_credits: float
    reserved_credits: float
    """Held by requests in flight (a part of ``remaining_credits``)."""
    written_off_credits: float
    starts_at: float
    expires_at: float | None
    expired: bool
    note: str
    granted_at: float


class KeyOwner(BaseModel):
    """Who a live key belongs to."""

    tenant_id: str
    project_id: str
    role: KeyRole


USAGE_DIMENSIONS = ("tenant_id", "project_id", "model", "day")


class UsageQuery(BaseModel):
    """Filters of a usage export or report (``GET /admin/v1/usage``, ``/admin/v1/usage/report``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenant_id: str | None = None
    project_id: str | None = None
    model: str | None = Field(default=None, max_length=200)
    since: float | None = None
    """Unix seconds (events settled at or after; for a report, from that UTC day)."""
    until: float | None = None
    """Unix seconds (events settled before; for a report, up to that UTC day)."""
    group_by: tuple[Literal["tenant_id", "project_id", "model", "day"], ...] = (
        "tenant_id",
        "project_id",
        "model",
        "day",
    )
    """Report only: the dimensions to sum over (in this order)."""


class Page(BaseModel, Generic[T]):
    """One page of a listing: pass ``next_after`` as ``after`` for the next one."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    next_after: str | None


class TenantView(BaseModel):
    """A tenant as the admin API shows it."""

    model_config = ConfigDict(extra="forbid")

    tenant_id: str
    name: str
    weight: float
    allowed_models: list[str] | None
    credits: float
    """Balance not yet charged (includes what is reserved)."""
    reserved_credits: float
    """Held by requests in flight."""
    available_credits: float
    """``credits - reserved_credits``: what a new request may reserve."""
    in_flight: int
    limits: TenantLimits
    created_at: float


class ApiKeyView(BaseModel):
    """A key as listings show it (never the secret)."""

    key_id: str
    tenant_id: str
    project_id: str = DEFAULT_PROJECT
    role: KeyRole = "member"
    name: str
    display_prefix: str
    created_at: float
    revoked_at: float | None


class CreatedApiKey(ApiKeyView):
    """The answer to key creation: the only time ``api_key`` is shown."""

    api_key: str


class RateLimitState(BaseModel):
    """Live bucket state for one limit."""

    limit: int
    remaining: int
    reset_s: float
    """Seconds until the bucket is full again."""


class UsageRow(BaseModel):
    """Usage of one model on one UTC day (of one project, or of an organization's projects)."""

    day: str
    project_id: str | None = None
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Of the prompt tokens, those the engine found in its prefix cache (charged at the cached price)."""
    credits: float


class ProjectUsage(BaseModel):
    """The calling key's project in ``GET /v1/usage``."""

    project_id: str
    credit_cap: float | None
    cap_period: CapPeriod
    spent_credits: float
    reserved_credits: float
    available_credits: float | None
    """What the cap leaves (``None``: no cap); a request also needs the organization's credits."""
    in_flight: int
    limits: TenantLimits
    rate_limits: dict[str, RateLimitState]


class UsageSummary(BaseModel):
    """``GET /v1/usage``: a key's organization (balance, grants, limits, live rate state), its
    project, and the project's usage by day and model."""

    tenant_id: str
    name: str
    credits: float
    reserved_credits: float
    available_credits: float
    in_flight: int
    limits: TenantLimits
    rate_limits: dict[str, RateLimitState]
    """``"requests"`` and/or ``"tokens"`` when those limits are set."""
    grants: list[GrantView] = []
    """The organization's grants that are not used up, soonest expiry first."""
    project: ProjectUsage | None = None
    usage: list[UsageRow]
