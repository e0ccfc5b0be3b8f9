"""``tokenweir tenants | projects | grants | keys | usage``: organization administration from the
command line (a tenant is an organization; its projects hold keys, caps and limits).

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
from serving.tenancy import (
    DEFAULT_PROJECT,
    GrantCreate,
    ProjectCreate,
    ProjectUpdate,
    TenancyBackend,
    TenantCreate,
    TenantLimits,
    TenantUpdate,
    TopUp,
    UsageQuery,
)

__all__ = ["ConfigOpt", "UrlOpt", "grants_app", "keys_app", "projects_app", "tenants_app", "usage_app"]

tenants_app = typer.Typer(
    help="Create, list, show, update tenants; top up credits; set limits.", no_args_is_help=True
)
keys_app = typer.Typer(help="Create, list, revoke API keys.", no_args_is_help=True)
usage_app = typer.Typer(help="Export usage events and reports for billing.", no_args_is_help=True)
projects_app = typer.Typer(
    help="Create, list, show, update an organization's projects.", no_args_is_help=True
)
grants_app = typer.Typer(help="Grant credits (program, start, expiry); list grants.", no_args_is_help=True)

ConfigOpt = Annotated[
    str | None, typer.Option("--config", help="YAML config (default: the embedded deploy/local.yaml).")
]
UrlOpt = Annotated[str | None, typer.Option("--url", help="Gateway base URL (default: from the config).")]
TenantArg = Annotated[str, typer.Argument(help="Tenant (organization) id.")]
ProjectArg = Annotated[str, typer.Argument(help="Project id within the organization.")]
AfterOpt = Annotated[str | None, typer.Option(help="List after this id (the previous page's next_after).")]
LimitOpt = Annotated[int, typer.Option(help="Page size (1-1000).", min=1, max=1000)]
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
    else:  # a PostgreSQL ledger held by a live writer is refused at once, not waited for
        async with local_ledger(mcfg.model_copy(update={"postgres_lock_wait_s": 0.0})) as client:
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
    if isinstance(obj, tuple):
        obj = obj[0]
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
def list_tenants(
    after: AfterOpt = None, limit: LimitOpt = 100, config: ConfigOpt = None, url: UrlOpt = None
) -> None:
    """A page of organizations, with balance and limits."""
    _show(config, url, lambda b: b.list_tenants(after, limit))


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


@tenants_app.command("figures")
def figures(tenant_id: TenantArg, config: ConfigOpt = None, url: UrlOpt = None) -> None:
    """One organization's live figures (balance, reserved, charged, refusals, per project)."""
    _show(config, url, lambda b: b.tenant_figures(tenant_id))


def _cap(credit_cap: float | None) -> dict[str, Any]:
    return {} if credit_cap is None else {"credit_cap": credit_cap}


@projects_app.command("create")
def project_create(
    tenant_id: TenantArg,
    project_id: ProjectArg,
    name: Annotated[str, typer.Option(help="Human-readable name.")] = "",
    weight: Annotated[float, typer.Option(help="Share of the organization's part under contention.")] = 1.0,
    credit_cap: Annotated[float | None, typer.Option(help="Most credits per cap period.")] = None,
    cap_period: Annotated[
        Literal["lifetime", "daily", "monthly"], typer.Option(help="When the cap resets.")
    ] = "lifetime",
    models: ModelsOpt = None,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    max_concurrency: ConcurrencyOpt = None,
    max_tokens_per_request: MaxTokensOpt = None,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Create a project in an organization; prints it."""
    limits = _limits(rpm, tpm, max_concurrency, max_tokens_per_request) or TenantLimits()
    with _input_errors():
        spec = ProjectCreate(
            project_id=project_id, name=name, weight=weight, cap_period=cap_period, limits=limits,
            allowed_models=models.split(",") if models else None, **_cap(credit_cap),
        )  # fmt: skip
    _show(config, url, lambda b: b.create_project(tenant_id, spec))


@projects_app.command("list")
def project_list(
    tenant_id: TenantArg,
    after: AfterOpt = None,
    limit: LimitOpt = 100,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """A page of an organization's projects."""
    _show(config, url, lambda b: b.list_projects(tenant_id, after, limit))


@projects_app.command("show")
def project_show(
    tenant_id: TenantArg, project_id: ProjectArg, config: ConfigOpt = None, url: UrlOpt = None
) -> None:
    """One project: cap, spending this period, limits."""
    _show(config, url, lambda b: b.get_project(tenant_id, project_id))


@projects_app.command("update")
def project_update(
    tenant_id: TenantArg,
    project_id: ProjectArg,
    name: Annotated[str | None, typer.Option(help="New name.")] = None,
    weight: Annotated[float | None, typer.Option(help="New share.")] = None,
    credit_cap: Annotated[float | None, typer.Option(help="New credit cap.")] = None,
    no_cap: Annotated[bool, typer.Option("--no-cap", help="Remove the credit cap.")] = False,
    cap_period: Annotated[
        Literal["lifetime", "daily", "monthly"] | None, typer.Option(help="When the cap resets.")
    ] = None,
    models: ModelsOpt = None,
    all_models: Annotated[
        bool, typer.Option("--all-models", help="Every model the organization may use.")
    ] = False,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    max_concurrency: ConcurrencyOpt = None,
    max_tokens_per_request: MaxTokensOpt = None,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Change the fields given; limits given replace the project's limits as a whole."""
    fields: dict[str, Any] = {
        k: v for k, v in (("name", name), ("weight", weight), ("cap_period", cap_period)) if v is not None
    }
    fields |= _cap(credit_cap)
    if no_cap:
        fields["remove_credit_cap"] = True
    if models:
        fields["allowed_models"] = models.split(",")
    if all_models:
        fields["allow_all_models"] = True
    if (lim := _limits(rpm, tpm, max_concurrency, max_tokens_per_request)) is not None:
        fields["limits"] = lim
    with _input_errors():
        change = ProjectUpdate(**fields)
    _show(config, url, lambda b: b.update_project(tenant_id, project_id, change))


@grants_app.command("create")
def grant_create(
    tenant_id: TenantArg,
    grant_id: Annotated[str, typer.Argument(help="Your id for the grant (a retry with it is a no-op).")],
    credits: Annotated[float, typer.Argument(help="Credits granted.")],
    program: Annotated[str, typer.Option(help="Credit program (innovation-lab, partnership, paid-plan...).")],
    starts: Annotated[
        str | None, typer.Option(help="Usable from (unix seconds or ISO date/time; default now).")
    ] = None,
    expires: Annotated[
        str | None, typer.Option(help="Written off at (unix seconds or ISO date/time).")
    ] = None,
    note: Annotated[str, typer.Option(help="Kept with the grant.")] = "",
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Grant credits to an organization (platform admin only)."""
    with _input_errors():
        spec = GrantCreate(
            grant_id=grant_id,
            credits=credits,
            program=program,
            starts_at=_ts(starts),
            expires_at=_ts(expires),
            note=note,
        )
    _show(config, url, lambda b: b.create_grant(tenant_id, spec))


@grants_app.command("list")
def grant_list(tenant_id: TenantArg, config: ConfigOpt = None, url: UrlOpt = None) -> None:
    """An organization's grants, soonest expiry first: remaining, reserved, written off."""
    _show(config, url, lambda b: b.list_grants(tenant_id))


@keys_app.command("create")
def key_create(
    tenant_id: TenantArg,
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    project: Annotated[str, typer.Option(help="The project whose requests the key makes.")] = DEFAULT_PROJECT,
    org_admin: Annotated[
        bool,
        typer.Option("--org-admin", help="An organization admin key (admin API on this organization only)."),
    ] = False,
    key_only: Annotated[
        bool, typer.Option("--key-only", help="Print only the key on stdout (for scripts).")
    ] = False,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Create an API key for a project (or an organization admin key); the key is shown once (only
    its hash is kept)."""
    created = _run(
        config, url, lambda b: b.create_key(tenant_id, name, project, "admin" if org_admin else "member")
    )
    if key_only:
        print(created.api_key)
        return
    print(f"API key (shown once): {created.api_key}", file=sys.stderr)
    _print(created)


@keys_app.command("list")
def key_list(
    tenant_id: TenantArg,
    project: Annotated[str | None, typer.Option(help="Only this project's keys.")] = None,
    after: AfterOpt = None,
    limit: LimitOpt = 100,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """A page of an organization's keys (ids and prefixes, never the keys)."""
    _show(config, url, lambda b: b.list_keys(tenant_id, project, after, limit))


@keys_app.command("revoke")
def key_revoke(
    key_id: Annotated[str, typer.Argument(help="Key id (key_...).")],
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Revoke a key at once."""
    _show(config, url, lambda b: b.revoke_key(key_id))


def _write_stream(
    config: str | None, url: str | None, make: Callable[[TenancyBackend], Any], out: str | None
) -> None:
    """Write an export's chunks as they arrive (to ``out`` or stdout)."""

    async def go(b: TenancyBackend) -> None:
        sink = open(out, "w") if out else sys.stdout  # noqa: SIM115 - closed below when a file
        try:
            async for chunk in make(b):
                sink.write(chunk)
            if not out:
                sink.write("\n")
        finally:
            if out:
                sink.close()

    _run(config, url, go)
    if out:
        print(f"wrote {out}", file=sys.stderr)


@usage_app.command("export")
def export(
    tenant: Annotated[str | None, typer.Option(help="One organization (default: all).")] = None,
    project: Annotated[str | None, typer.Option(help="One project (needs --tenant).")] = None,
    model: Annotated[str | None, typer.Option(help="One model.")] = None,
    since: Annotated[str | None, typer.Option(help="Unix seconds or ISO date/time.")] = None,
    until: Annotated[str | None, typer.Option(help="Unix seconds or ISO date/time.")] = None,
    fmt: Annotated[Literal["csv", "json", "jsonl"], typer.Option("--format", help="Output format.")] = "csv",
    out: Annotated[str | None, typer.Option(help="File to write (default: stdout).")] = None,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Export usage events for billing, streamed page by page."""
    with _input_errors():
        q = UsageQuery(tenant_id=tenant, project_id=project, model=model, since=_ts(since), until=_ts(until))
    _write_stream(config, url, lambda b: b.export_usage(q, fmt), out)


@usage_app.command("report")
def report(
    group_by: Annotated[
        str, typer.Option(help="Comma-separated of tenant_id,project_id,model,day.")
    ] = "tenant_id,project_id,model,day",
    tenant: Annotated[str | None, typer.Option(help="One organization (default: all).")] = None,
    project: Annotated[str | None, typer.Option(help="One project (needs --tenant).")] = None,
    model: Annotated[str | None, typer.Option(help="One model.")] = None,
    since: Annotated[str | None, typer.Option(help="From this UTC day (unix seconds or ISO date).")] = None,
    until: Annotated[str | None, typer.Option(help="Up to this UTC day (unix seconds or ISO date).")] = None,
    fmt: Annotated[Literal["csv", "json", "jsonl"], typer.Option("--format", help="Output format.")] = "csv",
    out: Annotated[str | None, typer.Option(help="File to write (default: stdout).")] = None,
    config: ConfigOpt = None,
    url: UrlOpt = None,
) -> None:
    """Requests, tokens and credits summed by organization, project, model and day (from the daily
    roll-up, which outlives the events' retention)."""
    with _input_errors():
        q = UsageQuery(
            tenant_id=tenant, project_id=project, model=model, since=_ts(since), until=_ts(until),
            group_by=tuple(group_by.split(",")),  # type: ignore[arg-type]
        )  # fmt: skip
    _write_stream(config, url, lambda b: b.usage_report(q, fmt), out)
