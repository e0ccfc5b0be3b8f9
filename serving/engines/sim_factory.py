"""Build the simulated engine a pool config (``engine: sim``) asks for."""

from __future__ import annotations

from models.catalog import ModelEntry
from serving.config.schema import PoolConfig
from serving.engines.sim import SimEngine
from serving.hardware import EngineSettings, get_gpu
from serving.pools.planning import engine_args, model_arch


def build_sim_engine(pool: PoolConfig, entry: ModelEntry) -> SimEngine:
    """A SimEngine on the pool's GPU profile with the planned (or explicit) settings."""
    args = engine_args(pool, entry)
    settings = EngineSettings(
        max_num_seqs=int(args["max_num_seqs"]),
        max_num_batched_tokens=int(args["max_num_batched_tokens"]),
        gpu_memory_utilization=float(args["gpu_memory_utilization"]),
    )
    return SimEngine(
        model_arch(entry),
        get_gpu(pool.accelerator),
        settings,
        speedup=pool.sim_speedup,
        max_model_len=entry.max_model_len,
    )
