"""A request's chunks, whichever way they travel: all on the pool replica's token channel (direct
submission), or the first on the request's own handle stream and the rest on the handle stream or
the channel (``serving.pools.channel``)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from serving.admission import AdmissionRefused
from serving.engines.base import EngineChunk
from serving.pools.channel import ChannelClient, ChannelLost, RemoteFailure

_FINAL_GRACE_S = 10.0
"""After the handle stream ends, how long the final chunk may still take on the channel."""


class RequestTimeout(Exception):
    """The request ran past ``gateway.request_timeout_s``."""


class PoolFailure(Exception):
    """A directly submitted request failed at the pool replica (the message names the error)."""


def _raise_remote(failure: RemoteFailure) -> None:
    if failure.refusal is not None:
        raise AdmissionRefused(failure.refusal)
    raise PoolFailure(failure.message)


class _HandleEnded:
    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class ChunkStream:
    """Yields batches of chunks; an empty batch means the stream ended without a finished chunk."""

    def __init__(
        self, gen: Any, first: EngineChunk | None, channels: ChannelClient | None, request_id: str
    ) -> None:
        self.gen = gen
        self.request_id = request_id
        self._channels = channels
        self._inbox: asyncio.Queue[Any] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._handle_ended = False
        self._direct_to: str | None = None
        self._pending: list[EngineChunk] = []
        if first is not None and first.via_channel and channels is not None and not first.finished:
            self._inbox = channels.inbox(request_id)
            channels.bind(request_id, first.via_channel)
            self._watch = asyncio.ensure_future(self._watch_handle())

    @classmethod
    def direct(cls, channels: ChannelClient, replica_key: str, request: Any) -> ChunkStream:
        """Submit ``request`` (its inbox registered) to a pool replica on the channel."""
        stream = cls(None, None, channels, request.request_id)
        stream._inbox = channels.inbox(request.request_id)
        stream._direct_to = replica_key
        channels.submit(replica_key, request)
        return stream

    async def first(self, timeout_s: float) -> EngineChunk:
        """A direct stream's first chunk (raises what the pool refused or failed with)."""
        async with asyncio.timeout(timeout_s):
            while True:
                batch = await self._next_batch()
                if batch:
                    self._pending[:0] = batch[1:]  # the rest go to the next read
                    return batch[0]

    async def _watch_handle(self) -> None:
        """In channel mode the handle stream stays open until the pool is done; it carries nothing
        but its end (or the replica's failure)."""
        assert self._inbox is not None
        try:
            extra = await self.gen.__anext__()
            self._inbox.put_nowait(extra)  # not expected; deliver it rather than lose it
            await self.gen.__anext__()
        except StopAsyncIteration:
            self._inbox.put_nowait(_HandleEnded(None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            self._inbox.put_nowait(_HandleEnded(e))

    async def next_batch(self, deadline: float) -> list[EngineChunk]:
        """The next chunks (several when they queued up meanwhile); ``deadline`` on the loop clock."""
        try:
            async with asyncio.timeout_at(deadline):
                return await self._next_batch()
        except TimeoutError as e:
            if asyncio.get_running_loop().time() >= deadline:
                raise RequestTimeout("the request ran past the gateway's request_timeout_s") from e
            raise

    async def _next_batch(self) -> list[EngineChunk]:
        if self._pending:
            pending, self._pending = self._pending, []
            return pending
        if self._inbox is None:
            try:
                return [await self.gen.__anext__()]
            except StopAsyncIteration:
                return []
        inbox = self._inbox
        out: list[EngineChunk] = []
        item = await (asyncio.wait_for(inbox.get(), _FINAL_GRACE_S) if self._handle_ended else inbox.get())
        while True:
            if isinstance(item, EngineChunk):
                out.append(item)
            elif isinstance(item, _HandleEnded):
                if item.error is not None:
                    raise item.error
                self._handle_ended = True
            elif isinstance(item, ChannelLost):
                raise item
            elif isinstance(item, RemoteFailure):
                _raise_remote(item)
            if inbox.empty():
                break
            item = inbox.get_nowait()
        if not out and self._handle_ended:
            # The pool finished: its final chunk is on the channel, possibly a moment behind.
            try:
                return await self._next_batch()
            except TimeoutError as e:
                raise ChannelLost("the stream's final chunk never arrived on the channel") from e
        return out

    def close(self, finished: bool) -> None:
        """Stop watching; cancel upstream (aborts the generation) unless the stream finished."""
        if self._direct_to is not None:
            assert self._channels is not None
            self._channels.finish(self._direct_to, self.request_id, abort=not finished)
            self._direct_to = None
            return
        if self._watch is not None:
            self._watch.cancel()
        if not finished:
            with contextlib.suppress(Exception):
                self.gen.cancel()
        if self._channels is not None:
            self._channels.unregister(self.request_id)
