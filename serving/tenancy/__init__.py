"""Tenants, their limits and API keys; the admin and self-service HTTP surface.

Persistence and enforcement live in :mod:`serving.metering` (the ledger), which implements
:class:`TenancyBackend`; this package does not import it.
"""

from ._backend import ExportFormat, TenancyBackend
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
    MAX_CREDITS,
    UCREDITS_PER_CREDIT,
    ApiKeyView,
    CreatedApiKey,
    KeyCreate,
    RateLimitState,
    TenantCreate,
    TenantLimits,
    TenantUpdate,
    TenantView,
    TopUp,
    UsageRow,
    UsageSummary,
    credits_to_ucredits,
    ucredits_to_credits,
)
from ._ops import ensure_demo_tenant

__all__ = [
    "API_KEY_PREFIX",
    "MAX_CREDITS",
    "UCREDITS_PER_CREDIT",
    "AdminHttpBackend",
    "ApiKeyView",
    "CreatedApiKey",
    "ExportFormat",
    "GeneratedKey",
    "KeyCreate",
    "RateLimitState",
    "TenancyBackend",
    "TenantCreate",
    "TenantLimits",
    "TenantUpdate",
    "TenantView",
    "TopUp",
    "UsageRow",
    "UsageSummary",
    "constant_time_equals",
    "credits_to_ucredits",
    "ensure_demo_tenant",
    "generate_api_key",
    "hash_api_key",
    "looks_like_api_key",
    "make_tenancy_router",
    "ucredits_to_credits",
]
