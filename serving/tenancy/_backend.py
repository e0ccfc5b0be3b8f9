"""What the admin HTTP surface and the CLI need from the store behind them.

:class:`serving.metering.LedgerClient` implements it (over the ledger actor, or over a ledger opened
in-process on the SQLite file); :class:`serving.tenancy.AdminHttpBackend` over a running gateway's
admin API. The router depends only on this protocol, so tenancy does not import metering.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

from ._model import (
    DEFAULT_PROJECT,
    ApiKeyView,
    CreatedApiKey,
    GrantCreate,
    GrantView,
    KeyOwner,
    KeyRole,
    Page,
    ProjectCreate,
    ProjectUpdate,
    ProjectView,
    TenantCreate,
    TenantUpdate,
    TenantView,
    TopUp,
    UsageQuery,
    UsageSummary,
)

__all__ = ["ExportFormat", "TenancyBackend"]

ExportFormat = Literal["csv", "json", "jsonl"]


class TenancyBackend(Protocol):
    """Organization administration and self-service reads. Errors raise :mod:`serving.errors`
    classes. Listings are pages: pass ``next_after`` back as ``after``."""

    async def create_tenant(self, spec: TenantCreate) -> TenantView: ...

    async def list_tenants(self, after: str | None = None, limit: int = 100) -> Page[TenantView]: ...

    async def get_tenant(self, tenant_id: str) -> TenantView: ...

    async def update_tenant(self, tenant_id: str, update: TenantUpdate) -> TenantView: ...

    async def top_up(self, tenant_id: str, top_up: TopUp) -> TenantView: ...

    async def create_project(self, tenant_id: str, spec: ProjectCreate) -> ProjectView: ...

    async def list_projects(
        self, tenant_id: str, after: str | None = None, limit: int = 100
    ) -> Page[ProjectView]: ...

    async def get_project(self, tenant_id: str, project_id: str) -> ProjectView: ...

    async def update_project(self, tenant_id: str, project_id: str, update: ProjectUpdate) -> ProjectView: ...

    async def create_grant(self, tenant_id: str, spec: GrantCreate) -> tuple[GrantView, bool]:
        """The grant and whether it was created now (False: a retry of the same grant id)."""
        ...

    async def list_grants(self, tenant_id: str) -> list[GrantView]: ...

    async def create_key(
        self, tenant_id: str, name: str = "", project_id: str = DEFAULT_PROJECT, role: KeyRole = "member"
    ) -> CreatedApiKey: ...

    async def list_keys(
        self, tenant_id: str, project_id: str | None = None, after: str | None = None, limit: int = 100
    ) -> Page[ApiKeyView]: ...

    async def revoke_key(self, key_id: str, tenant_id: str | None = None) -> ApiKeyView:
        """Revoke a key (only a key of ``tenant_id`` when given: an organization admin's call)."""
        ...

    async def key_owner(self, api_key: str) -> KeyOwner:
        """Who a live key belongs to; raises :class:`serving.errors.AuthenticationError` otherwise."""
        ...

    async def usage_summary(
        self, tenant_id: str, project_id: str | None = None, since_ts: float | None = None
    ) -> UsageSummary: ...

    def export_usage(self, query: UsageQuery, fmt: ExportFormat) -> AsyncIterator[str]:
        """Usage events as text chunks (CSV, a JSON array or JSON lines), page by page."""
        ...

    def usage_report(self, query: UsageQuery, fmt: ExportFormat) -> AsyncIterator[str]:
        """Sums by ``query.group_by`` from the daily roll-up, as text chunks."""
        ...

    async def tenant_figures(self, tenant_id: str) -> dict[str, Any]:
        """One organization's live figures (balance, reserved, in flight, charged, refusals, per
        project), whether or not the metrics budget labels it."""
        ...
