"""Build the Ray Serve application from the configuration: one gateway, one deployment per pool.

The config is resolved here, once (:func:`serving.config.resolve`: catalog, plan, overrides), and
each replica gets its part of the frozen result as a constructor argument. :func:`app_builder` is
the same build for a Serve config file (``serve run`` / ``serve deploy`` / a RayService), which
carries the Tokenweir config as the application's ``args``.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from serving.config import TokenweirConfig, parse_config, resolve
from serving.gateway.deployment import Gateway
from serving.pools.replica import PoolReplica
from serving.ray_env import SERVE_ENV

APP_NAME = "tokenweir"
GATEWAY_DEPLOYMENT = "gateway"
_POOL_CONTROL_CALLS = 64
"""Concurrent Serve calls a pool replica takes: control only (readiness, stats); requests come on
the token channel and queue in the replica's admission core."""


def build_app(cfg: TokenweirConfig, *, cluster: bool | None = None) -> Application:
    """The bound application: ``gateway`` with a handle to every ``pool-<name>``; ``cluster`` as in
    :func:`serving.config.resolve` (every pool pinned to its accelerator type's nodes)."""
    deployment = resolve(cfg, cluster=cluster)
    runtime_env = {"env_vars": SERVE_ENV}
    handles: dict[str, Any] = {}
    for pool in deployment.pools:
        dep = serve.deployment(PoolReplica).options(  # type: ignore[attr-defined]
            name=pool.deployment_name,
            num_replicas=pool.replicas,
            max_ongoing_requests=_POOL_CONTROL_CALLS,
            ray_actor_options={**pool.ray_actor_options, "runtime_env": runtime_env},
            health_check_period_s=10,
            health_check_timeout_s=60,
            graceful_shutdown_timeout_s=pool.graceful_shutdown_timeout_s,
        )
        handles[pool.name] = dep.bind(pool, deployment.ray.namespace)
    gateway = serve.deployment(Gateway).options(  # type: ignore[attr-defined]
        name=GATEWAY_DEPLOYMENT,
        num_replicas=deployment.gateway.replicas,
        max_ongoing_requests=deployment.gateway.max_ongoing_requests,
        ray_actor_options={
            "num_cpus": deployment.gateway.num_cpus,
            "resources": {r: 1} if (r := deployment.gateway.node_resource) else {},
            "runtime_env": runtime_env,
        },
        graceful_shutdown_timeout_s=5,
    )
    return gateway.bind(deployment, handles)


def app_builder(args: dict[str, Any]) -> Application:
    """Ray Serve's application builder (``import_path: serving.app:app_builder``): ``args`` is a
    Tokenweir config, as ``tokenweir deploy render`` embeds it; validated as a config file is, then
    built by :func:`build_app` for a cluster (a Serve config is deployed onto one that exists: every
    pool is pinned to the nodes of its accelerator type, whatever ``ray.address`` says)."""
    return build_app(parse_config(dict(args), source="the Serve application's args"), cluster=True)
