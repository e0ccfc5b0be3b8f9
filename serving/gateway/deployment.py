"""The ``gateway`` Ray Serve deployment: the OpenAI-compatible HTTP ingress.

Each gateway replica serves HTTP itself (uvicorn on ``gateway.host:gateway.port``, ``node`` meaning
this replica's Ray node address, the socket bound
with ``SO_REUSEPORT`` so every replica on a node shares the port and the kernel spreads connections
among them) instead of behind Ray Serve's HTTP proxy: the proxy hop costs a Ray message per streamed
SSE event and ~6 ms of CPU per request on two cores (see README, "Speed"). Ray Serve still runs the
replicas (placement, health checks, replacement, scaling); requests reach the pools on the token
channel (:mod:`serving.gateway.transport`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from starlette.responses import Response

from serving.admission import GateSettings
from serving.config.resolved import ResolvedDeployment
from serving.errors import (
    APIError,
    AuthenticationError,
    PermissionDeniedError,
    ServiceUnavailableError,
    error_response,
    install_error_handlers,
)
from serving.gateway.access_log import AccessLog, AccessRecord, request_record, valid_traceparent
from serving.gateway.gate import FairGate, GateSlot
from serving.gateway.http import (
    ClientDisconnected,
    RequestIdMiddleware,
    SSEResponse,
    StallGuard,
    bearer_token,
    json_response,
    read_json,
    request_id_of,
    unless_disconnected,
)
from serving.gateway.http_server import guarded_protocol
from serving.gateway.openapi import openapi_document
from serving.gateway.pool_directory import PoolDirectory, PoolRef, pool_info
from serving.gateway.request import Prepared
from serving.gateway.service import GatewayService
from serving.gateway.tokenization import PromptTokenizer
from serving.gateway.transport import ChannelTransport
from serving.logs import route_logs_to_serve
from serving.metering import Meter, connect
from serving.metrics import BoardCollector, render
from serving.pools.loadboard import PUBLISH_INTERVAL_S, get_board
from serving.pools.replica import node_ip, replica_id
from serving.priority import run_at_normal_priority
from serving.ray_env import listen_host
from serving.tenancy import make_tenancy_router

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from serving.gateway.tracing import RequestTracer

log = logging.getLogger("tokenweir.gateway")

_PREPARE_INLINE_BYTES = 32 * 1024
"""Bodies at least this large are validated and tokenized in a worker thread (a 1 MiB prompt of
token ids takes ~170 ms of CPU, which on the event loop would stall every other stream)."""


def _release(slot: GateSlot, p: Prepared | None) -> None:
    """Give a place at the gate back, with what its request was served (the gate's VTC charge)."""
    o = p.outcome if p is not None else None
    if o is None:
        slot.release()
    else:
        slot.release(o.prompt_tokens, o.completion_tokens)


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn without its signal handlers: the Ray worker owns the process's signals."""

        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield

    return Server


_Server = _server_class()


class Gateway:
    """One gateway replica: tokenizes, meters, routes and relays streams."""

    async def __init__(  # type: ignore[misc]  # Ray Serve awaits async constructors
        self, deployment: ResolvedDeployment, pool_handles: dict[str, Any]
    ) -> None:
        run_at_normal_priority()
        route_logs_to_serve()
        self.cfg = deployment
        self.entries = {name: m.entry for name, m in deployment.models.items()}
        loop = asyncio.get_running_loop()
        tokenizers = {}
        for name, m in deployment.models.items():
            tokenizers[name] = await loop.run_in_executor(None, PromptTokenizer, m.tokenizer_source)
        refs = [
            PoolRef(
                p.name, p.model, p.accelerator, p.replicas, pool_handles[p.name], p.slo.ttft_ms, p.slo.tpot_ms
            )
            for p in deployment.pools
        ]
        infos = [pool_info(p) for p in deployment.pools]
        self._replica = replica_id()
        self.transport = ChannelTransport(self._replica)
        self.pools = PoolDirectory(refs, infos, self.transport, node=node_ip())
        self.app = FastAPI(title="Tokenweir", docs_url=None, redoc_url=None, openapi_url=None)
        install_error_handlers(self.app)
        self.meter = self._make_meter()
        self.service = GatewayService(
            self.entries,
            tokenizers,
            self.pools,
            self.cfg.gateway.first_token_timeout_s,
            self.meter,
            self.cfg.gateway.request_timeout_s,
            self.cfg.gateway.prefix_cache_scope,
        )
        self._prepare_pool = ThreadPoolExecutor(2, thread_name_prefix="prepare")
        g = deployment.gateway
        self.access_log = AccessLog(g.access_log, g.access_log_file)
        self.tracer = self._make_tracer()
        self.created = int(time.time())
        self.board = get_board(self.cfg.ray.namespace)
        self._add_routes(self.app)
        self.internal_app = FastAPI(
            title="Tokenweir internals", docs_url=None, redoc_url=None, openapi_url=None
        )
        install_error_handlers(self.internal_app)
        self._add_internal_routes(self.internal_app)
        self.stall_guard = StallGuard(self.cfg.gateway.client_stall_timeout_s)
        self.gate = FairGate(
            GateSettings(
                min_requests=min(g.fair_gate_min_requests, g.max_ongoing_requests),
                max_requests=g.max_ongoing_requests,
                max_queued=g.max_ongoing_requests,
                timeout_s=g.fair_gate_timeout_s,
            )
        )
        self._weights: dict[str, float] = {}
        """Each organization's weight as its last reservation said (the gate's VTC weight)."""
        self._tasks = [
            loop.create_task(self.pools.follow_board(self.board)),
            loop.create_task(self._publish_stats()),
            loop.create_task(self.stall_guard.run()),
            loop.create_task(self.meter.record_progress()),
            loop.create_task(self._connect_ledger()),
        ]
        if g.fair_gate:
            self._tasks.append(loop.create_task(self.gate.steer()))
        g = self.cfg.gateway
        self._internal_server = await self._start_http(
            self.internal_app, listen_host(g.internal_host), g.internal_port, 64
        )
        self._server = await self._start_http(self.app, listen_host(g.host), g.port, g.max_ongoing_requests)

    # ------------------------------------------------------------------ setup
    def _make_meter(self) -> Meter:
        """Metering on: one LedgerClient per replica, all sharing the one ledger actor; mount the
        admin and self-service routes."""
        mcfg = self.cfg.metering
        if not mcfg.enabled:
            return Meter(None, enabled=False)
        client = connect(mcfg, namespace=self.cfg.ray.namespace)
        self.app.include_router(make_tenancy_router(client, mcfg.for_actors().admin_key_sha256))
        return Meter(client, default_max_tokens=mcfg.default_max_tokens)

    def _make_tracer(self) -> RequestTracer | None:
        """OTLP export of request spans when ``gateway.otel_endpoint`` is set; else None, and
        neither :mod:`.tracing` nor the OTLP exporter is imported."""
        g = self.cfg.gateway
        if g.otel_endpoint is None:
            return None
        from serving.gateway.tracing import RequestTracer

        return RequestTracer(g.otel_endpoint, g.otel_service_name, self._replica, g.otel_batch_delay_ms)

    async def _connect_ledger(self) -> None:
        """Keep the ledger link open (from the start, so the key directory is synced before
        traffic, and again after it drops, since readiness depends on it)."""
        while True:
            if not self.meter.ledger_ready():
                try:
                    await self.meter.connect()
                except Exception as e:  # retried below; requests meanwhile connect on their own
                    log.warning("ledger link not open: %s", e)
            await asyncio.sleep(1.0)  # a periodic check, not a wait for a condition

    async def _start_http(self, app: FastAPI, host: str, port: int, max_requests: int) -> Any:
        """uvicorn on a shared (SO_REUSEPORT) listening socket, in this replica's event loop, with a
        read deadline and an OpenAI-shaped 503 past ``max_requests`` (:mod:`.http_server`)."""
        import uvicorn

        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
        sock.setblocking(False)
        config = uvicorn.Config(
            RequestIdMiddleware(app),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_keep_alive=30,
            http=guarded_protocol(self.cfg.gateway.read_timeout_s, max_requests),
        )
        server = _Server(config)
        self._tasks.append(asyncio.get_running_loop().create_task(server.serve(sockets=[sock])))
        while not server.started:
            await asyncio.sleep(0.01)
        return server

    async def _publish_stats(self) -> None:
        """Publish this replica's counters so any replica's /metrics covers all of them."""
        while True:
            st = self.service.stats
            st.routing_total = dict(self.pools.router.stats().decisions_total)
            st.prefix_total = {
                (pool, reason): n
                for pool, pr in self.pools.prefix.items()
                for reason, n in (pr.stats.by_reason or {}).items()
            }
            st.prefix_tokens = {
                pool: (pr.stats.prompt_tokens, pr.stats.predicted_cached_tokens, pr.stats.cache_events)
                for pool, pr in self.pools.prefix.items()
            }
            st.in_flight = sum(p.in_flight for p in self.pools.pools)
            st.gate = self.gate.stats()
            st.loop_demand = self.gate.core.demand or 0.0
            try:
                self.board.publish.remote("gateway", self._replica, st)
            except Exception:
                log.debug("publishing gateway stats failed", exc_info=True)
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    async def check_health(self) -> None:
        """Ray Serve's health check: both HTTP servers must still be running."""
        if self._server is None or any(t.done() for t in self._tasks[-2:]):
            raise RuntimeError("the gateway's HTTP server has stopped")

    async def __del__(self) -> None:
        for server in (self._server, self._internal_server):
            if server is not None:
                server.should_exit = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        await self.transport.close()
        if self.tracer is not None:  # flushes what is queued: blocking, so off the loop
            await asyncio.get_running_loop().run_in_executor(None, self.tracer.shutdown)

    # ------------------------------------------------------------------ routes
    async def _generate(self, kind: str, request: Request) -> Response:
        rid = request_id_of(request)
        t0 = time.monotonic()
        prepared: Prepared | None = None
        body: Any = None
        traceparent = valid_traceparent(request.headers.get("traceparent"))
        span = None if self.tracer is None else self.tracer.start(kind, traceparent, time.time())
        slot: GateSlot | None = None
        try:
            api_key = bearer_token(request)
            if self.meter.enabled and not api_key:
                raise AuthenticationError("Missing API key: send `Authorization: Bearer <key>`.")
            self.meter.check_key(api_key)  # before the body is read, parsed or tokenized
            if self.cfg.gateway.fair_gate:  # wait here, by organization, not in the loop's FIFO
                # (A client that leaves while it waits is noticed when its body cannot be read.)
                tenant = self.meter.tenant_of(api_key) or ""
                slot = await self.gate.acquire(tenant, self._weights.get(tenant, 1.0))
            body, size = await read_json(request, self.cfg.gateway.max_body_bytes)
            # The caller's id is echoed and logged, never a key: each request gets its own internal id
            # (its reservation, its stream on the channel, its admission entry).
            if size < _PREPARE_INLINE_BYTES:
                prepared = self.service.prepare(kind, body, client_request_id=rid)  # type: ignore[arg-type]
            else:  # a large prompt is validated and tokenized off the event loop: streams keep flowing
                prepared = await asyncio.get_running_loop().run_in_executor(
                    self._prepare_pool,
                    functools.partial(self.service.prepare, kind, body, client_request_id=rid),  # type: ignore[arg-type]
                )
            assert prepared is not None
            pin = request.headers.get("x-tokenweir-gpu")
            if pin:
                if not self.cfg.gateway.allow_gpu_pinning:
                    raise PermissionDeniedError(
                        "GPU pinning is disabled on this gateway", code="gpu_pinning_disabled"
                    )
                prepared.pinned_gpu = pin
            prepared.traceparent = traceparent
            if slot is not None:
                prepared.gate_wait_s = slot.waited_s
            if span is not None and self.tracer is not None:
                prepared.engine_traceparent = self.tracer.traceparent_of(span)
            await self.service.authorize(prepared, api_key)
            if (res := prepared.reservation) is not None and self.meter.enabled:
                self._weights[res.tenant_id] = res.tenant_weight
            if prepared.stream:
                stream, _ = await unless_disconnected(request, self.service.stream(prepared))
                done = functools.partial(self._stream_done, kind, body, prepared, t0, slot, span)
                slot = None  # the stream holds it until its end
                return SSEResponse(stream, self.stall_guard, prepared.extra_headers, on_done=done)
            result = await unless_disconnected(request, self.service.complete(prepared))
            self._log_access(kind, body, prepared, t0, 200, None, span=span)
            return json_response(result, rid, prepared.extra_headers)
        except APIError as e:
            self._log_access(kind, body, prepared, t0, e.status_code, e.code, rid, traceparent, span)
            return error_response(e)
        except ClientDisconnected:
            self._log_access(kind, body, prepared, t0, 499, None, rid, traceparent, span)
            return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
        finally:
            if slot is not None:
                _release(slot, prepared)

    def _stream_done(
        self, kind: str, body: Any, p: Prepared, t0: float, slot: GateSlot | None, span: Span | None
    ) -> None:
        """A stream has ended: its access line (and span), and its place at the gate back."""
        if slot is not None:
            _release(slot, p)
        self._log_access(kind, body, p, t0, 200, None, span=span)

    def _log_access(
        self,
        kind: str,
        body: Any,
        p: Prepared | None,
        t0: float,
        status: int,
        error: str | None,
        client_request_id: str | None = None,
        traceparent: str | None = None,
        span: Span | None = None,
    ) -> None:
        """One access-log line for a request that has ended (:mod:`.access_log`), and the end of
        its span when tracing is on (:mod:`.tracing`)."""
        if not self.access_log.enabled and span is None:
            return
        ts, duration_s = time.time(), time.monotonic() - t0
        if p is None:
            rec = AccessRecord(ts=ts, status=status, error=error, kind=kind, duration_s=round(duration_s, 6))
            rec.client_request_id, rec.traceparent = client_request_id, traceparent
            model = body.get("model") if isinstance(body, dict) else None
            rec.model = model if isinstance(model, str) and model in self.entries else None
        else:
            rec = request_record(p, ts, status, error, kind, duration_s, self.meter.enabled)
        self.access_log.write(rec)
        if span is not None and self.tracer is not None:
            self.tracer.finish(span, rec)

    def _add_routes(self, app: FastAPI) -> None:
        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Response:
            """OpenAI chat completions, streamed (SSE) or not."""
            return await self._generate("chat", request)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            """OpenAI (legacy) text completions, streamed or not."""
            return await self._generate("completion", request)

        @app.get("/v1/models")
        async def list_models(request: Request) -> Response:
            """The served models."""
            data = [
                {
                    "id": name,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "tokenweir",
                    "max_model_len": self.entries[name].max_model_len,
                    "pools": [p.name for p in self.pools.pools if p.model == name],
                }
                for name in self.entries
            ]
            return json_response({"object": "list", "data": data}, request_id_of(request))

        @app.get("/healthz")
        async def healthz(request: Request) -> Response:
            """Liveness: this gateway replica answers."""
            return json_response({"status": "ok"}, request_id_of(request))

        @app.get("/readyz")
        async def readyz(request: Request) -> Response:
            """This gateway replica's own readiness (what a load balancer or Kubernetes probes): its
            ledger link is up (when metering is on) and at least one pool has a replica it reaches.
            One dead pool does not take every gateway out of service; ``/readyz/pools`` asks for all.
            Answered from what the replica already knows, without a call into a pool."""
            pools = self.pools.reachable()
            ledger = "ready" if self.meter.ledger_ready() else "not ready: no ledger link"
            if ledger == "ready" and any(v == "ready" for v in pools.values()):
                return json_response(
                    {"status": "ready", "ledger": ledger, "pools": pools}, request_id_of(request)
                )
            return error_response(
                ServiceUnavailableError(f"not ready: ledger {ledger}, pools {pools}", code="not_ready")
            )

        @app.get("/readyz/pools")
        async def readyz_pools(request: Request) -> Response:
            """Every pool has a replica this gateway reaches on the token channel (what ``tokenweir
            serve`` waits for after a deploy)."""
            results = self.pools.reachable()
            if all(v == "ready" for v in results.values()):
                return json_response({"status": "ready", "pools": results}, request_id_of(request))
            return error_response(ServiceUnavailableError(f"pools not ready: {results}", code="not_ready"))

        document: dict[str, Any] = {}

        @app.get("/openapi.json")
        async def openapi_json(request: Request) -> Response:
            """This document: every route of this listener, with the JSON Schema of its body."""
            if not document:  # built on first use, once every route (the tenancy ones too) is in
                document.update(openapi_document(app))
            return json_response(document, request_id_of(request))

    def _add_internal_routes(self, app: FastAPI) -> None:
        """The operator's listener (``gateway.internal_host:internal_port``): metrics that name
        tenants, and calls into the pools. Never on the public port."""

        @app.get("/healthz")
        async def healthz(request: Request) -> Response:
            """Liveness: this gateway replica answers."""
            return json_response({"status": "ok"}, request_id_of(request))

        @app.get("/readyz")
        async def readyz(request: Request) -> Response:
            """Readiness, asked of the pools: every pool has a replica whose engine takes requests."""
            rid = request_id_of(request)
            results: dict[str, str] = {}

            async def probe(pool: PoolRef) -> None:
                try:
                    ok = await asyncio.wait_for(pool.ready(), timeout=5.0)
                    results[pool.name] = "ready" if ok else "not ready"
                except Exception as e:
                    results[pool.name] = f"not ready: {type(e).__name__}"

            await asyncio.gather(*(probe(p) for p in self.pools.pools))
            if all(v == "ready" for v in results.values()):
                return json_response({"status": "ready", "pools": results}, rid)
            return error_response(ServiceUnavailableError(f"pools not ready: {results}", code="not_ready"))

        @app.get("/metrics")
        async def metrics(request: Request) -> Response:
            """Prometheus exposition, complete across gateway replicas, pool replicas and the ledger."""
            collectors: list[Any] = []
            tenants = None
            if self.meter.enabled:
                tenants = (await self.meter.refresh_metrics()).labelled_tenants
                collectors.append(self.meter.collector)
            collectors.insert(0, BoardCollector(await self.board.read.remote(), self.cfg.pools, tenants))
            return Response(render(collectors), media_type="text/plain; version=0.0.4; charset=utf-8")

        @app.get("/internal/pools")
        async def pool_stats(request: Request) -> Response:
            """Per-pool engine counters (one replica each), for `tokenweir status` and tests."""
            out = {}
            for p in self.pools.pools:
                try:
                    out[p.name] = await asyncio.wait_for(p.stats(), timeout=5.0)
                except Exception as e:
                    out[p.name] = {"error": type(e).__name__}
                out[p.name]["gateway_in_flight"] = p.in_flight
            return json_response(out, request_id_of(request))
