"""The engine interface every pool replica drives: vLLM (CPU or CUDA build) or the simulated engine.

The contract, in the shape of vLLM's ``v1/core/sched/interface.py``:

* ``start()`` loads weights / builds the schedule and returns when the engine can take requests.
* ``generate(request)`` is an async iterator of :class:`EngineChunk`. Each chunk carries only what is
  *new* since the previous chunk (deltas), plus cumulative usage. The last chunk has
  ``finished=True``. Several engine steps may be merged into one chunk when the consumer is slow;
  consumers must not assume one token per chunk.
* Cancelling the iterator (``aclose()`` or task cancellation) aborts the request in the engine at once
  and frees its KV cache. Usage of an aborted request is whatever the last chunk reported.
* ``submit(request, sink)`` is the push form of ``generate``: the engine calls ``sink.chunk(chunk)``
  itself as each step's output is ready (every stream of a step in one pass, no task per stream),
  then ``sink.fail(error)`` or nothing more. It returns a function that aborts the request. The base
  class implements it on ``generate``; engines override it to skip the per-stream task.
* ``num_unfinished()`` is the engine's own count of requests it still holds (running + waiting).
* Failures raise :class:`EngineError` (the engine is alive; this request failed) or
  :class:`EngineDeadError` (the engine is gone; the replica should be replaced).
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from serving.engines._metrics import EngineMetrics
from serving.kvcache import CacheRuns

log = logging.getLogger("tokenweir.engine")


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """Sampling parameters, already validated by the API layer."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    """None: no logprobs. k >= 0: the sampled token's logprob plus the top-k alternatives."""
    ignore_eos: bool = False
    min_tokens: int = 0


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One generation request, tokenized by the gateway (prompt counted exactly once)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingSpec
    tenant_id: str = "default"
    """Who pays (the organization); the pool's fair queue uses it."""
    tenant_weight: float = 1.0
    project_id: str | None = None
    """The project within the organization (None: its one implicit project); the fair queue shares
    the organization's part among its projects by their weights."""
    project_weight: float = 1.0
    traceparent: str | None = None
    """W3C trace context from the client, handed to the engine (vLLM's ``trace_headers``)."""
    cache_salt: str | None = None
    """vLLM's ``cache_salt``: set by the gateway (never by the client) when prefix caching is scoped
    per organization, so the engine shares cached blocks only between prompts of one salt."""


@dataclass(slots=True)
class TokenLogprob:
    """Logprob of one generated token and its top alternatives."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass(slots=True)
class ChoiceDelta:
    """New output of one choice (``index`` in ``0..n-1``) since the previous chunk."""

    index: int
    text: str
    num_tokens: int
    finish_reason: str | None = None
    """``"stop"``, ``"length"`` or ``"abort"`` once the choice is done."""
    logprobs: list[TokenLogprob] | None = None


@dataclass(slots=True)
class EngineChunk:
    """What one request gained since the last chunk; usage counts are cumulative."""

    deltas: list[ChoiceDelta]
    prompt_tokens: int
    completion_tokens: int
    finished: bool = False
    cached_tokens: int = 0
    """Of ``prompt_tokens``, how many the engine found in its prefix cache (OpenAI's
    ``usage.prompt_tokens_details.cached_tokens``)."""


def merge_chunks(a: EngineChunk, b: EngineChunk) -> EngineChunk:
    """One chunk saying what ``a`` then ``b`` (consecutive chunks of one request) said: deltas
    joined per choice, usage and ``finished`` from ``b``."""
    by_index = {
        d.index: ChoiceDelta(d.index, d.text, d.num_tokens, d.finish_reason, d.logprobs) for d in a.deltas
    }
    for d in b.deltas:
        m = by_index.get(d.index)
        if m is None:
            by_index[d.index] = d
            continue
        m.text += d.text
        m.num_tokens += d.num_tokens
        m.finish_reason = d.finish_reason
        if d.logprobs:
            m.logprobs = (m.logprobs or []) + d.logprobs
    return EngineChunk(
        list(by_index.values()), b.prompt_tokens, b.completion_tokens, b.finished, b.cached_tokens
    )


@dataclass(frozen=True, slots=True)
class EngineCapacity:
    """What one engine can hold at once (the admission core's upper bounds)."""

    max_num_seqs: int
    kv_capacity_tokens: int


class EngineError(Exception):
    """A request failed inside a live engine (recoverable: other requests go on)."""


class EngineDeadError(EngineError):
    """The engine itself has died; every request on it fails and the replica must be replaced."""


class ChunkSink(Protocol):
    """Where a submitted request's output goes. Both are called from the engine's own loop and must
    not block; after ``fail`` or a chunk with ``finished=True`` nothing more comes."""

    def chunk(self, chunk: EngineChunk) -> None: ...

    def fail(self, error: EngineError) -> None: ...


Abort = Callable[[], None]
CacheSink = Callable[[CacheRuns, bool], None]
"""Receives an engine's KV-cache events: runs of ``(stored, block hashes)`` in order, and whether
the cache was cleared before them."""
"""Aborts a submitted request (idempotent; nothing more reaches its sink)."""


def deliver(sink: ChunkSink, chunk: EngineChunk) -> bool:
    """Hand a chunk to a sink from inside an engine; False (and logged) when the sink raised, so
    one broken consumer cannot stop the engine's loop: the engine then aborts that request."""
    try:
        sink.chunk(chunk)
        return True
    except Exception:
        log.exception("a chunk sink failed; aborting its request")
        return False


class Engine(abc.ABC):
    """A continuous-batching engine as a pool replica sees it."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the engine; return once it accepts requests."""

    @abc.abstractmethod
    def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        """Stream the request's output; cancelling the iterator aborts the request."""

    async def submit(self, request: EngineRequest, sink: ChunkSink) -> Abort:
        """Start ``request``; its output goes to ``sink`` (see the module docstring)."""
        task = asyncio.get_running_loop().create_task(self._pump(request, sink))

        def abort() -> None:
            task.cancel()

        return abort

    async def _pump(self, request: EngineRequest, sink: ChunkSink) -> None:
        stream = self.generate(request)
        try:
            async for chunk in stream:
                if not deliver(sink, chunk):
                    return
        except EngineError as e:
            sink.fail(e)
        except Exception as e:  # an engine bug: the request fails, the replica goes on
            sink.fail(EngineError(f"{type(e).__name__}: {e}"))
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    @abc.abstractmethod
    def capacity(self) -> EngineCapacity:
        """Batch and KV-cache bounds of the started engine."""

    def engine_metrics(self) -> EngineMetrics | None:
        """The engine's own metric families, vLLM's as its logger exposes them (plain data, safe to
        ship), or None before it started."""
        return None

    def prefix_hashing(self) -> tuple[int, str] | None:
        """How the started engine names cached blocks: its block size and the seed of its first
        block's parent hash (vLLM's ``NONE_HASH``); None without a prefix cache. The router hashes
        prompts the same way (what it assumed from the config is corrected by this)."""
        return None

    def watch_cache(self, sink: CacheSink) -> bool:
        """Report what the prefix cache stores and removes (vLLM's KV-cache events) to ``sink``, on
        the event loop, from now on; False: this engine publishes none (no prefix cache)."""
        return False

    @abc.abstractmethod
    def num_unfinished(self) -> int:
        """Requests the engine still holds (running or waiting)."""

    @abc.abstractmethod
    async def check_health(self) -> None:
        """Raise :class:`EngineDeadError` when the engine is gone."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop the engine and free its resources."""
