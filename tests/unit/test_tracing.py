"""OTLP export of request spans (serving/gateway/tracing.py) against a real OTLP/HTTP receiver on
127.0.0.1 (tests/_otlp.py: an HTTP server decoding OpenTelemetry's protobuf; the collector is the one
fake). The live request path is in tests/integration/test_otel_export.py."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from serving.config.schema import GatewayConfig
from serving.gateway.access_log import AccessRecord
from serving.gateway.tracing import RequestTracer
from tests._otlp import OtlpReceiver

TRACE = "0af7651916cd43dd8448eb211c80319c"
PARENT = "b7ad6b7169203331"


@pytest.fixture
def rx() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def record(status: int = 200, **kw: object) -> AccessRecord:
    fields: dict[str, object] = {
        "ts": time.time(),
        "status": status,
        "request_id": "0190abc",
        "client_request_id": "client-1",
        "tenant": "acme",
        "project": "alice",
        "model": "llama-3.1-8b-instruct",
        "kind": "chat",
        "stream": True,
        "pool": "sim-h100",
        "gpu": "H100",
        "outcome": "ok",
        "prompt_tokens": 12,
        "completion_tokens": 8,
        "cached_tokens": 0,
        "credits": 20.0,
        "queue_s": 0.003,
        "ttft_s": 0.042,
        "duration_s": 0.2,
    }
    return AccessRecord(**(fields | kw))  # type: ignore[arg-type]


def test_off_by_default_and_the_exporter_is_not_imported() -> None:
    """Off (the default), the gateway never imports this module or the OTLP exporter. (Ray Serve
    itself imports OpenTelemetry's API and SDK in every Serve process, for its own tracing.)"""
    assert GatewayConfig().otel_endpoint is None
    code = (
        "import sys\n"
        "import serving.app, serving.gateway.deployment\n"
        "from serving.config import parse_config, resolve\n"
        "resolve(parse_config({'pools': [{'name': 'p', 'model': 'llama-3.1-8b-instruct',"
        " 'accelerator': 'H100', 'engine': 'sim'}]}))\n"
        "print(sorted(m for m in sys.modules if m == 'serving.gateway.tracing'"
        " or m.startswith('opentelemetry.exporter')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_endpoint_is_validated() -> None:
    assert GatewayConfig(otel_endpoint="http://otel:4318/v1/traces").otel_endpoint
    for bad in ("otel:4318", "grpc://otel:4317", "http://"):
        with pytest.raises(ValidationError):
            GatewayConfig(otel_endpoint=bad)


def test_a_span_carries_the_callers_trace_and_the_access_fields_never_a_key(rx: OtlpReceiver) -> None:
    tracer = RequestTracer(rx.endpoint, "tokenweir-test", "gw-1", batch_delay_ms=50)
    t0 = time.time()
    span = tracer.start("chat", f"00-{TRACE}-{PARENT}-01", t0)
    mine = tracer.traceparent_of(span)
    assert mine.startswith(f"00-{TRACE}-") and mine.endswith("-01") and PARENT not in mine
    rec = record()
    tracer.finish(span, rec)
    (got,) = rx.wait_for(lambda s: len(s) == 1)
    assert rx.content_types == ["application/x-protobuf"]
    assert (got.trace_id, got.parent_span_id, got.span_id) == (TRACE, PARENT, mine[36:52])
    assert got.name == "POST /v1/chat/completions" and got.kind == 2  # SPAN_KIND_SERVER
    assert got.start_ns == int(t0 * 1e9) and got.end_ns == int(rec.ts * 1e9)
    assert got.status_code == 0  # unset
    assert got.resource["service.name"] == "tokenweir-test"
    assert got.resource["service.instance.id"] == "gw-1"
    assert got.attributes == {
        "http.request.method": "POST",
        "http.route": "/v1/chat/completions",
        "http.response.status_code": 200,
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "llama-3.1-8b-instruct",
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 8,
        "tokenweir.request_id": "0190abc",
        "tokenweir.client_request_id": "client-1",
        "tokenweir.organization": "acme",
        "tokenweir.project": "alice",
        "tokenweir.pool": "sim-h100",
        "tokenweir.gpu": "H100",
        "tokenweir.outcome": "ok",
        "tokenweir.stream": True,
        "tokenweir.cached_tokens": 0,
        "tokenweir.credits": 20.0,
        "tokenweir.queue_s": 0.003,
        "tokenweir.ttft_s": 0.042,
    }
    tracer.shutdown()


def test_without_a_traceparent_a_trace_starts_and_a_5xx_is_an_error(rx: OtlpReceiver) -> None:
    tracer = RequestTracer(rx.endpoint, "tokenweir", "gw-1", batch_delay_ms=50)
    span = tracer.start("completion", None, time.time())
    tracer.finish(span, record(503, kind="completion", error="engine_unavailable", tenant=None))
    (got,) = rx.wait_for(lambda s: len(s) == 1)
    assert got.parent_span_id == "" and got.trace_id not in ("", "0" * 32)
    assert got.name == "POST /v1/completions" and got.status_code == 2  # STATUS_CODE_ERROR
    assert got.attributes["error.type"] == "engine_unavailable"
    assert got.attributes["gen_ai.operation.name"] == "text_completion"
    assert "tokenweir.organization" not in got.attributes
    tracer.shutdown()


def test_an_unsampled_callers_trace_is_not_recorded(rx: OtlpReceiver) -> None:
    tracer = RequestTracer(rx.endpoint, "tokenweir", "gw-1", batch_delay_ms=50)
    span = tracer.start("chat", f"00-{TRACE}-{PARENT}-00", time.time())
    assert tracer.traceparent_of(span).startswith(f"00-{TRACE}-") and not span.is_recording()
    tracer.finish(span, record())
    sampled = tracer.start("chat", f"00-{TRACE}-{PARENT}-01", time.time())
    tracer.finish(sampled, record(client_request_id="client-2"))
    spans = rx.wait_for(lambda s: len(s) >= 1)
    tracer.shutdown()
    assert [s.attributes["tokenweir.client_request_id"] for s in rx.spans()] == ["client-2"], spans


def test_ending_spans_never_waits_on_the_collector(rx: OtlpReceiver) -> None:
    """The collector takes the first export and does not answer: ending 600 more spans (more than
    one batch of 512) still returns at once, since the export runs on the processor's own thread.
    Were it on the caller's thread, this test would hang here (and time out)."""
    tracer = RequestTracer(rx.endpoint, "tokenweir", "gw-1", batch_delay_ms=20)
    rx.hold()
    first = tracer.start("chat", None, time.time())
    tracer.finish(first, record(client_request_id="c-first"))
    for i in range(600):
        tracer.finish(tracer.start("chat", None, time.time()), record(client_request_id=f"c-{i}"))
    assert rx.spans() == []  # nothing answered yet: every export is stalled at the collector
    rx.release()
    spans = rx.wait_for(lambda s: len(s) == 601)
    assert len({s.span_id for s in spans}) == 601
    tracer.shutdown()
