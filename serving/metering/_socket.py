"""The ledger socket: hot batches on a TCP link instead of Ray actor calls.

A Ray actor call costs ~1.6 ms round trip on this 2-core machine; a frame on an open TCP connection
~0.1 ms (measured, README "Speed"). Every request reserves before dispatch, so that round trip is
on every request's time to first token. The ledger actor therefore also listens on a socket
(:class:`LedgerSocketServer`) for batches of hot operations; a gateway replica keeps one
:class:`LedgerLink` to it, opened from the address and link secret the actor gives out over Ray (so
only cluster members can connect). Admin operations and reads never travel here.

Frames (:class:`serving.wire.Codec`, msgpack of typed structs): after the mutual handshake on the
secret (:func:`serving.wire.client_handshake`) the client sends
:class:`Batch` frames and the ledger answers each with a :class:`Reply` carrying the same ``seq``.
Only hot operations decode as a batch: a frame that does not (an admin operation, garbage) ends
that link with :class:`~serving.wire.FrameError`, and the ledger goes on serving every other link.
Batches are applied concurrently, so those of every gateway share one group commit. This module
knows nothing of Ray: :class:`~._actor.ActorTransport` learns the address, and reconnects and
resends (the hot operations are idempotent) when the ledger restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec

from serving.errors import LedgerUnavailableError
from serving.wire import Codec, client_handshake, new_secret, server_handshake

from ._keys import KeyDirectory, KeyEntry, Keys, snapshot_frames
from ._ops import HotOp, HotResult

__all__ = ["Batch", "Endpoint", "LedgerLink", "LedgerSocketServer", "Reply"]

log = logging.getLogger("tokenweir.ledger")

Endpoint = tuple[str, int, bytes]
"""``(host, port, secret)`` of a ledger socket."""


class Batch(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """Client to ledger: hot operations to apply in order."""

    seq: int
    ops: list[HotOp]


class Reply(msgspec.Struct, frozen=True, tag=True, array_like=True):
    """Ledger to client: the results of batch ``seq``, or why it failed (a failed commit)."""

    seq: int
    results: list[HotResult] = []
    error: str | None = None


_BATCHES: Codec[Batch] = Codec(Batch)
_REPLIES: Codec[Reply | Keys] = Codec(Reply | Keys)


class KeyFeed(Protocol):
    """Where the server gets the usable keys it sends each connection (the ledger core)."""

    def key_snapshot(self) -> list[KeyEntry]: ...

    def subscribe_keys(self, listener: Callable[[list[KeyEntry]], None]) -> Callable[[], None]: ...


class LedgerSocketServer:
    """The ledger's end: applies hot batches from any number of gateway connections.

    Each connection is a *lease*: ``apply`` gets its number with every batch (the reservations it
    opens are held by it), and ``on_close`` is told when the connection ends, so the reservations
    of a gateway that died are resolved soon after instead of at their TTL."""

    def __init__(
        self,
        apply: Callable[[list[HotOp], int], Awaitable[list[HotResult]]],
        host: str,
        on_close: Callable[[int], object] | None = None,
        keys: KeyFeed | None = None,
    ) -> None:
        self._apply = apply
        self._on_close = on_close
        self._keys = keys
        self._leases = itertools.count(1)
        self.host = host
        self.secret = new_secret()
        self._server: asyncio.base_events.Server | None = None
        self.endpoint: Endpoint | None = None

    async def start(self) -> Endpoint:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        port = int(self._server.sockets[0].getsockname()[1])
        self.endpoint = (self.host, port, self.secret)
        return self.endpoint

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks: set[asyncio.Task[None]] = set()
        lease = 0
        unsubscribe: Callable[[], None] | None = None
        try:
            await server_handshake(reader, writer, self.secret)
            lease = next(self._leases)
            if self._keys is not None:  # snapshot and subscription in one tick: nothing is missed
                for frame in snapshot_frames(self._keys.key_snapshot()):
                    writer.write(_REPLIES.frame(frame))
                unsubscribe = self._keys.subscribe_keys(
                    lambda entries: (
                        None if writer.is_closing() else writer.write(_REPLIES.frame(Keys(entries)))
                    )
                )
            while True:
                batch = await _BATCHES.read(reader)
                t = asyncio.get_running_loop().create_task(self._one(writer, batch, lease))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as e:  # FrameError too
            log.debug("ledger link closed: %s", e)
        finally:
            writer.close()
            if unsubscribe is not None:
                unsubscribe()
            if lease and self._on_close is not None:
                self._on_close(lease)

    async def _one(self, writer: asyncio.StreamWriter, batch: Batch, lease: int) -> None:
        try:
            reply = Reply(batch.seq, await self._apply(batch.ops, lease))
        except Exception as e:  # a failed commit: the caller sees the ledger as unavailable
            reply = Reply(batch.seq, error=f"{type(e).__name__}: {e}")
        if not writer.is_closing():
            writer.write(_REPLIES.frame(reply))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()


class _Connection:
    """One open connection: batches in flight by sequence number, answered by a reader task."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, keys: KeyDirectory | None = None
    ) -> None:
        self.writer = writer
        self.keys = keys
        self.pending: dict[int, asyncio.Future[list[HotResult]]] = {}
        self.alive = True
        self._seq = itertools.count()
        self._reader = asyncio.get_running_loop().create_task(
            self._read(reader), context=contextvars.Context()
        )

    async def _read(self, reader: asyncio.StreamReader) -> None:
        err: Exception = ConnectionError("ledger link closed")
        try:
            while True:
                reply = await _REPLIES.read(reader)
                if isinstance(reply, Keys):
                    if self.keys is not None:
                        self.keys.apply(reply)
                    continue
                fut = self.pending.pop(reply.seq, None)
                if fut is None or fut.done():
                    continue
                if reply.error is None:
                    fut.set_result(reply.results)
                else:
                    fut.set_exception(
                        LedgerUnavailableError(
                            f"The usage ledger failed: {reply.error}", headers={"retry-after": "1"}
                        )
                    )
        except (asyncio.IncompleteReadError, ConnectionError, OSError, ValueError) as e:  # FrameError too
            err = ConnectionError(f"ledger link closed: {e}")
        finally:
            self.close(err)

    async def call(self, ops: list[HotOp]) -> list[HotResult]:
        if not self.alive:
            raise ConnectionError("ledger link closed")
        seq = next(self._seq)
        fut: asyncio.Future[list[HotResult]] = asyncio.get_running_loop().create_future()
        self.pending[seq] = fut
        self.writer.write(_BATCHES.frame(Batch(seq, ops)))
        return await fut

    def close(self, err: Exception) -> None:
        self.alive = False
        if self.keys is not None:
            self.keys.lost()
        self.writer.close()
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(err)
        if not self._reader.done() and asyncio.current_task() is not self._reader:
            self._reader.cancel()


class LedgerLink:
    """A gateway's end: one connection to the ledger socket, opened on first use and again after it
    closes (at ``endpoint()``'s answer then, which changes when the ledger restarts). A call on a
    link that goes down raises :class:`ConnectionError`; resending is the caller's choice."""

    def __init__(self, endpoint: Callable[[], Awaitable[Endpoint]], keys: KeyDirectory | None = None) -> None:
        self._endpoint = endpoint
        self.keys = keys
        """Fed by the ledger on every connection this link opens (:mod:`._keys`)."""
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None

    async def _open(self) -> _Connection:
        host, port, secret = await self._endpoint()
        reader, writer = await asyncio.open_connection(host, port)
        try:
            await client_handshake(reader, writer, secret)
        except BaseException:
            writer.close()
            raise
        return _Connection(reader, writer, self.keys)

    async def _connected(self) -> _Connection:
        if self._conn is not None and self._conn.alive:
            return self._conn
        connecting = self._connecting
        if connecting is None or connecting.done():
            # Shared by every caller that finds the link down; not a child of any one request.
            connecting = self._connecting = asyncio.get_running_loop().create_task(
                self._open(), context=contextvars.Context()
            )
        try:
            conn = await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        self._conn = conn
        return conn

    async def call(self, ops: list[HotOp]) -> list[HotResult]:
        return await (await self._connected()).call(ops)

    async def connect(self) -> None:
        """Open the link now (a gateway does at start, so its key directory syncs before use)."""
        await self._connected()

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close(ConnectionError("link closed"))
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
