"""Tenants, their limits and keys as the admin API and the ledger exchange them.

Credits cross this boundary as floats (``credits``); the ledger keeps integer micro-credits
(``1 credit = 1_000_000 ucredits``) so that charges add up exactly.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "MAX_CREDITS",
    "UCREDITS_PER_CREDIT",
    "ApiKeyView",
    "CreatedApiKey",
    "KeyCreate",
    "RateLimitState",
    "TenantCreate",
    "TenantLimits",
    "TenantUpdate",
    "TenantView",
    "TopUp",
    "UsageRow",
    "UsageSummary",
    "credits_to_ucredits",
    "ucredits_to_credits",
]

UCREDITS_PER_CREDIT = 1_000_000
_TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
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

    name: str = ""
    """A label for the key (shown in listings)."""


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
    """Usage of one model on one UTC day."""

    day: str
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    credits: float


class UsageSummary(BaseModel):
    """``GET /v1/usage``: a tenant's own balance, limits, live rate state and usage."""

    tenant_id: str
    name: str
    credits: float
    reserved_credits: float
    available_credits: float
    in_flight: int
    limits: TenantLimits
    rate_limits: dict[str, RateLimitState]
    """``"requests"`` and/or ``"tokens"`` when those limits are set."""
    usage: list[UsageRow]
