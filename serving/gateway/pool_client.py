"""How the gateway talks to pools: streaming deployment handles, one per pool."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from serving.engines.base import EngineChunk, EngineRequest


@dataclass
class PoolRef:
    """A pool as the gateway sees it: its config facts and its handle."""

    name: str
    model: str
    accelerator: str
    replicas: int
    handle: Any
    in_flight: int = 0

    def stream(self, request: EngineRequest) -> Any:
        """A ``DeploymentResponseGenerator`` of :class:`EngineChunk` (cancel() aborts upstream)."""
        return self.handle.options(stream=True).generate.remote(request)

    async def stats(self) -> dict[str, Any]:
        """One replica's stats (whichever Serve picks)."""
        return await self.handle.stats.remote()

    async def ready(self) -> bool:
        """Whether a replica answers its readiness probe."""
        return bool(await self.handle.ready.remote())


def pick_pool(candidates: list[PoolRef]) -> PoolRef:
    """Least in-flight requests per replica among the pools serving the model."""
    return min(candidates, key=lambda p: p.in_flight / p.replicas)


async def iterate(gen: Any) -> AsyncIterator[EngineChunk]:
    """Iterate a response generator (typing helper)."""
    async for chunk in gen:
        yield chunk
