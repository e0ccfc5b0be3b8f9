"""SimEngine under a fake clock: timing on the model's timeline, batching, preemption, aborts, usage."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable

import pytest

from serving.engines.base import EngineChunk, EngineDeadError, EngineError, EngineRequest, SamplingSpec
from serving.engines.sim import FakeClock, SimEngine
from serving.hardware.catalog import get_gpu
from serving.hardware.perfmodel import ModelArch, PerfModel
from serving.hardware.plan import EngineSettings

LLAMA8B = ModelArch("llama-8b", 8_030_261_248, 32, 4096, 32, 8, 128, 14336, 128256, 2)
H100 = get_gpu("H100")
PERF = PerfModel(LLAMA8B, H100)


async def settle() -> None:
    """Let every ready task run (yields to the loop; no wall-clock time passes)."""
    for _ in range(30):
        await asyncio.sleep(0)


async def run_until(clock: FakeClock, done: Callable[[], bool], max_jumps: int = 100_000) -> None:
    """Alternate letting tasks run and jumping the fake clock to the next deadline until ``done``."""
    for _ in range(max_jumps):
        await settle()
        if done():
            return
        if not clock.advance_to_next():
            await settle()
            assert done(), "nothing sleeps and the condition does not hold"
            return
    raise AssertionError("condition not reached")


def req(rid: str, prompt: int = 100, **sampling: object) -> EngineRequest:
    """A request whose prompt shares nothing with other ids' (no prefix-cache hits between them)."""
    sampling.setdefault("max_tokens", 5)
    first = zlib.crc32(rid.encode()) * 8192
    return EngineRequest(rid, list(range(first, first + prompt)), SamplingSpec(**sampling))  # type: ignore[arg-type]


class Collector:
    """Consumes one request's stream, recording each chunk with the fake time it arrived."""

    def __init__(self, engine: SimEngine, clock: FakeClock, request: EngineRequest) -> None:
        self.chunks: list[tuple[float, EngineChunk]] = []
        self.error: BaseException | None = None
        self.task = asyncio.get_running_loop().create_task(self._consume(engine, clock, request))

    async def _consume(self, engine: SimEngine, clock: FakeClock, request: EngineRequest) -> None:
        try:
            async for chunk in engine.generate(request):
                self.chunks.append((clock.now(), chunk))
        except EngineError as e:
            self.error = e

    @property
    def done(self) -> bool:
        return self.task.done()

    def text(self, index: int = 0) -> str:
        return "".join(d.text for _, c in self.chunks for d in c.deltas if d.index == index)

    def tokens(self, index: int = 0) -> int:
        return sum(d.num_tokens for _, c in self.chunks for d in c.deltas if d.index == index)


async def make(clock: FakeClock, seqs: int = 64, chunk: int = 2048, **kw: object) -> SimEngine:
    kw.setdefault("eos_mean_tokens", None)
    engine = SimEngine(LLAMA8B, H100, EngineSettings(seqs, chunk, 0.9), clock=clock, **kw)  # type: ignore[arg-type]
    await engine.start()
    return engine


async def test_tokens_arrive_on_the_models_timeline() -> None:
    clock = FakeClock(100.0)
    engine = await make(clock)
    c = Collector(engine, clock, req("a", prompt=1000, max_tokens=4))
    await run_until(clock, lambda: c.done)
    times = [t for t, _ in c.chunks]
    expected = [100.0 + PERF.prefill_time_s([1000])]
    for k in range(3):  # decode of output token k over 1000 + k cached tokens
        expected.append(expected[-1] + PERF.decode_step_time_uniform_s(1, 1000 + k))
    assert times == pytest.approx(expected, abs=1e-9)
    last = c.chunks[-1][1]
    assert last.finished and last.completion_tokens == 4 and last.prompt_tokens == 1000
    assert last.deltas[0].finish_reason == "length"
    assert engine.num_unfinished() == 0
    await engine.shutdown()


async def test_speedup_divides_the_timeline() -> None:
    clock = FakeClock()
    engine = await make(clock, speedup=10.0)
    c = Collector(engine, clock, req("a", prompt=1000, max_tokens=1))
    await run_until(clock, lambda: c.done)
    assert c.chunks[0][0] == pytest.approx(PERF.prefill_time_s([1000]) / 10)
    await engine.shutdown()


async def test_chunked_prefill_spreads_a_long_prompt_over_steps() -> None:
    clock = FakeClock()
    engine = await make(clock, chunk=2048)
    c = Collector(engine, clock, req("a", prompt=5000, max_tokens=1))
    await run_until(clock, lambda: c.done)
    assert engine.stats.steps == 3
    assert c.chunks[0][0] == pytest.approx(PERF.chunked_prefill_time_s(5000, 2048))
    await engine.shutdown()


async def test_concurrent_requests_share_steps() -> None:
    clock = FakeClock()
    engine = await make(clock)
    cs = [Collector(engine, clock, req(f"r{i}", prompt=100, max_tokens=10)) for i in range(8)]
    await run_until(clock, lambda: all(c.done for c in cs))
    # One prefill step for all eight, then nine decode steps of batch 8: ten steps, not eighty.
    assert engine.stats.steps == 10
    assert {c.chunks[-1][0] for c in cs} == {clock.now()}
    first = PERF.prefill_time_s([100] * 8)
    assert cs[0].chunks[0][0] == pytest.approx(first)
    assert cs[0].chunks[1][0] - cs[0].chunks[0][0] == pytest.approx(PERF.decode_step_time_uniform_s(8, 100))
    await engine.shutdown()


async def test_max_num_seqs_queues_the_rest() -> None:
    clock = FakeClock()
    engine = await make(clock, seqs=2)
    cs = [Collector(engine, clock, req(f"r{i}", max_tokens=3)) for i in range(3)]
    await run_until(clock, lambda: all(c.done for c in cs))
    # The third request starts only after the first two finish.
    assert cs[2].chunks[0][0] > cs[0].chunks[-1][0]
    assert engine.stats.steps == 6
    await engine.shutdown()


async def test_preemption_keeps_text_and_usage_exact() -> None:
    async def run(kv_tokens: int | None) -> tuple[list[str], list[int], SimEngine]:
        clock = FakeClock()
        engine = await make(clock, kv_capacity_tokens=kv_tokens, max_model_len=400)
        cs = [Collector(engine, clock, req(f"r{i}", prompt=100, max_tokens=120)) for i in range(4)]
        await run_until(clock, lambda: all(c.done for c in cs))
        await engine.shutdown()
        return [c.text() for c in cs], [c.chunks[-1][1].completion_tokens for c in cs], engine

    texts, usage, roomy = await run(None)
    texts_small, usage_small, tight = await run(640)  # 40 blocks; 4 x 220 tokens need 56
    assert roomy.stats.preemptions == 0
    assert tight.stats.preemptions > 0
    assert usage == usage_small == [120] * 4
    assert texts == texts_small
    assert tight.stats.steps > roomy.stats.steps
    assert tight._sched.free_blocks == tight._sched.num_blocks


async def test_n_choices_eos_and_usage() -> None:
    clock = FakeClock()
    engine = await make(clock, eos_mean_tokens=8)
    c = Collector(engine, clock, req("a", prompt=50, max_tokens=64, n=3))
    await run_until(clock, lambda: c.done)
    last = c.chunks[-1][1]
    counts = [c.tokens(i) for i in range(3)]
    assert last.completion_tokens == sum(counts)
    assert all(1 <= n <= 16 for n in counts)  # EOS falls uniformly in 1..16
    reasons = [d.finish_reason for _, ch in c.chunks for d in ch.deltas if d.finish_reason]
    assert sorted(reasons) == ["stop"] * 3
    assert len({c.text(i) for i in range(3)}) == 3  # choices differ
    # Each chunk's usage is cumulative and consistent with its deltas.
    running = 0
    for _, ch in c.chunks:
        running += sum(d.num_tokens for d in ch.deltas)
        assert ch.completion_tokens == running
    # ignore_eos runs to max_tokens.
    d = Collector(engine, clock, req("b", prompt=50, max_tokens=40, ignore_eos=True))
    await run_until(clock, lambda: d.done)
    assert d.chunks[-1][1].completion_tokens == 40
    await engine.shutdown()


async def test_text_is_deterministic_and_stop_strings_truncate() -> None:
    clock = FakeClock()
    engine = await make(clock)
    a = Collector(engine, clock, req("same", max_tokens=12))
    await run_until(clock, lambda: a.done)
    b = Collector(engine, clock, req("same", max_tokens=12))
    await run_until(clock, lambda: b.done)
    text = a.text()
    assert text == b.text() and len(text.split()) == 12
    words = text.split()
    stop = f"{words[5]} {words[6][:2]}"  # straddles two tokens
    cut = text.find(stop)
    s = Collector(engine, clock, req("same", max_tokens=12, stop=(stop, "never-there")))
    await run_until(clock, lambda: s.done)
    assert s.text() == text[:cut]
    assert s.chunks[-1][1].deltas[-1].finish_reason == "stop"
    assert s.chunks[-1][1].completion_tokens == len(text[: cut + len(stop)].split())
    seeded = [Collector(engine, clock, req(f"x{i}", max_tokens=6, seed=7)) for i in range(2)]
    await run_until(clock, lambda: all(x.done for x in seeded))
    assert seeded[0].text() == seeded[1].text()
    await engine.shutdown()


async def test_lagging_consumer_gets_merged_chunks() -> None:
    clock = FakeClock()
    engine = await make(clock)
    gen = engine.generate(req("a", max_tokens=10, logprobs=2))
    first = asyncio.ensure_future(gen.__anext__())
    await run_until(clock, first.done)
    assert first.result().deltas[0].num_tokens == 1
    for _ in range(4):  # four steps pass while the consumer does not read
        clock.advance_to_next()
        await settle()
    merged = await gen.__anext__()
    assert merged.deltas[0].num_tokens == 4 and len(merged.deltas[0].text.split()) == 4
    lps = merged.deltas[0].logprobs
    assert lps is not None and len(lps) == 4 and all(len(lp.top) == 2 and lp.logprob < 0 for lp in lps)
    await gen.aclose()
    await engine.shutdown()


async def test_aclose_and_cancel_abort_and_free_kv() -> None:
    clock = FakeClock()
    engine = await make(clock)
    gen = engine.generate(req("a", prompt=500, max_tokens=100))
    first = asyncio.ensure_future(gen.__anext__())
    await run_until(clock, first.done)
    c = Collector(engine, clock, req("b", prompt=500, max_tokens=100))
    await run_until(clock, lambda: len(c.chunks) >= 2)
    assert engine.num_unfinished() == 2
    await gen.aclose()
    assert engine.num_unfinished() == 1
    c.task.cancel()
    await settle()
    assert engine.num_unfinished() == 0
    sched = engine._sched
    assert sched.free_blocks == sched.num_blocks and not sched.has_work()
    steps = engine.stats.steps
    await settle()
    assert engine.stats.steps <= steps + 1  # the in-flight step at most; then the engine idles
    await engine.shutdown()


async def test_refusals_and_shutdown() -> None:
    clock = FakeClock()
    engine = SimEngine(LLAMA8B, H100, EngineSettings(8, 512, 0.9), clock=clock, max_model_len=1000)
    with pytest.raises(EngineError, match="not started"):
        await engine.generate(req("a")).__anext__()
    await engine.start()
    with pytest.raises(EngineError, match="exceeds the simulated max_model_len 1000"):
        await engine.generate(req("a", prompt=990, max_tokens=20)).__anext__()
    c = Collector(engine, clock, req("dup", max_tokens=50))
    await settle()
    with pytest.raises(EngineError, match="duplicate"):
        await engine.generate(req("dup")).__anext__()
    await engine.check_health()
    await engine.shutdown()
    await settle()
    assert isinstance(c.error, EngineDeadError)
    with pytest.raises(EngineDeadError):
        await engine.check_health()
    with pytest.raises(EngineDeadError):
        await engine.generate(req("late")).__anext__()


class Sink:
    """A pushed request's consumer: records each chunk with the fake time it was handed over."""

    def __init__(self, clock: FakeClock, raise_on: int | None = None) -> None:
        self.clock = clock
        self.chunks: list[tuple[float, EngineChunk]] = []
        self.errors: list[EngineError] = []
        self.raise_on = raise_on

    def chunk(self, chunk: EngineChunk) -> None:
        self.chunks.append((self.clock.now(), chunk))
        if self.raise_on is not None and len(self.chunks) == self.raise_on:
            raise RuntimeError("consumer bug")

    def fail(self, error: EngineError) -> None:
        self.errors.append(error)

    @property
    def done(self) -> bool:
        return bool(self.errors) or (bool(self.chunks) and self.chunks[-1][1].finished)


async def test_submit_pushes_the_same_chunks_at_the_same_times_as_generate() -> None:
    """The push path (what pool replicas use) and the iterator agree token for token."""
    requests = [req(f"r{i}", prompt=300 + 50 * i, max_tokens=6, stop=("zz",), n=1 + i % 2) for i in range(3)]
    clock_a, clock_b = FakeClock(5.0), FakeClock(5.0)
    pulling, pushing = await make(clock_a), await make(clock_b)
    pulled = [Collector(pulling, clock_a, r) for r in requests]
    await settle()
    sinks = [Sink(clock_b) for _ in requests]
    for r, sink in zip(requests, sinks, strict=True):
        await pushing.submit(r, sink)
    await run_until(clock_a, lambda: all(c.done for c in pulled))
    await run_until(clock_b, lambda: all(s.done for s in sinks))
    for c, sink in zip(pulled, sinks, strict=True):
        assert sink.chunks == c.chunks
        assert sink.chunks[-1][1].finished and sink.errors == []
    assert pushing.num_unfinished() == 0
    await pulling.shutdown()
    await pushing.shutdown()


async def test_submit_abort_frees_kv_and_stops_the_sink() -> None:
    clock = FakeClock()
    engine = await make(clock)
    sink = Sink(clock)
    abort = await engine.submit(req("a", prompt=500, max_tokens=100), sink)
    await run_until(clock, lambda: len(sink.chunks) >= 2)
    abort()
    abort()  # idempotent
    n = len(sink.chunks)
    await settle()
    clock.advance_to_next()
    await settle()
    assert len(sink.chunks) == n and engine.num_unfinished() == 0
    sched = engine._sched
    assert sched.free_blocks == sched.num_blocks and not sched.has_work()
    await engine.shutdown()
    assert sink.errors == []  # an aborted request hears nothing more, not even the shutdown


async def test_a_raising_sink_aborts_only_its_request_and_shutdown_fails_the_rest() -> None:
    clock = FakeClock()
    engine = await make(clock)
    bad, good = Sink(clock, raise_on=2), Sink(clock)
    await engine.submit(req("bad", max_tokens=50), bad)
    await engine.submit(req("good", max_tokens=50), good)
    await run_until(clock, lambda: len(good.chunks) >= 5)
    assert len(bad.chunks) == 2 and engine.num_unfinished() == 1  # the engine loop went on
    await engine.shutdown()
    assert len(good.errors) == 1 and isinstance(good.errors[0], EngineDeadError)
    assert bad.errors == []


async def test_num_gpu_blocks_override_sets_the_kv_cache_the_engine_and_router_see() -> None:
    """vLLM's `num_gpu_blocks_override` engine argument: a simulated replica holds exactly that many
    blocks (and so preempts as a vLLM engine of that size would), and the gateway's router assumes
    the same capacity; without it both take the performance model's prediction."""
    from serving.config import parse_config, resolve
    from serving.gateway.pool_directory import pool_info
    from serving.pools.replica import build_engine

    model = "qwen2.5-7b-instruct"
    pool = {"model": model, "accelerator": "L40S", "engine": "sim", "engine_args": {"max_num_seqs": 2}}
    cfg = parse_config(
        {
            "models": {model: {"tokenizer": "builtin:tiny-llama"}},
            "pools": [
                {**pool, "name": "small", "engine_args": {"max_num_seqs": 2, "num_gpu_blocks_override": 288}},
                {**pool, "name": "planned"},
            ],
        }
    )
    small, planned = resolve(cfg).pools
    engines = [build_engine(small), build_engine(planned)]
    assert engines[0].kv_capacity_tokens == pool_info(small).kv_capacity_tokens == 288 * 16
    assert engines[0].capacity().kv_capacity_tokens == 288 * 16
    predicted = PerfModel(planned.arch, planned.gpu).kv_capacity_tokens(
        planned.engine_args["gpu_memory_utilization"], planned.engine_args["max_num_batched_tokens"], 16
    )
    assert engines[1].kv_capacity_tokens == pool_info(planned).kv_capacity_tokens == predicted > 100_000
    for e in engines:
        await e.shutdown()
