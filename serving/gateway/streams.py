"""A request's chunks after the first, whichever way they travel: on the request's own handle
stream, or on the pool replica's token channel (``serving.pools.channel``)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from serving.engines.base import EngineChunk
from serving.pools.channel import ChannelClient, ChannelLost

_FINAL_GRACE_S = 10.0
"""After the handle stream ends, how long the final chunk may still take on the channel."""


class RequestTimeout(Exception):
    """The request ran past ``gateway.request_timeout_s``."""


class _HandleEnded:
    __slots__ = ("error",)

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class ChunkStream:
    """Yields batches of chunks; an empty batch means the stream ended without a finished chunk."""

    def __init__(self, gen: Any, first: EngineChunk, channels: ChannelClient | None, request_id: str) -> None:
        self.gen = gen
        self.request_id = request_id
        self._channels = channels
        self._inbox: asyncio.Queue[Any] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._handle_ended = False
        if first.via_channel and channels is not None and not first.finished:
            self._inbox = channels.inbox(request_id)
            channels.bind(request_id, first.via_channel)
            self._watch = asyncio.ensure_future(self._watch_handle())

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
        if self._watch is not None:
            self._watch.cancel()
        if not finished:
            with contextlib.suppress(Exception):
                self.gen.cancel()
        if self._channels is not None:
            self._channels.unregister(self.request_id)
