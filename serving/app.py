"""Build the Ray Serve application from the configuration: one gateway, one deployment per pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from models.catalog import CATALOG_PATH, load_catalog, resolve_source
from serving.cli.runtime import SERVE_ENV
from serving.config.schema import PoolConfig, TokenweirConfig
from serving.gateway.deployment import Gateway
from serving.pools.placement import ray_actor_options_for
from serving.pools.planning import deployed_entry
from serving.pools.replica import PoolReplica

APP_NAME = "tokenweir"
GATEWAY_DEPLOYMENT = "gateway"


def pool_deployment_name(pool: PoolConfig) -> str:
    """Ray Serve deployment name of a pool."""
    return f"pool-{pool.name}"


def build_app(cfg: TokenweirConfig) -> Application:
    """The bound application: ``gateway`` with a handle to every ``pool-<name>``."""
    catalog = load_catalog(Path(cfg.catalog) if cfg.catalog else CATALOG_PATH)
    tokenizer_sources: dict[str, str] = {}
    entries: dict[str, dict[str, Any]] = {}
    handles: dict[str, Any] = {}
    for pool in cfg.pools:
        entry = deployed_entry(catalog[pool.model], cfg.models.get(pool.model))
        if pool.model not in entries:
            entries[pool.model] = entry.model_dump()
            tokenizer_sources[pool.model] = resolve_source(entry.tokenizer or entry.source)
        weights = resolve_source(entry.source) if pool.engine == "vllm" else ""
        dep = serve.deployment(PoolReplica).options(  # type: ignore[attr-defined]
            name=pool_deployment_name(pool),
            num_replicas=pool.replicas,
            max_ongoing_requests=pool.max_ongoing_requests,
            ray_actor_options={**ray_actor_options_for(pool), "runtime_env": {"env_vars": SERVE_ENV}},
            health_check_period_s=10,
            health_check_timeout_s=60,
            graceful_shutdown_timeout_s=5,
        )
        handles[pool.name] = dep.bind(
            pool.model_dump(mode="json"), entries[pool.model], weights, cfg.ray.namespace
        )
    gateway = serve.deployment(Gateway).options(  # type: ignore[attr-defined]
        name=GATEWAY_DEPLOYMENT,
        num_replicas=cfg.gateway.replicas,
        max_ongoing_requests=cfg.gateway.max_ongoing_requests,
        ray_actor_options={"num_cpus": cfg.gateway.num_cpus, "runtime_env": {"env_vars": SERVE_ENV}},
        graceful_shutdown_timeout_s=5,
    )
    return gateway.bind(cfg.model_dump(mode="json"), entries, tokenizer_sources, handles)
