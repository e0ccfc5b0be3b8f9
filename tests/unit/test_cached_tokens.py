"""Cached prompt tokens (issue 17): what the engine found in its prefix cache is reported as OpenAI's
``usage.prompt_tokens_details.cached_tokens``, charged at the model's cached price and recorded in the
usage events (both stores); and prefix caching scoped per organization (vLLM's ``cache_salt``) keeps
one organization's prompts from hitting another's blocks, in the simulated engine and in the router.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator

import pytest
from _ledger_stores import LedgerTarget
from pydantic import ValidationError

from serving.api.protocol import unsupported_field
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
from serving.metering._policy import ModelPrice
from serving.metering._storage import export_query
from serving.routing._prefix import PrefixRouter
from serving.tenancy import TenantCreate, UsageQuery

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
    for sql in (  # back to schema 2's usage_events
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
        assert ledger_target.schema_version() == 3
        assert ledger_target.rows("SELECT request_id, cached_tokens FROM usage_events") == [("old", 0)]
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
        assert await client.audit() == []
    finally:
        await c.close()


# -- per-organization cache scope -------------------------------------------------------------------
def test_organization_salts_are_stable_distinct_and_never_from_the_client() -> None:
    a, b = organization_cache_salt("acme"), organization_cache_salt("globex")
    assert a == organization_cache_salt("acme") and a != b and len(a) == 32
    assert unsupported_field({"cache_salt": "guess"}) == "cache_salt"  # a client cannot pick a salt
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
