"""The ledger's hot path over a direct TCP link instead of Ray actor calls.

A Ray actor call costs ~1.6 ms round trip on this 2-core machine; a frame on an open TCP connection
~0.1 ms (measured, README "Speed"). Every request reserves before dispatch, so that round trip is
on every request's time to first token. The ledger actor therefore also listens on a socket
(:class:`LedgerSocketServer`) for ``reserve``/``settle``/``progress`` batches; gateway replicas
reach it with :class:`SocketTransport`, which learns the address and the link secret from the actor
(over Ray, so only cluster members can connect) and keeps admin operations and reads on Ray.

Frames (:mod:`serving.wire`): the client sends the secret, then ``(seq, ops)`` frames; the ledger
answers each with ``(seq, ok, results | message)``. Frames are applied concurrently, so batches from
every gateway share one group commit. If the ledger dies the link closes; the transport asks the
(restarted) actor for its new address and resends, as the hot operations are idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ray.exceptions import RayActorError

from serving.errors import LedgerUnavailableError
from serving.wire import check_secret, frame, new_secret, read_frame

__all__ = ["HOT_OPS", "ActorTransport", "LedgerSocketServer", "SocketTransport"]

_UNAVAILABLE = "The usage ledger is unavailable; retry later."

log = logging.getLogger("tokenweir.ledger")
HOT_OPS = frozenset({"reserve", "settle", "progress"})
"""Operations the socket accepts: the per-request ones, all idempotent by request id."""


def _unavailable(message: str) -> LedgerUnavailableError:
    return LedgerUnavailableError(message, headers={"retry-after": "1"})


class LedgerSocketServer:
    """The ledger's end: applies hot batches from any number of gateway connections."""

    def __init__(self, apply: Callable[[list[tuple[Any, ...]]], Awaitable[list[Any]]], host: str) -> None:
        self._apply = apply
        self.host = host
        self.secret = new_secret()
        self._server: asyncio.base_events.Server | None = None
        self.endpoint: tuple[str, int, bytes] | None = None

    async def start(self) -> tuple[str, int, bytes]:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        port = int(self._server.sockets[0].getsockname()[1])
        self.endpoint = (self.host, port, self.secret)
        return self.endpoint

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks: set[asyncio.Task[None]] = set()
        try:
            await check_secret(reader, self.secret)
            while True:
                seq, ops = await read_frame(reader)
                t = asyncio.get_running_loop().create_task(self._one(writer, seq, ops))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as e:
            log.debug("ledger link closed: %s", e)
        finally:
            writer.close()

    async def _one(self, writer: asyncio.StreamWriter, seq: int, ops: list[tuple[Any, ...]]) -> None:
        if any(op[0] not in HOT_OPS for op in ops):
            msg: tuple[Any, ...] = (seq, False, "only reserve/settle/progress travel on the ledger socket")
        else:
            try:
                msg = (seq, True, await self._apply(ops))
            except Exception as e:  # a failed commit: the caller sees the ledger as unavailable
                msg = (seq, False, f"{type(e).__name__}: {e}")
        if not writer.is_closing():
            writer.write(frame(msg))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


class _Link:
    """One open connection: calls in flight by sequence number, answered by a reader task."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.pending: dict[int, asyncio.Future[list[Any]]] = {}
        self.alive = True
        self._seq = itertools.count()
        self._reader = asyncio.get_running_loop().create_task(
            self._read(reader), context=contextvars.Context()
        )

    async def _read(self, reader: asyncio.StreamReader) -> None:
        err: Exception = ConnectionError("ledger link closed")
        try:
            while True:
                seq, ok, payload = await read_frame(reader)
                fut = self.pending.pop(seq, None)
                if fut is None or fut.done():
                    continue
                if ok:
                    fut.set_result(payload)
                else:
                    fut.set_exception(_unavailable(f"The usage ledger failed: {payload}"))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError) as e:
            err = ConnectionError(f"ledger link closed: {e}")
        finally:
            self.close(err)

    async def call(self, ops: list[tuple[Any, ...]]) -> list[Any]:
        if not self.alive:
            raise ConnectionError("ledger link closed")
        seq = next(self._seq)
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self.pending[seq] = fut
        self.writer.write(frame((seq, ops)))
        return await fut

    def close(self, err: Exception) -> None:
        self.alive = False
        self.writer.close()
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)
        if not self._reader.done() and asyncio.current_task() is not self._reader:
            self._reader.cancel()


class SocketTransport:
    """A :class:`~serving.metering._client.LedgerTransport`: hot batches on the ledger's socket,
    admin operations and reads as Ray actor calls (through ``actor``)."""

    def __init__(self, actor: ActorTransport) -> None:
        self.actor = actor
        self._link: _Link | None = None
        self._connecting: asyncio.Task[_Link] | None = None

    async def _open(self) -> _Link:
        host, port, secret = await self.actor.handle.endpoint.remote()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(secret)
        return _Link(reader, writer)

    async def _connected(self) -> _Link:
        if self._link is not None and self._link.alive:
            return self._link
        connecting = self._connecting
        if connecting is None or connecting.done():
            # Shared by every caller that finds the link down; not a child of any one request.
            connecting = self._connecting = asyncio.get_running_loop().create_task(
                self._open(), context=contextvars.Context()
            )
        try:
            link = await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        self._link = link
        return link

    async def apply(self, ops: list[tuple[Any, ...]], *, retry: bool) -> list[Any]:
        if not retry or any(op[0] not in HOT_OPS for op in ops):
            return await self.actor.apply(ops, retry=retry)
        deadline = time.monotonic() + self.actor.restart_deadline_s
        delay_s = 0.05
        while True:
            try:
                link = await self._connected()
                return await link.call(ops)
            except (ConnectionError, OSError, RayActorError) as e:
                if time.monotonic() + delay_s > deadline:
                    raise _unavailable("The usage ledger is unavailable; retry later.") from e
                log.info("ledger link down (%s); reconnecting", e)
                await asyncio.sleep(delay_s)  # back-off timer while Ray restarts the ledger
                delay_s = min(1.0, delay_s * 2)

    async def read(self, name: str, *args: Any) -> Any:
        return await self.actor.read(name, *args)

    async def close(self) -> None:
        if self._link is not None:
            self._link.close(ConnectionError("transport closed"))
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting


class ActorTransport:
    """Reaches the ledger actor; resends idempotent batches while it restarts."""

    def __init__(self, handle: Any, *, restart_deadline_s: float = 60.0) -> None:
        self.handle = handle
        self.restart_deadline_s = restart_deadline_s

    async def apply(self, ops: list[tuple[Any, ...]], *, retry: bool) -> list[Any]:
        deadline = time.monotonic() + self.restart_deadline_s
        delay_s = 0.05
        while True:
            try:
                return await self.handle.apply.remote(ops)
            except RayActorError as e:
                if not retry or time.monotonic() + delay_s > deadline:
                    raise LedgerUnavailableError(_UNAVAILABLE, headers={"retry-after": "1"}) from e
                await asyncio.sleep(delay_s)  # back-off timer while Ray restarts the actor
                delay_s = min(1.0, delay_s * 2)

    async def read(self, name: str, *args: Any) -> Any:
        try:
            return await self.handle.read.remote(name, *args)
        except RayActorError as e:
            raise LedgerUnavailableError(_UNAVAILABLE, headers={"retry-after": "1"}) from e
