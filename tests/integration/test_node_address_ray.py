"""``gateway.host: node`` inside Ray: a Ray worker learns the address of the node it runs on."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_node_host_is_the_workers_ray_node_address(live: dict) -> None:
    import ray

    from serving.ray_env import listen_host

    alive = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    bound = ray.get(ray.remote(num_cpus=0)(listen_host).remote("node"), timeout=60)
    assert bound in alive
