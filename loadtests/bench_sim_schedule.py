"""Does the simulated engine keep its schedule? 500 concurrent streams in real time on this machine.

Every token carries its time on the model's timeline (the end of the engine step that sampled it);
the lag is the time the consumer receives it minus that time. Goal: p99 <= 5 ms, so a simulated
fleet measures the gateway, not the simulator.

Two consumers: ``push`` (the default) is what pool replicas use: ``engine.submit`` with a sink the
engine calls as each step ends, and the sink does what the replica's relay does per chunk: appends
the chunk to an outbox and books the tokens with a real admission core (``on_tokens``, applied for
all streams in one callback after the step's pass, as ``PoolReplica.book_tokens`` does; ``on_finish``). ``iterate`` is one task per stream running ``async for`` over
``engine.generate``, the Serve-handle path.

    .venv/bin/python loadtests/bench_sim_schedule.py [--streams 500] [--max-tokens 200] [--gpu H100] [--consumer push|iterate]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import time

from serving.admission import AdmissionConfig, AdmissionCore
from serving.engines.base import EngineChunk, EngineRequest, SamplingSpec
from serving.engines.sim import SimEngine
from serving.hardware.catalog import get_gpu
from serving.hardware.perfmodel import ModelArch
from serving.hardware.plan import EngineSettings

LLAMA8B = ModelArch("llama-8b", 8_030_261_248, 32, 4096, 32, 8, 128, 14336, 128256, 2)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def main(args: argparse.Namespace) -> None:
    engine = SimEngine(
        LLAMA8B,
        get_gpu(args.gpu),
        EngineSettings(max_num_seqs=args.streams, max_num_batched_tokens=8192, gpu_memory_utilization=0.9),
        speedup=args.speedup,
        eos_mean_tokens=None,
        record_lag=True,
    )
    await engine.start()
    received = 0

    def request(i: int) -> EngineRequest:
        return EngineRequest(
            f"s{i}", list(range(args.prompt)), SamplingSpec(max_tokens=args.max_tokens, ignore_eos=True)
        )

    async def consume(i: int) -> None:
        nonlocal received
        async for chunk in engine.generate(request(i)):
            received += sum(d.num_tokens for d in chunk.deltas)

    outbox: list[tuple[str, EngineChunk]] = []
    done = asyncio.Event()
    open_streams = args.streams

    core = AdmissionCore(
        AdmissionConfig(
            max_num_seqs=args.streams,
            kv_capacity_tokens=engine.kv_capacity_tokens,
            ttft_slo_ms=60_000,
            tpot_slo_ms=1_000,
        )
    )
    clock = time.monotonic
    bookings: list[tuple[str, int]] = []

    def apply_bookings() -> None:
        items = bookings[:]
        bookings.clear()
        now = clock()
        for rid, n in items:
            core.on_tokens(rid, n, now)

    class Sink:
        """What a pool replica's relay does per chunk: book the tokens, queue one frame item."""

        def __init__(self, rid: str) -> None:
            self.rid, self.seen = rid, 0
            core.submit(rid, "bench", 1.0, args.prompt, args.max_tokens, clock())

        def chunk(self, chunk: EngineChunk) -> None:
            nonlocal received, open_streams
            new = chunk.completion_tokens - self.seen
            self.seen = chunk.completion_tokens
            received += new
            outbox.append((self.rid, chunk))
            if len(outbox) >= args.streams:
                outbox.clear()
            if not bookings:
                asyncio.get_running_loop().call_soon(apply_bookings)
            bookings.append((self.rid, new))
            if chunk.finished:
                apply_bookings()
                core.on_finish(self.rid, chunk.prompt_tokens, chunk.completion_tokens, clock())
                open_streams -= 1
                if open_streams == 0:
                    done.set()

        def fail(self, error: Exception) -> None:
            raise error

    async def push_all() -> None:
        for i in range(args.streams):
            await engine.submit(request(i), Sink(f"s{i}"))
        await done.wait()

    gc.collect()
    gc.freeze()  # as in a pool replica: tokenweir serve sets RAY_SERVE_FREEZE_GC_ON_STARTUP=1
    cpu0, t0 = time.process_time(), time.perf_counter()
    if args.consumer == "push":
        await push_all()
    else:
        await asyncio.gather(*(consume(i) for i in range(args.streams)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    await engine.shutdown()
    st = engine.stats
    lag_ms = [x * 1e3 for x in st.lag_s]
    assert received == args.streams * args.max_tokens == st.tokens == len(lag_ms)
    print(
        f"gpu={args.gpu} streams={args.streams} prompt={args.prompt} max_tokens={args.max_tokens} "
        f"speedup={args.speedup} consumer={args.consumer}"
    )
    print(f"engine steps={st.steps}  model time={st.model_busy_s:.2f}s  wall={wall:.2f}s  cpu={cpu:.2f}s")
    print(f"tokens={received}  tokens/s={received / wall:,.0f}  cpu us/token={cpu / received * 1e6:.1f}")
    print(
        f"resyncs={st.timeline_resyncs}  preemptions={st.preemptions}  loadavg={os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus"
    )
    print(
        f"emission lag ms: p50={statistics.median(lag_ms):.2f}  p90={pct(lag_ms, 0.9):.2f}  "
        f"p99={pct(lag_ms, 0.99):.2f}  max={max(lag_ms):.2f}   (goal p99 <= 5 ms)"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=500)
    p.add_argument("--prompt", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--gpu", default="H100")
    p.add_argument("--speedup", type=float, default=1.0)
    p.add_argument("--consumer", choices=("push", "iterate"), default="push")
    asyncio.run(main(p.parse_args()))
