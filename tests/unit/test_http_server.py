"""The gateway's HTTP protocol guards against slow and idle clients and answers overload with the
OpenAI error body. A real uvicorn server on 127.0.0.1 with a small app (the boundary: the gateway's
routes are replaced by one that waits until the test releases it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.gateway.http import ClientDisconnected, SSEResponse, StallGuard, unless_disconnected
from serving.gateway.http_server import guarded_protocol

pytestmark = pytest.mark.timeout(60)

READ_TIMEOUT_S = 0.3
LIMIT = 2


@contextlib.asynccontextmanager
async def server() -> AsyncIterator[tuple[int, asyncio.Event, list[int]]]:
    release = asyncio.Event()
    inside = [0]

    async def slow(request: Request) -> JSONResponse:
        await request.body()
        inside[0] += 1
        await release.wait()
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/slow", slow, methods=["POST", "GET"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app, log_level="warning", lifespan="off", http=guarded_protocol(READ_TIMEOUT_S, LIMIT)
    )
    srv = uvicorn.Server(config)
    task = asyncio.ensure_future(srv.serve(sockets=[sock]))
    while not srv.started:
        await asyncio.sleep(0.01)
    try:
        yield port, release, inside
    finally:
        release.set()
        srv.should_exit = True
        await task


async def _raw(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    got = await asyncio.wait_for(reader.read(), 10)  # until the server closes
    writer.close()
    return got


async def test_a_client_that_stops_mid_request_gets_408_and_is_closed() -> None:
    async with server() as (port, _, _inside):
        for partial in (
            b"POST /slow HTTP/1.1\r\n",  # a request line, then nothing
            b"POST /slow HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n" + b"x" * 10,  # a trickled body
        ):
            got = await _raw(port, partial)
            head, _, body = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), got
            err = json.loads(body)["error"]
            assert err["code"] == "request_timeout" and set(err) == {"message", "type", "param", "code"}


async def test_overload_is_an_openai_503_and_idle_sockets_do_not_count() -> None:
    async with server() as (port, release, inside):
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3 * LIMIT)]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            busy = [asyncio.ensure_future(c.post("/slow", content=b"{}")) for _ in range(LIMIT)]
            while inside[0] < LIMIT:  # both reach the app and wait on `release`
                await asyncio.sleep(0.005)
            r = await c.get("/slow")
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "overloaded"
            release.set()
            assert [x.status_code for x in await asyncio.gather(*busy)] == [200] * LIMIT
            assert (await c.get("/slow")).status_code == 200  # served again, idle sockets or not
        for _reader, writer in idle:
            writer.close()


async def _sse_server(guard: StallGuard, events: list[str]) -> tuple[uvicorn.Server, asyncio.Task[None], int]:
    async def body() -> AsyncIterator[bytes]:
        try:
            while True:
                events.append("chunk")
                yield b"data: " + b"x" * 65536 + b"\n\n"
                await asyncio.sleep(0)
        finally:
            events.append("closed")

    async def app(scope: dict, receive: object, send: object) -> None:
        await SSEResponse(body(), guard)(scope, receive, send)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
    task = asyncio.ensure_future(srv.serve(sockets=[sock]))
    while not srv.started:
        await asyncio.sleep(0.01)
    return srv, task, sock.getsockname()[1]


async def test_a_stream_whose_client_stops_reading_is_cut_and_closed() -> None:
    guard = StallGuard(timeout_s=0.3)
    watchdog = asyncio.ensure_future(guard.run())
    events: list[str] = []
    srv, task, port = await _sse_server(guard, events)
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")  # then never reads
    async with asyncio.timeout(20):
        while "closed" not in events:
            await asyncio.sleep(0.01)
    assert guard.cut == 1 and not guard.live
    sent = events.count("chunk")
    assert sent < 2000  # bounded by the socket buffers, not by the body (endless)
    writer.close()
    watchdog.cancel()
    srv.should_exit = True
    await task


async def test_a_stream_whose_client_hangs_up_is_closed_at_once() -> None:
    guard = StallGuard(timeout_s=60)
    events: list[str] = []
    srv, task, port = await _sse_server(guard, events)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    await reader.readexactly(1000)  # the stream is flowing
    writer.close()
    async with asyncio.timeout(10):
        while "closed" not in events:
            await asyncio.sleep(0.01)
    assert guard.cut == 0 and not guard.live
    srv.should_exit = True
    await task


async def test_a_client_that_hangs_up_before_the_first_token_is_noticed_at_once() -> None:
    # The gateway awaits a stream's first token (or a whole answer) under unless_disconnected: a
    # client that hangs up meanwhile cancels the wait at once (which aborts the pool's request and
    # settles what was produced), instead of at the first token, whenever that comes.
    events: list[str] = []
    never = asyncio.Event()

    async def first_token() -> None:
        try:
            await never.wait()  # the pool has not produced anything, and will not
        finally:
            events.append("aborted")

    async def route(request: Request) -> JSONResponse:
        await request.body()
        try:
            await unless_disconnected(request, first_token())
        except ClientDisconnected:
            events.append("disconnected")
        return JSONResponse({})

    app = Starlette(routes=[Route("/v1/chat/completions", route, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="critical", lifespan="off"))
    task = asyncio.ensure_future(srv.serve(sockets=[sock]))
    while not srv.started:
        await asyncio.sleep(0.01)
    _reader, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
    body = b'{"model": "m", "stream": true}'
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    await asyncio.sleep(0.2)  # the request is waiting for its first token
    assert events == []
    t0 = asyncio.get_running_loop().time()
    writer.close()
    async with asyncio.timeout(5):
        while "disconnected" not in events:
            await asyncio.sleep(0.01)
    assert events == ["aborted", "disconnected"]
    assert asyncio.get_running_loop().time() - t0 < 1.0
    srv.should_exit = True
    await task
