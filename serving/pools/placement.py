"""Pin a pool's replicas to its accelerator type through Ray's scheduling options."""

from __future__ import annotations

from typing import Any

from serving.config.schema import PoolConfig

# Accelerator types Ray knows by name (`ray.util.accelerators`); others use a custom resource
# `accelerator_type:<TYPE>` that the node must advertise (`ray start --resources`).
RAY_KNOWN_TYPES = {"H100": "H100", "H200": "H200", "H20": "H20", "L40S": "L40S", "A100-80GB": "A100-80G"}


def ray_actor_options_for(pool: PoolConfig) -> dict[str, Any]:
    """``ray_actor_options`` for a pool replica: CPUs, GPUs and the accelerator pin."""
    opts: dict[str, Any] = {"num_cpus": pool.num_cpus}
    if pool.engine == "sim" or pool.accelerator == "CPU":
        return opts
    opts["num_gpus"] = pool.gpus_per_replica
    known = RAY_KNOWN_TYPES.get(pool.accelerator)
    if known:
        opts["accelerator_type"] = known
    else:
        opts["resources"] = {f"accelerator_type:{pool.accelerator}": 0.001}
    return opts
