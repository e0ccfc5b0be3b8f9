"""A :class:`TenancyBackend` over the running gateway's admin API (for the CLI)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx

from serving.errors import (
    APIError,
    AuthenticationError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
)

from ._backend import ExportFormat
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

__all__ = ["AdminHttpBackend"]

_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidInputError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
}


def _raise(r: httpx.Response) -> None:
    try:
        err = r.json()["error"]
        message, param = err["message"], err.get("param")
    except (ValueError, KeyError, TypeError):
        message, param = r.text, None
    if r.status_code in _BY_STATUS:
        raise _BY_STATUS[r.status_code](message, param=param)
    raise APIError(message, param=param, status_code=r.status_code)


class AdminHttpBackend:
    """Calls ``/admin/v1`` with the admin key; errors come back as :mod:`serving.errors` classes.

    ``tenant_for_key`` and ``usage_summary`` use ``GET /v1/usage`` and need the tenant's own key
    (``tenant_key``), since the admin API never takes tenant keys.
    """

    def __init__(
        self, base_url: str, admin_key: str, *, tenant_key: str | None = None, timeout_s: float = 10.0
    ):
        self._client = httpx.AsyncClient(
            base_url=base_url.rstrip("/"), timeout=timeout_s, headers={"authorization": f"Bearer {admin_key}"}
        )
        self._tenant_key = tenant_key

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        r = await self._client.request(method, path, **kw)
        if r.status_code >= 400:
            _raise(r)
        return r

    async def create_tenant(self, spec: TenantCreate) -> TenantView:
        r = await self._call("POST", "/admin/v1/tenants", json=spec.model_dump(mode="json"))
        return TenantView.model_validate(r.json())

    async def list_tenants(self, after: str | None = None, limit: int = 100) -> Page[TenantView]:
        r = await self._call("GET", "/admin/v1/tenants", params=_page(after, limit))
        return Page[TenantView].model_validate(r.json())

    async def get_tenant(self, tenant_id: str) -> TenantView:
        return TenantView.model_validate((await self._call("GET", f"/admin/v1/tenants/{tenant_id}")).json())

    async def update_tenant(self, tenant_id: str, update: TenantUpdate) -> TenantView:
        body = update.model_dump(mode="json", exclude_unset=True)
        return TenantView.model_validate(
            (await self._call("PATCH", f"/admin/v1/tenants/{tenant_id}", json=body)).json()
        )

    async def top_up(self, tenant_id: str, top_up: TopUp) -> TenantView:
        r = await self._call(
            "POST", f"/admin/v1/tenants/{tenant_id}/credits", json=top_up.model_dump(mode="json")
        )
        return TenantView.model_validate(r.json())

    async def create_project(self, tenant_id: str, spec: ProjectCreate) -> ProjectView:
        r = await self._call(
            "POST", f"/admin/v1/tenants/{tenant_id}/projects", json=spec.model_dump(mode="json")
        )
        return ProjectView.model_validate(r.json())

    async def list_projects(
        self, tenant_id: str, after: str | None = None, limit: int = 100
    ) -> Page[ProjectView]:
        r = await self._call("GET", f"/admin/v1/tenants/{tenant_id}/projects", params=_page(after, limit))
        return Page[ProjectView].model_validate(r.json())

    async def get_project(self, tenant_id: str, project_id: str) -> ProjectView:
        r = await self._call("GET", f"/admin/v1/tenants/{tenant_id}/projects/{project_id}")
        return ProjectView.model_validate(r.json())

    async def update_project(self, tenant_id: str, project_id: str, update: ProjectUpdate) -> ProjectView:
        body = update.model_dump(mode="json", exclude_unset=True)
        r = await self._call("PATCH", f"/admin/v1/tenants/{tenant_id}/projects/{project_id}", json=body)
        return ProjectView.model_validate(r.json())

    async def create_grant(self, tenant_id: str, spec: GrantCreate) -> tuple[GrantView, bool]:
        r = await self._call(
            "POST", f"/admin/v1/tenants/{tenant_id}/grants", json=spec.model_dump(mode="json")
        )
        return GrantView.model_validate(r.json()), r.status_code == 201

    async def list_grants(self, tenant_id: str) -> list[GrantView]:
        r = await self._call("GET", f"/admin/v1/tenants/{tenant_id}/grants")
        return [GrantView.model_validate(x) for x in r.json()["data"]]

    async def create_key(
        self, tenant_id: str, name: str = "", project_id: str = DEFAULT_PROJECT, role: KeyRole = "member"
    ) -> CreatedApiKey:
        body = {"name": name, "project_id": project_id, "role": role}
        r = await self._call("POST", f"/admin/v1/tenants/{tenant_id}/keys", json=body)
        return CreatedApiKey.model_validate(r.json())

    async def list_keys(
        self, tenant_id: str, project_id: str | None = None, after: str | None = None, limit: int = 100
    ) -> Page[ApiKeyView]:
        params = _page(after, limit) | ({} if project_id is None else {"project_id": project_id})
        r = await self._call("GET", f"/admin/v1/tenants/{tenant_id}/keys", params=params)
        return Page[ApiKeyView].model_validate(r.json())

    async def revoke_key(self, key_id: str, tenant_id: str | None = None) -> ApiKeyView:
        return ApiKeyView.model_validate((await self._call("DELETE", f"/admin/v1/keys/{key_id}")).json())

    async def _own_usage(self, since_ts: float | None) -> UsageSummary:
        if self._tenant_key is None:
            raise AuthenticationError("This operation needs the tenant's own key.")
        params = {} if since_ts is None else {"since": str(since_ts)}
        r = await self._call(
            "GET", "/v1/usage", params=params, headers={"authorization": f"Bearer {self._tenant_key}"}
        )
        return UsageSummary.model_validate(r.json())

    async def key_owner(self, api_key: str) -> KeyOwner:
        summary = await self._own_usage(None)
        project = summary.project
        return KeyOwner(
            tenant_id=summary.tenant_id,
            project_id=DEFAULT_PROJECT if project is None else project.project_id,
            role="admin" if project is None else "member",
        )

    async def usage_summary(
        self, tenant_id: str, project_id: str | None = None, since_ts: float | None = None
    ) -> UsageSummary:
        summary = await self._own_usage(since_ts)
        if summary.tenant_id != tenant_id:
            raise AuthenticationError("The tenant key belongs to another tenant.")
        return summary

    async def _stream(
        self, path: str, query: UsageQuery, fmt: ExportFormat, report: bool
    ) -> AsyncIterator[str]:
        params: dict[str, str] = {"format": fmt}
        for name in ("tenant_id", "project_id", "model", "since", "until"):
            if (value := getattr(query, name)) is not None:
                params[name] = str(value)
        if report:
            params["group_by"] = ",".join(query.group_by)
        async with self._client.stream("GET", path, params=params) as r:
            if r.status_code >= 400:
                await r.aread()
                _raise(r)
            async for chunk in r.aiter_text():
                yield chunk

    def export_usage(self, query: UsageQuery, fmt: ExportFormat) -> AsyncIterator[str]:
        return self._stream("/admin/v1/usage", query, fmt, report=False)

    def usage_report(self, query: UsageQuery, fmt: ExportFormat) -> AsyncIterator[str]:
        return self._stream("/admin/v1/usage/report", query, fmt, report=True)

    async def tenant_figures(self, tenant_id: str) -> dict[str, Any]:
        return dict((await self._call("GET", f"/admin/v1/tenants/{tenant_id}/figures")).json())


def _page(after: str | None, limit: int) -> dict[str, str]:
    return {"limit": str(limit)} | ({} if after is None else {"after": after})
