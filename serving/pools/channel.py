"""The token channel: one TCP connection per (gateway replica, pool replica) that carries the deltas
of every stream between them, one frame per engine step instead of one Ray message per token.

Two ways a request travels:

* **Direct** (the default once a gateway is connected): the gateway picks the replica itself (power
  of two choices over its own in-flight counts) and sends ``("submit", EngineRequest)`` on the
  channel; every chunk comes back on it, and ``("abort", request_id)`` cancels. No Ray message per
  request at all: a Serve handle call costs ~2-3 ms of CPU across gateway and replica here.
* **Through Ray Serve** (before the channel is up, or with ``gateway.token_channel: false``): the
  pool yields the first chunk on the request's own handle stream, with ``via_channel`` set when the
  gateway has a channel here; the rest then travel on the channel.

Either way chunks of one engine step go out as one frame: Ray Serve's cost follows messages, not
tokens (~0.7 ms of CPU per streamed message on two cores). Ray Serve still runs the replicas
(placement, health checks, restarts); a replica that dies closes its channels, and its streams end
with :class:`ChannelLost` (retried elsewhere before the first token).

Frames are :mod:`serving.wire`'s. Gateway to pool: the replica's secret (published with its address
on the load board), ``("hello", gateway_id)``, then ``("submit", request)`` / ``("abort", id)``.
Pool to gateway: a list of ``(request_id, EngineChunk | RemoteFailure)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import random
import socket
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from serving.engines.base import EngineChunk, merge_chunks
from serving.wire import check_secret, new_secret
from serving.wire import frame as _frame
from serving.wire import read_frame as _read_frame

log = logging.getLogger("tokenweir.channel")


@dataclass(frozen=True, slots=True)
class RemoteFailure:
    """A directly submitted request failed at the pool: ``refusal`` (the admission core's
    ``Refused``) when it was refused, else ``message`` names the error."""

    message: str
    refusal: Any = None


class Submissions:
    """What a pool replica does with direct requests (implemented by the replica)."""

    def __init__(
        self,
        submit: Callable[[str, Any], None],
        abort: Callable[[str, str], None],
        gone: Callable[[str], None],
    ) -> None:
        self.submit, self.abort, self.gone = submit, abort, gone


class _Outbound:
    """One gateway's connection at the pool: an outbox flushed once per event-loop pass, so every
    stream's chunk of one engine step goes out in one frame.

    When the gateway reads slower than the engine steps, the link's buffers fill (the socket's send
    buffer is kept small, ``SEND_BUFFER_BYTES``); the outbox then holds on and merges each request's
    chunks until the transport drains, as vLLM's own output collector merges for a slow reader. So
    a busy gateway gets fewer, larger chunks instead of a growing backlog of stale ones."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.outbox: list[list[Any]] = []
        self._pending: dict[str, list[Any]] = {}
        """Request id -> its item in the outbox while that holds a chunk (to merge into)."""
        self.alive = True
        self._scheduled = False
        self._draining = False
        self.merged = 0
        """Chunks merged into an earlier one because the gateway was behind."""

    def send(self, request_id: str, chunk: EngineChunk | RemoteFailure) -> None:
        item = self._pending.get(request_id)
        if item is not None and isinstance(chunk, EngineChunk):
            item[1] = merge_chunks(item[1], chunk)
            self.merged += 1
        else:
            item = [request_id, chunk]
            self.outbox.append(item)
            if isinstance(chunk, EngineChunk):
                self._pending[request_id] = item
            else:
                self._pending.pop(request_id, None)
        if not self._scheduled and not self._draining:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if not self.outbox or not self.alive or self._draining:
            return
        items, self.outbox = self.outbox, []
        self._pending.clear()
        try:
            self.writer.write(_frame([(rid, c) for rid, c in items]))
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

    async def drain(self) -> None:
        """Flush now and wait until the transport has taken the bytes."""
        self.flush()
        await self.writer.drain()


SEND_BUFFER_BYTES = 256 * 1024
"""Kernel send buffer of a channel at the pool (loopback autotuning would let it grow to MBs of
frames the gateway has not read yet)."""

_BACKGROUND: set[asyncio.Task[None]] = set()

READ_SLICE_S = 0.005
"""The gateway reads buffered frames for at most this long before letting its streams run."""


class ChannelServer:
    """The pool replica's end: accepts gateways, sends their streams' chunks."""

    def __init__(self, host: str, submissions: Submissions | None = None) -> None:
        self.host = host
        self.port = 0
        self.secret = new_secret()
        self.submissions = submissions
        self._conns: dict[str, _Outbound] = {}
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> tuple[str, int, bytes]:
        """Listen; return ``(host, port, secret)``: what a gateway needs to connect."""
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.host, self.port, self.secret

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        gateway_id = None
        conn: _Outbound | None = None
        try:
            await check_secret(reader, self.secret)
            kind, gateway_id = await _read_frame(reader)
            if kind != "hello":
                raise ValueError(f"unexpected first frame {kind!r}")
            old = self._conns.get(gateway_id)
            if old is not None:
                old.alive = False
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
            conn = self._conns[gateway_id] = _Outbound(writer)
            subs = self.submissions
            while True:  # EOF (IncompleteReadError) means the gateway went away
                msg = await _read_frame(reader)
                if subs is None:
                    raise ValueError("this replica takes no direct submissions")
                if msg[0] == "submit":
                    subs.submit(gateway_id, msg[1])
                elif msg[0] == "abort":
                    subs.abort(gateway_id, msg[1])
        except (asyncio.IncompleteReadError, ConnectionError, ValueError, pickle.UnpicklingError):
            pass
        finally:
            if conn is not None:
                conn.alive = False
                if gateway_id is not None and self._conns.get(gateway_id) is conn:
                    # Still this gateway's current link (not one it replaced): its requests end here.
                    del self._conns[gateway_id]
                    if self.submissions is not None:
                        self.submissions.gone(gateway_id)
            writer.close()

    def connection(self, gateway_id: str | None) -> _Outbound | None:
        """The live connection of a gateway, if it has one here."""
        if gateway_id is None:
            return None
        conn = self._conns.get(gateway_id)
        return conn if conn is not None and conn.alive else None

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in self._conns.values():
            c.alive = False
            c.writer.close()


class ChannelLost(Exception):
    """The channel carrying a stream closed before the stream finished."""


class ChannelClient:
    """The gateway replica's end: one connection per pool replica, demultiplexed into per-request
    inboxes (an ``asyncio.Queue`` each, registered before the request is sent)."""

    def __init__(self, gateway_id: str) -> None:
        self.gateway_id = gateway_id
        self._inboxes: dict[str, asyncio.Queue[Any]] = {}
        self._owner: dict[str, str] = {}
        self._conns: dict[str, asyncio.Task[None]] = {}
        self._live: set[str] = set()
        self._writers: dict[str, asyncio.StreamWriter] = {}
        self.in_flight: defaultdict[str, int] = defaultdict(int)
        """Directly submitted requests open per pool replica (for the replica choice)."""

    def register(self, request_id: str) -> asyncio.Queue[Any]:
        """An inbox for a request about to be sent (chunks may arrive before its first chunk does)."""
        q: asyncio.Queue[Any] = asyncio.Queue()
        self._inboxes[request_id] = q
        return q

    def inbox(self, request_id: str) -> asyncio.Queue[Any]:
        """The inbox registered for a request."""
        return self._inboxes[request_id]

    def bind(self, request_id: str, replica_key: str) -> None:
        """The request's first chunk says its other chunks come on ``replica_key``'s channel."""
        self._owner[request_id] = replica_key
        if replica_key not in self._live:
            q = self._inboxes.get(request_id)
            if q is not None:
                q.put_nowait(ChannelLost(f"no channel to pool replica {replica_key}"))

    def unregister(self, request_id: str) -> None:
        self._inboxes.pop(request_id, None)
        self._owner.pop(request_id, None)

    def sync(self, endpoints: Iterable[tuple[str, str, int, bytes]]) -> None:
        """Keep one connection per advertised pool replica ``(replica_key, host, port, secret)``."""
        wanted = {key: (host, port, secret) for key, host, port, secret in endpoints}
        for key, task in list(self._conns.items()):
            if key not in wanted or task.done():
                task.cancel()
                del self._conns[key]
        loop = asyncio.get_running_loop()
        for key, (host, port, secret) in wanted.items():
            if key not in self._conns:
                self._conns[key] = loop.create_task(self._run(key, host, port, secret))

    async def _run(self, key: str, host: str, port: int, secret: bytes) -> None:
        writer = None
        try:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(secret + _frame(("hello", self.gateway_id)))
            await writer.drain()
            self._live.add(key)
            self._writers[key] = writer
            inboxes = self._inboxes
            loop = asyncio.get_running_loop()
            # A frame already buffered is read without suspending. Reading a whole backlog in one
            # pass would stall every stream (ITL) for as long; yielding after every frame would wake
            # each stream once per frame (its chunks not batched into one write: more CPU per
            # token). So: read what is buffered for up to READ_SLICE_S, then let the streams run.
            # ``passed`` flips when the loop has run other callbacks since the last frame (the read
            # suspended), which starts a new slice.
            passed = [True]
            since = 0.0
            while True:
                frame = await _read_frame(reader)
                if passed[0]:
                    passed[0] = False
                    since = loop.time()
                    loop.call_soon(passed.__setitem__, 0, True)
                for rid, chunk in frame:
                    q = inboxes.get(rid)
                    if q is not None:
                        q.put_nowait(chunk)
                if loop.time() - since > READ_SLICE_S:
                    await asyncio.sleep(0)
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            log.info("channel to %s closed: %s", key, e)
        finally:
            self._live.discard(key)
            self._writers.pop(key, None)
            if writer is not None:
                writer.close()
            # Streams that were on this channel cannot finish: wake them with the loss.
            lost = ChannelLost(f"channel to pool replica {key} closed")
            for rid, owner in list(self._owner.items()):
                q = self._inboxes.get(rid)
                if owner == key and q is not None:
                    q.put_nowait(lost)

    # -- direct submission ---------------------------------------------------------------------------
    def pick(self, replica_keys: Iterable[str]) -> str | None:
        """A connected replica among ``replica_keys``: the less loaded of two random ones (by this
        gateway's open requests on each), or None when none is connected."""
        live = [k for k in replica_keys if k in self._writers]
        if len(live) <= 1:
            return live[0] if live else None
        a, b = random.sample(live, 2)
        return a if self.in_flight[a] <= self.in_flight[b] else b

    def submit(self, replica_key: str, request: Any) -> None:
        """Send a registered request to a replica; its chunks arrive in its inbox."""
        writer = self._writers.get(replica_key)
        if writer is None or writer.is_closing():
            raise ChannelLost(f"no channel to pool replica {replica_key}")
        self.bind(request.request_id, replica_key)
        self.in_flight[replica_key] += 1
        writer.write(_frame(("submit", request)))

    def finish(self, replica_key: str, request_id: str, *, abort: bool) -> None:
        """A direct request is over: forget it, and abort it at the replica unless it finished."""
        self.in_flight[replica_key] = max(0, self.in_flight[replica_key] - 1)
        writer = self._writers.get(replica_key)
        if abort and writer is not None and not writer.is_closing():
            writer.write(_frame(("abort", request_id)))
        self.unregister(request_id)

    async def close(self) -> None:
        for t in self._conns.values():
            t.cancel()
        for t in self._conns.values():
            with contextlib.suppress(BaseException):
                await t
