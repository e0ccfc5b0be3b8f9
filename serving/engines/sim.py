"""The simulated engine: continuous batching on the performance model, streamed in (scaled) real time.

One background task owns the schedule (style rule 6): it asks the pure :class:`SimScheduler` for a
step, prices it with :class:`PerfModel`, waits until the step's end on the model's timeline
(``clock.sleep_until``; steps follow one another back to back while there is work), applies it and
pushes each sampled token into its request's :class:`SimStream`. A consumer that lags finds several
tokens buffered and gets them as one merged chunk. Text is deterministic (words derived from the
request id or seed, the choice index and the position); usage counts are exact; a choice ends on
``max_tokens`` ("length"), a stop string, or a deterministic EOS ("stop") unless ``ignore_eos``.

Prefix caching is vLLM's (on by default, as in vLLM v1): each prompt's full blocks are hashed as
vLLM hashes them (:class:`~serving.kvcache.BlockHasher`), a new request reuses the longest cached
prefix and prefills only the rest, and cached blocks are evicted LRU within the KV capacity
(:class:`~serving.kvcache.BlockPool`). ``stats.prefix_cache`` counts queried and hit prompt
tokens, exported as ``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits``.

:meth:`SimEngine.engine_metrics` gives the vLLM families it models, as vLLM's logger exposes them
(:mod:`serving.engines._metrics`; labelled with ``served_name`` and engine 0), from the scheduler
(running, waiting, KV usage, preemptions, prefix cache) and from the steps as they end: prompt and
generation tokens, TTFT, inter-token and end-to-end latency per sequence, in seconds on the
engine's clock (wall time; with ``speedup`` the hardware's times divided by it).

``speedup`` divides every step time (a test fleet can run 100x faster than the hardware it models).
``record_lag`` keeps, per delivered token, how late the consumer got it against the model's
timeline (``stats.lag_s``), which ``loadtests/bench_sim_schedule.py`` reports. For a submitted
request (``submit``, what pool replicas use) that is when its sink is called; for ``generate``,
when the iterating task wakes up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from serving.engines._metrics import EngineMetrics, EngineMetricsRecorder
from serving.engines._sim_clock import Clock, FakeClock, LoopClock
from serving.engines._sim_sched import SeqStatus, SimScheduler, SimSeq
from serving.engines._sim_stream import SimStream, seq_hash
from serving.engines.base import (
    Abort,
    CacheSink,
    ChunkSink,
    Engine,
    EngineCapacity,
    EngineChunk,
    EngineDeadError,
    EngineError,
    EngineRequest,
    deliver,
)
from serving.hardware.catalog import GpuProfile
from serving.hardware.perfmodel import KV_BLOCK_TOKENS, ModelArch, PerfFactors, PerfModel
from serving.hardware.plan import EngineSettings
from serving.kvcache import DEFAULT_NONE_HASH_SEED, BlockHasher, CacheEventLog, PrefixCacheStats

__all__ = ["Clock", "FakeClock", "LoopClock", "SimEngine", "SimStats"]

_RESYNC_S = 0.5
"""If the scheduler falls this far behind its timeline (a stalled process), it restarts from now."""


@dataclass(slots=True)
class SimStats:
    """Counters of one simulated engine (plain data; exported elsewhere)."""

    steps: int = 0
    preemptions: int = 0
    tokens: int = 0
    model_busy_s: float = 0.0
    """Sum of (scaled) step times."""
    timeline_resyncs: int = 0
    prefix_cache: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    """Prompt tokens looked up in and found in the prefix cache (the scheduler's own counters)."""
    lag_s: list[float] = field(default_factory=list)
    """Per delivered token: consumer wake-up time minus the token's time on the model's timeline."""


class SimEngine(Engine):
    """An :class:`Engine` that behaves like vLLM on ``gpu`` serving ``arch``, without a GPU."""

    def __init__(
        self,
        arch: ModelArch,
        gpu: GpuProfile,
        settings: EngineSettings,
        *,
        speedup: float = 1.0,
        clock: Clock | None = None,
        factors: PerfFactors | None = None,
        kv_capacity_tokens: int | None = None,
        max_model_len: int | None = None,
        eos_mean_tokens: int | None = 256,
        record_lag: bool = False,
        enable_prefix_caching: bool = True,
        block_tokens: int = KV_BLOCK_TOKENS,
        served_name: str | None = None,
    ) -> None:
        """``kv_capacity_tokens`` defaults to the model's prediction at the settings' utilisation;
        ``max_model_len`` (prompt + max_tokens) to that capacity; ``eos_mean_tokens`` sets where
        the deterministic EOS falls (uniform in 1..2x, None: never); ``block_tokens`` is vLLM's
        ``block_size`` (16 on GPUs, 128 in the CPU build); ``served_name`` is the ``model_name`` of
        its metrics, as vLLM's served model name (default: the architecture's name)."""
        if speedup <= 0:
            raise ValueError(f"speedup must be > 0, got {speedup}")
        self.perf = PerfModel(arch, gpu, factors)
        kv = kv_capacity_tokens
        if kv is None:
            kv = self.perf.kv_capacity_tokens(
                settings.gpu_memory_utilization, settings.max_num_batched_tokens, block_tokens
            )
        if kv <= 0:
            raise EngineError(f"{arch.name} does not fit on {gpu.name} at {settings.gpu_memory_utilization}")
        self.settings = settings
        self.speedup = speedup
        self.clock: Clock = clock if clock is not None else LoopClock()
        self.max_model_len = min(kv, max_model_len) if max_model_len else kv
        self.eos_mean_tokens = eos_mean_tokens
        self.stats = SimStats()
        self._record_lag = record_lag
        self._sched = SimScheduler(
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            kv_capacity_tokens=kv,
            block_tokens=block_tokens,
            enable_prefix_caching=enable_prefix_caching,
        )
        self.stats.prefix_cache = self._sched.prefix_cache_stats
        self._metrics = EngineMetricsRecorder(served_name if served_name is not None else arch.name)
        self._hasher = BlockHasher(block_tokens) if enable_prefix_caching else None
        self._streams: dict[str, SimStream] = {}
        self._task: asyncio.Task[None] | None = None
        self._work = asyncio.Event()
        self._dead: EngineDeadError | None = None
        self._cache_sink: CacheSink | None = None

    def prefix_hashing(self) -> tuple[int, str] | None:
        if self._hasher is None:
            return None
        return self._hasher.block_tokens, DEFAULT_NONE_HASH_SEED

    def watch_cache(self, sink: CacheSink) -> bool:
        """The block pool's stores and evictions, once per step, as vLLM's publisher sends them."""
        if self._hasher is None:
            return False
        self._cache_sink = sink
        self._sched.pool.events = CacheEventLog()
        return True

    @property
    def kv_capacity_tokens(self) -> int:
        return self._sched.kv_capacity_tokens

    def capacity(self) -> EngineCapacity:
        return EngineCapacity(self.settings.max_num_seqs, self._sched.kv_capacity_tokens)

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        return dataclasses.replace(self.stats.prefix_cache) if self._hasher is not None else None

    def engine_metrics(self) -> EngineMetrics:
        sched = self._sched
        pc = sched.prefix_cache_stats
        return self._metrics.snapshot(
            running=len(sched.running),
            waiting=len(sched.waiting),
            kv_cache_usage=sched.kv_cache_usage,
            preemptions=sched.num_preemptions,
            prefix_cache_queries=pc.queries,
            prefix_cache_hits=pc.hits,
        )

    # ---- Engine interface -----------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-engine-scheduler")

    def num_unfinished(self) -> int:
        return len(self._streams)

    async def check_health(self) -> None:
        if self._dead is not None:
            raise self._dead

    async def shutdown(self) -> None:
        self._fail_all(EngineDeadError("simulated engine shut down"))
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:
        stream = self._admit(request)
        loop = asyncio.get_running_loop()
        lag = self.stats.lag_s if self._record_lag else None
        try:
            while True:
                if not stream.has_news():
                    stream.waiter = loop.create_future()
                    await stream.waiter
                    stream.waiter = None
                if stream.error is not None:
                    raise stream.error
                if lag is not None and stream.emit_times:
                    now = self.clock.now()
                    lag.extend(now - t for t in stream.emit_times)
                    stream.emit_times.clear()
                chunk = stream.take()
                if chunk.finished:
                    self._streams.pop(request.request_id, None)
                yield chunk
                if chunk.finished:
                    return
        finally:
            if not stream.done:
                self._abort(stream)

    async def submit(self, request: EngineRequest, sink: ChunkSink) -> Abort:
        """Push delivery: a step's chunks are built while the step "runs" and handed to their sinks
        right at its end, in one pass over the batch (no task wake-up per stream)."""
        stream = self._admit(request)
        stream.sink = sink

        def abort() -> None:
            if stream.sink is not None:
                stream.sink = None
                self._abort(stream)

        return abort

    def _prepare_push(self, stream: SimStream) -> tuple[SimStream, EngineChunk, list[float]]:
        """Before the step ends: its chunk for a pushed stream, and its tokens' times."""
        stream.publish()
        times: list[float] = []
        if stream.emit_times:
            times, stream.emit_times = stream.emit_times, []
        return stream, stream.take(), times

    def _push(self, ready: list[tuple[SimStream, EngineChunk, list[float]]]) -> None:
        """At the step's end: hand every pushed stream its chunk."""
        lag = self.stats.lag_s if self._record_lag else None
        clock = self.clock
        for stream, chunk, times in ready:
            sink = stream.sink
            if sink is None:
                continue  # aborted while the step ran
            if lag is not None:
                now = clock.now()
                lag.extend(now - t for t in times)
            if chunk.finished:
                stream.sink = None
                self._streams.pop(stream.request.request_id, None)
            if not deliver(sink, chunk) and not chunk.finished:
                stream.sink = None
                self._abort(stream)

    # ---- internals ------------------------------------------------------------------------------
    def _admit(self, request: EngineRequest) -> SimStream:
        if self._dead is not None:
            raise self._dead
        if self._task is None:
            raise EngineError("simulated engine not started")
        sp = request.sampling
        prompt_len = len(request.prompt_token_ids)
        if prompt_len < 1:
            raise EngineError("empty prompt")
        if prompt_len + sp.max_tokens > self.max_model_len:
            raise EngineError(
                f"prompt ({prompt_len} tokens) + max_tokens ({sp.max_tokens}) exceeds the "
                f"simulated max_model_len {self.max_model_len}"
            )
        if request.request_id in self._streams:
            raise EngineError(f"duplicate request id {request.request_id!r}")
        hashes = [seq_hash(request, i) for i in range(sp.n)]
        now = self.clock.now()
        blocks = (
            self._hasher.block_hashes(request.prompt_token_ids, cache_salt=request.cache_salt)
            if self._hasher is not None
            else []
        )
        seqs = []
        for i, h in enumerate(hashes):
            eos = None
            if not sp.ignore_eos and self.eos_mean_tokens:
                eos = max(1 + h % (2 * self.eos_mean_tokens), sp.min_tokens)
            seqs.append(
                SimSeq(
                    owner=None,
                    index=i,
                    prompt_len=prompt_len,
                    max_tokens=sp.max_tokens,
                    eos_after=eos,
                    block_hashes=blocks,
                    arrival_s=now,
                )
            )
        stream = SimStream(request, seqs, hashes, self._record_lag)
        for seq in seqs:
            seq.owner = stream
            self._sched.add(seq)
        self._streams[request.request_id] = stream
        self._work.set()
        return stream

    def _abort(self, stream: SimStream) -> None:
        for seq in stream.seqs:
            if seq.status is not SeqStatus.FINISHED:
                self._sched.finish(seq, "abort")
        stream.done = True
        self._streams.pop(stream.request.request_id, None)

    def _fail_all(self, error: EngineDeadError) -> None:
        self._dead = error
        for stream in list(self._streams.values()):
            sink = stream.sink
            if sink is not None:
                stream.sink = None
                stream.done = True
                sink.fail(error)
            else:
                stream.fail(error)
        self._streams.clear()

    async def _run(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the engine is gone: every stream must learn it
            self._fail_all(EngineDeadError(f"simulated engine crashed: {e!r}"))
            raise

    async def _loop(self) -> None:
        sched, clock, perf, stats = self._sched, self.clock, self.perf, self.stats
        t = clock.now()
        while True:
            if not sched.has_work():
                self._work.clear()
                await self._work.wait()
                t = clock.now()
                continue
            batch = sched.schedule()
            stats.preemptions += batch.preempted
            if not batch.items:
                # Nothing fits (cannot happen while max_model_len <= KV capacity); fail loudly.
                raise RuntimeError(f"scheduler made no progress: {len(sched.waiting)} waiting, 0 running")
            dur = perf.step_time_s(**batch.perf_args()) / self.speedup
            t_end = t + dur
            now = clock.now()
            if now - t_end > _RESYNC_S:
                t_end = now
                stats.timeline_resyncs += 1
            # The step's outcome is fixed once it is scheduled: apply it and prepare its tokens now,
            # so that at the step's end only the (cheap) publication is left.
            produced = sched.postprocess(batch)
            staged: dict[int, SimStream] = {}
            # Engine metrics, counted once the step's outcome is fixed, at its end time. Sequences
            # that also sampled in the previous step (ending at t) share one inter-token latency.
            metrics = self._metrics
            decoded = 0
            for seq in produced:
                stream: SimStream = seq.owner
                staged[id(stream)] = stream
                if stream.stage(seq, t_end):  # a stop string matched
                    if seq.status is SeqStatus.FINISHED:
                        seq.finish_reason = "stop"
                    else:
                        sched.finish(seq, "stop")
                if seq.last_token_s == t and seq.num_output > 1:
                    decoded += 1
                elif seq.num_output == 1:
                    metrics.first_token(t_end - seq.arrival_s, seq.prompt_len)
                else:
                    metrics.next_token(t_end - seq.last_token_s)
                seq.last_token_s = t_end
                if seq.status is SeqStatus.FINISHED:
                    metrics.finished(t_end - seq.arrival_s)
            if decoded:
                metrics.next_token(t_end - t, decoded)
            # Pushed streams' chunks are built now too; at the step's end they are only handed over.
            ready = [self._prepare_push(s) for s in staged.values() if s.sink is not None and not s.done]
            if t_end > now:
                await clock.sleep_until(t_end)
            t = t_end
            stats.steps += 1
            stats.model_busy_s += dur
            stats.tokens += len(produced)
            if ready:
                self._push(ready)
            events = sched.pool.events
            if events and self._cache_sink is not None:
                self._cache_sink(*events.drain())
            for stream in staged.values():
                if stream.sink is None and not stream.done:
                    stream.publish()
            # Let the woken consumers run before computing the next step.
            await asyncio.sleep(0)
