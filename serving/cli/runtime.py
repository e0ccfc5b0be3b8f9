"""Start or join Ray and deploy the application (used by ``tokenweir serve`` and the tests)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx

from serving.config.schema import TokenweirConfig
from serving.ray_env import LOOPBACK_ENV, NODE_HOST, SERVE_ENV, listen_host


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
        address="local",  # always a new local Ray: never attach to another one found on this machine
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

    # The gateway replicas serve HTTP themselves (see serving.gateway.deployment); no Serve proxy.
    serve.start(http_options={"location": "NoServer"})
    serve.run(build_app(cfg), name=APP_NAME, route_prefix=None, blocking=False)
    return gateway_url(cfg)


def gateway_url(cfg: TokenweirConfig, url: str | None = None) -> str:
    """``url``, or the gateway's base URL for a client on this machine. With ``gateway.host: node``
    that is this machine's Ray node address: loopback for the local Ray ``tokenweir serve`` starts,
    the connected node's on a cluster; a CLI not connected to a cluster's Ray needs ``--url``."""
    if url:
        return url
    host = cfg.gateway.host
    if host == NODE_HOST:
        if cfg.ray.address is None:
            host = "127.0.0.1"  # init_ray's local Ray runs on loopback
        elif _ray_connected():
            host = listen_host(host)
        else:
            raise SystemExit(
                "tokenweir: gateway.host is `node` on a cluster: pass --url http://<a gateway node>:"
                f"{cfg.gateway.port}"
            )
    return f"http://{host}:{cfg.gateway.port}"


def _ray_connected() -> bool:
    import ray

    return bool(ray.is_initialized())


def with_admin_key(cfg: TokenweirConfig) -> TokenweirConfig:
    """Fill ``metering.admin_key`` from the environment or ``<state_dir>/admin_key`` (created, mode
    0600, on first use) so the admin API and the CLI share one key."""
    m = cfg.metering_config()
    if not m.enabled or m.admin_key:
        return cfg
    key = os.environ.get(m.admin_key_env) or _read_or_create_secret(Path(str(m.state_dir)) / "admin_key")
    return cfg.model_copy(update={"metering": cfg.metering.model_copy(update={"admin_key": key})})


def _read_or_create_secret(path: Path) -> str:
    if path.exists():
        return path.read_text().strip()
    import secrets

    path.parent.mkdir(parents=True, exist_ok=True)
    key = "tw-admin-" + secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def ensure_demo_key(cfg: TokenweirConfig) -> str | None:
    """Create the demo tenant and its key on first start (kept in ``<state_dir>/demo_key``, 0600);
    later starts print the same key from there. None when metering is off."""
    import asyncio

    from serving.metering import connect
    from serving.tenancy import ensure_demo_tenant

    m = cfg.metering_config()
    if not m.enabled:
        return None
    path = Path(str(m.state_dir)) / "demo_key"
    client = connect(m, namespace=cfg.ray.namespace)
    _, key = asyncio.run(ensure_demo_tenant(client))
    if key:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        return key
    return path.read_text().strip() if path.exists() else None


def wait_ready(base_url: str, timeout_s: float = 600.0) -> dict[str, Any]:
    """Poll ``/readyz/pools`` until every pool is ready; raise TimeoutError with the last answer."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base_url}/readyz/pools", timeout=10.0)
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
