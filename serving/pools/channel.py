"""The token channel, pool end: the one data path between gateways and a pool replica.

One TCP connection per (gateway replica, pool replica) carries every request and every chunk between
them (frames: :mod:`serving.pools.frames`). Ray Serve runs the replicas (placement, health, restarts)
and answers control calls (readiness, stats), but carries no request: a Serve handle call costs
~2-3 ms of CPU across gateway and replica on two cores, and ~0.7 ms per streamed message (README,
"Speed"); a frame here carries one engine step of every stream.

Each connection has an outbox flushed once per event-loop pass, so every stream's chunk of one step
goes out in one frame. A gateway that reads slower than the engine steps fills the socket's (small,
``SEND_BUFFER_BYTES``) send buffer; the outbox then merges each request's chunks until the link
drains, as vLLM's output collector merges for a slow reader: fewer, larger chunks, no backlog.

When the engine publishes its KV-cache events, the replica keeps what they add up to
(:class:`~serving.kvcache.CachedBlocks`); a gateway gets that as a snapshot when it connects, then
the changes (:class:`~serving.pools.frames.CacheEvents`, every ``CACHE_EVENTS_INTERVAL_S`` at most:
:class:`~serving.pools.host.ReplicaHost` collects them), and routes by them.

Gateway and replica prove to each other that they hold the replica's secret (published with the
address on the load board; :func:`serving.wire.server_handshake`), then the gateway says
:class:`~serving.pools.frames.Hello` with its id and protocol version: a mismatch, or an id that is
already connected, closes the link.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from serving.engines.base import EngineChunk, EngineRequest, merge_chunks
from serving.kvcache import CachedBlocks, CacheRuns
from serving.pools.frames import (
    PROTOCOL_VERSION,
    Abort,
    Batch,
    CacheEvents,
    Drain,
    Failure,
    Hello,
    Submit,
    Welcome,
    from_gateway,
    from_pool,
)
from serving.wire import HANDSHAKE_TIMEOUT_S, FrameError, new_secret, server_handshake

__all__ = ["SEND_BUFFER_BYTES", "ChannelServer", "Outbound", "Submissions"]

log = logging.getLogger("tokenweir.channel")

SEND_BUFFER_BYTES = 256 * 1024
"""Kernel send buffer of a channel at the pool (loopback autotuning would let it grow to MBs of
frames the gateway has not read yet)."""

CACHE_EVENTS_BACKLOG_BYTES = 1024 * 1024
"""Above this much unsent data on a gateway's link, cache events for it are skipped (it gets a
snapshot when it has caught up)."""

_BACKGROUND: set[asyncio.Task[None]] = set()


class Outbound:
    """One gateway's connection at the pool: queue chunks and failures with :meth:`send` /
    :meth:`fail`; they leave in one frame per event-loop pass."""

    __slots__ = (
        "_admitted",
        "_draining",
        "_failures",
        "_pending",
        "_scheduled",
        "alive",
        "cache_stale",
        "gateway_id",
        "merged",
        "outbox",
        "writer",
    )

    def __init__(self, gateway_id: str, writer: asyncio.StreamWriter) -> None:
        self.gateway_id = gateway_id
        self.writer = writer
        self.outbox: list[list[object]] = []
        self._failures: list[Failure] = []
        self._admitted: list[tuple[str, float]] = []
        self._pending: dict[str, list[object]] = {}
        """Request id -> its item in the outbox while that holds a chunk (to merge into)."""
        self.alive = True
        self._scheduled = False
        self._draining = False
        self.merged = 0
        """Chunks merged into an earlier one because the gateway was behind."""
        self.cache_stale = False
        """Cache events were skipped while the gateway was behind: it gets a snapshot next."""

    def send(self, request_id: str, chunk: EngineChunk) -> None:
        item = self._pending.get(request_id)
        if item is not None:
            item[1] = merge_chunks(item[1], chunk)  # type: ignore[arg-type]
            self.merged += 1
        else:
            item = [request_id, chunk]
            self.outbox.append(item)
            self._pending[request_id] = item
        self._schedule()

    def admitted(self, request_id: str, waited_s: float) -> None:
        """The request left the replica's admission queue after ``waited_s``: that goes to the
        gateway with the request's first chunk or failure (no frame of its own)."""
        self._admitted.append((request_id, waited_s))

    def fail(self, failure: Failure) -> None:
        self._pending.pop(failure.request_id, None)
        self._failures.append(failure)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and not self._draining:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def write(self, frame: bytes) -> None:
        """A control frame, now (after what is queued)."""
        self.flush()
        if self.alive and not self.writer.is_closing():
            self.writer.write(frame)

    def flush(self) -> None:
        self._scheduled = False
        if not (self.outbox or self._failures) or not self.alive or self._draining:
            return
        items, self.outbox = self.outbox, []
        failures, self._failures = self._failures, []
        admitted, self._admitted = self._admitted, []
        self._pending.clear()
        try:
            self.writer.write(from_pool.frame(Batch([(i[0], i[1]) for i in items], failures, admitted)))  # type: ignore[misc]
        except Exception:
            self.alive = False
            log.warning("channel write failed; the gateway's streams here are aborted", exc_info=True)
            return
        if self.writer.transport.get_write_buffer_size() > 0:  # the socket buffer is full
            self._draining = True
            task = asyncio.get_running_loop().create_task(self._drain_then_flush())
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)

    async def _drain_then_flush(self) -> None:
        try:
            await self.writer.drain()
        except Exception:
            self.alive = False
            return
        finally:
            self._draining = False
        self.flush()


@dataclass(frozen=True, slots=True)
class Submissions:
    """What the replica does with a connection's messages."""

    submit: Callable[[Outbound, EngineRequest], None]
    abort: Callable[[Outbound, str], None]
    gone: Callable[[Outbound], None]
    """The connection closed: its requests cannot be answered any more."""


class ChannelServer:
    """The pool replica's end: accepts gateways, hands their requests to ``submissions``."""

    def __init__(self, host: str, replica: str, submissions: Submissions) -> None:
        self.host = host
        self.port = 0
        self.replica = replica
        self.secret = new_secret()
        self.submissions = submissions
        self._conns: dict[str, Outbound] = {}
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.draining = False
        self.cache: CachedBlocks | None = None
        """What the engine's prefix cache holds (by its KV-cache events), when it publishes them:
        a gateway that connects gets it as a snapshot, then every change (:meth:`send_cache`)."""

    async def start(self) -> tuple[str, int, bytes]:
        """Listen; return ``(host, port, secret)``: what a gateway needs to connect."""
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.host, self.port, self.secret

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn: Outbound | None = None
        subs = self.submissions
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        try:
            await server_handshake(reader, writer, self.secret)
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                    hello = await from_gateway.read(reader)
            except TimeoutError as e:
                raise FrameError("no hello in time") from e
            if not isinstance(hello, Hello):
                raise FrameError(f"expected a hello, got {type(hello).__name__}")
            writer.write(from_pool.frame(Welcome(PROTOCOL_VERSION, self.replica)))
            if hello.protocol != PROTOCOL_VERSION:
                raise FrameError(
                    f"gateway speaks channel protocol {hello.protocol}, this replica {PROTOCOL_VERSION}"
                )
            old = self._conns.get(hello.gateway_id)
            if old is not None and old.alive:
                # One connection per gateway id: a second one while the first is up is an impostor
                # (or a reconnect racing the old link's close; the gateway retries on its next sync).
                raise FrameError(f"gateway {hello.gateway_id!r} is already connected")
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            conn = self._conns[hello.gateway_id] = Outbound(hello.gateway_id, writer)
            if self.draining:
                conn.write(from_pool.frame(Drain()))
            if self.cache is not None:
                conn.write(self._cache_snapshot())
            while True:  # EOF (IncompleteReadError) means the gateway went away
                match await from_gateway.read(reader):
                    case Submit(request):
                        subs.submit(conn, request)
                    case Abort(request_id):
                        subs.abort(conn, request_id)
                    case Hello():
                        raise FrameError("a second hello")
        except (asyncio.IncompleteReadError, ConnectionError, FrameError) as e:
            log.debug("channel from a gateway closed: %s", e)
        except asyncio.CancelledError:
            pass  # close(): the task ends here (asyncio's stream callback would log a re-raise)
        finally:
            if conn is not None:
                conn.alive = False
                if self._conns.get(conn.gateway_id) is conn:
                    del self._conns[conn.gateway_id]
                subs.gone(conn)
            writer.close()

    def _cache_snapshot(self) -> bytes:
        assert self.cache is not None
        return from_pool.frame(CacheEvents(self.cache.snapshot(), cleared=True))

    def send_cache(self, runs: CacheRuns, cleared: bool) -> None:
        """Every connected gateway gets these cache changes (already applied to :attr:`cache`). A
        gateway whose socket is backed up skips them and gets a snapshot once it has caught up:
        a stream's tokens are never queued behind cache news."""
        frame: bytes | None = None
        for conn in self._conns.values():
            if not conn.alive or conn.writer.is_closing():
                continue
            if conn.writer.transport.get_write_buffer_size() > CACHE_EVENTS_BACKLOG_BYTES:
                conn.cache_stale = True
            elif conn.cache_stale:
                conn.cache_stale = False
                conn.write(self._cache_snapshot())
            else:
                if frame is None:
                    frame = from_pool.frame(CacheEvents(runs, cleared))
                conn.write(frame)

    def drain(self) -> None:
        """Tell every gateway (and any that connects later) to send nothing new here."""
        self.draining = True
        frame = from_pool.frame(Drain())
        for conn in self._conns.values():
            conn.write(frame)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self._conns.values()):
            c.flush()
            c.alive = False
            c.writer.close()
        handlers = list(self._handlers)
        for t in handlers:
            t.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
