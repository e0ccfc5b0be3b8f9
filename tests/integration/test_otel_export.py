"""OTLP trace export through the live gateway: the session's gateways export to a real OTLP/HTTP
receiver on 127.0.0.1 (tests/_otlp.py, the collector boundary; tests/conftest.py sets
``gateway.otel_endpoint``). A request with a W3C traceparent gets a span in the caller's trace with
the caller's span as its parent, the organization and project ids, model, pool, GPU type, status,
tokens and TTFT; a refused one gets a span with its status and error; no key is ever sent."""

from __future__ import annotations

import secrets

import httpx

from tests._otlp import OtlpReceiver, ReceivedSpan

MODEL = "llama-3.1-8b-instruct"  # the simulated H100 and A10 pools


def test_request_spans_reach_the_collector_in_the_callers_trace(
    gateway_url: str, api_key: str, otlp: OtlpReceiver
) -> None:
    trace, parent = secrets.token_hex(16), secrets.token_hex(8)
    tag = secrets.token_hex(4)
    auth = {"Authorization": f"Bearer {api_key}"}
    tp = {"traceparent": f"00-{trace}-{parent}-01"}
    with httpx.Client(base_url=gateway_url, timeout=60) as http:
        r = http.post(
            "/v1/chat/completions",
            headers=auth | tp | {"x-request-id": f"otel-ok-{tag}"},
            json={"model": MODEL, "messages": [{"role": "user", "content": "trace me"}], "max_tokens": 4},
        )
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        with http.stream(
            "POST",
            "/v1/completions",
            headers=auth | tp | {"x-request-id": f"otel-stream-{tag}"},
            json={"model": MODEL, "prompt": "stream me", "max_tokens": 3, "stream": True},
        ) as s:
            assert s.status_code == 200 and "data: [DONE]" in list(s.iter_lines())
        bad_key = "tw-" + "x" * 40
        refused = http.post(
            "/v1/chat/completions",
            headers={"Authorization": f"Bearer {bad_key}", "x-request-id": f"otel-401-{tag}"} | tp,
            json={"model": MODEL, "messages": [{"role": "user", "content": "no"}]},
        )
        assert refused.status_code == 401

    def ours(spans: list[ReceivedSpan]) -> dict[str, ReceivedSpan]:
        return {
            str(s.attributes.get("tokenweir.client_request_id")).split("-")[1]: s
            for s in spans
            if str(s.attributes.get("tokenweir.client_request_id", "")).endswith(tag)
        }

    got = ours(otlp.wait_for(lambda spans: len(ours(spans)) == 3))
    ok, st, no = got["ok"], got["stream"], got["401"]
    for s in (ok, st, no):
        assert (s.trace_id, s.parent_span_id) == (trace, parent), s
        assert s.kind == 2 and s.resource["service.name"] == "tokenweir"  # SERVER
    assert ok.span_id != st.span_id
    assert ok.name == "POST /v1/chat/completions" and st.name == "POST /v1/completions"
    a = ok.attributes
    assert a["http.response.status_code"] == 200 and a["gen_ai.request.model"] == MODEL
    assert a["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert a["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 4
    assert a["tokenweir.pool"] in ("sim-h100", "sim-a10") and a["tokenweir.gpu"] in ("H100", "A10")
    assert a["tokenweir.organization"] and a["tokenweir.project"] and a["tokenweir.credits"] > 0
    assert a["tokenweir.ttft_s"] > 0 and a["tokenweir.outcome"] == "ok"
    assert ok.end_ns > ok.start_ns
    assert st.attributes["tokenweir.stream"] is True and st.attributes["gen_ai.usage.output_tokens"] == 3
    assert no.attributes["http.response.status_code"] == 401
    assert no.attributes["error.type"] == "invalid_api_key" and "tokenweir.organization" not in no.attributes
    assert no.status_code == 0  # a 4xx is the caller's error, not the span's
    # no key, the caller's or a refused one, in anything sent to the collector
    raw = b"".join(otlp.bodies)
    assert api_key.encode() not in raw and bad_key.encode() not in raw
    assert api_key[-12:].encode() not in raw
