"""Start or join Ray and deploy the application (used by ``tokenweir serve`` and the tests)."""

from __future__ import annotations

import os
import time
from typing import Any

import httpx

from serving.config.schema import TokenweirConfig

# Keep a local Ray on loopback (without the second variable Ray still advertised eth0).
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# Quieter, cheaper Serve request path (measured: see README "Speed").
SERVE_ENV = {"RAY_SERVE_LOG_TO_STDERR": "0", "RAY_DEDUP_LOGS": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def init_ray(cfg: TokenweirConfig) -> None:
    """Start a local Ray on loopback, or join ``cfg.ray.address``."""
    import ray

    for k, v in {**LOOPBACK_ENV, **SERVE_ENV}.items():
        os.environ.setdefault(k, v)
    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, namespace=cfg.ray.namespace, log_to_driver=False)
        return
    ray.init(
        num_cpus=cfg.ray.num_cpus or max(4, os.cpu_count() or 1),
        namespace=cfg.ray.namespace,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )


def deploy(cfg: TokenweirConfig) -> str:
    """Deploy the app (blocks until every replica's engine has started); returns the base URL."""
    from ray import serve

    from serving.app import APP_NAME, build_app

    serve.start(http_options={"host": cfg.gateway.host, "port": cfg.gateway.port})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
    return f"http://{cfg.gateway.host}:{cfg.gateway.port}"


def wait_ready(base_url: str, timeout_s: float = 600.0) -> dict[str, Any]:
    """Poll ``/readyz`` until every pool is ready; raise TimeoutError with the last answer."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base_url}/readyz", timeout=10.0)
            last = r.json()
            if r.status_code == 200:
                return last
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise TimeoutError(f"gateway at {base_url} not ready after {timeout_s:g} s: {last}")


def shutdown() -> None:
    """Tear the application and the local Ray down."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    finally:
        ray.shutdown()
