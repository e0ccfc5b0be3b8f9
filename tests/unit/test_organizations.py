"""Organizations, projects and credit grants on a real ledger store (issue 15's guarantees).

The ledger runs in this process with hand-moved clocks, each test on a SQLite file and on a
PostgreSQL database (marker ``postgres``); the gateway side is the real :class:`Meter` and
:class:`LedgerClient`.
"""

from __future__ import annotations

import asyncio
import math
import random
import shutil
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from _ledger_stores import LedgerTarget

from serving.errors import (
    AuthenticationError,
    ConflictError,
    InsufficientQuotaError,
    InvalidInputError,
    RateLimitExceededError,
)
from serving.metering import LedgerClient, Meter, MeteringConfig, PriceConfig, Reservation
from serving.metering._client import LocalTransport
from serving.metering._core import LedgerCore
from serving.metering._ops import CreateTenant, Reserve, Settle
from serving.metering._policy import period_start
from serving.metering._store import SCHEMA_VERSION
from serving.tenancy import (
    GrantCreate,
    ProjectCreate,
    ProjectUpdate,
    TenantCreate,
    TenantLimits,
    UsageQuery,
    hash_api_key,
)

U = 1_000_000
DATA = Path(__file__).parent.parent / "data"
PRICED = {"priced": PriceConfig(prompt_credits_per_1k_tokens=1000, completion_credits_per_1k_tokens=1000)}
"""1 credit per token, so credits and tokens read the same."""


class Clock:
    def __init__(self) -> None:
        self.mono = 100.0
        self.wall = 1_767_225_600.0  # 2026-01-01T00:00:00Z

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_core(target: LedgerTarget, clock: Clock, **kw: object) -> LedgerCore:
    return LedgerCore(target.config(prices=PRICED, **kw), clock=lambda: clock.mono, wall=lambda: clock.wall)


@pytest.fixture
async def core(ledger_target: LedgerTarget, clock: Clock) -> AsyncIterator[LedgerCore]:
    c = make_core(ledger_target, clock)
    await c.start()
    yield c
    await c.close()


@pytest.fixture
def client(core: LedgerCore) -> LedgerClient:
    return LedgerClient(LocalTransport(core))


def q(path: Path, sql: str, *args: object) -> list[tuple]:
    """Raw SQL against a SQLite ledger file in ``path`` (the migration test's)."""
    with sqlite3.connect(path / "ledger.sqlite3") as db:
        return db.execute(sql, args).fetchall()


async def reserve(client: LedgerClient, key: str, rid: str, prompt: int, max_tokens: int) -> Reservation:
    return await Meter(client).authorize(key, "priced", prompt, max_tokens, rid)


# -- migration -------------------------------------------------------------------------------------
async def test_schema_1_file_migrates_to_organizations_with_a_default_project(
    tmp_path: Path, clock: Clock
) -> None:
    """A ledger file written by the round-1 code (tests/data/make_ledger_v1.py): its tenants become
    organizations with one project 'default' holding their keys, top-ups become grants whose
    remainders make up the balance, its open reservation is still held and settles, and the
    daily roll-up holds its events."""
    shutil.copy(DATA / "ledger_v1.sqlite3", tmp_path / "ledger.sqlite3")
    keys = dict(line.split() for line in (DATA / "ledger_v1_keys.txt").read_text().splitlines())
    before = {t: b for t, b in q(tmp_path, "SELECT tenant_id, balance_ucredits FROM tenants")}
    assert q(tmp_path, "PRAGMA user_version") == [(1,)]
    clock.wall = 1_767_330_100.0  # just after the open reservation, within its TTL
    core = LedgerCore(
        MeteringConfig(
            state_dir=tmp_path,
            prices={
                "priced": PriceConfig(prompt_credits_per_1k_tokens=1, completion_credits_per_1k_tokens=2)
            },
        ),
        clock=lambda: clock.mono,
        wall=lambda: clock.wall,
    )
    await core.start()
    try:
        c = LedgerClient(LocalTransport(core))
        assert q(tmp_path, "PRAGMA user_version") == [(SCHEMA_VERSION,)] and SCHEMA_VERSION == 4
        assert await c.audit() == []
        for tid, balance in before.items():
            t = await c.get_tenant(tid)
            assert round(t.credits * U) == balance
            assert [p.project_id for p in (await c.list_projects(tid)).data] == ["default"]
            grants = await c.list_grants(tid)
            assert sum(round(g.remaining_credits * U) for g in grants) == balance
        assert [g.program for g in await c.list_grants("acme")] == ["migrated", "migrated"]
        keys_acme = (await c.list_keys("acme")).data
        assert {k.project_id for k in keys_acme} == {"default"} and len(keys_acme) == 2
        assert (await c.get_tenant("acme")).in_flight == 1  # the open reservation is held
        s = await c.submit(Settle("req-open", 200, 50, pool="p", gpu_type="sim"))
        assert s.charged_ucredits == 200 * 1000 + 50 * 2000
        r = await reserve(c, keys["acme"], "after-migration", 10, 5)
        assert r.project_id == "default"
        await Meter(c).settle(r, 10, 5, "completed", "p", "sim")
        assert await c.audit() == []
        daily = q(tmp_path, "SELECT sum(requests), sum(ucredits), sum(cached_tokens) FROM usage_daily")
        events = q(tmp_path, "SELECT count(*), sum(ucredits), sum(cached_tokens) FROM usage_events")
        assert daily == events and events[0][0] == 8
        usage = await c.usage_summary("acme", "default")
        assert sum(row.requests for row in usage.usage) == 7
    finally:
        await core.close()


# -- two levels -------------------------------------------------------------------------------------
async def org(client: LedgerClient, tenant_id: str, credits: float, **limits: int) -> None:
    await client.create_tenant(
        TenantCreate(tenant_id=tenant_id, name=tenant_id, credits=credits, limits=TenantLimits(**limits))
    )


async def project_key(client: LedgerClient, tenant_id: str, project_id: str, **spec: object) -> str:
    if project_id != "default":
        await client.create_project(tenant_id, ProjectCreate(project_id=project_id, **spec))  # type: ignore[arg-type]
    return (await client.create_key(tenant_id, project_id=project_id)).api_key


async def test_300_concurrent_over_three_projects_exact_at_both_levels(
    core: LedgerCore, client: LedgerClient, ledger_target: LedgerTarget
) -> None:
    """The organization's balance covers a fraction of the load and two projects have caps: no
    project passes its cap, the organization never goes below zero, each served request is charged
    exactly its usage at both levels, and nothing stays reserved."""
    await org(client, "acme", 20_000)
    caps = {"alpha": 4_000.0, "beta": 9_000.0, "gamma": None}
    keys = {p: await project_key(client, "acme", p, credit_cap=cap) for p, cap in caps.items()}
    replicas = [Meter(LedgerClient(LocalTransport(core))) for _ in range(3)]
    rng = random.Random(15)
    charged: dict[str, int] = {p: 0 for p in caps}
    refused: dict[str, int] = {"organization": 0, "project": 0}

    async def one(i: int) -> None:
        project = list(caps)[i % 3]
        meter = replicas[i % 3]
        prompt, max_tokens = rng.randint(20, 100), rng.randint(50, 200)
        try:
            res = await meter.authorize(keys[project], "priced", prompt, max_tokens, f"r{i}")
        except InsufficientQuotaError as e:
            refused["project" if "project 'acme/" in str(e) else "organization"] += 1
            return
        await asyncio.sleep(rng.random() * 0.01)
        used = rng.randint(0, max_tokens)
        s = await meter.settle(res, prompt, used, "completed", "p", "sim")
        assert s is not None and s.charged_ucredits == (prompt + used) * U
        charged[project] += s.charged_ucredits

    await asyncio.gather(*(one(i) for i in range(300)))
    assert refused["organization"] > 0 and refused["project"] > 0
    for p, cap in caps.items():
        view = await client.get_project("acme", p)
        assert round(view.spent_credits * U) == charged[p]
        assert view.reserved_credits == 0 and view.in_flight == 0
        if cap is not None:
            assert view.spent_credits <= cap
        by_events = ledger_target.rows(
            "SELECT coalesce(sum(ucredits), 0) FROM usage_events WHERE project_id = ?", p
        )
        assert by_events == [(charged[p],)]
    t = await client.get_tenant("acme")
    assert t.credits >= 0 and t.reserved_credits == 0 and t.in_flight == 0
    assert round(t.credits * U) == 20_000 * U - sum(charged.values())
    assert ledger_target.rows("SELECT count(*) FROM reservations") == [(0,)]
    assert await client.audit() == []


async def test_refusals_name_the_level_and_project_limits_apply_within_the_organization(
    client: LedgerClient,
) -> None:
    await org(client, "acme", 1_000, rpm=100)
    await client.update_tenant(
        "acme",
        __import__("serving.tenancy", fromlist=["TenantUpdate"]).TenantUpdate(
            allowed_models=["priced", "other"]
        ),
    )
    with pytest.raises(InvalidInputError, match="within the organization"):
        await client.create_project("acme", ProjectCreate(project_id="bad", allowed_models=["elsewhere"]))
    key = await project_key(client, "acme", "lab", credit_cap=50.0, limits=TenantLimits(rpm=2))
    r = await reserve(client, key, "a", 10, 20)  # 30 credits held of the cap of 50
    with pytest.raises(InsufficientQuotaError, match=r"project 'acme/lab'"):
        await reserve(client, key, "b", 10, 20)
    await Meter(client).settle(r, 10, 0, "completed", "p", "sim")
    await reserve(client, key, "c", 10, 20)
    with pytest.raises(RateLimitExceededError, match=r"project 'acme/lab'"):
        await reserve(client, key, "d", 1, 1)
    big = await project_key(client, "acme", "big")
    with pytest.raises(InsufficientQuotaError, match=r"organization 'acme'"):
        await reserve(client, big, "e", 900, 200)
    view = await client.get_project("acme", "lab")
    assert view.spent_credits == 10 and view.reserved_credits == 30


async def test_daily_cap_resets_at_midnight_utc(client: LedgerClient, clock: Clock) -> None:
    await org(client, "acme", 1_000)
    key = await project_key(client, "acme", "dev", credit_cap=40.0, cap_period="daily")
    r = await reserve(client, key, "a", 10, 20)
    await Meter(client).settle(r, 10, 20, "completed", "p", "sim")
    with pytest.raises(InsufficientQuotaError, match="this day"):
        await reserve(client, key, "b", 10, 20)
    clock.advance(86_400)
    r = await reserve(client, key, "c", 10, 20)
    view = await client.get_project("acme", "dev")
    assert view.spent_credits == 0 and view.period_start == period_start(clock.wall, "daily")
    await Meter(client).settle(r, 10, 5, "completed", "p", "sim")
    assert (await client.get_project("acme", "dev")).spent_credits == 15
    assert period_start(1_767_225_600.0 + 40 * 86_400, "monthly") == 1_769_904_000.0  # 2026-02-01
    from serving.metering._policy import utc_day

    assert (utc_day(-2.16e16), utc_day(1e300)) == ("1970-01-01", "9999-12-31")  # a client's since
    assert (await client.usage_summary("acme", "dev", since_ts=-2.16e16)).usage


# -- grants -----------------------------------------------------------------------------------------
async def test_a_charge_spanning_two_grants_splits_exactly_soonest_expiry_first(
    client: LedgerClient, clock: Clock, ledger_target: LedgerTarget
) -> None:
    await org(client, "uni", 0)
    t0 = clock.wall
    await client.create_grant("uni", GrantCreate(grant_id="paid", credits=500, program="paid-plan"))
    await client.create_grant(
        "uni", GrantCreate(grant_id="lab", credits=30, program="innovation-lab", expires_at=t0 + 3600)
    )
    await client.create_grant(
        "uni", GrantCreate(grant_id="later", credits=100, program="partnership", starts_at=t0 + 7200)
    )
    assert (await client.get_tenant("uni")).available_credits == 530  # "later" has not started
    key = await project_key(client, "uni", "default")
    r = await reserve(client, key, "span", 20, 30)
    await Meter(client).settle(r, 20, 25, "completed", "p", "sim")  # 45 credits: 30 of lab, 15 of paid
    grants = {g.grant_id: g for g in await client.list_grants("uni")}
    assert grants["lab"].remaining_credits == 0 and grants["paid"].remaining_credits == 485
    assert [g.grant_id for g in await client.list_grants("uni")] == ["lab", "later", "paid"]
    view, new = await client.create_grant(
        "uni", GrantCreate(grant_id="lab", credits=30, program="innovation-lab", expires_at=t0 + 3600)
    )
    assert not new and view.remaining_credits == 0  # a retry is a no-op
    with pytest.raises(ConflictError):
        await client.create_grant("uni", GrantCreate(grant_id="lab", credits=31, program="innovation-lab"))
    assert ledger_target.rows(
        "SELECT count(*) FROM grant_events WHERE kind = 'granted' AND tenant_id = 'uni'"
    ) == [(3,)]
    assert await client.audit() == []


async def test_expiry_in_the_middle_of_a_load_writes_off_only_what_was_left(
    core: LedgerCore, client: LedgerClient, clock: Clock, ledger_target: LedgerTarget
) -> None:
    """Reservations hold slices of a grant when it expires: only its unreserved remainder is
    written off then; each one still open is charged as reserved when it settles, and the released
    part of its slice is written off then."""
    await org(client, "uni", 0)
    await client.create_grant(
        "uni",
        GrantCreate(grant_id="lab", credits=1_000, program="innovation-lab", expires_at=clock.wall + 60),
    )
    await client.create_grant("uni", GrantCreate(grant_id="paid", credits=10_000, program="paid-plan"))
    key = await project_key(client, "uni", "default")
    meter = Meter(client)
    held = [await reserve(client, key, f"h{i}", 50, 50) for i in range(6)]  # 600 of lab held
    done = [await reserve(client, key, f"d{i}", 50, 50) for i in range(2)]  # 200 more of lab
    for r in done:
        await meter.settle(r, 50, 10, "completed", "p", "sim")  # 60 each charged, 40 each released
    clock.advance(61)
    assert await core.expire_due() == 0  # no reservation expired, but the grant did
    lab = {g.grant_id: g for g in await client.list_grants("uni")}["lab"]
    assert lab.expired and lab.written_off_credits == 1_000 - 120 - 600 and lab.reserved_credits == 600
    for r in held:
        await meter.settle(r, 50, 20, "completed", "p", "sim")  # 70 charged of a 100 slice of lab
    lab = {g.grant_id: g for g in await client.list_grants("uni")}["lab"]
    assert lab.remaining_credits == 0 and lab.reserved_credits == 0
    assert lab.written_off_credits == 280 + 6 * 30
    assert round(lab.credits - lab.written_off_credits, 6) == 120 + 6 * 70  # what was charged to it
    paid = {g.grant_id: g for g in await client.list_grants("uni")}["paid"]
    assert paid.remaining_credits == 10_000
    r = await reserve(client, key, "after", 50, 50)  # now served by "paid"
    await meter.settle(r, 50, 50, "completed", "p", "sim")
    assert (await client.get_tenant("uni")).credits == 9_900
    assert ledger_target.rows("SELECT count(*) FROM grant_events WHERE kind = 'written_off'") == [(7,)]
    assert await client.audit() == []


async def test_grants_and_their_expiry_in_the_usage_summary(client: LedgerClient, clock: Clock) -> None:
    await org(client, "uni", 0)
    await client.create_grant(
        "uni", GrantCreate(grant_id="lab", credits=10, program="innovation-lab", expires_at=clock.wall + 60)
    )
    key = await project_key(client, "uni", "dev", credit_cap=5.0, cap_period="monthly")
    owner = await client.key_owner(key)
    assert (owner.tenant_id, owner.project_id, owner.role) == ("uni", "dev", "member")
    s = await client.usage_summary("uni", "dev")
    assert [(g.grant_id, g.expires_at) for g in s.grants] == [("lab", clock.wall + 60)]
    assert s.project is not None and s.project.credit_cap == 5 and s.project.available_credits == 5
    clock.advance(61)
    await client.get_tenant("uni")
    assert (await client.usage_summary("uni")).grants  # expiry is the ledger's periodic job
    await client.update_project("uni", "dev", ProjectUpdate(remove_credit_cap=True))
    assert (await client.get_project("uni", "dev")).credit_cap is None


# -- keys, pages, exports, retention ---------------------------------------------------------------
async def test_org_admin_keys_cannot_make_requests_and_pages_are_cursor_based(client: LedgerClient) -> None:
    for i in range(7):
        await org(client, f"org-{i}", 10)
    admin = await client.create_key("org-3", role="admin")
    with pytest.raises(AuthenticationError, match="organization admin key"):
        await reserve(client, admin.api_key, "x", 1, 1)
    seen, after = [], None
    while True:
        page = await client.list_tenants(after, 3)
        seen += [t.tenant_id for t in page.data]
        if not page.has_more:
            break
        after = page.next_after
    assert seen == [f"org-{i}" for i in range(7)]


async def test_export_streams_in_pages_and_the_rollup_outlives_retention(
    core: LedgerCore, client: LedgerClient, clock: Clock, ledger_target: LedgerTarget
) -> None:
    await org(client, "acme", 10_000)
    keys = {p: await project_key(client, "acme", p) for p in ("default", "lab")}
    meter = Meter(client)
    for i in range(25):
        p = "lab" if i % 5 == 0 else "default"
        r = await reserve(client, keys[p], f"e{i}", 3, 4)
        await meter.settle(r, 3, 4, "completed", "p", "sim")
        clock.advance(3600 * 5)
    chunks = [c async for c in client.export_usage(UsageQuery(tenant_id="acme"), "jsonl", page_rows=4)]
    assert len(chunks) == 7  # pages of 4: the export is never one big list
    assert sum(c.count("\n") for c in chunks) == 25
    lab = "".join(
        [c async for c in client.export_usage(UsageQuery(tenant_id="acme", project_id="lab"), "csv")]
    )
    assert len(lab.splitlines()) == 1 + 5
    report = "".join(
        [c async for c in client.usage_report(UsageQuery(tenant_id="acme", group_by=("project_id",)), "csv")]
    )
    assert report.splitlines()[1:] == ["default,20,60,80,0,140000000", "lab,5,15,20,0,35000000"]
    core.config = core.config.model_copy(update={"usage_event_retention_days": 2.0})
    pruned = await core.prune_usage_events(step=3)
    assert 0 < pruned < 25
    assert ledger_target.rows("SELECT count(*) FROM usage_events") == [(25 - pruned,)]
    report2 = "".join(
        [c async for c in client.usage_report(UsageQuery(tenant_id="acme", group_by=("project_id",)), "csv")]
    )
    assert report2 == report
    assert await client.audit() == []
    by_day = "".join([c async for c in client.usage_report(UsageQuery(group_by=("day",)), "json")])
    assert by_day.startswith("[") and by_day.endswith("]") and '"day": "2026-01-01"' in by_day


async def test_reserve_for_a_project_key_is_refused_after_its_revocation(client: LedgerClient) -> None:
    await org(client, "acme", 10)
    key = await project_key(client, "acme", "lab")
    created = (await client.list_keys("acme", "lab")).data[0]
    await client.revoke_key(created.key_id, tenant_id="acme")
    res = await client.submit(Reserve("z", hash_api_key(key), "priced", 1, 1))
    assert getattr(res, "kind", None) == "invalid_api_key"


async def test_metrics_budget_labels_tracked_organizations_and_sums_the_rest(
    ledger_target: LedgerTarget, clock: Clock
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from serving.metering._stats import LedgerCollector
    from serving.metrics import render

    core = make_core(ledger_target, clock, tracked_tenants=["org-03", "org-07"], metrics_series_budget=20)
    await core.start()
    try:
        client = LedgerClient(LocalTransport(core))
        meter = Meter(client)
        for i in range(40):
            await org(client, f"org-{i:02d}", 100)
            key = await project_key(client, f"org-{i:02d}", "default")
            r = await reserve(client, key, f"m{i}", 2, 3)
            await meter.settle(r, 2, 3, "completed", "p", "sim")
        stats = await client.stats()
        assert stats.labelled_tenants == frozenset({"org-03", "org-07"}) and stats.aggregated_tenants == 38
        assert stats.credits_charged["_other"] == 38 * 5 and stats.credits_charged["org-03"] == 5
        assert round(stats.credits_remaining["_other"]) == 38 * 95
        collector = LedgerCollector()
        collector.update(stats)
        tenants = {
            s.labels["tenant"]
            for fam in text_string_to_metric_families(render([collector]).decode())
            for s in fam.samples
            if "tenant" in s.labels
            and fam.name not in ("tokenweir_credits_low_remaining_ratio", "tokenweir_credits_run_out_seconds")
        }
        assert tenants == {"org-03", "org-07", "_other"}
        figures = await client.tenant_figures("org-21")  # any organization's live figures
        assert figures["charged_credits"] == 5 and figures["projects"][0]["project_id"] == "default"
    finally:
        await core.close()


async def test_run_out_gauge_ranks_all_5000_organizations_tracked_or_not(
    ledger_target: LedgerTarget, clock: Clock
) -> None:
    """5,000 organizations, one tracked: an untracked one burning fast is named first in the bounded
    run-out gauge (its other series are summed under _other), the counts cover every organization,
    and the rate decays with the hand-moved clock until an idle organization is no longer projected."""
    from serving.metering._policy import BURN_RATE_TAU_S
    from serving.metering._stats import RUN_OUT_TENANTS, LedgerCollector
    from serving.metrics import render

    core = make_core(ledger_target, clock, tracked_tenants=["org-0001"])
    await core.start()
    try:
        specs = [TenantCreate(tenant_id=f"org-{i:04d}", name="o", credits=100) for i in range(5000)]
        specs[1] = TenantCreate(tenant_id="org-0001", name="o", credits=1000)
        await core.apply([CreateTenant(spec) for spec in specs])
        client = LedgerClient(LocalTransport(core))
        meter = Meter(client)

        async def burn(tenant_id: str, credits: int) -> None:
            key = (await client.create_key(tenant_id)).api_key
            r = await reserve(client, key, f"r-{tenant_id}", credits // 2, credits // 2)
            await meter.settle(r, credits // 2, credits // 2, "completed", "p", "sim")

        await burn("org-4711", 60)  # 40 left at 60 an hour: 40 minutes
        for i in range(1000, 1030):
            await burn(f"org-{i}", 10)  # 90 left at 10 an hour: 9 hours
        await burn("org-0001", 10)  # tracked: 990 left at 10 an hour, 99 hours
        stats = await client.stats()
        assert stats.labelled_tenants == frozenset({"org-0001"}) and stats.aggregated_tenants == 4999
        assert len(stats.run_out) == RUN_OUT_TENANTS
        assert stats.run_out[0] == ("org-4711", pytest.approx(40 / (60 / BURN_RATE_TAU_S)))
        assert {t for t, _ in stats.run_out[1:]} < {f"org-{i}" for i in range(1000, 1030)}
        assert stats.tenants_running_out == {1: 1, 6: 1, 24: 31, 72: 31}
        collector = LedgerCollector()
        collector.update(stats)
        text = render([collector]).decode()
        assert 'tokenweir_credits_run_out_seconds{tenant="org-4711"}' in text
        assert 'tokenweir_credits_remaining{tenant="org-4711"}' not in text  # folded under _other
        assert 'tokenweir_tenants_running_out{within="1h"} 1.0' in text
        assert text.count("tokenweir_credits_run_out_seconds{") == RUN_OUT_TENANTS
        clock.advance(BURN_RATE_TAU_S)  # an hour idle: each rate is 1/e of what it was
        stats = await client.stats()
        assert stats.run_out[0] == ("org-4711", pytest.approx(40 / (60 / BURN_RATE_TAU_S) * math.e))
        assert stats.tenants_running_out == {1: 0, 6: 1, 24: 1, 72: 31}  # 9 h became 24.5 h
        clock.advance(24 * 3600)  # a day idle: the decayed sums are below a micro-credit
        stats = await client.stats()
        assert stats.run_out == [] and stats.tenants_running_out == {1: 0, 6: 0, 24: 0, 72: 0}
    finally:
        await core.close()
