"""``stream_interval_ms``: hold a stream's chunks for an interval and send them as one.

A wrapper around a request's sink, so pacing is not a second data path: the first chunk goes at
once (time to first token is not paced), later ones are merged (:func:`merge_chunks`, exact text
and usage) and released at most once per interval, and the finished chunk or a failure goes at
once with whatever was held.
"""

from __future__ import annotations

import asyncio

from serving.engines.base import ChunkSink, EngineChunk, EngineError, merge_chunks

__all__ = ["PacedSink"]


class PacedSink:
    """A :class:`ChunkSink` that forwards to ``inner`` at most once per ``interval_s``."""

    __slots__ = ("_held", "_timer", "inner", "interval_s")

    def __init__(self, inner: ChunkSink, interval_s: float) -> None:
        self.inner = inner
        self.interval_s = interval_s
        self._held: EngineChunk | None = None
        self._timer: asyncio.TimerHandle | None = None

    def chunk(self, chunk: EngineChunk) -> None:
        if self._held is not None:
            chunk = merge_chunks(self._held, chunk)
            self._held = None
        if chunk.finished:
            self.stop()
            self.inner.chunk(chunk)
        elif self._timer is None:
            self.inner.chunk(chunk)
            self._timer = asyncio.get_running_loop().call_later(self.interval_s, self._release)
        else:
            self._held = chunk

    def _release(self) -> None:
        self._timer = None
        held, self._held = self._held, None
        if held is not None:
            self.chunk(held)

    def fail(self, error: EngineError) -> None:
        held, self._held = self._held, None
        self.stop()
        if held is not None:
            self.inner.chunk(held)
        self.inner.fail(error)

    def stop(self) -> None:
        """No more releases (the request ended or was aborted)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
