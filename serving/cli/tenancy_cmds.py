"""``tokenweir tenants | keys | usage``: tenant administration from the command line.

With the gateway up, commands go through its admin API (``/admin/v1``) with the admin key; with it
down, they open the ledger file in-process (the ledger locks its file, so both cannot write at once).
The admin key comes from ``$TOKENWEIR_ADMIN_KEY`` or ``<state_dir>/admin_key``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from serving.config import load_config
from serving.errors import APIError, validation_message
from serving.tenancy import TenancyBackend, TenantCreate, TenantLimits, TenantUpdate, TopUp


@asynccontextmanager
async def _backend(args: argparse.Namespace) -> AsyncIterator[TenancyBackend]:
    from serving.metering import local_ledger
    from serving.tenancy import AdminHttpBackend

    cfg = load_config(args.config)
    mcfg = cfg.metering_config()
    url = args.url or f"http://{cfg.gateway.host}:{cfg.gateway.port}"
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


def _limits(args: argparse.Namespace) -> TenantLimits | None:
    vals = {k: getattr(args, k) for k in ("rpm", "tpm", "max_concurrency", "max_tokens_per_request")}
    return TenantLimits(**vals) if any(v is not None for v in vals.values()) else None


def _ts(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return datetime.fromisoformat(text).timestamp()


def _print(obj: Any) -> None:
    if isinstance(obj, list):
        obj = [o.model_dump(mode="json") if hasattr(o, "model_dump") else o for o in obj]
    elif hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    print(json.dumps(obj, indent=2))


async def _run(args: argparse.Namespace) -> None:
    async with _backend(args) as b:
        await args.op(b, args)


def _op(fn: Callable[[TenancyBackend, argparse.Namespace], Awaitable[Any]]) -> Callable[..., Any]:
    async def wrapped(b: TenancyBackend, args: argparse.Namespace) -> None:
        result = await fn(b, args)
        if result is not None:
            _print(result)

    return wrapped


@_op
async def _create(b: TenancyBackend, a: argparse.Namespace) -> Any:
    models = a.models.split(",") if a.models else None
    spec = TenantCreate(
        tenant_id=a.id,
        name=a.name,
        credits=a.credits,
        weight=a.weight,
        allowed_models=models,
        limits=_limits(a) or TenantLimits(),
    )
    return await b.create_tenant(spec)


@_op
async def _list(b: TenancyBackend, a: argparse.Namespace) -> Any:
    return await b.list_tenants()


@_op
async def _show(b: TenancyBackend, a: argparse.Namespace) -> Any:
    return await b.get_tenant(a.tenant_id)


@_op
async def _update(b: TenancyBackend, a: argparse.Namespace) -> Any:
    fields: dict[str, Any] = {}
    if a.name:
        fields["name"] = a.name
    if a.weight is not None:
        fields["weight"] = a.weight
    if a.models:
        fields["allowed_models"] = a.models.split(",")
    if a.all_models:
        fields["allow_all_models"] = True
    if (lim := _limits(a)) is not None:
        fields["limits"] = lim
    return await b.update_tenant(a.tenant_id, TenantUpdate(**fields))


@_op
async def _top_up(b: TenancyBackend, a: argparse.Namespace) -> Any:
    return await b.top_up(a.tenant_id, TopUp(credits=a.credits, note=a.note))


@_op
async def _key_create(b: TenancyBackend, a: argparse.Namespace) -> Any:
    created = await b.create_key(a.tenant_id, a.name)
    print(f"API key (shown once): {created.api_key}", file=sys.stderr)
    return created


@_op
async def _key_list(b: TenancyBackend, a: argparse.Namespace) -> Any:
    return await b.list_keys(a.tenant_id)


@_op
async def _key_revoke(b: TenancyBackend, a: argparse.Namespace) -> Any:
    return await b.revoke_key(a.key_id)


async def _export(b: TenancyBackend, a: argparse.Namespace) -> None:
    text = await b.export_usage(a.tenant, _ts(a.since), _ts(a.until), a.format)
    if a.out:
        Path(a.out).write_text(text)
        print(f"wrote {a.out}", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: deploy/local.yaml)")
    p.add_argument("--url", help="gateway base URL (default: from the config)")


def _limit_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rpm", type=int, help="requests per minute")
    p.add_argument("--tpm", type=int, help="tokens per minute")
    p.add_argument("--max-concurrency", type=int, help="concurrent requests")
    p.add_argument("--max-tokens-per-request", type=int, help="cap on a request's max_tokens")


def add_parsers(sub: Any) -> None:
    """Register ``tenants``, ``keys`` and ``usage`` on the top-level parser."""
    t = sub.add_parser("tenants", help="create, list, show, update tenants; top up credits; set limits")
    ts = t.add_subparsers(dest="tenants_cmd", required=True)
    c = ts.add_parser("create")
    c.add_argument("name")
    c.add_argument("--id", help="tenant id (default: generated)")
    c.add_argument("--credits", type=float, default=0.0)
    c.add_argument("--weight", type=float, default=1.0, help="share under contention")
    c.add_argument("--models", help="comma-separated allowed models (default: all)")
    _limit_flags(c)
    c.set_defaults(op=_create)
    ts.add_parser("list").set_defaults(op=_list)
    s = ts.add_parser("show")
    s.add_argument("tenant_id")
    s.set_defaults(op=_show)
    u = ts.add_parser("update")
    u.add_argument("tenant_id")
    u.add_argument("--name")
    u.add_argument("--weight", type=float)
    u.add_argument("--models")
    u.add_argument("--all-models", action="store_true")
    _limit_flags(u)
    u.set_defaults(op=_update)
    tu = ts.add_parser("top-up")
    tu.add_argument("tenant_id")
    tu.add_argument("credits", type=float)
    tu.add_argument("--note", default="")
    tu.set_defaults(op=_top_up)
    for p in ts.choices.values():
        _common(p)

    k = sub.add_parser("keys", help="create, list, revoke API keys")
    ks = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ks.add_parser("create")
    kc.add_argument("tenant_id")
    kc.add_argument("--name", default="")
    kc.set_defaults(op=_key_create)
    kl = ks.add_parser("list")
    kl.add_argument("tenant_id")
    kl.set_defaults(op=_key_list)
    kr = ks.add_parser("revoke")
    kr.add_argument("key_id")
    kr.set_defaults(op=_key_revoke)
    for p in ks.choices.values():
        _common(p)

    us = sub.add_parser("usage", help="export usage events for billing")
    uss = us.add_subparsers(dest="usage_cmd", required=True)
    e = uss.add_parser("export")
    e.add_argument("--tenant", help="one tenant (default: all)")
    e.add_argument("--since", help="unix seconds or ISO date/time")
    e.add_argument("--until", help="unix seconds or ISO date/time")
    e.add_argument("--format", choices=["csv", "json"], default="csv")
    e.add_argument("--out", help="file to write (default: stdout)")
    _common(e)
    e.set_defaults(op=_export)
    for parser in (t, k, us):
        parser.set_defaults(fn=run)


def run(args: argparse.Namespace) -> int:
    """Run a tenancy command; errors print a message and exit 1."""
    from pydantic import ValidationError

    try:
        asyncio.run(_run(args))
    except APIError as e:
        print(f"tokenweir: {e}", file=sys.stderr)
        return 1
    except ValidationError as e:
        print(f"tokenweir: {validation_message(e.errors()[0], show_input=True)[0]}", file=sys.stderr)
        return 2
    return 0
