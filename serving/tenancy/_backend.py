"""What the admin HTTP surface and the CLI need from the store behind them.

:class:`serving.metering.LedgerClient` implements it (over the ledger actor, or over a ledger opened
in-process on the SQLite file). The router depends only on this protocol, so tenancy does not import
metering.
"""

from __future__ import annotations

from typing import Literal, Protocol

from ._model import (
    ApiKeyView,
    CreatedApiKey,
    TenantCreate,
    TenantUpdate,
    TenantView,
    TopUp,
    UsageSummary,
)

__all__ = ["ExportFormat", "TenancyBackend"]

ExportFormat = Literal["csv", "json"]


class TenancyBackend(Protocol):
    """Tenant administration and self-service reads. Errors raise :mod:`serving.errors` classes."""

    async def create_tenant(self, spec: TenantCreate) -> TenantView: ...

    async def list_tenants(self) -> list[TenantView]: ...

    async def get_tenant(self, tenant_id: str) -> TenantView: ...

    async def update_tenant(self, tenant_id: str, update: TenantUpdate) -> TenantView: ...

    async def top_up(self, tenant_id: str, top_up: TopUp) -> TenantView: ...

    async def create_key(self, tenant_id: str, name: str = "") -> CreatedApiKey: ...

    async def list_keys(self, tenant_id: str) -> list[ApiKeyView]: ...

    async def revoke_key(self, key_id: str) -> ApiKeyView: ...

    async def tenant_for_key(self, api_key: str) -> str:
        """The tenant id owning a live key; raises :class:`serving.errors.AuthenticationError`
        otherwise."""
        ...

    async def usage_summary(self, tenant_id: str, since_ts: float | None = None) -> UsageSummary: ...

    async def export_usage(
        self,
        tenant_id: str | None,
        since_ts: float | None,
        until_ts: float | None,
        fmt: ExportFormat,
    ) -> str: ...
