"""Tenants, their limits and API keys; the admin and self-service HTTP surface.

Persistence and enforcement live in :mod:`serving.metering` (the ledger), which implements
:class:`TenancyBackend`; this package does not import it.
"""

from ._backend import ExportFormat, TenancyBackend
from ._export import MEDIA_TYPES, render_rows
from ._http import make_tenancy_router
from ._http_client import AdminHttpBackend
from ._keys import (
    API_KEY_PREFIX,
    GeneratedKey,
    constant_time_equals,
    generate_api_key,
    hash_api_key,
    looks_like_api_key,
)
from ._model import (
    DEFAULT_PROJECT,
    MAX_CREDITS,
    OTHER_TENANTS,
    UCREDITS_PER_CREDIT,
    ApiKeyView,
    CapPeriod,
    CreatedApiKey,
    GrantCreate,
    GrantView,
    KeyCreate,
    KeyOwner,
    KeyRole,
    Page,
    ProjectCreate,
    ProjectUpdate,
    ProjectUsage,
    ProjectView,
    RateLimitState,
    TenantCreate,
    TenantLimits,
    TenantUpdate,
    TenantView,
    TopUp,
    UsageQuery,
    UsageRow,
    UsageSummary,
    credits_to_ucredits,
    ucredits_to_credits,
)
from ._ops import ensure_demo_tenant

__all__ = [
    "API_KEY_PREFIX",
    "DEFAULT_PROJECT",
    "MAX_CREDITS",
    "MEDIA_TYPES",
    "OTHER_TENANTS",
    "UCREDITS_PER_CREDIT",
    "AdminHttpBackend",
    "ApiKeyView",
    "CapPeriod",
    "CreatedApiKey",
    "ExportFormat",
    "GeneratedKey",
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
    "TenancyBackend",
    "TenantCreate",
    "TenantLimits",
    "TenantUpdate",
    "TenantView",
    "TopUp",
    "UsageQuery",
    "UsageRow",
    "UsageSummary",
    "constant_time_equals",
    "credits_to_ucredits",
    "ensure_demo_tenant",
    "generate_api_key",
    "hash_api_key",
    "looks_like_api_key",
    "make_tenancy_router",
    "render_rows",
    "ucredits_to_credits",
]
