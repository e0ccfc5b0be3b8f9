"""``tokenweir serve | status | models build-tiny | plan | load``."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from serving.config import ConfigError, load_config


def _cmd_serve(args: argparse.Namespace) -> int:
    from serving.cli import runtime

    cfg = runtime.with_admin_key(load_config(args.config))
    print(
        f"tokenweir: starting Ray and deploying {len(cfg.pools)} pool(s); the first start of vLLM takes ~1 min"
    )
    runtime.init_ray(cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = runtime.deploy(cfg)
        ready = runtime.wait_ready(url, timeout_s=args.ready_timeout_s)
        print(f"tokenweir: ready at {url}  (pools: {', '.join(ready['pools'])})")
        model = cfg.pools[0].model
        key = runtime.ensure_demo_key(cfg)
        auth = ""
        if key:
            print(f"tokenweir: demo tenant API key: {key}")
            auth = f"-H 'Authorization: Bearer {key}' "
        elif cfg.metering.enabled:
            print(
                "tokenweir: demo tenant exists but its key file is gone; create one: tokenweir keys create demo"
            )
        print(
            "try:\n"
            f"  curl {url}/v1/chat/completions {auth}-H 'Content-Type: application/json' "
            f'-d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 16}}\'\n'
            "stop with Ctrl-C",
            flush=True,
        )
        while not stop.wait(1.0):
            pass
        print("tokenweir: shutting down")
        return 0
    finally:
        runtime.shutdown()


def _cmd_status(args: argparse.Namespace) -> int:
    import httpx

    cfg = load_config(args.config)
    url = args.url or f"http://{cfg.gateway.host}:{cfg.gateway.port}"
    rows: list[dict[str, Any]] = []
    replicas: dict[str, dict[str, int]] = {}
    try:
        import os

        import ray
        from ray import serve

        from serving.cli.runtime import LOOPBACK_ENV

        for k, v in LOOPBACK_ENV.items():
            os.environ.setdefault(k, v)
        ray.init(address=cfg.ray.address or "auto", namespace=cfg.ray.namespace, log_to_driver=False)
        st = serve.status()
        for app_status in st.applications.values():
            for name, dep in app_status.deployments.items():
                replicas[name] = {str(k): v for k, v in dep.replica_states.items()}
    except Exception as e:
        print(f"(Ray not reachable: {type(e).__name__}: {e})", file=sys.stderr)
    try:
        ready = httpx.get(f"{url}/readyz", timeout=10).json()
    except httpx.HTTPError as e:
        ready = {"error": repr(e)}
    pool_states = ready.get("pools", {}) if isinstance(ready, dict) else {}
    for p in cfg.pools:
        rows.append(
            {
                "pool": p.name,
                "model": p.model,
                "gpu": p.accelerator,
                "engine": p.engine,
                "replicas": f"{replicas.get('pool-' + p.name, {}).get('RUNNING', 0)}/{p.replicas}",
                "ready": pool_states.get(p.name, "unknown"),
            }
        )
    if args.json:
        print(json.dumps({"gateway": url, "pools": rows}, indent=2))
        return 0
    print(f"gateway {url}: {'ready' if ready.get('status') == 'ready' else 'not ready'}")
    cols = ["pool", "model", "gpu", "engine", "replicas", "ready"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    return 0


def _cmd_build_tiny(args: argparse.Namespace) -> int:
    from models.tiny import build_tiny_model

    print(build_tiny_model(args.out))
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from serving.config import resolve
    from serving.hardware import format_plan_table

    deployment = resolve(load_config(args.config), require_plans=False)
    plans, names, failures = [], [], []
    for pool in deployment.pools:
        if pool.accelerator == "CPU":
            failures.append(
                f"{pool.name}: CPU pool, no hardware plan (engine settings come from the catalog)"
            )
        elif pool.plan is None:
            failures.append(f"{pool.name}: cannot plan: {pool.plan_error}")
        else:
            plans.append(pool.plan)
            names.append(pool.name)
    if plans:
        print(format_plan_table(plans, names))
    for line in failures:
        print(line)
    return 1 if any("cannot plan" in f for f in failures) else 0


def _cmd_load(argv: list[str]) -> int:
    from loadtests.cli import main as load_main

    return load_main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenweir", description="Tokenweir LLM inference gateway")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="start or join Ray, deploy, wait until ready, serve until Ctrl-C")
    s.add_argument("--config", help="YAML config (default: the embedded deploy/local.yaml)")
    s.add_argument("--ready-timeout-s", type=float, default=900.0)
    s.set_defaults(fn=_cmd_serve)

    st = sub.add_parser("status", help="pools, replicas, their GPU types and readiness")
    st.add_argument("--config")
    st.add_argument("--url", help="gateway base URL (default: from the config)")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=_cmd_status)

    m = sub.add_parser("models", help="model utilities")
    msub = m.add_subparsers(dest="models_cmd", required=True)
    bt = msub.add_parser("build-tiny", help="build (or find) the deterministic tiny test model")
    bt.add_argument("--out", default=None)
    bt.set_defaults(fn=_cmd_build_tiny)

    pl = sub.add_parser("plan", help="the hardware plan of every GPU pool: engine settings and predictions")
    pl.add_argument("--config")
    pl.set_defaults(fn=_cmd_plan)

    from serving.cli.tenancy_cmds import add_parsers

    add_parsers(sub)

    sub.add_parser("load", help="run the load-test harness (see `tokenweir load --help`)", add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["load"]:
        return _cmd_load(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except ConfigError as e:
        print(f"tokenweir: {e}", file=sys.stderr)
        return 2
