"""CPU cost of a request's span with OTLP trace export on (``gateway.otel_endpoint``).

Times what a gateway replica does per request with tracing on, through the gateway's own
:class:`serving.gateway.tracing.RequestTracer` (start the span, hand its ``traceparent`` to the engine,
end it with a full access record), against an OTLP/HTTP receiver in another process that decodes and
counts the spans. Prints the CPU time per span on the calling thread (what the event loop pays) and
in the whole process (the ``BatchSpanProcessor``'s export thread included: protobuf encoding and the
HTTP posts), and how many spans arrived. Spans are ended in rounds of ``--round`` followed by a flush,
so the bounded queue (2,048) never drops any. Off (the default), a request pays an ``is None`` test
instead, nothing of this.

    .venv/bin/python loadtests/bench_tracing.py --spans 20000
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from typing import Any


def _receiver(port_q: Any, stop: Any, count_q: Any) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    spans = [0]
    reply = ExportTraceServiceResponse().SerializeToString()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            req = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
            spans[0] += sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port_q.put(server.server_address[1])
    server.timeout = 0.2
    while not stop.is_set():
        server.handle_request()
    count_q.put(spans[0])


def _record(i: int, parent: str) -> Any:
    from serving.gateway.access_log import AccessRecord

    return AccessRecord(
        ts=time.time(),
        status=200,
        request_id=f"{i:032x}",
        client_request_id="bench",
        traceparent=parent,
        tenant="acme",
        project="alice",
        model="llama-3.1-8b-instruct",
        kind="chat",
        stream=True,
        pool="sim-h100",
        gpu="H100",
        outcome="ok",
        prompt_tokens=32,
        completion_tokens=64,
        cached_tokens=0,
        credits=96.0,
        ttft_s=0.05,
        duration_s=0.5,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spans", type=int, default=20000)
    ap.add_argument("--round", type=int, default=1000)
    args = ap.parse_args()

    from serving.gateway.tracing import RequestTracer

    ctx = mp.get_context("spawn")
    port_q, count_q, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=_receiver, args=(port_q, stop, count_q), daemon=True)
    proc.start()
    port = port_q.get(timeout=30)
    tracer = RequestTracer(f"http://127.0.0.1:{port}/v1/traces", "tokenweir", "bench", batch_delay_ms=5000)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    thread_s = 0.0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    done = 0
    while done < args.spans:
        n = min(args.round, args.spans - done)
        records = [_record(done + i, parent) for i in range(n)]  # the access line's, built anyway
        t = time.thread_time()
        for rec in records:
            span = tracer.start("chat", parent, time.time())
            tracer.traceparent_of(span)
            tracer.finish(span, rec)
        thread_s += time.thread_time() - t
        tracer.flush()
        done += n
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    tracer.shutdown()
    stop.set()
    received = count_q.get(timeout=30)
    proc.join(timeout=10)
    print(
        json.dumps(
            {
                "spans": args.spans,
                "received": received,
                "calling_thread_us_per_span": round(thread_s / args.spans * 1e6, 1),
                "process_cpu_us_per_span": round(cpu_s / args.spans * 1e6, 1),
                "wall_s": round(wall_s, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
