"""Metering through the live gateway (two gateway replicas, one ledger actor, real SQLite):
keys, exact charging, zero overspend under concurrency, no leaked reservations, isolation."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def admin(live: dict) -> httpx.Client:
    return httpx.Client(
        base_url=live["url"], headers={"Authorization": f"Bearer {live['admin_key']}"}, timeout=60
    )


def _tenant(admin: httpx.Client, credits: float, **extra) -> tuple[str, str]:
    tid = "t-" + uuid.uuid4().hex[:10]
    r = admin.post("/admin/v1/tenants", json={"tenant_id": tid, "name": tid, "credits": credits, **extra})
    assert r.status_code == 201, r.text
    k = admin.post(f"/admin/v1/tenants/{tid}/keys", json={"name": "test"})
    assert k.status_code == 201, k.text
    return tid, k.json()["api_key"]


def _credits(usage: object) -> float:
    """What the default price charges for a response's ``usage`` (an SDK object or its JSON): a
    credit per token, half of one per prompt token found in the engine's prefix cache."""
    u = usage if isinstance(usage, dict) else usage.model_dump()  # type: ignore[attr-defined]
    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return u["total_tokens"] - cached / 2


def _view(admin: httpx.Client, tid: str) -> dict:
    r = admin.get(f"/admin/v1/tenants/{tid}")
    assert r.status_code == 200, r.text
    return r.json()


def test_missing_and_wrong_keys_get_401(gateway_url: str) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    r = httpx.post(f"{gateway_url}/v1/chat/completions", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key="tw-" + "x" * 43, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)


def test_charges_exact_usage_and_sends_ratelimit_headers(gateway_url: str, admin: httpx.Client) -> None:
    tid, key = _tenant(admin, 10_000, limits={"rpm": 1000, "tpm": 1_000_000})
    client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "count me"}],
        max_tokens=7,
        extra_body={"ignore_eos": True},
    )
    r = raw.parse()
    for h in ("requests", "tokens"):
        for part in ("limit", "remaining", "reset"):
            assert raw.headers.get(f"x-ratelimit-{part}-{h}"), (part, h, dict(raw.headers))
    view = _view(admin, tid)
    assert view["credits"] == pytest.approx(10_000 - _credits(r.usage))
    assert view["reserved_credits"] == 0 and view["in_flight"] == 0
    usage = httpx.get(f"{gateway_url}/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    assert usage["tenant_id"] == tid


def test_ratelimit_headers_on_every_response_of_a_tenant_without_own_limits(
    gateway_url: str, admin: httpx.Client
) -> None:
    """No limits of its own: the config's default RPM/TPM apply, streamed, plain and refused alike."""
    _tid, key = _tenant(admin, 100)
    names = [f"x-ratelimit-{p}-{k}" for k in ("requests", "tokens") for p in ("limit", "remaining", "reset")]
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.stream(
        "POST", f"{gateway_url}/v1/chat/completions", json={**chat, "stream": True}, headers=auth
    ) as s:
        assert s.status_code == 200 and all(s.headers.get(n) for n in names), dict(s.headers)
        s.read()
    plain = httpx.post(f"{gateway_url}/v1/chat/completions", json=chat, headers=auth)
    assert plain.status_code == 200 and all(plain.headers.get(n) for n in names), dict(plain.headers)
    assert int(plain.headers["x-ratelimit-limit-requests"]) == 60_000  # metering.default_rpm
    broke = httpx.post(f"{gateway_url}/v1/chat/completions", json={**chat, "max_tokens": 500}, headers=auth)
    assert broke.status_code == 429 and broke.json()["error"]["code"] == "insufficient_quota"
    assert all(broke.headers.get(n) for n in names), dict(broke.headers)


async def test_zero_overspend_under_300_concurrent_requests(gateway_url: str, admin: httpx.Client) -> None:
    initial = 2_000.0  # covers a fraction of 300 requests of ~30 tokens each
    tid, key = _tenant(admin, initial)
    client = openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key=key, max_retries=0, timeout=300)
    sem_free = asyncio.Semaphore(300)

    async def one(i: int) -> float | str:
        async with sem_free:
            try:
                r = await client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"r{i}"}],
                    max_tokens=8,
                    extra_body={"ignore_eos": True},
                )
                return _credits(r.usage)
            except openai.RateLimitError as e:
                return str(e.body.get("code") if isinstance(e.body, dict) else e.code)

    results = await asyncio.gather(*(one(i) for i in range(300)))
    await client.close()
    charged = [x for x in results if isinstance(x, float)]
    refused = [x for x in results if isinstance(x, str)]
    assert charged and refused, "expected both accepted and refused requests"
    assert set(refused) == {"insufficient_quota"}
    view = _view(admin, tid)
    assert view["credits"] == pytest.approx(initial - sum(charged))
    assert sum(charged) <= initial
    assert view["reserved_credits"] == 0 and view["in_flight"] == 0


async def test_a_reused_x_request_id_is_only_echoed(gateway_url: str, admin: httpx.Client) -> None:
    """Four concurrent requests of one tenant with the same ``x-request-id``: each is its own request
    (reserved, served and charged on its own); the caller's id comes back on every response."""
    tid, key = _tenant(admin, 100_000, limits={"max_tokens_per_request": 300})
    body = {
        "model": "llama-3.1-8b-instruct",  # the simulated pools: quick 250-token answers
        "messages": [{"role": "user", "content": "same id"}],
        "max_tokens": 250,
        "ignore_eos": True,
    }
    headers = {"Authorization": f"Bearer {key}", "x-request-id": "shared-id-1"}
    async with httpx.AsyncClient(base_url=gateway_url, timeout=60) as c:
        rs = await asyncio.gather(
            *(c.post("/v1/chat/completions", json=body, headers=headers) for _ in range(4))
        )
        too_big = await c.post("/v1/chat/completions", json={**body, "max_tokens": 301}, headers=headers)
    assert [r.status_code for r in rs] == [200] * 4, [r.text for r in rs]
    assert all(r.headers["x-request-id"] == "shared-id-1" for r in rs)
    assert len({r.json()["id"] for r in rs}) == 4
    assert sum(r.json()["usage"]["completion_tokens"] for r in rs) == 1000
    # The per-request cap still applies to a request that reuses a live id.
    assert too_big.status_code == 400, too_big.text
    view = _view(admin, tid)
    charged = sum(_credits(r.json()["usage"]) for r in rs)
    assert view["credits"] == pytest.approx(100_000 - charged)
    assert view["reserved_credits"] == 0 and view["in_flight"] == 0


def test_rpm_limit_gives_429_with_retry_after(gateway_url: str, admin: httpx.Client) -> None:
    _, key = _tenant(admin, 10_000, limits={"rpm": 2})
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    h = {"Authorization": f"Bearer {key}"}
    codes = [
        httpx.post(f"{gateway_url}/v1/chat/completions", json=body, headers=h, timeout=60) for _ in range(3)
    ]
    assert [r.status_code for r in codes[:2]] == [200, 200]
    last = codes[2]
    assert last.status_code == 429
    assert last.json()["error"]["code"] == "rate_limit_exceeded"
    assert float(last.headers["retry-after"]) > 0


def test_model_not_allowed_is_403(gateway_url: str, admin: httpx.Client) -> None:
    _, key = _tenant(admin, 1_000, allowed_models=["some-other-model"])
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    r = httpx.post(
        f"{gateway_url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    )
    assert r.status_code == 403, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_disconnects_and_errors_leak_no_reservation(gateway_url: str, admin: httpx.Client) -> None:
    tid, key = _tenant(admin, 50_000)
    h = {"Authorization": f"Bearer {key}"}
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.Client(timeout=60) as c:
        for _ in range(3):
            with c.stream("POST", f"{gateway_url}/v1/chat/completions", json=body, headers=h) as r:
                for i, _line in enumerate(r.iter_lines()):
                    if i > 6:
                        break
        bad = c.post(f"{gateway_url}/v1/chat/completions", json={**body, "max_tokens": 99999}, headers=h)
        assert bad.status_code == 400

    end = time.monotonic() + 30
    view = _view(admin, tid)
    while (view["reserved_credits"] or view["in_flight"]) and time.monotonic() < end:
        time.sleep(0.1)
        view = _view(admin, tid)
    assert view["reserved_credits"] == 0 and view["in_flight"] == 0
    charged = 50_000 - view["credits"]
    assert 0 < charged < 3 * 1500, "aborted streams are charged what they produced, not their reservation"


def test_tenant_isolation_and_admin_refuses_tenant_keys(gateway_url: str, admin: httpx.Client) -> None:
    a_id, a_key = _tenant(admin, 100)
    b_id, _ = _tenant(admin, 100)
    h = {"Authorization": f"Bearer {a_key}"}
    assert httpx.get(f"{gateway_url}/admin/v1/tenants/{b_id}", headers=h).status_code == 401
    assert (
        httpx.post(
            f"{gateway_url}/admin/v1/tenants/{a_id}/credits", json={"credits": 10}, headers=h
        ).status_code
        == 401
    )
    own = httpx.get(f"{gateway_url}/v1/usage", headers=h).json()
    assert own["tenant_id"] == a_id
    assert httpx.get(f"{gateway_url}/v1/usage?tenant_id={b_id}", headers=h).status_code == 400


def test_admin_bad_input_changes_nothing(admin: httpx.Client) -> None:
    tid, _ = _tenant(admin, 100)
    before = _view(admin, tid)
    assert admin.post(f"/admin/v1/tenants/{tid}/credits", json={"credits": -5}).status_code == 400
    assert (
        admin.post(
            "/admin/v1/tenants/nope-" + uuid.uuid4().hex[:6] + "/credits", json={"credits": 5}
        ).status_code
        == 404
    )
    assert admin.put(f"/admin/v1/tenants/{tid}/limits", json={"rpm": "lots"}).status_code == 400
    r = admin.put(f"/admin/v1/tenants/{tid}/limits", json={"rpm": -1})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert _view(admin, tid) == before


def test_revocation_reaches_every_replica_within_1s_and_bad_keys_skip_body_work(
    gateway_url: str, admin: httpx.Client
) -> None:
    tid, key = _tenant(admin, 10_000)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    # Fresh connections each time, so SO_REUSEPORT spreads them over both gateway replicas.
    for _ in range(6):
        assert (
            httpx.post(f"{gateway_url}/v1/chat/completions", json=body, headers=_bearer(key)).status_code
            == 200
        )
    key_id = admin.get(f"/admin/v1/tenants/{tid}/keys").json()["data"][0]["key_id"]
    assert admin.delete(f"/admin/v1/keys/{key_id}").status_code == 200
    t0, statuses = time.monotonic(), []
    while time.monotonic() - t0 < 1.0:
        statuses.append(
            httpx.post(f"{gateway_url}/v1/chat/completions", json=body, headers=_bearer(key)).status_code
        )
    assert statuses and set(statuses) == {401}, statuses
    # A bad key with a 1 MiB body of token ids: refused from the key directory, the body unread.
    huge = b'{"model": "tiny-llama", "prompt": [' + b"1," * 500_000 + b"1]}"
    r = httpx.post(
        f"{gateway_url}/v1/completions",
        content=huge,
        headers={**_bearer("tw-" + "q" * 43), "content-type": "application/json"},
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_cached_prompt_tokens_are_reported_and_charged_at_the_cached_price(
    gateway_url: str, admin: httpx.Client
) -> None:
    """The real vLLM engine's prefix-cache hits come back as ``prompt_tokens_details.cached_tokens``
    (the second identical prompt finds at least one 128-token block of the CPU build's cache) and
    the ledger charges them at half the prompt price (the default cached price)."""
    tid, key = _tenant(admin, 10_000)
    client = openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=key, max_retries=0)
    messages = [{"role": "user", "content": " ".join(f"w{i}" for i in range(300))}]
    charged = 0.0
    results = []
    for _ in range(2):
        r = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=3, extra_body={"ignore_eos": True}
        )
        u = r.usage
        assert u.prompt_tokens > 256 and u.completion_tokens == 3
        cached = u.prompt_tokens_details.cached_tokens
        charged += u.prompt_tokens - cached / 2 + u.completion_tokens
        results.append(cached)
    assert results[1] >= 128 and results[1] % 128 == 0, results
    view = _view(admin, tid)
    assert view["credits"] == pytest.approx(10_000 - charged)
    assert view["reserved_credits"] == 0 and view["in_flight"] == 0
