"""The ``tokenweir`` command: ``serve``, ``status``, ``plan``, ``models build-tiny``, the tenancy
commands (``serving.cli._tenancy``), ``deploy render`` (``serving.cli._deploy``), ``ledger
migrate-to-postgres`` (``serving.cli._ledger``) and ``load``.

Built on typer; tables are rich tables. Commands import what they need when they run, so
``tokenweir --help`` and the tenancy commands do not pay for Ray Serve or vLLM.

``load`` is not part of the gateway: the load-test harness registers it as the entry point ``load``
in the group ``tokenweir.commands`` (a ``main(argv, prog_name) -> int``), and is installed with the
``load`` extra. The gateway never imports it; without it ``tokenweir load`` says how to get it.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from serving.cli._deploy import deploy_app
from serving.cli._ledger import ledger_app
from serving.cli._tenancy import ConfigOpt, UrlOpt, grants_app, keys_app, projects_app, tenants_app, usage_app
from serving.config import ConfigError, load_config

app = typer.Typer(
    name="tokenweir",
    help="Tokenweir: an OpenAI-compatible LLM inference gateway with tenant metering, on Ray Serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
models_app = typer.Typer(help="Model utilities.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(tenants_app, name="tenants")
app.add_typer(projects_app, name="projects")
app.add_typer(grants_app, name="grants")
app.add_typer(keys_app, name="keys")
app.add_typer(usage_app, name="usage")
app.add_typer(deploy_app, name="deploy")
app.add_typer(ledger_app, name="ledger")

PLUGIN_GROUP = "tokenweir.commands"
"""Entry-point group of commands that live outside the gateway (the load-test harness's ``load``)."""


def print_table(columns: Sequence[str], rows: Sequence[Sequence[Any]], right_from: int | None = None) -> None:
    """Print ``rows`` under ``columns`` as a rich table; columns from ``right_from`` on are
    right-aligned (numbers). Piped output keeps the table's natural width instead of folding it."""
    console = Console() if sys.stdout.isatty() else Console(width=1000)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for i, name in enumerate(columns):
        right = right_from is not None and i >= right_from
        table.add_column(name, justify="right" if right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*(str(c) for c in row))
    console.print(table)


@app.command()
def serve(
    config: ConfigOpt = None,
    ready_timeout_s: Annotated[
        float, typer.Option(help="How long to wait for every pool to become ready.")
    ] = 900.0,
) -> None:
    """Start or join Ray, deploy, wait until ready, serve until Ctrl-C."""
    from serving.cli import runtime

    cfg = runtime.with_admin_key(load_config(config))
    print(
        f"tokenweir: starting Ray and deploying {len(cfg.pools)} pool(s); the first start of vLLM takes ~1 min"
    )
    runtime.init_ray(cfg)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = runtime.deploy(cfg)
        ready = runtime.wait_ready(url, timeout_s=ready_timeout_s)
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
    finally:
        runtime.shutdown()


def _cluster_view(cfg: Any) -> tuple[dict[str, dict[str, int]], dict[str, Any] | None]:
    """Serve's replica states per deployment and where the ledger actor lives, from a running Ray
    (empty and None when none is reachable)."""
    import dataclasses
    import os

    import ray
    from ray import serve

    from serving.cli.runtime import LOOPBACK_ENV
    from serving.metering import ledger_home

    replicas: dict[str, dict[str, int]] = {}
    ledger: dict[str, Any] | None = None
    try:
        for k, v in LOOPBACK_ENV.items():
            os.environ.setdefault(k, v)
        ray.init(address=cfg.ray.address or "auto", namespace=cfg.ray.namespace, log_to_driver=False)
        for app_status in serve.status().applications.values():
            for name, dep in app_status.deployments.items():
                replicas[name] = {str(k): v for k, v in dep.replica_states.items()}
        if cfg.metering.enabled:
            ledger = dataclasses.asdict(ledger_home(cfg.metering_config(), namespace=cfg.ray.namespace))
    except Exception as e:  # Ray's connection errors have no common base; the table says "0/N" then
        print(f"(Ray not reachable: {type(e).__name__}: {e})", file=sys.stderr)
    return replicas, ledger


def ledger_line(ledger: dict[str, Any] | None, state_dir: str) -> str:
    """One line: where the ledger runs (its Ray node) and what pins it there."""
    if ledger is None:
        return "ledger: unknown (Ray not reachable)"
    where = f"on node {ledger['node_id'][:16]} ({ledger['node_ip']})" if ledger["node_id"] else "on no node"
    pid = f", pid {ledger['pid']}" if ledger["pid"] else ""
    if ledger["node_resource"] is None:  # metering.store: postgres
        return (
            f"ledger: {ledger['state']} {where}{pid}, restarts {ledger['restarts']}; on PostgreSQL (any node)"
        )
    return (
        f"ledger: {ledger['state']} {where}{pid}, restarts {ledger['restarts']}; pinned by "
        f"{ledger['node_resource']}; file under {state_dir} there"
    )


@app.command()
def status(
    config: ConfigOpt = None,
    url: UrlOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Pools, replicas, their GPU types and readiness; where the ledger lives."""
    import httpx

    from serving.cli.runtime import gateway_url

    cfg = load_config(config)
    replicas, ledger = _cluster_view(cfg)
    base = gateway_url(cfg, url)
    try:
        ready = httpx.get(f"{base}/readyz", timeout=10).json()
    except (httpx.HTTPError, ValueError) as e:
        ready = {"error": repr(e)}
    pool_states = ready.get("pools", {}) if isinstance(ready, dict) else {}
    rows = [
        {
            "pool": p.name,
            "model": p.model,
            "gpu": p.accelerator,
            "engine": p.engine,
            "replicas": f"{replicas.get('pool-' + p.name, {}).get('RUNNING', 0)}/{p.replicas}",
            "ready": pool_states.get(p.name, "unknown"),
        }
        for p in cfg.pools
    ]
    if as_json:
        print(json.dumps({"gateway": base, "ledger": ledger, "pools": rows}, indent=2))
        return
    print(f"gateway {base}: {'ready' if ready.get('status') == 'ready' else 'not ready'}")
    if cfg.metering.enabled:
        print(ledger_line(ledger, str(cfg.metering_config().state_dir)))
    cols = ["pool", "model", "gpu", "engine", "replicas", "ready"]
    print_table(cols, [[r[c] for c in cols] for r in rows])


@models_app.command("build-tiny")
def build_tiny(
    out: Annotated[str | None, typer.Option(help="Directory (default: the cache, keyed by content).")] = None,
) -> None:
    """Build (or find) the deterministic tiny test model; prints its directory."""
    from pathlib import Path

    from models.tiny import build_tiny_model

    print(build_tiny_model(Path(out) if out else None))


PLAN_COLUMNS = (
    "pool",
    "gpu",
    "max_num_seqs",
    "max_batched_tok",
    "gpu_mem_util",
    "kv_tokens",
    "tpot_ms",
    "ttft_ms",
    "tok/s",
    "tok/s/price",
)


def plan_row(name: str, p: Any) -> list[str]:
    """One row of the ``plan`` table for the ``EnginePlan`` ``p``."""
    s = p.settings
    return [
        name,
        p.gpu,
        str(s.max_num_seqs),
        str(s.max_num_batched_tokens),
        f"{s.gpu_memory_utilization:.2f}",
        f"{p.kv_capacity_tokens:,}",
        f"{p.predicted_tpot_ms:.1f}",
        f"{p.predicted_ttft_ms:.0f}",
        f"{p.tokens_per_s:,.0f}",
        f"{p.tokens_per_s_per_price:,.0f}",
    ]


@app.command()
def plan(config: ConfigOpt = None) -> None:
    """The hardware plan of every GPU pool: engine settings and predictions."""
    from serving.config import resolve

    deployment = resolve(load_config(config), require_plans=False)
    rows, failures, failed = [], [], False
    for pool in deployment.pools:
        if pool.accelerator == "CPU":
            failures.append(
                f"{pool.name}: CPU pool, no hardware plan (engine settings come from the catalog)"
            )
        elif pool.plan is None:
            failures.append(f"{pool.name}: cannot plan: {pool.plan_error}")
            failed = True
        else:
            rows.append(plan_row(pool.name, pool.plan))
    if rows:
        print_table(PLAN_COLUMNS, rows, right_from=2)
    for line in failures:
        print(line)
    if failed:
        raise typer.Exit(1)


def load_plugin(name: str) -> Callable[..., int] | str:
    """The entry point ``name`` of :data:`PLUGIN_GROUP`, loaded; or why it cannot be."""
    found = entry_points(group=PLUGIN_GROUP, name=name)
    if not found:
        return (
            f"tokenweir {name}: not installed (no {PLUGIN_GROUP!r} entry point {name!r}); "
            "reinstall with the load extra: pip install -e '.[load]'"
        )
    ep = next(iter(found))
    try:
        fn: Callable[..., int] = ep.load()
    except ImportError as e:
        return (
            f"tokenweir {name}: the load-test harness needs the load extra ({e}); "
            "install it with: pip install 'tokenweir[load]'"
        )
    return fn


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def load(ctx: typer.Context) -> None:
    """Run the load-test harness (the load extra; see `tokenweir load --help`)."""
    fn = load_plugin("load")
    if isinstance(fn, str):
        print(fn, file=sys.stderr)
        raise typer.Exit(2)
    raise typer.Exit(fn(list(ctx.args), prog_name="tokenweir load"))


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (2: usage or configuration error)."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="tokenweir", standalone_mode=True)
    except SystemExit as e:
        if isinstance(e.code, str):  # SystemExit("message"): the message, exit code 1
            print(e.code, file=sys.stderr)
            return 1
        return int(e.code or 0)
    except ConfigError as e:
        print(f"tokenweir: {e}", file=sys.stderr)
        return 2
    return 0
