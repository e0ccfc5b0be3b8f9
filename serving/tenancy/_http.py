"""The admin API (``/admin/v1/...``) and self-service ``GET /v1/usage``.

Two callers: the platform admin key (every organization; the only one that creates organizations,
changes their weight, models and limits, or grants credits), and an organization admin key (a key
of role ``admin``: manages its own organization's projects and keys and reads its own usage; any
other organization answers as an unknown one would). Project keys (role ``member``) get 401 here.

Bodies and query strings are validated here, and each route renders its own errors with
:func:`serving.errors.error_response` (a router cannot install exception handlers), so every error,
including malformed input, is the OpenAI error body in whatever app mounts the router; nothing
changes on a 4xx.
"""

from __future__ import annotations

import functools
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from serving.errors import (
    APIError,
    AuthenticationError,
    InvalidInputError,
    NotFoundError,
    PermissionDeniedError,
    error_response,
    validation_message,
)
from serving.http_body import parse_json, read_body

from ._backend import ExportFormat, TenancyBackend
from ._export import MEDIA_TYPES
from ._keys import constant_time_equals, hash_api_key
from ._model import (
    GrantCreate,
    KeyCreate,
    Page,
    ProjectCreate,
    ProjectUpdate,
    TenantCreate,
    TenantLimits,
    TenantUpdate,
    TopUp,
    UsageQuery,
)

__all__ = ["make_tenancy_router"]

M = TypeVar("M", bound=BaseModel)
_MAX_BODY_BYTES = 1 << 20
"""Admin bodies are a tenant spec or a few fields."""
Handler = Callable[..., Awaitable[Any]]


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("Missing API key: send 'Authorization: Bearer <key>'.")
    return token.strip()


async def _body(request: Request, model: type[M], *, optional: bool = False) -> M:
    """The body as ``model`` (read and parsed as the OpenAI routes do: :mod:`serving.http_body`);
    an ``optional`` body may be empty."""
    raw = await read_body(request, _MAX_BODY_BYTES)
    if optional and not raw:
        return model()
    data = parse_json(raw, request.headers.get("content-type"))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = validation_message(e.errors()[0])
        raise InvalidInputError(message, param=param) from e


def _float_query(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a unix timestamp in seconds (got {raw!r}).", param=name)
    return value


def _int_query(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise InvalidInputError(f"{name} must be an integer from {lo} to {hi} (got {raw!r}).", param=name)
    return int(raw)


def _page_query(request: Request) -> tuple[str | None, int]:
    after = request.query_params.get("after")
    if after is not None and len(after) > 200:
        raise InvalidInputError("after is too long.", param="after")
    return after, _int_query(request, "limit", 100, 1, 1000)


def _only(request: Request, allowed: set[str]) -> None:
    extra = sorted(set(request.query_params) - allowed)
    if extra:
        raise InvalidInputError(f"Unknown query parameter {extra[0]!r}.", param=extra[0])


@dataclass(frozen=True, slots=True)
class Caller:
    """Who calls the admin API: the platform admin (``tenant_id`` None) or one organization's admin."""

    tenant_id: str | None

    def scope(self, tenant_id: str) -> str:
        """``tenant_id`` if this caller may see it; an organization admin asking for another
        organization gets the answer an unknown one gets (nothing tells it the other exists)."""
        if self.tenant_id is not None and self.tenant_id != tenant_id:
            raise NotFoundError(f"No tenant {tenant_id!r}.", param="tenant_id")
        return tenant_id

    def platform_only(self, what: str) -> None:
        if self.tenant_id is not None:
            raise PermissionDeniedError(f"Only the platform admin key may {what}.")


def _guard(fn: Handler) -> Handler:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = await fn(*args, **kwargs)
        except APIError as e:
            return error_response(e)
        if isinstance(result, Response):
            return result
        if isinstance(result, list):
            return JSONResponse({"object": "list", "data": [r.model_dump(mode="json") for r in result]})
        return JSONResponse(result.model_dump(mode="json"))

    return wrapper


def _usage_query(request: Request, caller: Caller, *, report: bool) -> UsageQuery:
    allowed = {"tenant_id", "project_id", "model", "since", "until", "format"} | (
        {"group_by"} if report else set()
    )
    _only(request, allowed)
    q = request.query_params
    tenant_id = q.get("tenant_id")
    if caller.tenant_id is not None:
        tenant_id = caller.scope(tenant_id or caller.tenant_id)
    if q.get("project_id") is not None and tenant_id is None:
        raise InvalidInputError("project_id needs tenant_id.", param="project_id")
    fields: dict[str, Any] = {
        "tenant_id": tenant_id,
        "project_id": q.get("project_id"),
        "model": q.get("model"),
        "since": _float_query(request, "since"),
        "until": _float_query(request, "until"),
    }
    if report and q.get("group_by"):
        fields["group_by"] = tuple(q["group_by"].split(","))
    try:
        return UsageQuery.model_validate(fields)
    except ValidationError as e:
        message, param = validation_message(e.errors()[0])
        raise InvalidInputError(message, param=param) from e


def _format(request: Request, default: str) -> ExportFormat:
    fmt = request.query_params.get("format", default)
    if fmt not in MEDIA_TYPES:
        raise InvalidInputError(f"format must be one of {sorted(MEDIA_TYPES)} (got {fmt!r}).", param="format")
    return fmt  # type: ignore[return-value]


async def _streamed(chunks: AsyncIterator[str], media_type: str) -> StreamingResponse:
    """Send the first chunk's errors (an unknown tenant) as an error body, the rest as a stream."""
    it = aiter(chunks)
    try:
        first = await anext(it)
    except StopAsyncIteration:
        first = ""

    async def rest() -> AsyncIterator[str]:
        yield first
        async for chunk in it:
            yield chunk

    return StreamingResponse(rest(), media_type=media_type)


def make_tenancy_router(backend: TenancyBackend, admin_key_sha256: str | None) -> APIRouter:
    """Routes for the gateway to mount, checking the platform admin key against its SHA-256 (the
    key itself never reaches a Ray actor) and organization admin keys against the ledger. ``None``
    disables the platform admin key (organization admin keys still work on their own organization)."""
    router = APIRouter()

    async def caller(request: Request) -> Caller:
        token = _bearer(request)
        if admin_key_sha256 is not None and constant_time_equals(hash_api_key(token), admin_key_sha256):
            return Caller(None)
        try:
            owner = await backend.key_owner(token)
        except AuthenticationError:
            owner = None
        if owner is None or owner.role != "admin":
            raise AuthenticationError("This endpoint needs the admin key or an organization admin key.")
        return Caller(owner.tenant_id)

    @router.post("/admin/v1/tenants")
    @_guard
    async def create_tenant(request: Request) -> Any:
        (await caller(request)).platform_only("create organizations")
        view = await backend.create_tenant(await _body(request, TenantCreate))
        return JSONResponse(view.model_dump(mode="json"), status_code=201)

    @router.get("/admin/v1/tenants")
    @_guard
    async def list_tenants(request: Request) -> Any:
        c = await caller(request)
        _only(request, {"after", "limit"})
        after, limit = _page_query(request)
        if c.tenant_id is not None:
            own = (
                [] if after is not None and after >= c.tenant_id else [await backend.get_tenant(c.tenant_id)]
            )
            return Page(data=own, has_more=False, next_after=None)
        return await backend.list_tenants(after, limit)

    @router.get("/admin/v1/tenants/{tenant_id}")
    @_guard
    async def get_tenant(request: Request, tenant_id: str) -> Any:
        return await backend.get_tenant((await caller(request)).scope(tenant_id))

    @router.patch("/admin/v1/tenants/{tenant_id}")
    @_guard
    async def update_tenant(request: Request, tenant_id: str) -> Any:
        c = await caller(request)
        c.scope(tenant_id)
        c.platform_only("change an organization's weight, models or limits")
        return await backend.update_tenant(tenant_id, await _body(request, TenantUpdate))

    @router.put("/admin/v1/tenants/{tenant_id}/limits")
    @_guard
    async def set_limits(request: Request, tenant_id: str) -> Any:
        c = await caller(request)
        c.scope(tenant_id)
        c.platform_only("change an organization's limits")
        limits = await _body(request, TenantLimits)
        return await backend.update_tenant(tenant_id, TenantUpdate(limits=limits))

    @router.post("/admin/v1/tenants/{tenant_id}/credits")
    @_guard
    async def top_up(request: Request, tenant_id: str) -> Any:
        c = await caller(request)
        c.scope(tenant_id)
        c.platform_only("grant credits")
        return await backend.top_up(tenant_id, await _body(request, TopUp))

    @router.post("/admin/v1/tenants/{tenant_id}/grants")
    @_guard
    async def create_grant(request: Request, tenant_id: str) -> Any:
        c = await caller(request)
        c.scope(tenant_id)
        c.platform_only("grant credits")
        view, new = await backend.create_grant(tenant_id, await _body(request, GrantCreate))
        return JSONResponse(view.model_dump(mode="json"), status_code=201 if new else 200)

    @router.get("/admin/v1/tenants/{tenant_id}/grants")
    @_guard
    async def list_grants(request: Request, tenant_id: str) -> Any:
        return await backend.list_grants((await caller(request)).scope(tenant_id))

    @router.get("/admin/v1/tenants/{tenant_id}/figures")
    @_guard
    async def figures(request: Request, tenant_id: str) -> Any:
        return JSONResponse(await backend.tenant_figures((await caller(request)).scope(tenant_id)))

    @router.post("/admin/v1/tenants/{tenant_id}/projects")
    @_guard
    async def create_project(request: Request, tenant_id: str) -> Any:
        tid = (await caller(request)).scope(tenant_id)
        view = await backend.create_project(tid, await _body(request, ProjectCreate))
        return JSONResponse(view.model_dump(mode="json"), status_code=201)

    @router.get("/admin/v1/tenants/{tenant_id}/projects")
    @_guard
    async def list_projects(request: Request, tenant_id: str) -> Any:
        tid = (await caller(request)).scope(tenant_id)
        _only(request, {"after", "limit"})
        return await backend.list_projects(tid, *_page_query(request))

    @router.get("/admin/v1/tenants/{tenant_id}/projects/{project_id}")
    @_guard
    async def get_project(request: Request, tenant_id: str, project_id: str) -> Any:
        return await backend.get_project((await caller(request)).scope(tenant_id), project_id)

    @router.patch("/admin/v1/tenants/{tenant_id}/projects/{project_id}")
    @_guard
    async def update_project(request: Request, tenant_id: str, project_id: str) -> Any:
        tid = (await caller(request)).scope(tenant_id)
        return await backend.update_project(tid, project_id, await _body(request, ProjectUpdate))

    async def _create_key(request: Request, tenant_id: str, project_id: str | None) -> Any:
        tid = (await caller(request)).scope(tenant_id)
        body = await _body(request, KeyCreate, optional=True)
        created = await backend.create_key(tid, body.name, project_id or body.project_id, body.role)
        return JSONResponse(created.model_dump(mode="json"), status_code=201)

    @router.post("/admin/v1/tenants/{tenant_id}/keys")
    @_guard
    async def create_key(request: Request, tenant_id: str) -> Any:
        return await _create_key(request, tenant_id, None)

    @router.post("/admin/v1/tenants/{tenant_id}/projects/{project_id}/keys")
    @_guard
    async def create_project_key(request: Request, tenant_id: str, project_id: str) -> Any:
        return await _create_key(request, tenant_id, project_id)

    @router.get("/admin/v1/tenants/{tenant_id}/keys")
    @_guard
    async def list_keys(request: Request, tenant_id: str) -> Any:
        tid = (await caller(request)).scope(tenant_id)
        _only(request, {"after", "limit", "project_id"})
        return await backend.list_keys(tid, request.query_params.get("project_id"), *_page_query(request))

    @router.get("/admin/v1/tenants/{tenant_id}/projects/{project_id}/keys")
    @_guard
    async def list_project_keys(request: Request, tenant_id: str, project_id: str) -> Any:
        tid = (await caller(request)).scope(tenant_id)
        _only(request, {"after", "limit"})
        return await backend.list_keys(tid, project_id, *_page_query(request))

    @router.delete("/admin/v1/keys/{key_id}")
    @_guard
    async def revoke_key(request: Request, key_id: str) -> Any:
        return await backend.revoke_key(key_id, (await caller(request)).tenant_id)

    @router.get("/admin/v1/usage")
    @_guard
    async def export_usage(request: Request) -> Any:
        query = _usage_query(request, await caller(request), report=False)
        fmt = _format(request, "json")
        return await _streamed(backend.export_usage(query, fmt), MEDIA_TYPES[fmt])

    @router.get("/admin/v1/usage/report")
    @_guard
    async def usage_report(request: Request) -> Any:
        query = _usage_query(request, await caller(request), report=True)
        fmt = _format(request, "json")
        return await _streamed(backend.usage_report(query, fmt), MEDIA_TYPES[fmt])

    @router.get("/v1/usage")
    @_guard
    async def own_usage(request: Request) -> Any:
        _only(request, {"since"})
        owner = await backend.key_owner(_bearer(request))
        project = owner.project_id if owner.role == "member" else None
        return await backend.usage_summary(owner.tenant_id, project, _float_query(request, "since"))

    return router
