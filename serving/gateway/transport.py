"""How a gateway talks to pool replicas: submit a request, read its chunks in batches, abort.

:class:`Transport` is the whole protocol the request path uses; :class:`ChannelTransport` is its
one implementation, the gateway's end of the token channel (:mod:`serving.pools.channel` has the
pool's end and why it exists). It keeps one connection per pool replica on the load board and
demultiplexes their frames into one inbox per request (registered before the request is sent).

Reading: a frame already buffered is read without suspending. Reading a whole backlog in one pass
would stall every stream (ITL) for as long; yielding after every frame would wake each stream once
per frame (its chunks not batched into one write: more CPU per token). So the reader takes what is
buffered for up to ``READ_SLICE_S``, then lets the streams run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from serving.admission import AdmissionRefused
from serving.engines.base import EngineChunk, EngineRequest
from serving.kvcache import CacheRuns
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
from serving.wire import HANDSHAKE_TIMEOUT_S, FrameError, client_handshake

__all__ = [
    "ChannelLost",
    "ChannelTransport",
    "PoolFailure",
    "RequestTimeout",
    "TokenStream",
    "Transport",
]

log = logging.getLogger("tokenweir.channel")

READ_SLICE_S = 0.005
"""The gateway reads buffered frames for at most this long before letting its streams run."""


class ChannelLost(Exception):
    """The channel carrying a stream closed before the stream finished (or none was up)."""


class PoolFailure(Exception):
    """The pool replica ended a request with a failure (the message names the error)."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class RequestTimeout(Exception):
    """The request ran past ``gateway.request_timeout_s``."""


def _error(failure: Failure) -> Exception:
    if failure.refusal is not None:
        return AdmissionRefused(failure.refusal)
    return PoolFailure(failure.message, failure.retryable)


class Transport(Protocol):
    """What the request path needs from the link to pool replicas."""

    def usable(self, replica: str) -> bool:
        """Whether ``replica`` takes requests from this gateway now."""
        ...

    @property
    def load(self) -> Mapping[str, int]:
        """This gateway's open requests per replica."""
        ...

    def submit(self, replica: str, request: EngineRequest) -> TokenStream:
        """Send ``request``; raises :class:`ChannelLost` when ``replica`` is not usable."""
        ...

    async def wait_changed(self, timeout_s: float) -> None:
        """Return when a replica became usable or unusable, or after ``timeout_s``."""
        ...


class TokenStream:
    """One request's chunks, in batches (whatever arrived since the last read); ``close`` ends it
    (an abort at the replica unless it finished)."""

    __slots__ = ("_error", "_inbox", "_link", "_transport", "done", "queue_s", "request_id")

    def __init__(self, transport: ChannelTransport, link: _Link, request_id: str) -> None:
        self._transport = transport
        self._link: _Link | None = link
        self.request_id = request_id
        self._inbox: asyncio.Queue[object] = asyncio.Queue()
        self._error: Exception | None = None
        self.done = False
        """The finished chunk was read."""
        self.queue_s: float | None = None
        """How long the request waited in the replica's admission queue, once it was let in (by
        the time its first chunk is read; None from a replica that does not say)."""

    async def next_batch(self, deadline: float | None = None) -> list[EngineChunk]:
        """The next chunks (at least one); raises what ended the stream otherwise. ``deadline`` on
        the loop clock: :class:`RequestTimeout` past it."""
        if self._error is not None:
            raise self._error
        if deadline is None:
            item = await self._inbox.get()
        else:
            try:
                async with asyncio.timeout_at(deadline):
                    item = await self._inbox.get()
            except TimeoutError as e:
                raise RequestTimeout("the request ran past the gateway's request_timeout_s") from e
        inbox = self._inbox
        out: list[EngineChunk] = []
        while True:
            if isinstance(item, EngineChunk):
                out.append(item)
                if item.finished:
                    self.done = True
            else:
                err = _error(item) if isinstance(item, Failure) else item
                assert isinstance(err, Exception)
                if not out:
                    raise err
                self._error = err  # deliver the chunks before it: their usage is what was produced
                return out
            if inbox.empty():
                return out
            item = inbox.get_nowait()

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> list[EngineChunk]:
        if self.done:
            raise StopAsyncIteration
        return await self.next_batch()

    def close(self) -> None:
        """Forget the stream; abort it at the replica unless its finished chunk came."""
        link, self._link = self._link, None
        if link is not None:
            self._transport._finish(link, self.request_id, abort=not self.done)


class _Link:
    """One connection to a pool replica."""

    __slots__ = ("draining", "host", "key", "live", "streams", "task", "writer")

    def __init__(self, key: str, host: str = "") -> None:
        self.key = key
        self.host = host
        """The replica's channel address: the address of the Ray node it runs on."""
        self.live = False
        self.draining = False
        self.writer: asyncio.StreamWriter | None = None
        self.streams: dict[str, TokenStream] = {}
        self.task: asyncio.Task[None] | None = None


class ChannelTransport:
    """The gateway replica's end of the token channel."""

    def __init__(self, gateway_id: str) -> None:
        self.gateway_id = gateway_id
        self._links: dict[str, _Link] = {}
        self._inboxes: dict[str, asyncio.Queue[object]] = {}
        self._load: defaultdict[str, int] = defaultdict(int)
        self._waiters: list[asyncio.Future[None]] = []
        self.on_cache: Callable[[str, CacheRuns, bool], None] | None = None
        """Receives each pool replica's KV-cache events: ``(replica key, runs, cleared)``."""

    # -- Transport ----------------------------------------------------------------------------------
    def usable(self, replica: str) -> bool:
        link = self._links.get(replica)
        return link is not None and link.live and not link.draining

    @property
    def load(self) -> Mapping[str, int]:
        return self._load

    def node_of(self, replica: str) -> str | None:
        """The node address of a pool replica this gateway has a channel to (None: none)."""
        link = self._links.get(replica)
        return link.host if link is not None else None

    def submit(self, replica: str, request: EngineRequest) -> TokenStream:
        link = self._links.get(replica)
        if link is None or not link.live or link.draining or link.writer is None or link.writer.is_closing():
            raise ChannelLost(f"no channel to pool replica {replica}")
        rid = request.request_id
        stream = TokenStream(self, link, rid)
        link.streams[rid] = stream
        self._inboxes[rid] = stream._inbox
        self._load[replica] += 1
        link.writer.write(from_gateway.frame(Submit(request)))
        return stream

    async def wait_changed(self, timeout_s: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, timeout_s)

    # -- internals ----------------------------------------------------------------------------------
    def _finish(self, link: _Link, request_id: str, *, abort: bool) -> None:
        self._load[link.key] = max(0, self._load[link.key] - 1)
        link.streams.pop(request_id, None)
        self._inboxes.pop(request_id, None)
        w = link.writer
        if abort and link.live and w is not None and not w.is_closing():
            w.write(from_gateway.frame(Abort(request_id)))

    def notify(self) -> None:
        """Wake whoever waits for a usable replica."""
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def sync(self, endpoints: Iterable[tuple[str, str, int, bytes]]) -> None:
        """Keep one connection per advertised pool replica ``(replica_key, host, port, secret)``."""
        wanted = {key: (host, port, secret) for key, host, port, secret in endpoints}
        for key, link in list(self._links.items()):
            if key not in wanted or (link.task is not None and link.task.done()):
                if link.task is not None:
                    link.task.cancel()
                del self._links[key]
        loop = asyncio.get_running_loop()
        for key, (host, port, secret) in wanted.items():
            if key not in self._links:
                link = self._links[key] = _Link(key, host)
                link.task = loop.create_task(self._run(link, host, port, secret))

    async def _run(self, link: _Link, host: str, port: int, secret: bytes) -> None:
        writer = None
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                reader, writer = await asyncio.open_connection(host, port)
            await client_handshake(reader, writer, secret)
            writer.write(from_gateway.frame(Hello(PROTOCOL_VERSION, self.gateway_id)))
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                welcome = await from_pool.read(reader)
            if not isinstance(welcome, Welcome) or welcome.protocol != PROTOCOL_VERSION:
                got = welcome.protocol if isinstance(welcome, Welcome) else type(welcome).__name__
                log.error(
                    "pool replica %s speaks channel protocol %s, this gateway %d",
                    link.key,
                    got,
                    PROTOCOL_VERSION,
                )
                return
            link.writer, link.live = writer, True
            self.notify()
            inboxes = self._inboxes
            loop = asyncio.get_running_loop()
            # ``passed`` flips when the loop has run other callbacks since the last frame (the read
            # suspended), which starts a new read slice.
            passed = [True]
            since = 0.0
            while True:
                msg = await from_pool.read(reader)
                if passed[0]:
                    passed[0] = False
                    since = loop.time()
                    loop.call_soon(passed.__setitem__, 0, True)
                if isinstance(msg, Batch):
                    for rid, waited_s in msg.admitted:
                        if (admitted := link.streams.get(rid)) is not None:
                            admitted.queue_s = waited_s
                    for rid, chunk in msg.chunks:
                        q = inboxes.get(rid)
                        if q is not None:
                            q.put_nowait(chunk)
                    for failure in msg.failures:
                        q = inboxes.get(failure.request_id)
                        if q is not None:
                            q.put_nowait(failure)
                elif isinstance(msg, CacheEvents):
                    if self.on_cache is not None:
                        self.on_cache(link.key, msg.runs, msg.cleared)
                elif isinstance(msg, Drain):
                    link.draining = True
                    self.notify()
                if loop.time() - since > READ_SLICE_S:
                    await asyncio.sleep(0)
        except (asyncio.IncompleteReadError, ConnectionError, OSError, FrameError, TimeoutError) as e:
            log.info("channel to %s closed: %s", link.key, e)
        finally:
            link.live = False
            if writer is not None:
                writer.close()
            # Streams that were on this channel cannot finish: wake them with the loss.
            lost = ChannelLost(f"channel to pool replica {link.key} closed")
            for stream in list(link.streams.values()):
                stream._inbox.put_nowait(lost)
            self.notify()

    async def close(self) -> None:
        tasks = [link.task for link in self._links.values() if link.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
