"""The OpenAI-compatible API through the official `openai` client against a live gateway:
real Ray Serve, real vLLM (CPU build) on the tiny model."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration
MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def client(gateway_url: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway_url}/v1", api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def auth(api_key: str) -> dict:
    return {"Authorization": f"Bearer {api_key}"}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def _chat_prompt_len(tokenizer, messages) -> int:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return len(ids)


def test_chat_completion_usage_is_exact(client: openai.OpenAI, tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about weirs."},
    ]
    r = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, extra_body={"ignore_eos": True}
    )
    assert r.object == "chat.completion"
    assert r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == _chat_prompt_len(tokenizer, messages)
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_a_previous_answer_goes_back_in_messages(client: openai.OpenAI) -> None:
    """The client appends the message it got back (as the openai SDK serializes it); fields that
    Tokenweir would drop are refused by name instead of ignored (issue 13)."""
    messages: list = [{"role": "user", "content": "Tell me about weirs."}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    messages += [first.choices[0].message, {"role": "user", "content": "And rivers?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, store=False)
    assert r.choices[0].message.role == "assistant"
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, extra_body={"top_k": 5})
    assert ei.value.body["param"] == "top_k"
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(
            model=MODEL, messages=[*messages, {"role": "assistant", "tool_calls": [call]}], max_tokens=4
        )
    assert ei.value.body["param"] == "messages[3].tool_calls"


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Stream please"}],
        max_completion_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    assert content_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in content_chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert len({c.id for c in chunks}) == 1


def test_seed_makes_sampling_reproducible_and_n_gives_choices(client: openai.OpenAI) -> None:
    kw = dict(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=16, seed=7, temperature=1.0
    )
    a = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    b = client.chat.completions.create(**kw, extra_body={"ignore_eos": True})
    assert a.choices[0].message.content == b.choices[0].message.content
    r = client.chat.completions.create(**{**kw, "n": 3}, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 3 * 16


def test_stop_sequence_ends_with_stop(client: openai.OpenAI) -> None:
    kw = dict(
        model=MODEL,
        prompt="The river",
        max_tokens=40,
        seed=11,
        temperature=1.0,
        extra_body={"ignore_eos": True},
    )
    full = client.completions.create(**kw).choices[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    r = client.completions.create(**kw, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].text
    assert full.startswith(r.choices[0].text)


def test_completions_stream_and_token_id_prompt(client: openai.OpenAI, tokenizer) -> None:
    ids = tokenizer("A weir regulates a river")["input_ids"]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, extra_body={"ignore_eos": True})
    assert r.object == "text_completion"
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == 5
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(model=MODEL, prompt="A weir", max_tokens=6, stream=True)
        if c.choices
    )
    assert isinstance(text, str)


def test_logprobs_chat_and_completions(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    c = client.completions.create(
        model=MODEL, prompt="x", max_tokens=3, logprobs=2, extra_body={"ignore_eos": True}
    )
    assert len(c.choices[0].logprobs.tokens) == 3
    assert all(len(d) <= 2 for d in c.choices[0].logprobs.top_logprobs)


def test_models_health_ready_and_request_ids(gateway_url: str, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert MODEL in [m.id for m in models.data]
    for path in ("/healthz", "/readyz", "/readyz/pools", "/v1/models"):
        r = httpx.get(gateway_url + path)
        assert r.status_code == 200, (path, r.text)
        assert r.headers.get("x-request-id")
    own = httpx.get(gateway_url + "/readyz").json()
    assert own["ledger"] == "ready"  # the gateway's own readiness: its ledger link and >= 1 pool
    pools = httpx.get(gateway_url + "/readyz/pools").json()["pools"]
    assert (
        pools
        == own["pools"]
        == {
            "tiny-cpu": "ready",
            "sim-h100": "ready",
            "sim-a10": "ready",
            "sim-l40s": "ready",
        }
    )


def test_internals_are_only_on_the_operators_listener(gateway_url: str, internal_url: str) -> None:
    """The public port shows nothing about tenants and makes no call into the pools for anyone."""
    for path in ("/metrics", "/internal/pools"):
        r = httpx.get(gateway_url + path, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
        assert "tenant" not in r.text
    assert "tokenweir_credits_remaining" in httpx.get(internal_url + "/metrics", timeout=30).text
    assert set(httpx.get(internal_url + "/internal/pools", timeout=30).json()) == {
        "tiny-cpu",
        "sim-h100",
        "sim-a10",
        "sim-l40s",
    }
    deep = httpx.get(internal_url + "/readyz", timeout=30)
    assert deep.status_code == 200 and deep.json()["status"] == "ready", deep.text


def _post(url: str, path: str, auth: dict, **kw) -> httpx.Response:
    return httpx.post(url + path, timeout=60, headers={**auth, **kw.pop("headers", {})}, **kw)


def _assert_openai_error(r: httpx.Response, status: int, *fragments: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers.get("x-request-id")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for f in fragments:
        assert f in err["message"], err
    return err


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"model": MODEL, "messages": "hi"}, "messages"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 9}, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "seed": 2**64}, "seed"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "best_of": 3}, "best_of"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 9}},
            "logit_bias",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            "tools",
        ),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temprature": 0.5}, "temprature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_k": 40}, "top_k"),
    ],
)
def test_bad_chat_bodies_get_400(gateway_url: str, auth: dict, body: dict, fragment: str) -> None:
    err = _assert_openai_error(_post(gateway_url, "/v1/chat/completions", auth, json=body), 400, fragment)
    assert err["type"] == "invalid_request_error"


def test_malformed_json_and_non_object(gateway_url: str, auth: dict) -> None:
    _assert_openai_error(
        _post(
            gateway_url,
            "/v1/chat/completions",
            auth,
            content=b"{not json",
            headers={"content-type": "application/json"},
        ),
        400,
        "not valid JSON",
    )
    _assert_openai_error(_post(gateway_url, "/v1/completions", auth, json=[1, 2]), 400, "JSON object")


def test_hostile_bodies_get_400_not_500(gateway_url: str, auth: dict) -> None:
    deep = b'{"model": "tiny-llama", "messages": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    _assert_openai_error(
        _post(
            gateway_url,
            "/v1/chat/completions",
            auth,
            content=deep,
            headers={"content-type": "application/json"},
        ),
        400,
        "nested too deeply",
    )
    lone = b'{"model": "tiny-llama", "prompt": "a\\ud800b", "max_tokens": 2}'
    _assert_openai_error(
        _post(
            gateway_url, "/v1/completions", auth, content=lone, headers={"content-type": "application/json"}
        ),
        400,
        "surrogate",
    )
    err = _assert_openai_error(
        _post(gateway_url, "/v1/completions", auth, json={"model": MODEL, "prompt": [True, False]}), 400
    )
    assert err["param"] == "prompt"
    # A surrogate pair (an emoji, as ensure_ascii JSON encoders send it) is fine.
    pair = b'{"model": "tiny-llama", "prompt": "\\ud83d\\ude00", "max_tokens": 1}'
    r = _post(
        gateway_url, "/v1/completions", auth, content=pair, headers={"content-type": "application/json"}
    )
    assert r.status_code == 200, r.text
    # Harmless values of unsupported fields are accepted.
    r = _post(
        gateway_url,
        "/v1/chat/completions",
        auth,
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 1,
            "best_of": 1,
            "tools": [],
            "response_format": {"type": "text"},
            "store": False,
            "top_k": -1,
            "repetition_penalty": 1.0,
        },
    )
    assert r.status_code == 200, r.text


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert ei.value.body["code"] == "model_not_found"


def test_context_length_error_names_both_numbers(gateway_url: str, auth: dict, tokenizer) -> None:
    msgs = [{"role": "user", "content": "hello"}]
    n_prompt = _chat_prompt_len(tokenizer, msgs)
    r = _post(
        gateway_url, "/v1/chat/completions", auth, json={"model": MODEL, "messages": msgs, "max_tokens": 5000}
    )
    err = _assert_openai_error(r, 400, "2048", str(n_prompt), "5000")
    assert err["code"] == "context_length_exceeded"
    huge = "weir " * 3000
    r = _post(gateway_url, "/v1/completions", auth, json={"model": MODEL, "prompt": huge, "max_tokens": 1})
    _assert_openai_error(r, 400, "2048")
    ids = [5] * 10_000  # a ~50 KB body: prepared off the event loop, same errors
    r = _post(gateway_url, "/v1/completions", auth, json={"model": MODEL, "prompt": ids, "max_tokens": 1})
    _assert_openai_error(r, 400, "2048", "10000")


def test_body_over_limit_is_413(gateway_url: str, auth: dict) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 70000}]}
    err = _assert_openai_error(_post(gateway_url, "/v1/chat/completions", auth, json=body), 413, "65536")
    assert err["code"] == "payload_too_large"


def test_gateway_serves_after_errors(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "still up?"}], max_tokens=2
    )
    assert r.usage.completion_tokens >= 1


def test_access_log_has_one_line_per_request_with_trace_and_usage(
    live: dict, gateway_url: str, auth: dict
) -> None:
    import json
    import time
    from pathlib import Path

    trace = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
    r = _post(
        gateway_url,
        "/v1/chat/completions",
        auth,
        headers={"x-request-id": "access-ok-1", "traceparent": trace},
        json={"model": MODEL, "messages": [{"role": "user", "content": "log me"}], "max_tokens": 3},
    )
    assert r.status_code == 200
    usage = r.json()["usage"]
    bad = _post(
        gateway_url,
        "/v1/chat/completions",
        auth,
        headers={"x-request-id": "access-bad-1"},
        json={"model": MODEL},
    )
    assert bad.status_code == 400
    with httpx.stream(
        "POST",
        gateway_url + "/v1/completions",
        headers={**auth, "x-request-id": "access-stream-1", "traceparent": "not-a-trace"},
        json={"model": MODEL, "prompt": "s", "max_tokens": 2, "stream": True},
        timeout=60,
    ) as s:
        assert s.status_code == 200 and list(s.iter_lines())
    path = Path(live["state_dir"]) / "access.log"
    deadline = time.monotonic() + 10
    lines: dict[str, dict] = {}
    while time.monotonic() < deadline and len(lines) < 3:
        recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
        lines = {
            r["client_request_id"]: r for r in recs if r.get("client_request_id", "").startswith("access-")
        }
        time.sleep(0.1)
    ok, err, st = lines["access-ok-1"], lines["access-bad-1"], lines["access-stream-1"]
    assert ok["status"] == 200 and ok["traceparent"] == trace and ok["model"] == MODEL
    assert (
        ok["prompt_tokens"] == usage["prompt_tokens"]
        and ok["completion_tokens"] == usage["completion_tokens"]
    )
    assert ok["pool"] == "tiny-cpu" and ok["gpu"] == "CPU" and ok["tenant"] and ok["credits"] > 0
    assert ok["ttft_s"] > 0 and ok["duration_s"] >= ok["ttft_s"] and ok["request_id"] != "access-ok-1"
    # Its wait at the gateway's fair gate and in the pool replica's queue (a real wait is measured
    # in tests/unit/test_access_log.py, on a pool of one sequence).
    assert 0 <= ok["queue_s"] < ok["duration_s"] and 0 <= st["queue_s"] < st["duration_s"]
    assert err["status"] == 400 and err["model"] == MODEL and "tenant" not in err and "request_id" not in err
    assert "queue_s" not in err and "ttft_s" not in err  # it never reached a pool
    assert st["stream"] is True and st["completion_tokens"] == 2 and "traceparent" not in st
    assert auth["Authorization"].split()[-1] not in path.read_text()
