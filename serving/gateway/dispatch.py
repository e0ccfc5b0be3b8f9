"""Dispatch: route a prepared request to a pool and a replica, submit it on the transport, wait for
the first chunk with one retry elsewhere, and map what a pool raised to the client-visible error."""

from __future__ import annotations

import asyncio
import logging
import time

from serving.engines.base import EngineChunk, EngineRequest
from serving.errors import (
    APIError,
    InvalidRequestError,
    PoolUnavailableError,
    ServiceUnavailableError,
    from_exception,
    is_retryable,
)
from serving.gateway.pool_directory import PoolDirectory, PoolRef
from serving.gateway.request import Outcome, Prepared
from serving.gateway.transport import ChannelLost, PoolFailure, RequestTimeout, TokenStream
from serving.routing import NoPoolForGpuError, PromptBlocks

__all__ = ["map_dispatch_error", "open_stream"]

log = logging.getLogger("tokenweir.gateway")


async def open_stream(
    pools: PoolDirectory,
    first_token_timeout_s: float,
    request: EngineRequest,
    p: Prepared,
    outcome: Outcome,
) -> tuple[PoolRef, TokenStream, list[EngineChunk]]:
    """Route, submit and wait for the first chunks, so failures before them become HTTP errors.

    A replica that dies, drains or times out before the first token gets one retry elsewhere; so
    does an unpinned request whose pool has no replica running (a pinned one is refused at once:
    it has nowhere else to go).
    """
    loop = asyncio.get_running_loop()
    failed: str | None = None
    failed_replica: str | None = None
    blocks = PromptBlocks(p.prompt_ids, request.cache_salt)  # hashed once, for the pool and replica
    for attempt in (1, 2):
        try:
            pool, _decision = pools.choose(
                p.entry.name,
                len(p.prompt_ids),
                p.sampling.max_tokens * p.sampling.n,
                p.pinned_gpu,
                failed,
                blocks,
            )
        except NoPoolForGpuError as e:
            raise InvalidRequestError(str(e), param="x-tokenweir-gpu") from e
        outcome.pool, outcome.accelerator = pool.name, pool.accelerator
        t0 = time.monotonic()
        deadline = loop.time() + first_token_timeout_s
        stream: TokenStream | None = None
        replica: str | None = None
        pool.in_flight += 1
        try:
            replica = await pools.replica(pool, failed_replica, deadline, blocks)
            stream = pools.transport.submit(replica, request)
            async with asyncio.timeout_at(deadline):
                first = await stream.next_batch()
        except BaseException as e:
            pool.in_flight -= 1
            if stream is not None:
                stream.close()
            pinned_down = isinstance(e, PoolUnavailableError) and p.pinned_gpu is not None
            if attempt == 1 and _retryable(e) and not pinned_down:
                log.warning("pool %s failed before the first token (%s); retrying once", pool.name, e)
                failed, failed_replica = pool.name, replica
                continue
            raise map_dispatch_error(e, first_token_timeout_s) from e
        outcome.ttft_s = time.monotonic() - t0
        if stream.queue_s is not None:  # the admission frame comes with or before the first chunk
            outcome.queue_s = p.gate_wait_s + stream.queue_s
        p.extra_headers["x-tokenweir-pool"] = pool.name
        p.extra_headers["x-tokenweir-gpu"] = pool.accelerator
        if node := pools.transport.node_of(replica):  # the Ray node of the replica that serves it
            p.extra_headers["x-tokenweir-node"] = node
        return pool, stream, first
    raise AssertionError("unreachable")


def _retryable(e: BaseException) -> bool:
    """A replica death, drain or timeout before the first token, or a pool with no replica (not a
    refusal, not a cancellation)."""
    if isinstance(e, asyncio.TimeoutError | TimeoutError | ChannelLost | PoolUnavailableError):
        return True
    if isinstance(e, PoolFailure):
        return e.retryable
    return is_retryable(e)


def map_dispatch_error(e: BaseException, timeout_s: float) -> APIError:
    """Map what a pool call raised to the client-visible error: the transport's own failures here,
    the rest by :func:`serving.errors.from_exception`."""
    if isinstance(e, asyncio.TimeoutError | TimeoutError):
        return ServiceUnavailableError(f"no first token from the model pool within {timeout_s:g} s")
    if isinstance(e, RequestTimeout):
        return ServiceUnavailableError(str(e), code="request_timeout")
    if isinstance(e, ChannelLost):
        return ServiceUnavailableError(f"lost the model replica: {e}")
    if isinstance(e, PoolFailure):
        return ServiceUnavailableError(f"the model pool failed: {e}")
    return from_exception(e)
