"""A pool replica: one engine (vLLM or simulated) for one model on one accelerator type.

Ray Serve runs this class as the deployment ``pool-<name>``; the gateway reaches it through a
streaming deployment handle. Cancelling the handle's stream (client gone) cancels ``generate`` here,
which aborts the request in the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from models.catalog import ModelEntry
from serving.config.schema import PoolConfig
from serving.engines.base import Engine, EngineChunk, EngineRequest


def build_engine(pool: PoolConfig, entry: ModelEntry, model_source: str) -> Engine:
    """The engine a pool's config asks for."""
    if pool.engine == "vllm":
        from serving.engines.vllm_engine import VllmEngine
        from serving.pools.planning import engine_args

        args = engine_args(pool, entry)
        if pool.accelerator != "CPU" and pool.gpus_per_replica > 1:
            args.setdefault("tensor_parallel_size", pool.gpus_per_replica)
        return VllmEngine(model_source, entry.name, entry.max_model_len, args)
    from serving.engines.sim_factory import build_sim_engine

    return build_sim_engine(pool, entry)


class PoolReplica:
    """The body of a pool deployment replica."""

    async def __init__(  # type: ignore[misc]  # Ray Serve awaits async constructors
        self, pool: dict[str, Any], entry: dict[str, Any], model_source: str
    ) -> None:
        self.pool = PoolConfig.model_validate(pool)
        self.entry = ModelEntry.model_validate(entry)
        self._engine = build_engine(self.pool, self.entry, model_source)
        self._interval_s = self.pool.stream_interval_ms / 1000.0
        self._started = 0
        self._aborted = 0
        await self._engine.start()

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        """Stream the request's output; the engine merges deltas while a message is being sent."""
        stream = self._engine.generate(request)
        self._started += 1
        finished = False
        try:
            async for chunk in stream:
                finished = chunk.finished
                yield chunk
                if self._interval_s and not finished:
                    await asyncio.sleep(self._interval_s)
        finally:
            if not finished:
                self._aborted += 1
            await stream.aclose()  # type: ignore[attr-defined]

    async def stats(self) -> dict[str, Any]:
        """The replica's engine counters, for status and tests."""
        return {
            "pool": self.pool.name,
            "accelerator": self.pool.accelerator,
            "engine": self.pool.engine,
            "num_unfinished": self._engine.num_unfinished(),
            "requests_started": self._started,
            "requests_aborted": self._aborted,
        }

    async def ready(self) -> bool:
        """True once the engine takes requests (the constructor returns only then)."""
        await self._engine.check_health()
        return True

    async def check_health(self) -> None:
        """Ray Serve's health check: an exception marks the replica unhealthy and replaces it."""
        await self._engine.check_health()

    async def __del__(self) -> None:
        await self._engine.shutdown()
