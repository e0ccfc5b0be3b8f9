"""Optional OpenTelemetry export of each request's span (``gateway.otel_endpoint``; off by default).

One span per request, kind SERVER, named ``POST /v1/chat/completions`` or ``POST /v1/completions``,
from the moment the handler took the request to the end of its response (the last SSE event of a
stream). Its parent is the caller's W3C ``traceparent`` when one was sent (so the span has the
caller's trace id; a ``traceparent`` whose sampled flag is off is honoured: nothing is recorded),
else it starts a trace. The engine is handed this span's context as its ``traceparent``, so a vLLM
that exports its own traces nests them under it.

Attributes are the access line's (:mod:`.access_log`), under OpenTelemetry's HTTP and GenAI names
where those exist: ``http.request.method``, ``http.route``, ``http.response.status_code``,
``gen_ai.operation.name``, ``gen_ai.request.model``, ``gen_ai.usage.input_tokens`` /
``output_tokens``, ``error.type`` (the OpenAI error code), and ``tokenweir.request_id``,
``.client_request_id``, ``.organization``, ``.project`` (ids: never a key), ``.pool``, ``.gpu``,
``.outcome``, ``.stream``, ``.cached_tokens``, ``.credits``, ``.queue_s``, ``.ttft_s``. A 5xx sets
the span's status to ERROR.

Spans go through OpenTelemetry's ``BatchSpanProcessor``: ending one appends it to a bounded queue
(2,048 spans; beyond that new ones are dropped, never waited for), and the processor's own thread
sends batches of up to 512 as OTLP/HTTP protobuf every ``gateway.otel_batch_delay_ms``, so the
event loop never waits on the collector. Nothing imports this module (or the OTLP exporter) unless
``gateway.otel_endpoint`` is set (the ``otel`` extra: ``pip install 'tokenweir[otel]'``); off, a
request pays one ``is None`` test. The exporter also reads OpenTelemetry's ``OTEL_EXPORTER_OTLP_HEADERS`` and
certificate variables from the replica's environment.
"""

from __future__ import annotations

import time
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from serving.gateway.access_log import AccessRecord

__all__ = ["RequestTracer"]

_ROUTES = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}
_OPERATIONS = {"chat": "chat", "completion": "text_completion"}
_PROPAGATOR = TraceContextTextMapPropagator()


class RequestTracer:
    """One gateway replica's span exporter (its own provider: the process's global one is left alone)."""

    def __init__(
        self,
        endpoint: str,
        service_name: str,
        instance_id: str,
        batch_delay_ms: float,
        timeout_s: float = 10.0,
    ) -> None:
        resource = Resource.create({"service.name": service_name, "service.instance.id": instance_id})
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=endpoint, timeout=timeout_s), schedule_delay_millis=batch_delay_ms
            )
        )
        self._tracer = self._provider.get_tracer("tokenweir.gateway")

    def start(self, kind: str, traceparent: str | None, started_s: float) -> Span:
        """A request's span, begun at wall time ``started_s``, child of the caller's
        ``traceparent`` (already validated) when there is one."""
        ctx = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
        return self._tracer.start_span(
            f"POST {_ROUTES.get(kind, kind)}",
            context=ctx,
            kind=SpanKind.SERVER,
            start_time=int(started_s * 1e9),
        )

    @staticmethod
    def traceparent_of(span: Span) -> str:
        """The W3C ``traceparent`` naming ``span`` as the parent (what the engine is handed)."""
        c = span.get_span_context()
        return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"

    def finish(self, span: Span, rec: AccessRecord) -> None:
        """End ``span`` with the request's access record (cheap: the export is batched elsewhere)."""
        if span.is_recording():
            attrs: dict[str, Any] = {
                "http.request.method": "POST",
                "http.response.status_code": rec.status,
            }
            if rec.kind is not None:
                attrs["http.route"] = _ROUTES.get(rec.kind, rec.kind)
                attrs["gen_ai.operation.name"] = _OPERATIONS.get(rec.kind, rec.kind)
            for key, value in (
                ("gen_ai.request.model", rec.model),
                ("gen_ai.usage.input_tokens", rec.prompt_tokens),
                ("gen_ai.usage.output_tokens", rec.completion_tokens),
                ("error.type", rec.error),
                ("tokenweir.request_id", rec.request_id),
                ("tokenweir.client_request_id", rec.client_request_id),
                ("tokenweir.organization", rec.tenant),
                ("tokenweir.project", rec.project),
                ("tokenweir.pool", rec.pool),
                ("tokenweir.gpu", rec.gpu),
                ("tokenweir.outcome", rec.outcome),
                ("tokenweir.stream", rec.stream),
                ("tokenweir.cached_tokens", rec.cached_tokens),
                ("tokenweir.credits", rec.credits),
                ("tokenweir.queue_s", rec.queue_s),
                ("tokenweir.ttft_s", rec.ttft_s),
            ):
                if value is not None:
                    attrs[key] = value
            span.set_attributes(attrs)
            if rec.status >= 500:
                span.set_status(Status(StatusCode.ERROR, rec.error))
        span.end(end_time=int(rec.ts * 1e9))

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Send what is queued now (tests; shutdown)."""
        return self._provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Flush and stop the export thread."""
        self._provider.shutdown()


def wall_time_of(monotonic_s: float) -> float:
    """The wall time of an earlier ``time.monotonic()`` reading."""
    return time.time() - (time.monotonic() - monotonic_s)
