"""The OpenAPI document of the gateway's public listener (``GET /openapi.json``).

The handlers take the raw request (they bound the body, authenticate and parse it themselves, in
that order), so FastAPI's generator cannot see what they read. This module walks the app's own
route table and describes each route from :data:`_OPERATIONS`: the typed model the handler
validates its body with, the query parameters it reads, the key it needs and what it answers. The
JSON Schemas are pydantic's own (:func:`pydantic.json_schema.models_json_schema`) for those same
models, never a copy; every error response is :class:`serving.api.protocol.ErrorBody`.

:func:`openapi_document` refuses an app with a route this table does not describe, so a new route
cannot be left out of the document (``tests/unit/test_openapi.py`` builds the gateway's app).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from serving.api.protocol import ChatCompletionRequest, CompletionRequest, ErrorBody
from serving.tenancy import (
    ApiKeyView,
    CreatedApiKey,
    GrantCreate,
    GrantView,
    KeyCreate,
    ProjectCreate,
    ProjectUpdate,
    ProjectView,
    TenantCreate,
    TenantLimits,
    TenantUpdate,
    TenantView,
    TopUp,
    UsageSummary,
)

__all__ = ["openapi_document"]

_REF = "#/components/schemas/{model}"
_API_KEY = "apiKey"
_ADMIN_KEY = "adminKey"
_JSON = "application/json"


@dataclass(frozen=True)
class _Query:
    name: str
    schema: dict[str, Any]
    description: str


@dataclass(frozen=True)
class _Operation:
    """What one route reads and answers."""

    body: type[BaseModel] | None = None
    """The model the handler validates its JSON body with."""
    body_required: bool = True
    auth: str | None = None
    """Security scheme: the tenant's API key or the admin key; None for open routes."""
    response: type[BaseModel] | None = None
    """The model of a successful answer (None: a JSON object described only in prose)."""
    listing: bool = False
    """The answer is ``{"object": "list", "data": [response, ...]}``."""
    status: int = 200
    streams: bool = False
    """Answers ``text/event-stream`` when the body asks for ``stream``."""
    export: bool = False
    """A streamed export: may answer ``text/csv`` or JSON lines."""
    query: tuple[_Query, ...] = ()
    headers: tuple[_Query, ...] = ()


_SINCE = _Query("since", {"type": "number"}, "Unix timestamp in seconds: only usage from then on.")
_PAGE = (
    _Query("limit", {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}, "Page size."),
    _Query("after", {"type": "string"}, "The previous page's next_after."),
)
_USAGE = (
    _Query("tenant_id", {"type": "string"}, "Only this organization's usage."),
    _Query("project_id", {"type": "string"}, "Only this project's usage (needs tenant_id)."),
    _Query("model", {"type": "string"}, "Only this model's usage."),
    _SINCE,
    _Query("until", {"type": "number"}, "Unix timestamp in seconds: only usage before then."),
    _Query("format", {"enum": ["json", "csv", "jsonl"], "default": "json"}, "Export format (streamed)."),
)
_GENERATION_HEADERS = (
    _Query(
        "x-request-id",
        {"type": "string"},
        "Echoed and logged when it matches [A-Za-z0-9._:-]{1,128}; never a key.",
    ),
    _Query("x-tokenweir-gpu", {"type": "string"}, "Pin the request to a GPU type (when the gateway allows)."),
)

_OPERATIONS: dict[tuple[str, str], _Operation] = {
    ("POST", "/v1/chat/completions"): _Operation(
        ChatCompletionRequest, auth=_API_KEY, streams=True, headers=_GENERATION_HEADERS
    ),
    ("POST", "/v1/completions"): _Operation(
        CompletionRequest, auth=_API_KEY, streams=True, headers=_GENERATION_HEADERS
    ),
    ("GET", "/v1/models"): _Operation(),
    ("GET", "/healthz"): _Operation(),
    ("GET", "/readyz"): _Operation(),
    ("GET", "/readyz/pools"): _Operation(),
    ("GET", "/openapi.json"): _Operation(),
    ("GET", "/v1/usage"): _Operation(auth=_API_KEY, response=UsageSummary, query=(_SINCE,)),
    ("POST", "/admin/v1/tenants"): _Operation(TenantCreate, auth=_ADMIN_KEY, response=TenantView, status=201),
    ("GET", "/admin/v1/tenants"): _Operation(auth=_ADMIN_KEY, response=TenantView, listing=True, query=_PAGE),
    ("GET", "/admin/v1/tenants/{tenant_id}"): _Operation(auth=_ADMIN_KEY, response=TenantView),
    ("PATCH", "/admin/v1/tenants/{tenant_id}"): _Operation(
        TenantUpdate, auth=_ADMIN_KEY, response=TenantView
    ),
    ("PUT", "/admin/v1/tenants/{tenant_id}/limits"): _Operation(
        TenantLimits, auth=_ADMIN_KEY, response=TenantView
    ),
    ("POST", "/admin/v1/tenants/{tenant_id}/credits"): _Operation(
        TopUp, auth=_ADMIN_KEY, response=TenantView
    ),
    ("POST", "/admin/v1/tenants/{tenant_id}/grants"): _Operation(
        GrantCreate, auth=_ADMIN_KEY, response=GrantView, status=201
    ),
    ("GET", "/admin/v1/tenants/{tenant_id}/grants"): _Operation(
        auth=_ADMIN_KEY, response=GrantView, listing=True
    ),
    ("GET", "/admin/v1/tenants/{tenant_id}/figures"): _Operation(auth=_ADMIN_KEY),
    ("POST", "/admin/v1/tenants/{tenant_id}/projects"): _Operation(
        ProjectCreate, auth=_ADMIN_KEY, response=ProjectView, status=201
    ),
    ("GET", "/admin/v1/tenants/{tenant_id}/projects"): _Operation(
        auth=_ADMIN_KEY, response=ProjectView, listing=True, query=_PAGE
    ),
    ("GET", "/admin/v1/tenants/{tenant_id}/projects/{project_id}"): _Operation(
        auth=_ADMIN_KEY, response=ProjectView
    ),
    ("PATCH", "/admin/v1/tenants/{tenant_id}/projects/{project_id}"): _Operation(
        ProjectUpdate, auth=_ADMIN_KEY, response=ProjectView
    ),
    ("POST", "/admin/v1/tenants/{tenant_id}/keys"): _Operation(
        KeyCreate, body_required=False, auth=_ADMIN_KEY, response=CreatedApiKey, status=201
    ),
    ("GET", "/admin/v1/tenants/{tenant_id}/keys"): _Operation(
        auth=_ADMIN_KEY,
        response=ApiKeyView,
        listing=True,
        query=(*_PAGE, _Query("project_id", {"type": "string"}, "Only this project's keys.")),
    ),
    ("POST", "/admin/v1/tenants/{tenant_id}/projects/{project_id}/keys"): _Operation(
        KeyCreate, body_required=False, auth=_ADMIN_KEY, response=CreatedApiKey, status=201
    ),
    ("GET", "/admin/v1/tenants/{tenant_id}/projects/{project_id}/keys"): _Operation(
        auth=_ADMIN_KEY, response=ApiKeyView, listing=True, query=_PAGE
    ),
    ("DELETE", "/admin/v1/keys/{key_id}"): _Operation(auth=_ADMIN_KEY, response=ApiKeyView),
    ("GET", "/admin/v1/usage"): _Operation(auth=_ADMIN_KEY, export=True, query=_USAGE),
    ("GET", "/admin/v1/usage/report"): _Operation(
        auth=_ADMIN_KEY,
        export=True,
        query=(
            *_USAGE,
            _Query(
                "group_by",
                {"type": "string", "default": "tenant_id,project_id,model,day"},
                "Comma-separated dimensions of tenant_id, project_id, model, day.",
            ),
        ),
    ),
}
"""Every route of the public listener, by ``(method, path)``."""

_PATH_PARAM = re.compile(r"{(\w+)}")
_BODY_METHODS = {"POST", "PUT", "PATCH"}


def _routes(app: FastAPI) -> list[tuple[str, str, APIRoute]]:
    out: list[tuple[str, str, APIRoute]] = []
    for route in app.routes:
        if not isinstance(route, APIRoute):
            raise ValueError(f"route {route!r} is not an APIRoute; the OpenAPI document cannot describe it")
        out.extend((m, route.path, route) for m in sorted(route.methods) if m != "HEAD")
    return out


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``app``'s routes; ``ValueError`` names a route it cannot describe."""
    routes = _routes(app)
    ops: dict[tuple[str, str], _Operation] = {}
    for method, path, _ in routes:
        op = _OPERATIONS.get((method, path))
        if op is None:
            raise ValueError(f"{method} {path} is not described in serving/gateway/openapi.py")
        ops[method, path] = op
    models: list[type[BaseModel]] = [ErrorBody]
    for op in ops.values():
        models += [m for m in (op.body, op.response) if m is not None]
    keys, top = models_json_schema(
        [(m, "validation" if any(o.body is m for o in ops.values()) else "serialization") for m in models],
        ref_template=_REF,
    )
    schemas = {m.__name__: ref for (m, _), ref in keys.items()}
    paths: dict[str, dict[str, Any]] = {}
    for method, path, route in routes:
        op = ops[method, path]
        paths.setdefault(path, {})[method.lower()] = _operation(method, path, route, op, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": app.title,
            "version": app.version,
            "description": "Tokenweir's OpenAI-compatible API, tenant self-service and admin routes.",
        },
        "paths": paths,
        "components": {
            "schemas": top.get("$defs", {}),
            "securitySchemes": {
                _API_KEY: {"type": "http", "scheme": "bearer", "description": "A tenant's API key."},
                _ADMIN_KEY: {"type": "http", "scheme": "bearer", "description": "The operator's admin key."},
            },
        },
    }


def _operation(
    method: str, path: str, route: APIRoute, op: _Operation, schemas: dict[str, Any]
) -> dict[str, Any]:
    summary, _, description = (route.description or route.name.replace("_", " ")).strip().partition("\n")
    out: dict[str, Any] = {
        "operationId": f"{route.name}_{method.lower()}",
        "summary": summary,
        "security": [{op.auth: []}] if op.auth else [],
    }
    if description.strip():
        out["description"] = description.strip()
    params = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PATH_PARAM.findall(path)
    ]
    params += [
        {"name": q.name, "in": "query", "required": False, "schema": q.schema, "description": q.description}
        for q in op.query
    ]
    params += [
        {"name": h.name, "in": "header", "required": False, "schema": h.schema, "description": h.description}
        for h in op.headers
    ]
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {
            "required": op.body_required,
            "content": {_JSON: {"schema": schemas[op.body.__name__]}},
        }
    elif method in _BODY_METHODS:
        raise ValueError(f"{method} {path} needs a body model in serving/gateway/openapi.py")
    success: dict[str, Any] = {"description": "Success."}
    schema: dict[str, Any] = {"type": "object"}
    if op.response is not None:
        schema = schemas[op.response.__name__]
        if op.listing:
            schema = {
                "type": "object",
                "required": ["object", "data"],
                "properties": {
                    "object": {"const": "list"},
                    "data": {"type": "array", "items": schema},
                    "has_more": {"type": "boolean"},
                    "next_after": {"type": ["string", "null"]},
                },
            }
    success["content"] = {_JSON: {"schema": schema}}
    if op.streams:
        success["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    if op.export:
        success["content"]["text/csv"] = {"schema": {"type": "string"}}
        success["content"]["application/x-ndjson"] = {"schema": {"type": "string"}}
    out["responses"] = {
        str(op.status): success,
        "default": {
            "description": "An error, as the OpenAI API renders it.",
            "content": {_JSON: {"schema": schemas[ErrorBody.__name__]}},
        },
    }
    return out
