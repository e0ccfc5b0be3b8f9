"""uvicorn's HTTP protocol with the two guards a public listener needs and uvicorn lacks.

* **A read deadline**: a request's headers and body must arrive within ``read_timeout_s`` of its
  first byte (or of the connection, for the first request). A client that sends a request line and
  stops, or trickles its body, gets 408 and the connection is closed, so idle sockets cannot hold
  the replica's slots (uvicorn itself only times out idle keep-alive connections).
* **Overload is an OpenAI error**: past ``limit`` requests in flight on this replica, a request is
  answered at once with 503 ``overloaded`` (the OpenAI error body, ``Retry-After: 1``) instead of
  uvicorn's plain-text 503. Only requests count, not open connections.

Used as ``uvicorn.Config(http=guarded_protocol(read_timeout_s, limit))``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serving.errors import APIError, ServiceUnavailableError

__all__ = ["guarded_protocol"]


def _body(e: APIError) -> bytes:
    return json.dumps(e.body()).encode()


_OVERLOADED = ServiceUnavailableError(
    "this gateway replica has too many requests in flight; retry shortly", code="overloaded"
)
_TOO_SLOW = APIError(
    "the request's headers and body did not arrive in time", status_code=408, code="request_timeout"
)


async def _overloaded(scope: Any, receive: Any, send: Any) -> None:
    body = _body(_OVERLOADED)
    headers = [(b"content-type", b"application/json"), (b"retry-after", b"1"), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def guarded_protocol(read_timeout_s: float, limit: int) -> type[HttpToolsProtocol]:
    """The protocol class for a listener with these bounds."""

    class Guarded(HttpToolsProtocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(read_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete or not self.cycle.response_started:
                msg = _body(_TOO_SLOW)
                self.transport.write(
                    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                    b"content-length: " + str(len(msg)).encode() + b"\r\nconnection: close\r\n\r\n" + msg
                )
            self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            if len(self.tasks) >= limit:
                app, self.app = self.app, _overloaded
                try:
                    super().on_headers_complete()
                finally:
                    self.app = app
            else:
                super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Guarded
