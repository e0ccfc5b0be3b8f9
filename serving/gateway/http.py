"""HTTP plumbing of the gateway app: request ids, the bearer key, bounded JSON bodies, responses.

Every response carries ``x-request-id`` (:class:`RequestIdMiddleware`); errors are rendered in
:mod:`serving.errors`, which also installs the app's exception handlers.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from starlette.responses import JSONResponse, Response

from serving.http_body import parse_json, read_body

__all__ = [
    "ClientDisconnected",
    "RequestIdMiddleware",
    "SSEResponse",
    "StallGuard",
    "bearer_token",
    "json_response",
    "read_json",
    "request_id_of",
    "unless_disconnected",
]

_REQ_ID_OK = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class RequestIdMiddleware:
    """Pure ASGI middleware: every HTTP response carries ``x-request-id`` (the caller's when it sent
    a well-formed one, else a new one), and the handlers see the same id."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = None
        for k, v in scope["headers"]:
            if k == b"x-request-id":
                text = v.decode("latin-1")
                rid = text if _REQ_ID_OK.match(text) else None
                break
        if rid is None:
            rid = uuid.uuid4().hex
            scope["headers"] = [*scope["headers"], (b"x-request-id", rid.encode())]
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        await self.app(scope, receive, send_with_id)


def bearer_token(request: Request) -> str:
    """The API key of ``Authorization: Bearer <key>`` (empty when absent)."""
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def request_id_of(request: Request) -> str:
    """The caller's ``x-request-id`` when well-formed, else a new one."""
    rid = request.headers.get("x-request-id")
    return rid if rid and _REQ_ID_OK.match(rid) else uuid.uuid4().hex  # set by RequestIdMiddleware


async def read_json(request: Request, max_body_bytes: int) -> tuple[Any, int]:
    """Read the body within the size limit and parse it (:mod:`serving.http_body`, the one way
    every route reads a JSON body); the value and the body's size."""
    raw = await read_body(request, max_body_bytes)
    return parse_json(raw, request.headers.get("content-type")), len(raw)


T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client hung up before its response started."""


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` (the request's body already read); if the client hangs up first, cancel it
    (which aborts the generation and charges what was produced) and raise
    :class:`ClientDisconnected`. Without this a non-streamed request, or a stream still waiting for
    its first token, would run to the end for nobody."""
    me = asyncio.current_task()
    assert me is not None
    over = False

    async def wait_gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    def gone(w: asyncio.Future[None]) -> None:
        if not over and not w.cancelled() and w.exception() is None:
            me.cancel()

    watcher = asyncio.ensure_future(wait_gone())
    watcher.add_done_callback(gone)
    try:
        return await work
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled() and me.uncancel() == 0:
            raise ClientDisconnected() from None
        raise
    finally:
        over = True
        watcher.cancel()


class StallGuard:
    """Bounds how long a response may wait on a client that stopped reading: :class:`SSEResponse`
    marks each send, and :meth:`run` (one task per gateway replica) cancels a send blocked longer
    than ``timeout_s``; the stream then ends as a disconnect (aborted at the pool, charged what was
    produced). Two attribute writes per send, no timer per send."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.live: set[_Send] = set()
        self.cut = 0
        """Responses ended because their client stalled."""

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.timeout_s / 4))
            now = loop.time()
            for s in list(self.live):
                if s.since is not None and now - s.since > self.timeout_s and not s.cut:
                    s.cut = True
                    self.cut += 1
                    s.task.cancel()


class _Send:
    __slots__ = ("cut", "since", "task")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.since: float | None = None
        self.cut = False


class SSEResponse(Response):
    """``text/event-stream`` from an async iterator of bytes. Unlike Starlette's StreamingResponse
    it needs no task group: the sending task itself is cancelled when the client hangs up (a watcher
    on ``receive``) or stalls (:class:`StallGuard`), and the body is closed at once either way, so
    the request settles as soon as the client is gone."""

    media_type = "text/event-stream"

    def __init__(
        self,
        body: Any,
        guard: StallGuard,
        headers: dict[str, str] | None = None,
        on_done: Callable[[], object] | None = None,
    ) -> None:
        self.body_iterator = body
        self.guard = guard
        self.on_done = on_done
        """Called once the stream has ended and its body is closed (the access log)."""
        self.status_code = 200
        self.background = None
        self.init_headers({**_SSE_HEADERS, **(headers or {})})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        me = asyncio.current_task()
        assert me is not None
        loop = asyncio.get_running_loop()
        entry = _Send(me)
        gone = False
        over = False

        async def wait_gone() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        def on_gone(w: asyncio.Future[None]) -> None:
            nonlocal gone
            if not over and not w.cancelled() and w.exception() is None:
                gone = True
                me.cancel()

        watcher = asyncio.ensure_future(wait_gone())
        watcher.add_done_callback(on_gone)
        self.guard.live.add(entry)
        body = self.body_iterator
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in body:
                entry.since = loop.time()
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                entry.since = None
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not (gone or entry.cut) or me.uncancel() > 0:
                raise
        finally:
            over = True
            watcher.cancel()
            self.guard.live.discard(entry)
            try:
                await body.aclose()
            finally:  # the access line and the fair gate's place, however the body closed
                if self.on_done is not None:
                    self.on_done()


def json_response(obj: Any, request_id: str, headers: dict[str, str] | None = None) -> Response:
    """A JSON response carrying the request id."""
    return JSONResponse(obj, headers=headers)
