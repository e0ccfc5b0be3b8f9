"""``tokenweir tenants | keys | usage``: tenant administration from the command line.

With the gateway up, commands go through its admin API (``/admin/v1``) with the admin key; with it
down, they open the ledger file in-process (the ledger locks its file, so both cannot write at once).
The admin key comes from ``$TOKENWEIR_ADMIN_KEY`` or ``<state_dir>/admin_key``. Results print as
JSON on stdout (scripts read them); a new key is also shown on stderr. Exit codes: 1 for a refusal
of the ledger (unknown tenant, conflict), 2 for invalid input.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import typer
from pydantic import ValidationError

from serving.cli.runtime import gateway_url
from serving.config import load_config
from serving.errors import APIError, validation_message
from serving.tenancy import TenancyBackend, TenantCreate, TenantLimits, TenantUpdate, TopUp

__all__ = ["ConfigOpt", "UrlOpt", "keys_app", "tenants_app", "usage_app"]

tenants_app = typer.Typer(
    help="Create, list, show, update tenants; top up credits; set limits.", no_args_is_help=True
)
keys_app = typer.Typer(help="Create, list, revoke API keys.", no_args_is_help=True)
usage_app = typer.Typer(help="Export usage events for billing.", no_args_is_help=True)

ConfigOpt = Annotated[
    str | None, typer.Option("--config", help="YAML config (default: the embedded deploy/local.yaml).")
]
UrlOpt = Annotated[str | None, typer.Option("--url", help="Gateway base URL (default: from the config).")]
TenantArg = Annotated[str, typer.Argument(help="Tenant id.")]
RpmOpt = Annotated[int | None, typer.Option(help="Requests per minute.")]
TpmOpt = Annotated[int | None, typer.Option(help="Tokens per minute.")]
ConcurrencyOpt = Annotated[int | None, typer.Option(help="Concurrent requests.")]
MaxTokensOpt = Annotated[int | None, typer.Option(help="Cap on a request's max_tokens.")]
ModelsOpt = Annotated[str | None, typer.Option(help="Comma-separated allowed models (default: all).")]


@asynccontextmanager
async def _backend(config: str | None, url: str | None) -> AsyncIterator[TenancyBackend]:
    from serving.metering import local_ledger
    from serving.tenancy import AdminHttpBackend

    cfg = load_config(config)
    mcfg = cfg.metering_config()
    url = gateway_url(cfg, url)
    up = False
    with suppress(httpx.HTTPError):
        up = httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    if up:
        key_file = Path(str(mcfg.state_dir)) / "admin_key"
        key = mcfg.admin_key or os.environ.get(mcfg.admin_key_env)
        if not key and key_file.exists():
            key = key_file.read_text().strip()
        if not key:
            raise SystemExit(f"tokenweir: no admin key: set ${mcfg.admin_key_env} (or {key_file})")
        http = AdminHttpBackend(url, key)
        try:
            yield http
        finally:
            await http.aclose()
    else:
        async with local_ledger(mcfg) as client:
            yield client


@contextmanager
def _input_errors() -> Iterator[None]:
    """Turn the ledger's refusals (exit 1) and invalid input (exit 2) into a message on stderr."""
    try:
        yield
    except APIError as e:
        print(f"tokenweir: {e}", file=sys.stderr)
        raise typer.Exit(1) from e
    except ValidationError as e:
        print(f"tokenweir: {validation_message(e.errors()[0], show_input=True)[0]}", file=sys.stderr)
        raise typer.Exit(2) from e


def _print(obj: Any) -> None:
    if isinstance(obj, list):
        obj = [o.model_dump(mode="json") if hasattr(o, "model_dump") else o for o in obj]
    elif hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    print(json.dumps(obj, indent=2))


def _run(config: str | None, url: str | None, op: Callable[[TenancyBackend], Awaitable[Any]]) -> Any:
    """Open the backend (admin API or ledger file), run ``op`` on it, return its result."""

    async def go() -> Any:
        async with _backend(config, url) as b:
            return await op(b)

    with _input_errors():
        return asyncio.run(go())


def _show(config: str | None, url: str | None, op: Callable[[TenancyBackend], Awaitable[Any]]) -> None:
    _print(_run(config, url, op))


def _limits(
    rpm: int | None, tpm: int | None, max_concurrency: int | None, max_tokens_per_request: int | None
) -> TenantLimits | None:
    vals = {
        "rpm": rpm,
        "tpm": tpm,
        "max_concurrency": max_concurrency,
        "max_tokens_per_request": max_tokens_per_request,
    }
    with _input_errors():
        return TenantLimits(**vals) if any(v is not None for v in vals.values()) else None


def _ts(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        try:
            return datetime.fromisoformat(text).timestamp()
        except ValueError as e:
            raise typer.BadParameter(f"{text!r} is neither unix seconds nor an ISO date/time") from e


@tenants_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Human-readable name.")],
    tenant_id: Annotated[str | None, typer.Option("--id", help="Tenant id (default: generated).")] = None,
    credits: Annotated[float, typer.Option(help="Initial credit balance.")] = 0.0,
    weight: Annotated[float, typer.Option(help="Share under contention.")] = 1.0,
    models: ModelsOpt = None,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    max_concurrency: ConcurrencyOpt = None,
    max_tokens_per_request: MaxTokensOpt = None,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Create a tenant; prints it."""
    limits = _limits(rpm, tpm, max_concurrency, max_tokens_per_request) or TenantLimits()
    with _input_errors():
        spec = TenantCreate(
            tenant_id=tenant_id,
            name=name,
            credits=credits,
            weight=weight,
            allowed_models=models.split(",") if models else None,
            limits=limits,
        )
    _show(config, url, lambda b: b.create_tenant(spec))


@tenants_app.command("list")
def list_tenants(config: ConfigOpt = None, url: UrlOpt = None) -> None:
    """Every tenant, with balance and limits."""
    _show(config, url, lambda b: b.list_tenants())


@tenants_app.command("show")
def show(tenant_id: TenantArg, config: ConfigOpt = None, url: UrlOpt = None) -> None:
    """One tenant, with balance and limits."""
    _show(config, url, lambda b: b.get_tenant(tenant_id))


@tenants_app.command("update")
def update(
    tenant_id: TenantArg,
    name: Annotated[str | None, typer.Option(help="New name.")] = None,
    weight: Annotated[float | None, typer.Option(help="New share under contention.")] = None,
    models: Annotated[str | None, typer.Option(help="Comma-separated allowed models.")] = None,
    all_models: Annotated[bool, typer.Option("--all-models", help="Allow every model.")] = False,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    max_concurrency: ConcurrencyOpt = None,
    max_tokens_per_request: MaxTokensOpt = None,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Change the fields given; limits given replace the tenant's limits as a whole."""
    fields: dict[str, Any] = {}
    if name:
        fields["name"] = name
    if weight is not None:
        fields["weight"] = weight
    if models:
        fields["allowed_models"] = models.split(",")
    if all_models:
        fields["allow_all_models"] = True
    if (lim := _limits(rpm, tpm, max_concurrency, max_tokens_per_request)) is not None:
        fields["limits"] = lim
    with _input_errors():
        change = TenantUpdate(**fields)
    _show(config, url, lambda b: b.update_tenant(tenant_id, change))


@tenants_app.command("top-up")
def top_up(
    tenant_id: TenantArg,
    credits: Annotated[float, typer.Argument(help="Credits to add.")],
    note: Annotated[str, typer.Option(help="Kept with the grant (invoice number, reason).")] = "",
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Add credits to a tenant's balance."""
    with _input_errors():
        grant = TopUp(credits=credits, note=note)
    _show(config, url, lambda b: b.top_up(tenant_id, grant))


@keys_app.command("create")
def key_create(
    tenant_id: TenantArg,
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    key_only: Annotated[
        bool, typer.Option("--key-only", help="Print only the key on stdout (for scripts).")
    ] = False,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Create an API key for a tenant; the key is shown once (only its hash is kept)."""
    created = _run(config, url, lambda b: b.create_key(tenant_id, name))
    if key_only:
        print(created.api_key)
        return
    print(f"API key (shown once): {created.api_key}", file=sys.stderr)
    _print(created)


@keys_app.command("list")
def key_list(tenant_id: TenantArg, config: ConfigOpt = None, url: UrlOpt = None) -> None:
    """A tenant's keys (ids and prefixes, never the keys)."""
    _show(config, url, lambda b: b.list_keys(tenant_id))


@keys_app.command("revoke")
def key_revoke(
    key_id: Annotated[str, typer.Argument(help="Key id (key_...).")],
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Revoke a key at once."""
    _show(config, url, lambda b: b.revoke_key(key_id))


@usage_app.command("export")
def export(
    tenant: Annotated[str | None, typer.Option(help="One tenant (default: all).")] = None,
    since: Annotated[str | None, typer.Option(help="Unix seconds or ISO date/time.")] = None,
    until: Annotated[str | None, typer.Option(help="Unix seconds or ISO date/time.")] = None,
    fmt: Annotated[Literal["csv", "json"], typer.Option("--format", help="Output format.")] = "csv",
    out: Annotated[str | None, typer.Option(help="File to write (default: stdout).")] = None,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Export usage events for billing."""
    start, end = _ts(since), _ts(until)
    text = _run(config, url, lambda b: b.export_usage(tenant, start, end, fmt))
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
