"""Dispatch: route a prepared request to a pool, open its stream (directly on the token channel when
connected, else through a Serve handle), wait for the first chunk with one retry elsewhere, and map
what a pool raised to the client-visible error."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from serving.engines.base import EngineChunk, EngineDeadError, EngineRequest
from serving.errors import (
    APIError,
    InvalidRequestError,
    ServiceUnavailableError,
    from_exception,
    is_retryable,
)
from serving.gateway.pool_directory import PoolDirectory, PoolRef
from serving.gateway.request import Outcome, Prepared
from serving.gateway.streams import ChunkStream, PoolFailure, RequestTimeout
from serving.pools.channel import ChannelClient, ChannelLost
from serving.routing import NoPoolForGpuError

__all__ = ["map_dispatch_error", "open_stream"]

log = logging.getLogger("tokenweir.gateway")


async def open_stream(
    pools: PoolDirectory,
    channels: ChannelClient | None,
    first_token_timeout_s: float,
    request: EngineRequest,
    p: Prepared,
    outcome: Outcome,
) -> tuple[PoolRef, ChunkStream, EngineChunk]:
    """Route, dispatch and wait for the first chunk, so failures before it become HTTP errors.

    A replica that dies or times out before the first token gets one retry elsewhere.
    """
    if channels is not None:
        channels.register(p.request_id)
    failed: str | None = None
    failed_replica: str | None = None
    try:
        for attempt in (1, 2):
            try:
                pool, _decision = pools.choose(
                    p.entry.name,
                    len(p.prompt_ids),
                    p.sampling.max_tokens * p.sampling.n,
                    p.pinned_gpu,
                    failed,
                )
            except NoPoolForGpuError as e:
                raise InvalidRequestError(str(e), param="x-tokenweir-gpu") from e
            outcome.pool, outcome.accelerator = pool.name, pool.accelerator
            replica = (
                channels.pick(k for k in pool.replica_keys if k != failed_replica)
                if channels is not None
                else None
            )
            pool.in_flight += 1
            t0 = time.monotonic()
            gen: Any = None
            try:
                if replica is not None:  # direct on the token channel: no Ray message at all
                    assert channels is not None
                    chunks = ChunkStream.direct(channels, replica, request)
                    first = await chunks.first(first_token_timeout_s)
                else:
                    gen = pool.stream(request)
                    first = await asyncio.wait_for(gen.__anext__(), first_token_timeout_s)
                    chunks = ChunkStream(gen, first, channels, p.request_id)
            except BaseException as e:
                pool.in_flight -= 1
                if replica is not None:
                    assert channels is not None
                    channels.finish(replica, p.request_id, abort=True)
                elif gen is not None:
                    gen.cancel()
                if attempt == 1 and _retryable(e):
                    log.warning("pool %s failed before the first token (%s); retrying once", pool.name, e)
                    failed, failed_replica = pool.name, replica
                    if channels is not None:
                        channels.register(p.request_id)
                    continue
                raise map_dispatch_error(e, first_token_timeout_s) from e
            outcome.ttft_s = time.monotonic() - t0
            p.extra_headers["x-tokenweir-pool"] = pool.name
            p.extra_headers["x-tokenweir-gpu"] = pool.accelerator
            return pool, chunks, first
    except BaseException:
        if channels is not None:
            channels.unregister(p.request_id)
        raise
    raise AssertionError("unreachable")


def _retryable(e: BaseException) -> bool:
    """A replica death or timeout before the first token (not a refusal, not a cancellation)."""
    if isinstance(e, asyncio.TimeoutError | TimeoutError | ChannelLost):
        return True
    if isinstance(e, PoolFailure):
        # A failure frame names the engine's error class first (serving.pools.replica).
        return str(e).startswith(f"{EngineDeadError.__name__}:")
    return is_retryable(e)


def map_dispatch_error(e: BaseException, timeout_s: float) -> APIError:
    """Map what a pool call raised to the client-visible error: the transport's own failures here,
    the rest by :func:`serving.errors.from_exception`."""
    if isinstance(e, asyncio.TimeoutError | TimeoutError):
        return ServiceUnavailableError(f"no first token from the model pool within {timeout_s:g} s")
    if isinstance(e, RequestTimeout):
        return ServiceUnavailableError(str(e), code="request_timeout")
    if isinstance(e, ChannelLost):
        return ServiceUnavailableError(f"lost the model replica mid-stream: {e}")
    if isinstance(e, PoolFailure):
        return ServiceUnavailableError(f"the model pool failed: {e}")
    return from_exception(e)
