"""``GET /openapi.json`` of the gateway's public listener: every route the app registers is in it,
and its body schemas are the typed models' own (they accept and refuse what the handlers do)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import jsonschema
import pytest
from fastapi import FastAPI, Request
from fastapi.routing import APIRoute

import serving.errors as errors
from serving.api.protocol import ChatCompletionRequest, CompletionRequest, ErrorBody
from serving.gateway.deployment import Gateway
from serving.gateway.openapi import openapi_document
from serving.metering import LedgerClient, MeteringConfig, local_ledger
from serving.tenancy import TenantCreate, make_tenancy_router

ADMIN = "admin-key-0123456789abcdef"


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[LedgerClient]:
    async with local_ledger(MeteringConfig(state_dir=tmp_path)) as client:
        yield client


def gateway_app(ledger: LedgerClient | None) -> FastAPI:
    """The public app as a gateway replica builds it: the tenancy routes when metering is on, then
    the OpenAI routes (the handlers read the replica's state only when called)."""
    app = FastAPI(title="Tokenweir", docs_url=None, redoc_url=None, openapi_url=None)
    errors.install_error_handlers(app)
    if ledger is not None:
        app.include_router(make_tenancy_router(ledger, ADMIN))
    Gateway._add_routes(SimpleNamespace(), app)  # type: ignore[arg-type]
    return app


async def fetch_document(app: FastAPI) -> dict[str, Any]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        r = await c.get("/openapi.json")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    return r.json()


def registered(app: FastAPI) -> set[tuple[str, str]]:
    return {(m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in r.methods}


def documented(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}


@pytest.mark.parametrize("metering", [True, False])
async def test_every_registered_route_is_documented(ledger: LedgerClient, metering: bool) -> None:
    app = gateway_app(ledger if metering else None)
    doc = await fetch_document(app)
    assert doc["openapi"] == "3.1.0"
    assert documented(doc) == registered(app)
    expected = {
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models"),
        ("GET", "/healthz"),
        ("GET", "/readyz"),
        ("GET", "/openapi.json"),
    }
    if metering:
        expected |= {
            ("GET", "/v1/usage"),
            ("POST", "/admin/v1/tenants"),
            ("DELETE", "/admin/v1/keys/{key_id}"),
        }
    assert expected <= documented(doc)
    assert metering == any(p.startswith("/admin/") for _, p in documented(doc))
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            error = op["responses"]["default"]["content"]["application/json"]["schema"]
            assert error == {"$ref": "#/components/schemas/ErrorBody"}, (method, path)
            if method in ("post", "put", "patch"):
                assert "$ref" in op["requestBody"]["content"]["application/json"]["schema"], path
            names = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
            assert names == [s.strip("{}") for s in path.split("/") if s.startswith("{")], path


def _validator(doc: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    )


async def test_body_schemas_are_the_models_own(ledger: LedgerClient) -> None:
    doc = await fetch_document(gateway_app(ledger))
    schemas = doc["components"]["schemas"]
    for model in (ChatCompletionRequest, CompletionRequest, TenantCreate, ErrorBody):
        own = model.model_json_schema(ref_template="#/components/schemas/{model}")
        own.pop("$defs", None)
        assert schemas[model.__name__] == own, model
    chat = _validator(doc, "ChatCompletionRequest")
    ok = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert chat.is_valid(ok)
    ChatCompletionRequest.model_validate(ok)
    for bad in (
        {**ok, "messages": []},
        {**ok, "seed": 2**63},
        {**ok, "temperature": 2.5},
        {**ok, "n": 0},
        {"messages": ok["messages"]},
        {**ok, "messages": [{"role": "wizard", "content": "x"}]},
    ):
        assert not chat.is_valid(bad), bad
    completion = _validator(doc, "CompletionRequest")
    assert completion.is_valid({"model": "m", "prompt": [1, 2, 3]})
    assert not completion.is_valid({"model": "m", "prompt": {"text": "x"}})


def test_every_client_error_matches_the_documented_error_body() -> None:
    def subclasses(cls: type) -> list[type]:
        return [cls, *(s for c in cls.__subclasses__() for s in subclasses(c))]

    classes = [c for c in subclasses(errors.APIError) if c.__module__ == errors.__name__]
    assert len(classes) > 15
    for cls in classes:
        e = cls.__new__(cls)
        errors.APIError.__init__(e, "message")
        ErrorBody.model_validate(e.body())


def test_a_route_the_table_does_not_describe_is_refused() -> None:
    app = gateway_app(None)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> None:
        """Not described."""

    with pytest.raises(ValueError, match="POST /v1/embeddings"):
        openapi_document(app)
