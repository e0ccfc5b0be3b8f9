"""A :class:`TenancyBackend` over the running gateway's admin API (for the CLI)."""

from __future__ import annotations

from typing import Any

import httpx

from serving.errors import APIError, AuthenticationError, ConflictError, InvalidInputError, NotFoundError

from ._backend import ExportFormat
from ._model import ApiKeyView, CreatedApiKey, TenantCreate, TenantUpdate, TenantView, TopUp, UsageSummary

__all__ = ["AdminHttpBackend"]

_BY_STATUS: dict[int, type[APIError]] = {
    400: InvalidInputError,
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
}


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
            try:
                err = r.json()["error"]
                message, param = err["message"], err.get("param")
            except (ValueError, KeyError, TypeError):
                message, param = r.text, None
            if r.status_code in _BY_STATUS:
                raise _BY_STATUS[r.status_code](message, param=param)
            raise APIError(message, param=param, status_code=r.status_code)
        return r

    async def create_tenant(self, spec: TenantCreate) -> TenantView:
        r = await self._call("POST", "/admin/v1/tenants", json=spec.model_dump(mode="json"))
        return TenantView.model_validate(r.json())

    async def list_tenants(self) -> list[TenantView]:
        r = await self._call("GET", "/admin/v1/tenants")
        return [TenantView.model_validate(x) for x in r.json()["data"]]

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

    async def create_key(self, tenant_id: str, name: str = "") -> CreatedApiKey:
        r = await self._call("POST", f"/admin/v1/tenants/{tenant_id}/keys", json={"name": name})
        return CreatedApiKey.model_validate(r.json())

    async def list_keys(self, tenant_id: str) -> list[ApiKeyView]:
        r = await self._call("GET", f"/admin/v1/tenants/{tenant_id}/keys")
        return [ApiKeyView.model_validate(x) for x in r.json()["data"]]

    async def revoke_key(self, key_id: str) -> ApiKeyView:
        return ApiKeyView.model_validate((await self._call("DELETE", f"/admin/v1/keys/{key_id}")).json())

    async def _own_usage(self, since_ts: float | None) -> UsageSummary:
        if self._tenant_key is None:
            raise AuthenticationError("This operation needs the tenant's own key.")
        params = {} if since_ts is None else {"since": str(since_ts)}
        r = await self._call(
            "GET", "/v1/usage", params=params, headers={"authorization": f"Bearer {self._tenant_key}"}
        )
        return UsageSummary.model_validate(r.json())

    async def tenant_for_key(self, api_key: str) -> str:
        return (await self._own_usage(None)).tenant_id

    async def usage_summary(self, tenant_id: str, since_ts: float | None = None) -> UsageSummary:
        summary = await self._own_usage(since_ts)
        if summary.tenant_id != tenant_id:
            raise AuthenticationError("The tenant key belongs to another tenant.")
        return summary

    async def export_usage(
        self, tenant_id: str | None, since_ts: float | None, until_ts: float | None, fmt: ExportFormat
    ) -> str:
        params: dict[str, str] = {"format": fmt}
        for name, value in (("tenant_id", tenant_id), ("since", since_ts), ("until", until_ts)):
            if value is not None:
                params[name] = str(value)
        return (await self._call("GET", "/admin/v1/usage", params=params)).text
