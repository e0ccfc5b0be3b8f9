"""An OTLP/HTTP trace receiver for the tests: the collector boundary, and the only fake there.

A plain HTTP server on 127.0.0.1 that takes ``POST /v1/traces`` bodies as an OpenTelemetry collector
does (``application/x-protobuf``, an ``ExportTraceServiceRequest``), decodes them with
OpenTelemetry's own protobuf classes, keeps the raw bytes too (to check what never appears in
them), and answers an empty ``ExportTraceServiceResponse``. ``hold()`` makes it stall every export
until ``release()``, to show that the gateway does not wait on its collector.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the collector got it."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: int
    status_code: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


class OtlpReceiver:
    """``with OtlpReceiver() as rx:`` ... ``rx.endpoint`` ... ``rx.spans()``."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.content_types: list[str] = []
        self._lock = threading.Lock()
        self._open = threading.Event()
        self._open.set()
        self._arrived = threading.Condition(self._lock)
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver._open.wait()
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                with receiver._lock:
                    receiver.bodies.append(body)
                    receiver.content_types.append(self.headers.get("Content-Type", ""))
                    receiver._arrived.notify_all()
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="otlp-receiver")

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._open.set()
        self._server.shutdown()
        self._server.server_close()

    def hold(self) -> None:
        """Stall every export (the request is read, the answer withheld) until :meth:`release`."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            bodies = list(self.bodies)
        return list(_decode(bodies))

    def wait_for(self, predicate: Any, timeout_s: float = 30.0) -> list[ReceivedSpan]:
        """The spans received once ``predicate(spans)`` holds (woken by each export; fails at the deadline)."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.spans()
            if predicate(spans):
                return spans
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the collector did not get the expected spans: {spans}")
            with self._arrived:
                self._arrived.wait(min(left, 1.0))


def _decode(bodies: list[bytes]) -> Iterator[ReceivedSpan]:
    for body in bodies:
        req = ExportTraceServiceRequest.FromString(body)
        for rs in req.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    yield ReceivedSpan(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_span_id=s.parent_span_id.hex(),
                        name=s.name,
                        kind=s.kind,
                        status_code=s.status.code,
                        start_ns=s.start_time_unix_nano,
                        end_ns=s.end_time_unix_nano,
                        attributes={a.key: _value(a.value) for a in s.attributes},
                        resource=resource,
                    )
