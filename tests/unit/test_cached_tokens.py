"""Cached prompt tokens (issue 17): what the engine found in its prefix cache is reported as OpenAI's
``usage.prompt_tokens_details.cached_tokens``, charged at the model's cached price and recorded in the
usage events and the daily roll-up (both stores; ``GET /v1/usage`` and usage reports sum them); and
prefix caching scoped per organization (vLLM's ``cache_salt``) keeps
one organization's prompts from hitting another's blocks, in the simulated engine and in the router.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator

import httpx
import pytest
from _ledger_stores import LedgerTarget
from fastapi import FastAPI
from pydantic import ValidationError

from serving.api.protocol import ChatCompletionRequest
from serving.engines.base import EngineRequest, SamplingSpec
from serving.engines.sim import FakeClock, SimEngine
from serving.engines.vllm_engine import _prompt
from serving.hardware.catalog import get_gpu
from serving.hardware.perfmodel import ModelArch
from serving.hardware.plan import EngineSettings
from serving.kvcache import organization_cache_salt
from serving.metering import LedgerClient, Meter, PriceConfig
from serving.metering._client import LocalTransport
from serving.metering._core import LedgerCore
from serving.metering._policy import ModelPrice, utc_day
from serving.metering._storage import SCHEMA_VERSION, WriteBatch, export_query
from serving.routing._prefix import PrefixRouter
from serving.tenancy import ProjectCreate, TenantCreate, UsageQuery, hash_api_key, make_tenancy_router

U = 1_000_000
LLAMA8B = ModelArch("llama-8b", 8_030_261_248, 32, 4096, 32, 8, 128, 14336, 128256, 2)


# -- prices -----------------------------------------------------------------------------------------
def test_cached_prompt_tokens_cost_half_by_default_and_never_more_than_uncached() -> None:
    p = PriceConfig(prompt_credits_per_1k_tokens=1000, completion_credits_per_1k_tokens=2000).to_price()
    assert p.prompt_cost(100) == 100 * U
    assert p.prompt_cost(100, cached_tokens=60) == 40 * U + 30 * U
    assert p.prompt_cost(100, cached_tokens=500) == 50 * U  # capped at the prompt
    assert p.prompt_cost(100, cached_tokens=-5) == 100 * U
    assert p.prompt_cost(3, cached_tokens=1) == -(-(2 * 10**9 + 5 * 10**8) // 1000)  # rounded up once
    set_ = PriceConfig(prompt_credits_per_1k_tokens=1000, cached_prompt_credits_per_1k_tokens=100)
    assert set_.to_price().prompt_cost(100, cached_tokens=100) == 10 * U
    free = PriceConfig(cached_prompt_credits_per_1k_tokens=0).to_price()
    assert free.prompt_cost(10, cached_tokens=10) == 0
    with pytest.raises(ValidationError, match="above prompt_credits_per_1k_tokens"):
        PriceConfig(prompt_credits_per_1k_tokens=1, cached_prompt_credits_per_1k_tokens=2)
    assert ModelPrice(1000, 1000, cached_prompt_ucredits_per_1k=5000).cached_rate() == 1000


# -- the ledger -------------------------------------------------------------------------------------
PRICED = {"priced": PriceConfig(prompt_credits_per_1k_tokens=1000, completion_credits_per_1k_tokens=1000)}


@pytest.fixture
async def core(ledger_target: LedgerTarget) -> AsyncIterator[LedgerCore]:
    c = LedgerCore(ledger_target.config(prices=PRICED))
    await c.start()
    yield c
    await c.close()


async def test_a_settlement_charges_cached_tokens_at_their_price_and_records_them(
    core: LedgerCore, ledger_target: LedgerTarget
) -> None:
    client = LedgerClient(LocalTransport(core))
    await client.create_tenant(TenantCreate(tenant_id="acme", name="acme", credits=1000))
    key = (await client.create_key("acme")).api_key
    meter = Meter(client)
    r = await meter.authorize(key, "priced", 200, 10, "with-cache")
    s = await meter.settle(r, 200, 10, "completed", "p", "sim", cached_tokens=128)
    assert s.charged_ucredits == (72 + 64 + 10) * U  # 72 uncached + 128 at half + 10 completion
    r2 = await meter.authorize(key, "priced", 200, 10, "cold")
    assert (await meter.settle(r2, 200, 10)).charged_ucredits == 210 * U
    assert (await client.get_tenant("acme")).credits == pytest.approx(1000 - 146 - 210)
    rows = ledger_target.rows(
        "SELECT request_id, prompt_tokens, cached_tokens, prompt_ucredits FROM usage_events ORDER BY event_id"
    )
    assert rows == [("with-cache", 200, 128, 136 * U), ("cold", 200, 0, 200 * U)]
    lines = [c async for c in client.export_usage(UsageQuery(tenant_id="acme"), "jsonl")]
    events = [json.loads(x) for x in "".join(lines).splitlines()]
    assert [e["cached_tokens"] for e in events] == [128, 0]
    assert await client.audit() == []


async def test_a_schema_2_ledger_gains_the_cached_tokens_column(ledger_target: LedgerTarget) -> None:
    """An older ledger (SQLite file or PostgreSQL database at schema 2) is upgraded in place."""
    c = LedgerCore(ledger_target.config(prices=PRICED))
    await c.start()
    client = LedgerClient(LocalTransport(c))
    await client.create_tenant(TenantCreate(tenant_id="acme", name="acme", credits=100))
    key = (await client.create_key("acme")).api_key
    r = await Meter(client).authorize(key, "priced", 5, 5, "old")
    await Meter(client).settle(r, 5, 5)
    await c.close()
    for sql in (  # back to schema 2's usage_events and usage_daily
        "ALTER TABLE usage_daily DROP COLUMN cached_tokens",
        "ALTER TABLE usage_events DROP COLUMN cached_tokens",
        "DROP INDEX usage_events_tenant",
        "DROP INDEX usage_events_project",
        "CREATE INDEX usage_events_tenant_time ON usage_events(tenant_id, settled_at)",
        "CREATE INDEX usage_events_project_time ON usage_events(tenant_id, project_id, settled_at)",
    ):
        ledger_target.execute(sql)
    if ledger_target.kind == "sqlite":
        ledger_target.execute("PRAGMA user_version = 2")
    else:
        ledger_target.execute("UPDATE ledger_meta SET schema_version = 2")
    assert ledger_target.schema_version() == 2
    c = LedgerCore(ledger_target.config(prices=PRICED))
    await c.start()
    try:
        assert ledger_target.schema_version() == SCHEMA_VERSION == 4
        assert ledger_target.rows("SELECT request_id, cached_tokens FROM usage_events") == [("old", 0)]
        assert ledger_target.rows("SELECT requests, cached_tokens FROM usage_daily") == [(1, 0)]
        if ledger_target.kind == "sqlite":
            # An export page by organization or project is a range of an index in event_id order,
            # not a sort of every event the organization ever had.
            for filters in ({"tenant_id": "acme"}, {"tenant_id": "acme", "project_id": "default"}):
                sql, params = export_query(filters, None, None, 0, 5000, "?")
                plan = ledger_target.rows("EXPLAIN QUERY PLAN " + sql, *params)
                assert not any("TEMP B-TREE" in str(row) for row in plan), plan
                assert any(
                    "usage_events_tenant" in str(row) or "usage_events_project" in str(row) for row in plan
                )
        client = LedgerClient(LocalTransport(c))
        r = await Meter(client).authorize(key, "priced", 5, 5, "new")
        assert (await Meter(client).settle(r, 5, 5, cached_tokens=4)).charged_ucredits == 8 * U
        assert ledger_target.rows("SELECT requests, cached_tokens FROM usage_daily") == [(2, 4)]
        assert await client.audit() == []
    finally:
        await c.close()


# -- the daily roll-up (schema 4) -------------------------------------------------------------------
JAN1 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
DAY = 86_400.0
ADMIN = "platform-admin-key-0123456789"
ROLLUP = (
    "SELECT day, project_id, requests, prompt_tokens, completion_tokens, cached_tokens FROM usage_daily"
    " ORDER BY day, project_id"
)
TWO_DAYS = [  # (day, project, requests, prompt, completion, cached) of _settle_two_days
    ("2026-01-01", "default", 3, 350, 30, 192),
    ("2026-01-01", "lab", 1, 40, 10, 32),
    ("2026-01-02", "default", 1, 300, 10, 256),
]


def _core_at(target: LedgerTarget, wall: list[float]) -> LedgerCore:
    return LedgerCore(target.config(prices=PRICED), wall=lambda: wall[0])


async def _settle_two_days(client: LedgerClient, wall: list[float]) -> dict[str, str]:
    """Settlements with cached tokens over two days and two projects, each its own commit (the
    second of a day adds to the roll-up row the first wrote); returns the projects' keys."""
    await client.create_tenant(TenantCreate(tenant_id="acme", name="acme", credits=10_000))
    await client.create_project("acme", ProjectCreate(project_id="lab"))
    keys = {p: (await client.create_key("acme", project_id=p)).api_key for p in ("default", "lab")}
    meter = Meter(client)
    days = (
        (
            ("a", "default", 200, 128),
            ("b", "default", 100, 64),
            ("c", "default", 50, 0),
            ("d", "lab", 40, 32),
        ),
        (("e", "default", 300, 256),),
    )
    for n, settlements in enumerate(days):
        wall[0] = JAN1 + n * DAY + 3600
        for rid, project, prompt, cached in settlements:
            r = await meter.authorize(keys[project], "priced", prompt, 10, rid)
            await meter.settle(r, prompt, 10, "completed", "p", "sim", cached_tokens=cached)
    return keys


def test_a_batch_sums_cached_tokens_of_one_day_into_one_rollup_row() -> None:
    batch = WriteBatch()
    for rid, cached in (("x", 3), ("y", 4)):
        event = (rid, "acme", "k", "m", "p", "sim", 10, 2, 4, 1, 5, 0.0, 0.0, "completed", "default", cached)
        batch.close_reservation(rid, event, "2026-01-01", "acme", 0)
    assert batch.daily == {("2026-01-01", "acme", "default", "m"): [2, 20, 4, 10, 7]}


async def test_usage_by_day_and_reports_sum_cached_tokens(ledger_target: LedgerTarget) -> None:
    """The roll-up sums cached tokens per day, project and model; ``GET /v1/usage`` and the usage
    report (JSON and CSV, through the client and the admin API) carry them next to the prompt's."""
    wall = [JAN1]
    core = _core_at(ledger_target, wall)
    await core.start()
    try:
        client = LedgerClient(LocalTransport(core))
        keys = await _settle_two_days(client, wall)
        assert ledger_target.rows(ROLLUP) == TWO_DAYS
        summary = await client.usage_summary("acme")
        assert [(u.day, u.project_id, u.prompt_tokens, u.cached_tokens) for u in summary.usage] == [
            ("2026-01-01", "default", 350, 192),
            ("2026-01-01", "lab", 40, 32),
            ("2026-01-02", "default", 300, 256),
        ]
        by_day = "".join([c async for c in client.usage_report(UsageQuery(group_by=("day",)), "json")])
        assert json.loads(by_day) == [
            {"day": "2026-01-01", "requests": 4, "prompt_tokens": 390, "completion_tokens": 40,
             "cached_tokens": 224, "ucredits": (146 + 78 + 60 + 34) * U},
            {"day": "2026-01-02", "requests": 1, "prompt_tokens": 300, "completion_tokens": 10,
             "cached_tokens": 256, "ucredits": 182 * U},
        ]  # fmt: skip
        app = FastAPI()
        app.include_router(make_tenancy_router(client, hash_api_key(ADMIN)))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            mine = await http.get("/v1/usage", headers={"authorization": f"Bearer {keys['default']}"})
            assert [(u["day"], u["cached_tokens"]) for u in mine.json()["usage"]] == [
                ("2026-01-01", 192),
                ("2026-01-02", 256),
            ]
            admin = {"authorization": f"Bearer {ADMIN}"}
            report = await http.get(
                "/admin/v1/usage/report", headers=admin, params={"format": "csv", "group_by": "project_id"}
            )
            assert report.text.splitlines() == [
                "project_id,requests,prompt_tokens,completion_tokens,cached_tokens,ucredits",
                f"default,4,650,40,448,{(146 + 78 + 60 + 182) * U}",
                f"lab,1,40,10,32,{34 * U}",
            ]
            as_json = await http.get("/admin/v1/usage/report", headers=admin, params={"format": "json"})
            assert sum(row["cached_tokens"] for row in as_json.json()) == 480
        assert await client.audit() == []
    finally:
        await core.close()


async def test_a_schema_3_ledger_backfills_cached_tokens_into_the_daily_rollup(
    ledger_target: LedgerTarget,
) -> None:
    """At schema 3 the roll-up has no cached tokens (its events do): the upgrade to 4 gives every
    day, project and model the sum of its events' cached tokens, the day as settlement writes it."""
    wall = [JAN1]
    core = _core_at(ledger_target, wall)
    await core.start()
    try:
        await _settle_two_days(LedgerClient(LocalTransport(core)), wall)
    finally:
        await core.close()
    ledger_target.execute("ALTER TABLE usage_daily DROP COLUMN cached_tokens")  # back to schema 3
    if ledger_target.kind == "sqlite":
        ledger_target.execute("PRAGMA user_version = 3")
    else:
        ledger_target.execute("UPDATE ledger_meta SET schema_version = 3")
    assert ledger_target.schema_version() == 3
    core = _core_at(ledger_target, wall)
    await core.start()
    try:
        assert ledger_target.schema_version() == 4
        assert ledger_target.rows(ROLLUP) == TWO_DAYS
        events: dict[tuple[str, str], int] = {}
        for ts, project, cached in ledger_target.rows(
            "SELECT settled_at, project_id, cached_tokens FROM usage_events"
        ):
            events[utc_day(ts), project] = events.get((utc_day(ts), project), 0) + cached
        assert events == {(d, p): cached for d, p, *_, cached in TWO_DAYS}
        client = LedgerClient(LocalTransport(core))
        r = await Meter(client).authorize((await client.create_key("acme", project_id="lab")).api_key,
                                          "priced", 20, 5, "after")  # fmt: skip
        await Meter(client).settle(r, 20, 5, "completed", "p", "sim", cached_tokens=8)
        assert ledger_target.rows(ROLLUP)[-1] == ("2026-01-02", "lab", 1, 20, 5, 8)
        assert await client.audit() == []
    finally:
        await core.close()


# -- per-organization cache scope -------------------------------------------------------------------
def test_organization_salts_are_stable_distinct_and_never_from_the_client() -> None:
    a, b = organization_cache_salt("acme"), organization_cache_salt("globex")
    assert a == organization_cache_salt("acme") and a != b and len(a) == 32
    with pytest.raises(ValidationError, match="cache_salt"):  # a client cannot pick a salt
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user"}], "cache_salt": "guess"}
        )
    req = EngineRequest("r", [1, 2, 3], SamplingSpec(max_tokens=1), cache_salt=a)
    assert _prompt(req) == {"prompt_token_ids": [1, 2, 3], "cache_salt": a}  # vLLM's TokensPrompt
    assert _prompt(EngineRequest("r", [1], SamplingSpec(max_tokens=1))) == {"prompt_token_ids": [1]}


async def test_the_simulated_engine_shares_blocks_only_within_a_salt() -> None:
    clock = FakeClock(0.0)
    engine = SimEngine(
        LLAMA8B, get_gpu("H100"), EngineSettings(8, 1024, 0.9), clock=clock, eos_mean_tokens=None
    )
    await engine.start()
    system = list(range(10_000, 10_512))

    async def cached(rid: str, salt: str | None) -> int:
        req = EngineRequest(
            rid, [*system, len(rid)], SamplingSpec(max_tokens=1, ignore_eos=True), cache_salt=salt
        )
        stream = engine.generate(req)
        task = asyncio.get_running_loop().create_task(anext(stream))
        while not task.done():
            for _ in range(20):
                await asyncio.sleep(0)
            if not task.done():
                clock.advance_to_next()
        last = task.result()
        async for c in stream:
            last = c
        return last.cached_tokens

    acme, globex = organization_cache_salt("acme"), organization_cache_salt("globex")
    assert await cached("a1", acme) == 0
    assert await cached("a22", acme) == 512  # the same organization hits its system prompt
    assert await cached("g333", globex) == 0  # another organization does not
    assert await cached("n4444", None) == 0  # nor an unsalted request
    assert await cached("g55555", globex) == 512
    await engine.shutdown()


def test_the_router_predicts_hits_only_within_a_salt() -> None:
    router = PrefixRouter(16, 100_000)
    rng = random.Random(0)
    prompt = list(range(1000, 1200))
    load = {"r1": 0, "r2": 0}
    first = router.choose(["r1", "r2"], load, prompt, rng, cache_salt="a")
    assert first is not None
    same = router.choose(["r1", "r2"], load, prompt, rng, cache_salt="a")
    assert same is not None and same.replica == first.replica and same.cached_tokens == 192
    other = router.choose(["r1", "r2"], load, prompt, rng, cache_salt="b")
    assert other is not None and other.cached_tokens == 0
