"""An organization admin key against every admin route: its own organization works, another's
answers as an unknown one would (and changes nothing), platform-only routes are refused.

The routes are enumerated from the router itself, so a route added later without a case here fails
this test.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute

from serving.metering import LedgerClient, Meter, MeteringConfig, local_ledger
from serving.tenancy import hash_api_key, make_tenancy_router

ADMIN = "platform-admin-key-0123456789"

BODIES: dict[tuple[str, str], dict[str, Any] | None] = {
    ("POST", "/admin/v1/tenants"): {"tenant_id": "new-org", "name": "New"},
    ("PATCH", "/admin/v1/tenants/{tenant_id}"): {"name": "renamed"},
    ("PUT", "/admin/v1/tenants/{tenant_id}/limits"): {"rpm": 5},
    ("POST", "/admin/v1/tenants/{tenant_id}/credits"): {"credits": 1},
    ("POST", "/admin/v1/tenants/{tenant_id}/grants"): {"grant_id": "g1", "credits": 1, "program": "lab"},
    ("POST", "/admin/v1/tenants/{tenant_id}/projects"): {"project_id": "p-new"},
    ("PATCH", "/admin/v1/tenants/{tenant_id}/projects/{project_id}"): {"name": "renamed"},
    ("POST", "/admin/v1/tenants/{tenant_id}/keys"): {"name": "k"},
    ("POST", "/admin/v1/tenants/{tenant_id}/projects/{project_id}/keys"): {"name": "k"},
}
PLATFORM_ONLY = {
    ("POST", "/admin/v1/tenants"),
    ("PATCH", "/admin/v1/tenants/{tenant_id}"),
    ("PUT", "/admin/v1/tenants/{tenant_id}/limits"),
    ("POST", "/admin/v1/tenants/{tenant_id}/credits"),
    ("POST", "/admin/v1/tenants/{tenant_id}/grants"),
}
UNSCOPED = {("GET", "/admin/v1/tenants"), ("GET", "/admin/v1/usage"), ("GET", "/admin/v1/usage/report")}
"""Routes without a tenant in the path: checked by what they return."""


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, LedgerClient, FastAPI]]:
    async with local_ledger(MeteringConfig(state_dir=tmp_path)) as ledger:
        app = FastAPI()
        app.include_router(make_tenancy_router(ledger, hash_api_key(ADMIN)))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            yield http, ledger, app


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def setup_orgs(http: httpx.AsyncClient, ledger: LedgerClient) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for org in ("org-a", "org-b"):
        r = await http.post(
            "/admin/v1/tenants", headers=auth(ADMIN), json={"tenant_id": org, "name": org, "credits": 100}
        )
        assert r.status_code == 201
        r = await http.post(f"/admin/v1/tenants/{org}/keys", headers=auth(ADMIN), json={"role": "admin"})
        admin_key = r.json()["api_key"]
        r = await http.post(f"/admin/v1/tenants/{org}/keys", headers=auth(ADMIN), json={})
        member = r.json()
        meter = Meter(ledger)
        res = await meter.authorize(member["api_key"], "m", 3, 4, f"{org}-req")
        await meter.settle(res, 3, 4, "completed", "p", "sim")
        out[org] = {"admin": admin_key, "member": member["api_key"], "key_id": member["key_id"]}
    return out


async def snapshot(http: httpx.AsyncClient, org: str) -> str:
    parts = [
        (await http.get(f"/admin/v1/tenants/{org}", headers=auth(ADMIN))).json(),
        (await http.get(f"/admin/v1/tenants/{org}/projects", headers=auth(ADMIN))).json(),
        (await http.get(f"/admin/v1/tenants/{org}/keys", headers=auth(ADMIN))).json(),
        (await http.get(f"/admin/v1/tenants/{org}/grants", headers=auth(ADMIN))).json(),
        (await http.get("/admin/v1/usage", headers=auth(ADMIN), params={"tenant_id": org})).json(),
    ]
    for p in parts[:1]:
        p.pop("available_credits", None)
    return json.dumps(parts, sort_keys=True)


def admin_routes(app: FastAPI) -> list[tuple[str, str]]:
    return [
        (m, r.path)
        for r in app.routes
        if isinstance(r, APIRoute) and r.path.startswith("/admin/")
        for m in sorted(r.methods)
    ]


async def call(
    http: httpx.AsyncClient, method: str, path: str, org: str, key_id: str, key: str
) -> httpx.Response:
    url = path.format(tenant_id=org, project_id="default", key_id=key_id)
    body = BODIES.get((method, path))
    return await http.request(method, url, headers=auth(key), json=body if body is not None else None)


async def test_an_org_admin_reaches_no_other_organization_on_any_route(world: Any) -> None:
    http, ledger, app = world
    ids = await setup_orgs(http, ledger)
    routes = admin_routes(app)
    assert len(routes) >= 20
    before = await snapshot(http, "org-b")
    a = ids["org-a"]["admin"]
    for method, path in routes:
        if (method, path) in UNSCOPED:
            continue
        r = await call(http, method, path, "org-b", ids["org-b"]["key_id"], a)
        assert r.status_code in (403, 404), (method, path, r.status_code, r.text)
        assert "org-b" not in r.text or r.status_code == 404, (method, path, r.text)
    # Unscoped routes show only the caller's own organization.
    listed = (await http.get("/admin/v1/tenants", headers=auth(a))).json()
    assert [t["tenant_id"] for t in listed["data"]] == ["org-a"]
    own = (await http.get("/admin/v1/usage", headers=auth(a))).json()
    assert {e["tenant_id"] for e in own} == {"org-a"}
    assert (
        await http.get("/admin/v1/usage", headers=auth(a), params={"tenant_id": "org-b"})
    ).status_code == 404
    report = (await http.get("/admin/v1/usage/report", headers=auth(a))).json()
    assert {row["tenant_id"] for row in report} == {"org-a"}
    assert (
        await http.get("/admin/v1/usage/report", headers=auth(a), params={"tenant_id": "org-b"})
    ).status_code == 404
    assert await snapshot(http, "org-b") == before  # nothing of org-b changed


async def test_an_org_admin_manages_its_own_projects_and_keys_but_grants_nothing(world: Any) -> None:
    http, ledger, app = world
    ids = await setup_orgs(http, ledger)
    a = ids["org-a"]["admin"]
    for method, path in admin_routes(app):
        if (method, path) in UNSCOPED:
            continue
        r = await call(http, method, path, "org-a", ids["org-a"]["key_id"], a)
        if (method, path) in PLATFORM_ONLY:
            assert r.status_code == 403, (method, path, r.text)
            assert r.json()["error"]["type"] == "permission_denied_error" or r.status_code == 403
        else:
            assert r.status_code in (200, 201), (method, path, r.status_code, r.text)
    # Project keys and unknown keys get nothing from the admin API; the platform key does.
    for key in (ids["org-a"]["member"], "tw-" + "x" * 43):
        r = await http.get("/admin/v1/tenants/org-a", headers=auth(key))
        assert r.status_code == 401
    assert (
        await http.post(
            "/admin/v1/tenants/org-a/grants",
            headers=auth(ADMIN),
            json=BODIES[("POST", "/admin/v1/tenants/{tenant_id}/grants")],
        )
    ).status_code == 201
    retry = await http.post(
        "/admin/v1/tenants/org-a/grants",
        headers=auth(ADMIN),
        json=BODIES[("POST", "/admin/v1/tenants/{tenant_id}/grants")],
    )
    assert retry.status_code == 200  # idempotent by grant id
    # An org admin's /v1/usage is its organization's (no project); a member's is its project's.
    org_usage = (await http.get("/v1/usage", headers=auth(a))).json()
    assert org_usage["tenant_id"] == "org-a" and org_usage["project"] is None
    assert (
        await http.get("/v1/usage", headers=auth(ids["org-a"]["member"]))
    ).status_code == 401  # revoked above
    fresh = (await http.post("/admin/v1/tenants/org-a/projects/p-new/keys", headers=auth(a), json={})).json()
    mine = (await http.get("/v1/usage", headers=auth(fresh["api_key"]))).json()
    assert mine["project"]["project_id"] == "p-new" and mine["grants"][0]["grant_id"] == "initial"


async def test_a_refused_export_is_an_error_body_not_a_broken_stream(world: Any) -> None:
    """The first page is read before the response starts: an unknown tenant or an out-of-range
    day is a whole error answer (found by the fuzz tier as broken streams)."""
    http, ledger, _ = world
    await setup_orgs(http, ledger)
    for path, params in (
        ("/admin/v1/usage", {"format": "csv", "tenant_id": "", "project_id": "default"}),
        ("/admin/v1/usage/report", {"format": "csv", "tenant_id": "nobody"}),
    ):
        r = await http.get(path, headers=auth(ADMIN), params=params)
        assert r.status_code == 404 and r.json()["error"]["param"] in ("tenant_id", "project_id"), r.text
    r = await http.get(
        "/admin/v1/usage/report", headers=auth(ADMIN), params={"format": "csv", "since": "253402300800.0"}
    )
    assert r.status_code == 200 and r.text.startswith("tenant_id,project_id,model,day,requests")
    empty = await http.get("/admin/v1/usage", headers=auth(ADMIN), params={"format": "json", "model": "none"})
    assert empty.json() == []
    csv_empty = await http.get(
        "/admin/v1/usage", headers=auth(ADMIN), params={"format": "csv", "model": "none"}
    )
    assert csv_empty.text.startswith("event_id,") and len(csv_empty.text.splitlines()) == 1
