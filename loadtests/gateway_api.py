"""The two gateway APIs the harness uses besides inference: tenant provisioning and the usage meter.

Admin (only when a scenario has tenants without keys and an ``admin`` block):
``POST {admin}/admin/v1/tenants`` with ``{"name": ..., **create_body}`` → ``{"tenant_id": ...}`` (or
``id``), then ``POST {admin}/admin/v1/tenants/{id}/keys`` with ``{"name": "loadtest"}`` → ``{"api_key": ...}``
(or ``key``), both with
``Authorization: Bearer <admin key>``.

Meter: ``GET {target}/v1/usage`` with each distinct key, before and after the run. The gateway meters
a key (its tenant), not a scenario tenant: scenario tenants that share a key are checked as one group
against that key's charge (the sum of their client-seen tokens). Accepted bodies:
token fields (``prompt_tokens``, ``completion_tokens``, ``total_tokens``) at the top level, or under
``usage``, ``totals`` or ``data`` (an object, or a list of rows that are summed: the gateway's
``UsageSummary.usage`` is a list of per-day, per-model rows). A 404, an error or an unreadable body makes
the check "unavailable", never a failed run.

Prefix cache (when the scenario names ``metrics_url``): ``GET`` that Prometheus page before and
after the run, summing ``vllm:prefix_cache_queries_total`` and ``vllm:prefix_cache_hits_total`` over
every series (each engine replica's): the server-side hit rate is the ratio of the increases.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import httpx

from loadtests.client import RequestRecord
from loadtests.scenario import Scenario, ScenarioError

__all__ = [
    "MeterReading",
    "MeterRow",
    "PrefixCacheReading",
    "key_groups",
    "meter_rows",
    "provision_keys",
    "read_prefix_cache",
    "read_usage",
]

_TIMEOUT_S = 10.0
_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


def provision_keys(scenario: Scenario) -> dict[str, str]:
    """Tenant name → key; tenants without ``api_key`` are created through the admin API."""
    keys = {t.name: t.api_key for t in scenario.tenants if t.api_key is not None}
    missing = [t for t in scenario.tenants if t.api_key is None]
    if not missing:
        return keys
    assert scenario.admin is not None
    base = (scenario.admin.base_url or scenario.target_url).rstrip("/")
    headers = {"Authorization": f"Bearer {scenario.admin.api_key}"}
    with httpx.Client(timeout=_TIMEOUT_S, headers=headers) as client:
        for t in missing:
            try:
                r = client.post(f"{base}/admin/v1/tenants", json={"name": t.name, **t.create_body})
                r.raise_for_status()
                tid = r.json().get("tenant_id") or r.json().get("id")
                r = client.post(f"{base}/admin/v1/tenants/{tid}/keys", json={"name": "loadtest"})
                r.raise_for_status()
                key = r.json().get("api_key") or r.json().get("key")
            except (httpx.HTTPError, ValueError, AttributeError) as e:
                raise ScenarioError(
                    f"creating tenant {t.name!r} through the admin API at {base} failed: {e}"
                ) from e
            if not key:
                raise ScenarioError(f"admin API returned no key for tenant {t.name!r}")
            keys[t.name] = str(key)
    return keys


@dataclass(frozen=True, slots=True)
class MeterReading:
    """A tenant's usage counters as the gateway reports them (None: field absent)."""

    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None


def _pick(obj: dict[str, Any]) -> dict[str, int] | None:
    found = {f: int(obj[f]) for f in _FIELDS if isinstance(obj.get(f), int | float)}
    return found or None


def _sum_rows(rows: list[Any]) -> dict[str, int] | None:
    if not rows:
        return {f: 0 for f in _FIELDS}  # a tenant with no usage yet: every counter is zero
    picked = [r for r in (_pick(x) for x in rows if isinstance(x, dict)) if r]
    if not picked:
        return None
    return {f: sum(r.get(f, 0) for r in picked) for f in _FIELDS if any(f in r for r in picked)}


def _parse(body: Any) -> MeterReading | None:
    if not isinstance(body, dict):
        return None
    found = _pick(body)
    for key in ("usage", "totals", "data"):
        if found is None and isinstance(body.get(key), dict):
            found = _pick(body[key])
        elif found is None and isinstance(body.get(key), list):
            found = _sum_rows(body[key])
    if not found:
        return None
    p, c = found.get("prompt_tokens"), found.get("completion_tokens")
    total = found.get("total_tokens", p + c if p is not None and c is not None else None)
    return MeterReading(p, c, total)


def read_usage(base_url: str, keys: Iterable[str]) -> tuple[dict[str, MeterReading] | None, str | None]:
    """Each distinct key's counters, or ``(None, reason)`` when the meter cannot be read."""
    out: dict[str, MeterReading] = {}
    with httpx.Client(timeout=_TIMEOUT_S) as client:
        for key in dict.fromkeys(keys):
            try:
                r = client.get(f"{base_url.rstrip('/')}/v1/usage", headers={"Authorization": f"Bearer {key}"})
            except httpx.HTTPError as e:
                return None, f"GET /v1/usage failed: {type(e).__name__}"
            if r.status_code != 200:
                return None, f"GET /v1/usage answered {r.status_code}"
            try:
                reading = _parse(r.json())
            except ValueError:
                reading = None
            if reading is None:
                return None, "GET /v1/usage body has no token counters"
            out[key] = reading
    return out, None


def key_groups(keys: dict[str, str]) -> dict[str, list[str]]:
    """Key → the scenario tenants that send with it (in scenario order)."""
    groups: dict[str, list[str]] = {}
    for tenant, key in keys.items():
        groups.setdefault(key, []).append(tenant)
    return groups


@dataclass(frozen=True, slots=True)
class MeterRow:
    """Client-seen against gateway-charged tokens for one key, over the run."""

    tenant: str
    """The scenario tenant, or the group sharing one key (``a + b``)."""
    tenants: tuple[str, ...]
    """The scenario tenants behind the key."""
    client_tokens: int
    """Prompt + completion tokens from ``usage`` in the streams the client received, summed over ``tenants``."""
    gateway_tokens: int | None
    """Increase of the gateway's total for the key over the run."""
    diff_tokens: int | None
    requests_without_usage: int
    """Requests whose stream ended without a usage chunk (aborted, refused): not in ``client_tokens``."""


def meter_rows(
    records: list[RequestRecord],
    keys: dict[str, str],
    before: dict[str, MeterReading],
    after: dict[str, MeterReading],
) -> list[MeterRow]:
    """Per-key comparison of the client's token counts with the gateway's meter (``keys``: tenant →
    key; ``before``/``after``: key → reading); tenants that share a key are summed."""
    rows = []
    for key, tenants in key_groups(keys).items():
        if key not in after:
            continue
        mine = [r for r in records if r.tenant in tenants]
        client = sum((r.prompt_tokens or 0) + (r.completion_tokens or 0) for r in mine)
        no_usage = sum(r.completion_tokens is None for r in mine)
        a, b = after[key].total_tokens, before.get(key, MeterReading(0, 0, 0)).total_tokens
        gateway = a - (b or 0) if a is not None else None
        diff = None if gateway is None else gateway - client
        rows.append(MeterRow(" + ".join(tenants), tuple(tenants), client, gateway, diff, no_usage))
    return rows


@dataclass(frozen=True, slots=True)
class PrefixCacheReading:
    """The engines' prefix-cache counters, summed over their series (tokens)."""

    queries: float
    hits: float


def read_prefix_cache(metrics_url: str) -> tuple[PrefixCacheReading | None, str | None]:
    """(reading, None), or (None, why) when the page is unreachable or has no such counters."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        r = httpx.get(metrics_url, timeout=_TIMEOUT_S)
        r.raise_for_status()
        sums = {"vllm:prefix_cache_queries_total": 0.0, "vllm:prefix_cache_hits_total": 0.0}
        seen = False
        for fam in text_string_to_metric_families(r.text):
            for x in fam.samples:
                if x.name in sums:
                    seen = True
                    sums[x.name] += x.value
    except (httpx.HTTPError, ValueError) as e:
        return None, f"{metrics_url}: {e}"
    if not seen:
        return None, f"{metrics_url} has no vllm:prefix_cache_* counters"
    return PrefixCacheReading(
        sums["vllm:prefix_cache_queries_total"], sums["vllm:prefix_cache_hits_total"]
    ), None
