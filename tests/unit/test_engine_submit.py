"""``Engine.submit``'s generic form (used by engines that only implement ``generate``): chunks reach
the sink in order, engine errors reach ``fail``, and aborting closes the engine's stream. The engine
here is a minimal stand-in: the boundary under test is the base class."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from serving.engines.base import (
    ChoiceDelta,
    Engine,
    EngineCapacity,
    EngineChunk,
    EngineError,
    EngineRequest,
    SamplingSpec,
)


class _Scripted(Engine):
    def __init__(self, n: int, fail_after: int | None = None) -> None:
        self.n, self.fail_after = n, fail_after
        self.closed: list[str] = []
        self.go = asyncio.Event()

    async def start(self) -> None: ...

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:  # type: ignore[override]
        try:
            for i in range(self.n):
                if self.fail_after is not None and i == self.fail_after:
                    raise EngineError("scripted failure")
                if i == 2:
                    await self.go.wait()
                yield EngineChunk([ChoiceDelta(0, f"t{i}", 1)], 3, i + 1, finished=i == self.n - 1)
        finally:
            self.closed.append(request.request_id)

    def capacity(self) -> EngineCapacity:
        return EngineCapacity(1, 1)

    def num_unfinished(self) -> int:
        return 0

    async def check_health(self) -> None: ...

    async def shutdown(self) -> None: ...


class _Sink:
    def __init__(self) -> None:
        self.chunks: list[EngineChunk] = []
        self.errors: list[EngineError] = []

    def chunk(self, chunk: EngineChunk) -> None:
        self.chunks.append(chunk)

    def fail(self, error: EngineError) -> None:
        self.errors.append(error)


def _req(rid: str) -> EngineRequest:
    return EngineRequest(rid, [1, 2, 3], SamplingSpec(max_tokens=4))


async def test_generic_submit_delivers_in_order_then_aborts_on_request() -> None:
    engine = _Scripted(4)
    sink = _Sink()
    abort = await engine.submit(_req("a"), sink)
    for _ in range(20):
        await asyncio.sleep(0)
    assert [c.deltas[0].text for c in sink.chunks] == ["t0", "t1"]  # waiting inside step 2
    abort()
    for _ in range(20):
        await asyncio.sleep(0)
    assert engine.closed == ["a"] and len(sink.chunks) == 2 and sink.errors == []

    done = _Sink()
    engine.go.set()
    await engine.submit(_req("b"), done)
    for _ in range(20):
        await asyncio.sleep(0)
    assert [c.completion_tokens for c in done.chunks] == [1, 2, 3, 4] and done.chunks[-1].finished


async def test_generic_submit_reports_engine_errors_to_fail() -> None:
    engine = _Scripted(4, fail_after=1)
    sink = _Sink()
    await engine.submit(_req("a"), sink)
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(sink.chunks) == 1 and [str(e) for e in sink.errors] == ["scripted failure"]
    assert engine.closed == ["a"]
