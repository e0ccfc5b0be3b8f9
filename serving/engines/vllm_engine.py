"""vLLM's v1 ``AsyncLLM`` run in-process in a pool replica (CPU build here, CUDA build on GPUs).

The gateway has already tokenized the prompt, so the engine gets token ids and its usage counts are
exactly what the gateway charged up front. Outputs are requested as deltas; when the replica reads
slower than the engine steps, vLLM merges the pending deltas, which is what coalesces Ray messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from typing import Any

from serving.engines._metrics import EngineMetrics, from_prometheus
from serving.engines.base import (
    Abort,
    CacheSink,
    ChoiceDelta,
    ChunkSink,
    Engine,
    EngineCapacity,
    EngineChunk,
    EngineDeadError,
    EngineError,
    EngineRequest,
    TokenLogprob,
    deliver,
)
from serving.engines.cpu_placement import Placement, place_cpu_engine
from serving.kvcache import CacheRuns, block_key, vllm_none_hash_seed

log = logging.getLogger("tokenweir.engine")

# Keys of `engine_args` that are ours, not AsyncEngineArgs fields.
_CPU_KV_SPACE_KEY = "kv_cache_space_gib"


def _cpu_uniproc_applies(args: dict[str, Any]) -> bool:
    """Whether the model can run in the engine-core process: vLLM's CPU build, one device, and no
    executor chosen in ``engine_args``."""
    if args.get("distributed_executor_backend") is not None:
        return False
    if int(args.get("tensor_parallel_size", 1)) > 1 or int(args.get("pipeline_parallel_size", 1)) > 1:
        return False
    if int(args.get("data_parallel_size", 1)) > 1:
        return False
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


@contextlib.contextmanager
def _cpu_uniproc(config: Any) -> Iterator[frozenset[int] | None]:
    """Start vLLM's CPU engine with the model in the engine-core process: while the engine core is
    spawned, the OpenMP environment vLLM would give a separate model worker (thread count, core
    binding: ``VLLM_CPU_OMP_THREADS_BIND``) is this process's, so the engine core inherits it.
    Yields the cores that binding names (None when vLLM binds none).

    Why: the CPU build forces its multiprocess executor, whose worker and engine core hand every
    step to each other through shared-memory queues and busy-wait (``sched_yield``) for up to a
    second for the next message. On a machine with few cores the two spin on the same core or take
    one each from the serving processes; in one process a step is a function call. Measured on
    2 cores, 32 streams: 2,200-2,600 output tokens/s with the worker process, 4,200-4,400 without
    (same hour, same build).
    """
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    omp = OMPProcessManager(config)
    with omp.configure_omp_envs(rank=0, local_rank=0):  # the spawned engine core reads it on import
        yield frozenset(omp.cpu_lists[0]) if omp.cpu_lists else None


class VllmEngine(Engine):
    """Wraps ``vllm.v1.engine.async_llm.AsyncLLM``."""

    def __init__(
        self,
        model_path: str,
        served_name: str,
        max_model_len: int,
        engine_args: dict[str, Any],
        *,
        cpu_placement: bool = False,
        cpu_model_in_engine_core: bool = False,
        kv_events: bool = True,
    ):
        """``cpu_placement``: after start, separate the CPU build's processes by core
        (:mod:`serving.engines.cpu_placement`); ``placement`` then says where they went.
        ``cpu_model_in_engine_core``: on the CPU build with one device, run the model in the
        engine-core process (see :func:`_cpu_uniproc`)."""
        self._model_path = model_path
        self._cpu_placement = cpu_placement
        self._cpu_uniproc = cpu_model_in_engine_core
        self.placement: Placement | None = None
        self._served_name = served_name
        self._max_model_len = max_model_len
        self._args = dict(engine_args)
        self._llm: Any = None
        self._dispatch: _Dispatch | None = None
        self._registry: Any = None
        self._kv_events = kv_events
        """Publish KV-cache events (for gateways that route by cached prefix)."""
        self._kv_events_dir: str | None = None
        self._kv_events_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        args = dict(self._args)
        kv_gib = args.pop(_CPU_KV_SPACE_KEY, None)
        if kv_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_gib)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # Several devices: multiprocessing workers, not Ray (this replica is already a Ray actor).
        if int(args.get("tensor_parallel_size", 1)) > 1:
            args.setdefault("distributed_executor_backend", "mp")
        args.setdefault("disable_log_stats", True)
        args.setdefault("max_model_len", self._max_model_len)
        if self._kv_events and args.get("enable_prefix_caching", True) and "kv_events_config" not in args:
            from vllm.config.kv_events import KVEventsConfig

            # The engine's KV-cache events on a socket only this process can reach (a private
            # directory; vLLM's default tcp://*:5557 is open to the network and collides between
            # replicas on one node): the replica relays them to gateways on the token channel.
            self._kv_events_dir = tempfile.mkdtemp(prefix="tokenweir-kv-")
            args["kv_events_config"] = KVEventsConfig(
                enable_kv_cache_events=True,
                publisher="zmq",
                endpoint=f"ipc://{self._kv_events_dir}/events",
                topic="kv",
            )
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import PrometheusStatLogger

        uniproc = self._cpu_uniproc and _cpu_uniproc_applies(args)
        if uniproc:
            from vllm.v1.executor.uniproc_executor import UniProcExecutor

            # The class, not "uni": the CPU platform rewrites the string to "mp".
            args["distributed_executor_backend"] = UniProcExecutor
        engine_args = AsyncEngineArgs(model=self._model_path, served_model_name=[self._served_name], **args)
        usage = UsageContext.OPENAI_API_SERVER
        # vLLM's Prometheus logger alone (no periodic log lines): engine_metrics() ships its
        # families from the registry in this process, where the front end records every step's stats.
        loggers: list[Any] = [PrometheusStatLogger]

        def build() -> tuple[Any, frozenset[int] | None]:
            if not uniproc:
                llm = AsyncLLM.from_engine_args(engine_args, usage_context=usage, stat_loggers=loggers)
                return llm, None
            config = engine_args.create_engine_config(usage)
            with _cpu_uniproc(config) as cores:
                return AsyncLLM.from_vllm_config(
                    config,
                    usage_context=usage,
                    stat_loggers=loggers,
                    enable_log_requests=engine_args.enable_log_requests,
                    disable_log_stats=engine_args.disable_log_stats,
                ), cores

        # Engine start spawns the engine-core process and waits for it (tens of seconds): keep the
        # replica's event loop free meanwhile.
        self._llm, engine_cores = await asyncio.get_running_loop().run_in_executor(None, build)
        if self._cpu_placement:
            self.placement = place_cpu_engine(engine_cores)

    def prefix_hashing(self) -> tuple[int, str] | None:
        cache = self._llm.vllm_config.cache_config
        if not cache.enable_prefix_caching:
            return None
        return int(cache.block_size), vllm_none_hash_seed()  # the engine core inherits this env

    def watch_cache(self, sink: CacheSink) -> bool:
        """Subscribe to the engine's KV-cache events (the publisher :meth:`start` configured)."""
        if self._kv_events_dir is None or self._kv_events_task is not None:
            return False
        import zmq
        import zmq.asyncio

        sock = zmq.asyncio.Context.instance().socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"kv")
        sock.connect(f"ipc://{self._kv_events_dir}/events")
        self._kv_events_task = asyncio.get_running_loop().create_task(_relay_kv_events(sock, sink))
        return True

    def _params(self, request: EngineRequest) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        s = request.sampling
        return SamplingParams(
            n=s.n,
            temperature=s.temperature,
            top_p=s.top_p,
            max_tokens=s.max_tokens,
            stop=list(s.stop) or None,
            seed=s.seed,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            logprobs=s.logprobs,
            ignore_eos=s.ignore_eos,
            min_tokens=s.min_tokens,
            output_kind=RequestOutputKind.DELTA,
        )

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineChunk]:  # type: ignore[override]
        from vllm.v1.engine.exceptions import EngineDeadError as VllmDead
        from vllm.v1.engine.exceptions import EngineGenerateError

        prompt_tokens = len(request.prompt_token_ids)
        k = request.sampling.logprobs
        done_tokens = 0
        try:
            async for out in self._llm.generate(
                _prompt(request),
                self._params(request),
                request.request_id,
                trace_headers=_trace_headers(request),
            ):
                chunk = _chunk(out, prompt_tokens, done_tokens, k)
                done_tokens = chunk.completion_tokens
                yield chunk
        except VllmDead as e:
            raise EngineDeadError(f"vLLM engine died: {e}") from e
        except EngineGenerateError as e:
            raise EngineError(f"vLLM failed the request: {e}") from e

    async def submit(self, request: EngineRequest, sink: ChunkSink) -> Abort:
        """Push delivery without a task per request: vLLM's output handler puts each request's
        output into its collector and sets the collector's ``ready`` event; here that event is
        replaced by a :class:`_Pushed`, which queues the request for one flush per batch of outputs
        that hands every ready chunk to its sink."""
        if self._dispatch is None:
            if not _collector_has_ready_event():  # another vLLM's internals: the generic path
                return await super().submit(request, sink)
            self._dispatch = _Dispatch()
        q = await self._llm.add_request(
            request.request_id,
            _prompt(request),
            self._params(request),
            trace_headers=_trace_headers(request),
        )
        pushed = _Pushed(
            self, self._dispatch, q, sink, len(request.prompt_token_ids), request.sampling.logprobs
        )
        q.ready = pushed
        if q.output is not None:  # came before the swap
            pushed.set()
        return pushed.abort

    def capacity(self) -> EngineCapacity:
        cfg = self._llm.vllm_config
        blocks = cfg.cache_config.num_gpu_blocks
        if blocks:
            kv_tokens = int(blocks) * int(cfg.cache_config.block_size)
        else:  # not reported to the front-end process: estimate from the CPU KV space
            gib = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
            mc = cfg.model_config
            per_token = 2 * mc.get_num_layers(cfg.parallel_config) * mc.get_num_kv_heads(cfg.parallel_config)
            per_token *= mc.get_head_size() * mc.dtype.itemsize
            kv_tokens = int(gib * 2**30 // per_token)
        return EngineCapacity(int(cfg.scheduler_config.max_num_seqs), kv_tokens)

    def engine_metrics(self) -> EngineMetrics | None:
        """Every family of vLLM's Prometheus logger, from its registry in this process."""
        if self._llm is None or self._llm.logger_manager is None:
            return None
        if self._registry is None:
            from prometheus_client import REGISTRY  # where vLLM's logger registers (not multiprocess)

            self._registry = REGISTRY
        # the whole registry: its other collectors (process, GC) cost ~0.2 ms of the ~1.5 ms a read
        return from_prometheus(self._registry.collect())

    def num_unfinished(self) -> int:
        if self._llm is None:
            return 0
        return int(self._llm.output_processor.get_num_unfinished_requests())

    async def check_health(self) -> None:
        if self._llm is None:
            raise EngineDeadError("engine not started")
        if self._llm.errored:
            raise EngineDeadError("vLLM engine has errored")
        await self._llm.check_health()

    async def shutdown(self) -> None:
        if self._kv_events_task is not None:
            self._kv_events_task.cancel()
            with contextlib.suppress(BaseException):
                await self._kv_events_task
            self._kv_events_task = None
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None
        if self._kv_events_dir is not None:
            shutil.rmtree(self._kv_events_dir, ignore_errors=True)


async def _relay_kv_events(sock: Any, sink: CacheSink) -> None:
    """vLLM's KV-cache event batches (``[topic, seq, msgpack KVEventBatch]``) as runs for ``sink``:
    blocks of the device cache stored and removed, in order, and "all cleared". vLLM names a block
    by the low 64 bits of its sha256 hash (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``, its default),
    :func:`~serving.kvcache.block_key` of what :class:`~serving.kvcache.BlockHasher` computes; with
    that off it sends the whole digest, reduced here the same way."""
    import msgspec
    from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

    decode = msgspec.msgpack.Decoder(KVEventBatch).decode
    try:
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 3:
                continue
            try:
                batch = decode(frames[2])
            except msgspec.DecodeError:
                log.warning("undecodable KV-cache event batch from the engine (%d bytes)", len(frames[2]))
                continue
            runs: CacheRuns = []
            cleared = False
            for ev in batch.events:
                if isinstance(ev, AllBlocksCleared):
                    runs, cleared = [], True
                elif isinstance(ev, BlockStored | BlockRemoved) and ev.medium in (None, "GPU"):
                    hashes = [h if isinstance(h, int) else block_key(h) for h in ev.block_hashes]
                    if hashes:
                        runs.append((isinstance(ev, BlockStored), hashes))
            if runs or cleared:
                sink(runs, cleared)
    finally:
        sock.close(linger=0)


def _prompt(request: EngineRequest) -> dict[str, Any]:
    """vLLM's ``TokensPrompt`` for a request (with its ``cache_salt`` when the gateway set one)."""
    if request.cache_salt is None:
        return {"prompt_token_ids": request.prompt_token_ids}
    return {"prompt_token_ids": request.prompt_token_ids, "cache_salt": request.cache_salt}


def _chunk(out: Any, prompt_tokens: int, done_tokens: int, k: int | None) -> EngineChunk:
    """One vLLM ``RequestOutput`` (deltas) as an :class:`EngineChunk` (cumulative usage)."""
    deltas = []
    for c in out.outputs:
        n = len(c.token_ids)
        done_tokens += n
        deltas.append(
            ChoiceDelta(
                index=c.index,
                text=c.text,
                num_tokens=n,
                finish_reason=c.finish_reason,
                logprobs=_logprobs(c, k) if k is not None else None,
            )
        )
    return EngineChunk(
        deltas, prompt_tokens, done_tokens, finished=out.finished, cached_tokens=out.num_cached_tokens or 0
    )


def _collector_has_ready_event() -> bool:
    """Whether this vLLM's per-request output collector signals through a ``ready`` event (what
    :class:`_Pushed` stands in for; true of vLLM 0.32, the version pinned for both builds)."""
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.output_processor import RequestOutputCollector

    probe = RequestOutputCollector(RequestOutputKind.DELTA, "probe")
    return isinstance(getattr(probe, "ready", None), asyncio.Event) and hasattr(probe, "get_nowait")


class _Dispatch:
    """Collects the submitted requests that have new output and flushes them in one callback."""

    def __init__(self) -> None:
        self.ready: list[_Pushed] = []

    def mark(self, pushed: _Pushed) -> None:
        if not self.ready:
            asyncio.get_running_loop().call_soon(self.flush)
        self.ready.append(pushed)

    def flush(self) -> None:
        ready, self.ready = self.ready, []
        for pushed in ready:
            pushed.drain()


class _Pushed:
    """Stands in for a submitted request's ``RequestOutputCollector.ready`` event (vLLM calls
    ``set()`` when output arrives and ``clear()`` when it is taken)."""

    def __init__(
        self,
        engine: VllmEngine,
        dispatch: _Dispatch,
        q: Any,
        sink: ChunkSink,
        prompt_tokens: int,
        k: int | None,
    ) -> None:
        self.engine, self.dispatch, self.q, self.sink = engine, dispatch, q, sink
        self.prompt_tokens, self.k = prompt_tokens, k
        self.done_tokens = 0
        self.queued = False
        self.over = False

    # -- the asyncio.Event surface RequestOutputCollector uses
    def set(self) -> None:
        if not self.queued and not self.over:
            self.queued = True
            self.dispatch.mark(self)

    def clear(self) -> None:
        pass

    def is_set(self) -> bool:
        return self.q.output is not None

    async def wait(self) -> bool:  # only generate() waits; a submitted request never does
        raise RuntimeError("a pushed request has no waiting consumer")

    # -- delivery
    def drain(self) -> None:
        self.queued = False
        if self.over:
            return
        from vllm.v1.engine.exceptions import EngineDeadError as VllmDead

        try:
            out = self.q.get_nowait()
        except VllmDead as e:
            self._fail(EngineDeadError(f"vLLM engine died: {e}"))
            return
        except Exception as e:
            self._fail(EngineError(f"vLLM failed the request: {e}"))
            return
        if out is None:
            return
        chunk = _chunk(out, self.prompt_tokens, self.done_tokens, self.k)
        self.done_tokens = chunk.completion_tokens
        if chunk.finished:
            self.over = True
        if not deliver(self.sink, chunk) and not chunk.finished:
            self.abort()

    def _fail(self, error: EngineError) -> None:
        self.over = True
        self.sink.fail(error)

    def abort(self) -> None:
        if self.over:
            return
        self.over = True
        llm = self.engine._llm
        if llm is not None and not llm.errored:
            task = asyncio.get_running_loop().create_task(llm.abort(self.q.request_id, internal=True))
            _BACKGROUND.add(task)
            task.add_done_callback(_BACKGROUND.discard)


_BACKGROUND: set[asyncio.Task[None]] = set()
"""Abort calls in flight (kept referenced until done)."""


def _logprobs(c: Any, k: int) -> list[TokenLogprob]:
    items = []
    for tok_id, pos in zip(c.token_ids, c.logprobs or (), strict=False):
        if not pos:
            continue
        chosen = pos.get(tok_id)
        ranked = sorted(pos.values(), key=lambda lp: lp.rank if lp.rank is not None else 1 << 30)[:k]
        items.append(
            TokenLogprob(
                token=(chosen.decoded_token if chosen else "") or "",
                logprob=float(chosen.logprob) if chosen else float("-inf"),
                top=[(lp.decoded_token or "", float(lp.logprob)) for lp in ranked],
            )
        )
    return items


def _trace_headers(request: EngineRequest) -> dict[str, str] | None:
    return None if request.traceparent is None else {"traceparent": request.traceparent}
