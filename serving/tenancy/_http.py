"""The admin API (``/admin/v1/...``, admin key only) and self-service ``GET /v1/usage``.

Bodies and query strings are validated here, and each route renders its own errors with
:func:`serving.errors.error_response` (a router cannot install exception handlers), so every error,
including malformed input, is the OpenAI error body in whatever app mounts the router; nothing
changes on a 4xx.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from serving.errors import (
    APIError,
    AuthenticationError,
    InvalidInputError,
    error_response,
    validation_message,
)
from serving.http_body import parse_json, read_body

from ._backend import TenancyBackend
from ._keys import constant_time_equals, hash_api_key
from ._model import KeyCreate, TenantCreate, TenantLimits, TenantUpdate, TopUp

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


def make_tenancy_router(backend: TenancyBackend, admin_key_sha256: str | None) -> APIRouter:
    """Routes for the gateway to mount, checking the admin key against its SHA-256 (the key itself
    never reaches a Ray actor). ``None`` disables ``/admin/v1`` (every call 401)."""
    router = APIRouter()

    def admin(request: Request) -> None:
        token = _bearer(request)
        if admin_key_sha256 is None or not constant_time_equals(hash_api_key(token), admin_key_sha256):
            raise AuthenticationError("This endpoint needs the admin key.")

    @router.post("/admin/v1/tenants")
    @_guard
    async def create_tenant(request: Request) -> Any:
        admin(request)
        view = await backend.create_tenant(await _body(request, TenantCreate))
        return JSONResponse(view.model_dump(mode="json"), status_code=201)

    @router.get("/admin/v1/tenants")
    @_guard
    async def list_tenants(request: Request) -> Any:
        admin(request)
        return await backend.list_tenants()

    @router.get("/admin/v1/tenants/{tenant_id}")
    @_guard
    async def get_tenant(request: Request, tenant_id: str) -> Any:
        admin(request)
        return await backend.get_tenant(tenant_id)

    @router.patch("/admin/v1/tenants/{tenant_id}")
    @_guard
    async def update_tenant(request: Request, tenant_id: str) -> Any:
        admin(request)
        return await backend.update_tenant(tenant_id, await _body(request, TenantUpdate))

    @router.put("/admin/v1/tenants/{tenant_id}/limits")
    @_guard
    async def set_limits(request: Request, tenant_id: str) -> Any:
        admin(request)
        limits = await _body(request, TenantLimits)
        return await backend.update_tenant(tenant_id, TenantUpdate(limits=limits))

    @router.post("/admin/v1/tenants/{tenant_id}/credits")
    @_guard
    async def top_up(request: Request, tenant_id: str) -> Any:
        admin(request)
        return await backend.top_up(tenant_id, await _body(request, TopUp))

    @router.post("/admin/v1/tenants/{tenant_id}/keys")
    @_guard
    async def create_key(request: Request, tenant_id: str) -> Any:
        admin(request)
        body = await _body(request, KeyCreate, optional=True)
        created = await backend.create_key(tenant_id, body.name)
        return JSONResponse(created.model_dump(mode="json"), status_code=201)

    @router.get("/admin/v1/tenants/{tenant_id}/keys")
    @_guard
    async def list_keys(request: Request, tenant_id: str) -> Any:
        admin(request)
        return await backend.list_keys(tenant_id)

    @router.delete("/admin/v1/keys/{key_id}")
    @_guard
    async def revoke_key(request: Request, key_id: str) -> Any:
        admin(request)
        return await backend.revoke_key(key_id)

    @router.get("/admin/v1/usage")
    @_guard
    async def export_usage(request: Request) -> Any:
        admin(request)
        fmt = request.query_params.get("format", "json")
        if fmt not in ("json", "csv"):
            raise InvalidInputError(f"format must be 'json' or 'csv' (got {fmt!r}).", param="format")
        text = await backend.export_usage(
            request.query_params.get("tenant_id"),
            _float_query(request, "since"),
            _float_query(request, "until"),
            "csv" if fmt == "csv" else "json",
        )
        return Response(text, media_type="text/csv" if fmt == "csv" else "application/json")

    @router.get("/v1/usage")
    @_guard
    async def own_usage(request: Request) -> Any:
        extra = set(request.query_params) - {"since"}
        if extra:
            raise InvalidInputError(f"Unknown query parameter {sorted(extra)[0]!r}.", param=sorted(extra)[0])
        tenant_id = await backend.tenant_for_key(_bearer(request))
        return await backend.usage_summary(tenant_id, _float_query(request, "since"))

    return router
