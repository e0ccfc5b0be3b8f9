"""The admin and self-service HTTP surface over a real ledger file, through the ASGI app."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from serving.errors import NotFoundError
from serving.metering import LedgerClient, Meter, MeteringConfig, local_ledger
from serving.tenancy import AdminHttpBackend, TopUp, ensure_demo_tenant, hash_api_key, make_tenancy_router

ADMIN = "admin-key-0123456789abcdef"


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[LedgerClient]:
    async with local_ledger(MeteringConfig(state_dir=tmp_path)) as client:
        yield client


@pytest.fixture
async def http(ledger: LedgerClient) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    app.include_router(make_tenancy_router(ledger, hash_api_key(ADMIN)))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        yield c


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def make_tenant(http: httpx.AsyncClient, tenant_id: str, credits: float) -> str:
    r = await http.post(
        "/admin/v1/tenants",
        headers=auth(ADMIN),
        json={"tenant_id": tenant_id, "name": tenant_id, "credits": credits, "limits": {"rpm": 60}},
    )
    assert r.status_code == 201, r.text
    r = await http.post(f"/admin/v1/tenants/{tenant_id}/keys", headers=auth(ADMIN), json={"name": "main"})
    assert r.status_code == 201
    return r.json()["api_key"]


async def test_admin_flow_and_usage_export(http: httpx.AsyncClient, ledger: LedgerClient) -> None:
    key = await make_tenant(http, "acme", 100)
    r = await http.post(
        "/admin/v1/tenants/acme/credits", headers=auth(ADMIN), json={"credits": 50, "note": "inv-1"}
    )
    assert r.json()["credits"] == 150
    r = await http.put("/admin/v1/tenants/acme/limits", headers=auth(ADMIN), json={"rpm": 10, "tpm": 1000})
    assert r.json()["limits"]["tpm"] == 1000
    meter = Meter(ledger)
    res = await meter.authorize(key, "m", 5, 10, "req-1")
    await meter.settle(res, 5, 7, "completed", "pool-a", "cpu")
    usage = (await http.get("/v1/usage", headers=auth(key))).json()
    assert usage["tenant_id"] == "acme" and usage["credits"] == 138
    assert (
        usage["rate_limits"]["requests"]["limit"] == 10 and usage["rate_limits"]["requests"]["remaining"] == 9
    )
    assert usage["usage"][0]["model"] == "m" and usage["usage"][0]["completion_tokens"] == 7
    csv_text = (await http.get("/admin/v1/usage", headers=auth(ADMIN), params={"format": "csv"})).text
    assert csv_text.splitlines()[1].split(",")[1:4] == ["req-1", "acme", "default"]
    assert "pool-a,cpu" in csv_text
    exported = json.loads(
        (await http.get("/admin/v1/usage", headers=auth(ADMIN), params={"tenant_id": "acme"})).text
    )
    assert [e["ucredits"] for e in exported] == [12_000_000]
    listed = (await http.get("/admin/v1/tenants", headers=auth(ADMIN))).json()
    assert [t["tenant_id"] for t in listed["data"]] == ["acme"]
    keys = (await http.get("/admin/v1/tenants/acme/keys", headers=auth(ADMIN))).json()["data"]
    assert "api_key" not in keys[0] and key.startswith(keys[0]["display_prefix"])
    r = await http.delete(f"/admin/v1/keys/{keys[0]['key_id']}", headers=auth(ADMIN))
    assert r.json()["revoked_at"] is not None
    assert (await http.get("/v1/usage", headers=auth(key))).status_code == 401


async def test_tenant_isolation(http: httpx.AsyncClient) -> None:
    key_a = await make_tenant(http, "a", 10)
    await make_tenant(http, "b", 20)
    for method, path in [
        ("GET", "/admin/v1/tenants"),
        ("GET", "/admin/v1/tenants/b"),
        ("POST", "/admin/v1/tenants/a/credits"),
        ("GET", "/admin/v1/usage"),
        ("POST", "/admin/v1/tenants/b/keys"),
    ]:
        r = await http.request(method, path, headers=auth(key_a), json={"credits": 5})
        assert r.status_code == 401, (method, path)
        assert r.json()["error"]["code"] == "invalid_api_key"
    own = (await http.get("/v1/usage", headers=auth(key_a))).json()
    assert own["tenant_id"] == "a" and own["credits"] == 10
    r = await http.get("/v1/usage", headers=auth(key_a), params={"tenant_id": "b"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tenant_id"
    assert (await http.get("/admin/v1/tenants/b", headers=auth(ADMIN))).json()["credits"] == 20
    assert (await http.get("/v1/usage")).status_code == 401


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [
        ("POST", "/admin/v1/tenants/t/credits", {"credits": -5}, 400, "credits"),
        ("POST", "/admin/v1/tenants/t/credits", {"credits": 0}, 400, "credits"),
        ("POST", "/admin/v1/tenants/nope/credits", {"credits": 5}, 404, "tenant_id"),
        ("PUT", "/admin/v1/tenants/t/limits", {"rpm": -1}, 400, "rpm"),
        ("PUT", "/admin/v1/tenants/t/limits", {"rpm": "many"}, 400, "rpm"),
        ("PUT", "/admin/v1/tenants/t/limits", {"rps": 3}, 400, "rps"),
        ("PATCH", "/admin/v1/tenants/t", {"weight": 0}, 400, "weight"),
        ("POST", "/admin/v1/tenants", {"tenant_id": "Bad Id!", "name": "x"}, 400, "tenant_id"),
        ("POST", "/admin/v1/tenants", {"tenant_id": "t", "name": "dup"}, 409, "tenant_id"),
        ("POST", "/admin/v1/tenants/nope/keys", {}, 404, "tenant_id"),
        ("DELETE", "/admin/v1/keys/key_nope", None, 404, "key_id"),
    ],
)
async def test_admin_bad_input_is_4xx_and_changes_nothing(
    http: httpx.AsyncClient, method: str, path: str, body: dict | None, status: int, param: str
) -> None:
    await make_tenant(http, "t", 10)
    before = (await http.get("/admin/v1/tenants", headers=auth(ADMIN))).json()
    r = await http.request(method, path, headers=auth(ADMIN), json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and set(err) == {"message", "type", "param", "code"}
    assert (await http.get("/admin/v1/tenants", headers=auth(ADMIN))).json() == before


async def test_malformed_json_and_no_admin_key(ledger: LedgerClient, http: httpx.AsyncClient) -> None:
    r = await http.post(
        "/admin/v1/tenants", headers={**auth(ADMIN), "content-type": "application/json"}, content=b"{not json"
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    app = FastAPI()
    app.include_router(make_tenancy_router(ledger, None))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        assert (await c.get("/admin/v1/tenants", headers=auth(ADMIN))).status_code == 401


async def test_cli_backend_over_http_and_demo_tenant(http: httpx.AsyncClient, ledger: LedgerClient) -> None:
    backend = AdminHttpBackend("http://gw", ADMIN)
    backend._client = httpx.AsyncClient(  # same ASGI app instead of a socket (network boundary)
        transport=http._transport, base_url="http://gw", headers={"authorization": f"Bearer {ADMIN}"}
    )
    tenant_id, key = await ensure_demo_tenant(backend, credits=42)
    assert tenant_id == "demo" and key is not None
    assert await ensure_demo_tenant(backend) == ("demo", None)
    assert await ledger.tenant_for_key(key) == "demo"
    assert (await backend.top_up("demo", TopUp(credits=8))).credits == 50
    with pytest.raises(NotFoundError):
        await backend.get_tenant("ghost")
    await backend.aclose()


async def test_a_top_up_past_the_maximum_balance_is_400_and_the_ledger_keeps_working(
    http: httpx.AsyncClient,
) -> None:
    """Found by the fuzz tier: ten top-ups of 9.5e11 credits took the balance past SQLite's 64-bit
    integers, and the commit failed (a 500, and every operation in that batch with it)."""
    await make_tenant(http, "rich", 0)
    for _ in range(2):
        r = await http.post("/admin/v1/tenants/rich/credits", headers=auth(ADMIN), json={"credits": 5e11})
        assert r.status_code == 200, r.text
    for credits in (0.5, 953286081232.5):
        r = await http.post("/admin/v1/tenants/rich/credits", headers=auth(ADMIN), json={"credits": credits})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "credits" and "maximum" in r.json()["error"]["message"]
    r = await http.get("/admin/v1/tenants/rich", headers=auth(ADMIN))
    assert r.status_code == 200 and r.json()["credits"] == 1e12


@pytest.mark.parametrize(
    ("method", "path", "body", "content_type", "status"),
    [
        (
            "POST",
            "/admin/v1/tenants",
            b'{"name": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "application/json",
            400,
        ),
        ("POST", "/admin/v1/tenants", b'{"tenant_id": "s", "name": "a\\ud800"}', "application/json", 400),
        ("POST", "/admin/v1/tenants/acme/keys", b'{"name": "\\udc00"}', "application/json", 400),
        ("POST", "/admin/v1/tenants/acme/credits", b'{"credits": NaN}', "application/json", 400),
        ("POST", "/admin/v1/tenants/acme/credits", b'{"credits": 1}', "text/plain", 415),
        ("POST", "/admin/v1/tenants", b"x" * (1 << 21), "application/json", 413),
        ("GET", "/admin/v1/usage?since=nan", b"", None, 400),
        ("GET", "/admin/v1/usage?until=inf&format=csv", b"", None, 400),
    ],
)
async def test_hostile_admin_requests_are_4xx_and_change_nothing(
    http: httpx.AsyncClient, method: str, path: str, body: bytes, content_type: str | None, status: int
) -> None:
    """Found by the fuzz tier: a deep body was a 500 (RecursionError), a lone surrogate a 503 from
    the ledger's commit, a text/plain body and non-finite timestamps were accepted."""
    await make_tenant(http, "acme", 10)
    before = (await http.get("/admin/v1/tenants", headers=auth(ADMIN))).json()
    keys = (await http.get("/admin/v1/tenants/acme/keys", headers=auth(ADMIN))).json()
    headers = {**auth(ADMIN), **({"content-type": content_type} if content_type else {})}
    r = await http.request(method, path, headers=headers, content=body or None)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert (await http.get("/admin/v1/tenants", headers=auth(ADMIN))).json() == before
    assert (await http.get("/admin/v1/tenants/acme/keys", headers=auth(ADMIN))).json() == keys
