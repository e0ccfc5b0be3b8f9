"""A pool replica: one engine (vLLM or simulated) for one model on one accelerator type, behind the
tenant-fair admission core.

Ray Serve runs this class as the deployment ``pool-<name>`` and calls it for control only
(readiness, health, stats, shutdown). Requests and their tokens travel on the token channel
(:mod:`serving.pools.host`, :mod:`serving.pools.channel`), found by gateways on the load board this
replica publishes to. A request waits in the admission queue (VTC fair share, adaptive in-flight
limit); a refusal goes back as a failure frame that the gateway answers with 429/503.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any

from serving.admission import AdmissionCore, AsyncAdmission
from serving.config.resolved import ResolvedPool
from serving.engines.base import Engine
from serving.logs import route_logs_to_serve
from serving.pools.host import ReplicaHost
from serving.pools.loadboard import PUBLISH_INTERVAL_S, get_board
from serving.priority import run_at_normal_priority
from serving.ray_env import node_address

log = logging.getLogger("tokenweir.pool")


def build_engine(pool: ResolvedPool) -> Engine:
    """The engine a pool runs, on its resolved engine arguments."""
    if pool.engine == "vllm":
        from models.catalog import resolve_source
        from serving.engines.vllm_engine import VllmEngine

        cpu = pool.accelerator == "CPU"
        return VllmEngine(
            resolve_source(pool.weights_source),  # on this replica's node (a builtin model is built here)
            pool.model,
            pool.entry.max_model_len,
            pool.engine_args,
            cpu_placement=cpu and pool.cpu_core_placement,
            cpu_model_in_engine_core=cpu and pool.cpu_model_in_engine_core,
            kv_events=pool.prefix_routed,
        )
    from serving.engines.sim import SimEngine
    from serving.hardware import EngineSettings, PerfModel

    args = pool.engine_args
    settings = EngineSettings(
        int(args["max_num_seqs"]), int(args["max_num_batched_tokens"]), float(args["gpu_memory_utilization"])
    )
    return SimEngine(
        pool.arch,
        pool.gpu,
        settings,
        speedup=pool.sim_speedup,
        max_model_len=pool.entry.max_model_len,
        enable_prefix_caching=bool(args.get("enable_prefix_caching", True)),
        block_tokens=pool.block_tokens,
        kv_capacity_tokens=pool.kv_capacity_tokens(PerfModel(pool.arch, pool.gpu)),
        served_name=pool.model,
    )


def replica_id() -> str:
    """This Serve replica's unique id (the process id outside Serve)."""
    try:
        from ray import serve

        ctx = serve.get_replica_context()
        return str(getattr(ctx.replica_id, "unique_id", None) or ctx.replica_tag)
    except Exception:
        import os

        return f"pid-{os.getpid()}"


def node_ip() -> str:
    """Where this replica's token channel listens: the Ray node's address (loopback locally);
    :class:`~serving.ray_env.NodeAddressError` if Ray has none for it."""
    return node_address("a pool replica's token channel listens on its node")


class PoolReplica:
    """The body of a pool deployment replica: the engine and its :class:`ReplicaHost` (the data
    path), plus what Ray Serve and the gateways' routers ask of it (readiness, stats, load)."""

    async def __init__(  # type: ignore[misc]  # Ray Serve awaits async constructors
        self, pool: ResolvedPool, namespace: str = "tokenweir"
    ) -> None:
        run_at_normal_priority()  # before the engine starts: its processes inherit it
        route_logs_to_serve()
        self.pool = pool
        self._engine = build_engine(pool)
        self._channel_host = node_ip()
        await self._engine.start()
        cap = self._engine.capacity()
        admission = AsyncAdmission(
            AdmissionCore(
                pool.admission.for_engine(
                    cap.max_num_seqs, cap.kv_capacity_tokens, pool.slo.ttft_ms, pool.slo.tpot_ms
                )
            )
        )
        self.admission = admission
        placement = getattr(self._engine, "placement", None)
        self._engine_cores = (self._channel_host, sorted(placement.worker_cores)) if placement else None
        """(node, cores) a same-node gateway keeps off (vLLM CPU build only)."""
        self._id = replica_id()
        self._hashing = self._engine.prefix_hashing()
        self.host = ReplicaHost(
            self._engine,
            admission,
            self._channel_host,
            self._id,
            pool.stream_interval_ms,
            cache_events=pool.prefix_routed,
        )
        self._channel_addr = await self.host.start()
        self._board = get_board(namespace)
        self._publisher = asyncio.get_running_loop().create_task(self._publish_forever())

    def _payload(self) -> dict[str, Any]:
        core = self.admission.core
        snap = dataclasses.replace(core.snapshot(self.admission.now()), taken_at_s=time.time())
        return {
            "pool": self.pool.name,
            "accelerator": self.pool.accelerator,
            "snapshot": snap,
            "admission": core.stats(),
            "model": self.pool.model,
            "engine_metrics": self._engine.engine_metrics(),
            "engine_unfinished": self._engine.num_unfinished(),
            "replica": self._id,
            "channel": self._channel_addr,
            "engine_cores": self._engine_cores,
            "prefix_hashing": self._hashing,
        }

    async def _publish_forever(self) -> None:
        while True:
            try:
                self._board.publish.remote("pool", f"{self.pool.name}/{self._id}", self._payload())
            except Exception:  # the board restarts on its own; routing tolerates a missed beat
                log.debug("load board publish failed", exc_info=True)
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    async def stats(self) -> dict[str, Any]:
        """The replica's engine and admission counters, for status and tests."""
        a = self.admission.core.stats()
        return {
            "pool": self.pool.name,
            "replica": self._id,
            "accelerator": self.pool.accelerator,
            "engine": self.pool.engine,
            "num_unfinished": self._engine.num_unfinished(),
            "requests_started": self.host.requests_started,
            "requests_aborted": self.host.requests_aborted,
            "requests_total": self.host.requests_total,
            "queue_depth": a.queue_depth,
            "in_flight_seqs": a.in_flight_seqs,
            "seq_limit": a.seq_limit,
            "engine_cores": self._engine_cores[1] if self._engine_cores else None,
        }

    async def ready(self) -> bool:
        """True once the engine takes requests (the constructor returns only then)."""
        await self._engine.check_health()
        return True

    async def check_health(self) -> None:
        """Ray Serve's health check: an exception marks the replica unhealthy and replaces it."""
        await self._engine.check_health()

    async def __del__(self) -> None:
        """Ray Serve's shutdown (a redeploy, a scale-down): drain the channel, then stop."""
        self._publisher.cancel()  # off the load board: routers stop choosing this replica
        cut = await self.host.drain(max(0.0, self.pool.graceful_shutdown_timeout_s - _SHUTDOWN_MARGIN_S))
        if cut:
            log.warning("pool %s replica %s: %d streams cut off by shutdown", self.pool.name, self._id, cut)
        await self.host.close()
        with contextlib.suppress(BaseException):
            await self._publisher
        await self._engine.shutdown()


_SHUTDOWN_MARGIN_S = 1.0
"""Of ``graceful_shutdown_timeout_s``, what is kept back for ending the cut-off streams cleanly
before Ray Serve kills the replica."""
