"""A fake OpenAI-compatible streaming server for tests and the harness benchmark (network-boundary fake).

It answers ``/v1/chat/completions`` and ``/v1/completions`` with exactly ``max_tokens`` one-word
chunks, a usage chunk and ``[DONE]``, after ``ttft_s`` and with ``itl_s`` between chunks. It keeps
per-key token counts behind ``GET /v1/usage`` and a minimal admin API, so the meter check and tenant
provisioning can be exercised. Keys starting with ``sk-refuse`` get a 429 OpenAI error.

Run: ``python -m loadtests.stub_server --port 0`` prints ``LISTENING <port>`` once it accepts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field

from aiohttp import web

__all__ = ["StubConfig", "StubState", "make_app", "start_stub"]


@dataclass(slots=True)
class StubConfig:
    """Timing and metering behaviour of the stub."""

    ttft_s: float = 0.0
    itl_s: float = 0.0
    prompt_tokens: int = 7
    """Reported ``usage.prompt_tokens`` for every request."""
    meter_skew_tokens: int = 0
    """Added to each request's charged tokens in ``/v1/usage`` (to test the meter check)."""
    usage_endpoint: bool = True


@dataclass(slots=True)
class StubState:
    """What the stub saw."""

    requests: int = 0
    arrivals_s: list[float] = field(default_factory=list)
    """``time.monotonic()`` when each request arrived."""
    charged: dict[str, dict[str, int]] = field(default_factory=dict)
    tenants: dict[str, str] = field(default_factory=dict)
    bodies: list[dict[str, object]] = field(default_factory=list)


def _err(status: int, code: str, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return web.json_response(body, status=status)


def make_app(cfg: StubConfig, state: StubState, keep_bodies: bool = False) -> web.Application:
    """The aiohttp application."""

    async def complete(request: web.Request) -> web.StreamResponse:
        state.arrivals_s.append(time.monotonic())
        state.requests += 1
        key = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        body = await request.json()
        if keep_bodies:
            state.bodies.append(body)
        if key.startswith("sk-refuse"):
            return _err(429, "rate_limited", "tenant over its rate limit")
        n = int(body.get("max_tokens", 16))
        chat = request.path.endswith("/chat/completions")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if cfg.ttft_s:
            await asyncio.sleep(cfg.ttft_s)
        for i in range(n):
            if i and cfg.itl_s:
                await asyncio.sleep(cfg.itl_s)
            choice = {"index": 0, "delta": {"content": f" w{i}"}} if chat else {"index": 0, "text": f" w{i}"}
            await resp.write(b"data: " + json.dumps({"choices": [choice]}).encode() + b"\n\n")
        usage = {
            "prompt_tokens": cfg.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": cfg.prompt_tokens + n,
        }
        await resp.write(
            b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\ndata: [DONE]\n\n"
        )
        c = state.charged.setdefault(key, {"prompt_tokens": 0, "completion_tokens": 0})
        c["prompt_tokens"] += cfg.prompt_tokens
        c["completion_tokens"] += n + cfg.meter_skew_tokens
        await resp.write_eof()
        return resp

    async def usage(request: web.Request) -> web.Response:
        if not cfg.usage_endpoint:
            return _err(404, "not_found", "no usage endpoint")
        key = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        c = state.charged.get(key, {"prompt_tokens": 0, "completion_tokens": 0})
        total = c["prompt_tokens"] + c["completion_tokens"]
        row = {"day": "2026-01-01", "model": "stub", "requests": 1, **c, "credits": 0.0}
        return web.json_response({"tenant_id": key, "credits": 0.0, "usage": [row], "total": total})

    async def create_tenant(request: web.Request) -> web.Response:
        body = await request.json()
        tid = f"t{len(state.tenants) + 1}"
        state.tenants[tid] = str(body.get("name"))
        return web.json_response({"tenant_id": tid, "name": body.get("name")}, status=201)

    async def create_key(request: web.Request) -> web.Response:
        tid = request.match_info["tid"]
        if tid not in state.tenants:
            return _err(404, "not_found", "no such tenant")
        return web.json_response({"api_key": f"sk-{state.tenants[tid]}-{tid}"}, status=201)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", complete)
    app.router.add_post("/v1/completions", complete)
    app.router.add_get("/v1/usage", usage)
    app.router.add_post("/admin/v1/tenants", create_tenant)
    app.router.add_post("/admin/v1/tenants/{tid}/keys", create_key)
    return app


async def start_stub(
    cfg: StubConfig | None = None, host: str = "127.0.0.1", port: int = 0, keep_bodies: bool = False
) -> tuple[web.AppRunner, int, StubState]:
    """Start the stub in the running loop; returns its runner (``await runner.cleanup()``), port, state."""
    state = StubState()
    runner = web.AppRunner(
        make_app(cfg or StubConfig(), state, keep_bodies), access_log=None, shutdown_timeout=0.5
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    server = site._server
    assert server is not None
    bound = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return runner, int(bound), state


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ttft-ms", type=float, default=0.0)
    p.add_argument("--itl-ms", type=float, default=0.0)
    a = p.parse_args()

    async def serve() -> None:
        _, port, _ = await start_stub(StubConfig(ttft_s=a.ttft_ms / 1e3, itl_s=a.itl_ms / 1e3), port=a.port)
        print(f"LISTENING {port}", flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())


if __name__ == "__main__":
    main()
