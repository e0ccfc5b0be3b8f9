"""Fuzzing the live gateway from its own OpenAPI document (schemathesis), plus hand-made hostile
requests: no response >= 500, no request left without an answer, every error the OpenAI body.

Two Tokenweir applications on simulated pools share one local Ray (no vLLM, so the tier stands
alone): ``fuzz-api`` serves the OpenAI routes to a fuzz tenant without rate limits or quota whose
``max_tokens`` is capped at 8 (the ledger enforces the cap, so a fuzzed request costs at most 8
simulated tokens per choice), and ``fuzz-admin`` has its own ledger and admin key, so that a fuzzed
revoke, limit or top-up never touches the fuzz tenant. The seed is fixed; the counts are printed at
the end of the session (``tests/fuzz/conftest.py``).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import strategies as st

from serving.api.protocol import ErrorBody

pytestmark = [pytest.mark.fuzz, pytest.mark.integration, pytest.mark.timeout(900)]

MODEL = "llama-3.1-8b-instruct"
SEED = 20_240_613
REQUEST_TIMEOUT_S = 30.0
"""A request without a complete answer by then is a hang."""
MAX_TOKENS = 8
MIN_CASES = 5_000
API_NAMESPACE = "tokenweir-fuzz"
ADMIN_NAMESPACE = "tokenweir-fuzz-admin"
API_ADMIN_KEY = "fuzz-api-admin-" + "a" * 24
"""The fuzz-api ledger's admin key: used here to create the fuzz tenant, never given to the fuzzer."""
ADMIN_KEY = "fuzz-admin-" + "b" * 24
"""The fuzz-admin ledger's admin key, fuzzed with."""
MAX_EXAMPLES = {"api": 1100, "admin": 300}
"""Fuzzing-phase examples per operation (the coverage and examples phases add their own)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(namespace: str, state: Path, admin_key: str) -> Any:
    from serving.config import parse_config

    return parse_config(
        {
            "gateway": {
                "host": "127.0.0.1",
                "port": _free_port(),
                "internal_port": _free_port(),
                "replicas": 1,
            },
            "metering": {"admin_key": admin_key},
            "models": {MODEL: {"tokenizer": "builtin:tiny-llama"}},
            "ray": {"num_cpus": 8, "namespace": namespace},
            "state_dir": str(state),
            "pools": [
                {
                    "name": "sim",
                    "model": MODEL,
                    "accelerator": "H100",
                    "engine": "sim",
                    "sim_speedup": 50,
                    "slo": {"ttft_ms": 60000, "tpot_ms": 5000},
                }
            ],
        }
    )


def _admin(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30)


@pytest.fixture(scope="module")
def gateways(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Deploy ``fuzz-api`` and ``fuzz-admin``; create the fuzz tenant (in fuzz-api's ledger) and a
    target tenant with a key (in fuzz-admin's), which the admin fuzzing aims at half the time."""
    import ray
    from ray import serve

    from serving.app import build_app
    from serving.cli import runtime

    api_cfg = _config(API_NAMESPACE, tmp_path_factory.mktemp("fuzz-api"), API_ADMIN_KEY)
    admin_cfg = _config(ADMIN_NAMESPACE, tmp_path_factory.mktemp("fuzz-admin"), ADMIN_KEY)
    own_ray = not ray.is_initialized()
    runtime.init_ray(api_cfg)
    serve.start(http_options={"location": "NoServer"})
    apps = {"fuzz-api": api_cfg, "fuzz-admin": admin_cfg}
    try:
        for name, cfg in apps.items():
            serve.run(build_app(cfg), name=name, route_prefix=None, blocking=False)
        urls = {name: f"http://{c.gateway.host}:{c.gateway.port}" for name, c in apps.items()}
        for url in urls.values():
            runtime.wait_ready(url, timeout_s=300)
        with _admin(urls["fuzz-api"], API_ADMIN_KEY) as admin:
            r = admin.post(
                "/admin/v1/tenants",
                json={
                    "tenant_id": "fuzz",
                    "name": "fuzz",
                    "credits": 1e12,
                    "limits": {
                        "rpm": 10_000_000,
                        "tpm": 10_000_000_000,
                        "max_tokens_per_request": MAX_TOKENS,
                    },
                },
            )
            assert r.status_code == 201, r.text
            r = admin.post("/admin/v1/tenants/fuzz/keys", json={"name": "fuzz"})
            assert r.status_code == 201, r.text
            fuzz_key = r.json()["api_key"]
        with _admin(urls["fuzz-admin"], ADMIN_KEY) as admin:
            r = admin.post("/admin/v1/tenants", json={"tenant_id": "target", "name": "t", "credits": 10})
            assert r.status_code == 201, r.text
            r = admin.post("/admin/v1/tenants/target/keys", json={})
            assert r.status_code == 201, r.text
            target_key_id = r.json()["key_id"]
        yield {
            "api_url": urls["fuzz-api"],
            "admin_url": urls["fuzz-admin"],
            "fuzz_key": fuzz_key,
            "target_key_id": target_key_id,
        }
    finally:
        for name in apps:
            serve.delete(name)
        if own_ray:
            runtime.shutdown()


def _schema_config(key: str, max_examples: int) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "suppress-health-check": ["all"],
            "headers": {"Authorization": f"Bearer {key}"},
            "request-timeout": REQUEST_TIMEOUT_S,
            "generation": {"mode": "all", "max-examples": max_examples, "database": "none"},
            "phases": {"stateful": {"enabled": False}},
            "checks": {"enabled": False, "not_a_server_error": {"enabled": True}},
            "workers": 1,
        }
    )


@pytest.fixture(scope="module")
def api_schema(gateways: dict[str, Any]) -> Any:
    """The OpenAI and self-service routes of fuzz-api, with the fuzz tenant's key; half the
    generation bodies name the served model, so that they reach the pool."""
    schema = schemathesis.openapi.from_url(
        gateways["api_url"] + "/openapi.json",
        config=_schema_config(gateways["fuzz_key"], MAX_EXAMPLES["api"]),
    ).exclude(path_regex="^/admin/")

    @schema.hook
    def flatmap_body(context: Any, body: Any) -> Any:
        if isinstance(body, dict) and context.operation.path.endswith("completions"):
            return st.sampled_from([body, {**body, "model": MODEL}])
        return st.just(body)

    return schema


@pytest.fixture(scope="module")
def admin_schema(gateways: dict[str, Any]) -> Any:
    """The admin routes of fuzz-admin, with its admin key; half the cases aim at a real tenant or key."""
    schema = schemathesis.openapi.from_url(
        gateways["admin_url"] + "/openapi.json",
        config=_schema_config(ADMIN_KEY, MAX_EXAMPLES["admin"]),
    ).include(path_regex="^/admin/")
    target = {"tenant_id": "target", "key_id": gateways["target_key_id"]}

    @schema.hook
    def flatmap_path_parameters(context: Any, params: Any) -> Any:
        if not isinstance(params, dict) or not params:
            return st.just(params)
        aimed = {k: target.get(k, v) for k, v in params.items()}
        return st.sampled_from([params, aimed])

    return schema


def _server_error_events(text: str) -> list[str]:
    """Error events of type server_error inside an SSE body."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            try:
                event = json.loads(line[6:])
            except ValueError:
                out.append(f"not JSON: {line[:200]}")
                continue
            err = event.get("error") if isinstance(event, dict) else None
            if isinstance(err, dict) and err.get("type") == "server_error":
                out.append(json.dumps(err)[:300])
    return out


def _check(stats: Any, label: str, status: int, content_type: str, text: str, what: str) -> list[str]:
    """Count one answer; what is wrong with it: a server error (a status >= 500, or an error event
    of type server_error in a stream), an error that is not the OpenAI body, or more completion
    tokens than the fuzz tenant's cap allows."""
    stats.record(label, status)
    wrong = []
    if status >= 500:
        wrong.append(f"{label} -> {status}: {text[:300]} [{what}]")
        stats.server_errors.append(wrong[-1])
    elif content_type.startswith("text/event-stream"):
        bad = _server_error_events(text)
        if bad:
            wrong.append(f"{label} -> stream error {bad[0]} [{what}]")
            stats.server_errors.append(wrong[-1])
    if status >= 400:
        try:
            assert content_type.startswith("application/json"), content_type
            ErrorBody.model_validate_json(text)
        except (AssertionError, ValueError) as e:
            wrong.append(f"{label} -> {status} without the OpenAI error body: {e} [{what}]")
    elif status == 200 and content_type.startswith("application/json") and label.endswith("completions"):
        body = json.loads(text)
        cap = MAX_TOKENS * max(1, len(body["choices"]))
        if body["usage"]["completion_tokens"] > cap:
            wrong.append(f"{label}: {body['usage']} past the cap of {cap} tokens [{what}]")
    return wrong


def _fuzz(schema: Any, stats: Any, key: str) -> None:
    """Run schemathesis's phases (examples, coverage, fuzzing) on ``schema``, tallying every answer
    into ``stats``; fail on anything :func:`_check` finds, on a request left without an answer (a
    network error or the per-request timeout) and on what the engine itself reports."""
    from schemathesis.engine import Status, events, from_schema

    failures: list[str] = []

    def curl(case: Any) -> str:
        return case.as_curl_command().replace(key, "<key>")[:2000]

    @schema.hook
    def after_call(context: Any, case: Any, response: Any) -> None:
        ctype = next((v[0] for k, v in response.headers.items() if k.lower() == "content-type"), "")
        text = response.content.decode("utf-8", "replace")
        failures.extend(_check(stats, case.operation.label, response.status_code, ctype, text, curl(case)))

    @schema.hook
    def after_network_error(context: Any, case: Any, request: Any) -> None:
        stats.record(case.operation.label, 0)
        stats.hangs.append(f"{case.operation.label}: no answer within {REQUEST_TIMEOUT_S:g} s [{curl(case)}]")
        failures.append(stats.hangs[-1])

    for event in from_schema(schema).execute():
        if isinstance(event, events.FatalError):
            raise event.exception
        if isinstance(event, events.NonFatalError):
            failures.append(f"{event.label}: {event.info.format()}"[:8000].replace(key, "<key>"))
        if isinstance(event, events.ScenarioFinished) and event.status == Status.FAILURE:
            failures.append(f"{event.recorder.label}: a check failed")
    if failures:
        pytest.fail("\n\n".join(failures[:20]), pytrace=False)


def test_fuzz_openai_routes(api_schema: Any, gateways: dict[str, Any], fuzz_stats: Any) -> None:
    _fuzz(api_schema, fuzz_stats, gateways["fuzz_key"])


def test_fuzz_admin_routes(admin_schema: Any, fuzz_stats: Any) -> None:
    _fuzz(admin_schema, fuzz_stats, ADMIN_KEY)


def test_at_least_5000_generated_cases(fuzz_stats: Any) -> None:
    assert fuzz_stats.cases >= MIN_CASES, fuzz_stats.report()


_DEEP = 100_000
_MiB = 1 << 20
_JSON = "application/json"
_M = f'"model": "{MODEL}"'
_MSGS = '"messages": [{"role": "user", "content": "hi"}]'


def _chat(extra: str = "") -> bytes:
    return ("{" + f"{_M}, {_MSGS}{extra}" + "}").encode()


def _completion(prompt: str, extra: str = "") -> bytes:
    return ("{" + f'{_M}, "prompt": {prompt}{extra}' + "}").encode()


CHAT, COMPLETIONS = "POST /v1/chat/completions", "POST /v1/completions"
HAND_MADE: list[tuple[str, str, str, bytes, str | None]] = [
    # (name, app, "METHOD path", body, content type)
    ("chat messages nested 100,000 deep", "api", CHAT,
     ("{" + f'{_M}, "messages": ').encode() + b"[" * _DEEP + b"]" * _DEEP + b"}", _JSON),
    ("chat content nested 100,000 objects deep", "api", CHAT,
     ("{" + f'{_M}, "messages": [{{"role": "user", "content": ').encode()
     + b'{"a": ' * _DEEP + b"1" + b"}" * _DEEP + b"}]}", _JSON),
    ("lone surrogate in a completions prompt", "api", COMPLETIONS, _completion('"a\\ud800b"'), _JSON),
    ("lone low surrogate in a chat message", "api", CHAT,
     ("{" + f'{_M}, "messages": [{{"role": "user", "content": "\\udfff"}}]' + "}").encode(), _JSON),
    ("a surrogate's UTF-8 bytes in a prompt", "api", COMPLETIONS,
     ("{" + f'{_M}, "prompt": "a').encode() + b"\xed\xa0\x80" + b'b"}', _JSON),
    ("prompt [true, false]", "api", COMPLETIONS, _completion("[true, false]"), _JSON),
    ("prompt token id past 2**64", "api", COMPLETIONS, _completion(f"[{2**70}]"), _JSON),
    ("seed past int64", "api", CHAT, _chat(f', "seed": {2**64}'), _JSON),
    ("seed below int64", "api", COMPLETIONS, _completion('"x"', f', "seed": {-(2**63) - 1}'), _JSON),
    ("best_of on completions", "api", COMPLETIONS, _completion('"x"', ', "best_of": 3'), _JSON),
    ("best_of on chat", "api", CHAT, _chat(', "best_of": 2'), _JSON),
    ("max_tokens 10**30", "api", CHAT, _chat(f', "max_tokens": {10**30}'), _JSON),
    ("min_tokens 10**30", "api", COMPLETIONS, _completion('"x"', f', "min_tokens": {10**30}'), _JSON),
    ("n 10**30", "api", CHAT, _chat(f', "n": {10**30}'), _JSON),
    ("temperature NaN", "api", CHAT, _chat(', "temperature": NaN'), _JSON),
    ("top_p Infinity", "api", COMPLETIONS, _completion('"x"', ', "top_p": Infinity'), _JSON),
    ("a body over 1 MiB", "api", COMPLETIONS, _completion('"' + "x" * _MiB + '"'), _JSON),
    ("broken UTF-8", "api", COMPLETIONS, b'{"model": "\xff\xfe", "prompt": "\xc3\x28"}', _JSON),
    ("truncated JSON", "api", CHAT, _chat()[:-5], _JSON),
    ("empty body", "api", CHAT, b"", _JSON),
    ("null body", "api", COMPLETIONS, b"null", _JSON),
    ("text/plain", "api", CHAT, _chat(), "text/plain"),
    ("form-encoded", "api", COMPLETIONS, _completion('"x"'), "application/x-www-form-urlencoded"),
    ("multipart", "api", CHAT, _chat(), "multipart/form-data; boundary=x"),
    ("usage since NaN", "api", "GET /v1/usage?since=nan", b"", None),
    ("admin: tenant body nested 100,000 deep", "admin", "POST /admin/v1/tenants",
     b'{"name": ' + b"[" * _DEEP + b"]" * _DEEP + b"}", _JSON),
    ("admin: lone surrogate in a tenant name", "admin", "POST /admin/v1/tenants",
     b'{"tenant_id": "surrogate", "name": "a\\ud800"}', _JSON),
    ("admin: lone surrogate in a key name", "admin", "POST /admin/v1/tenants/target/keys",
     b'{"name": "\\udc00"}', _JSON),
    ("admin: broken UTF-8", "admin", "POST /admin/v1/tenants", b'{"name": "\xff"}', _JSON),
    ("admin: text/plain", "admin", "POST /admin/v1/tenants/target/credits", b'{"credits": 1}', "text/plain"),
    ("admin: credits NaN", "admin", "POST /admin/v1/tenants/target/credits", b'{"credits": NaN}', _JSON),
    ("admin: top-up past the maximum balance", "admin", "POST /admin/v1/tenants/target/credits",
     b'{"credits": 1e12}', _JSON),
    ("admin: usage since inf", "admin", "GET /admin/v1/usage?since=inf&until=-inf", b"", None),
    ("admin: usage since nan", "admin", "GET /admin/v1/usage?since=nan&format=csv", b"", None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("app", "route", "body", "content_type"),
    [pytest.param(a, r, b, c, id=n) for n, a, r, b, c in HAND_MADE],
)
def test_hand_made_hostile_requests(
    gateways: dict[str, Any], fuzz_stats: Any, app: str, route: str, body: bytes, content_type: str | None
) -> None:
    """Each is refused with a 4xx and the OpenAI error body, in time."""
    method, path = route.split(" ", 1)
    url, key = (
        (gateways["api_url"], gateways["fuzz_key"]) if app == "api" else (gateways["admin_url"], ADMIN_KEY)
    )
    r = httpx.request(
        method,
        url + path,
        content=body or None,
        headers={
            "Authorization": f"Bearer {key}",
            **({"content-type": content_type} if content_type else {}),
        },
        timeout=REQUEST_TIMEOUT_S,
    )
    label = f"hand-made {route}"
    assert not _check(fuzz_stats, label, r.status_code, r.headers.get("content-type", ""), r.text, "")
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert err["message"] and err["type"], err
