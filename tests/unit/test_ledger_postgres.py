"""What only the PostgreSQL store has: two writers fenced (the advisory lock and the epoch), a restart
on another process that reloads the state from the database, reconnection after a lost connection,
the same tables as the SQLite file, ``tokenweir ledger migrate-to-postgres``, and its config.

Every test here runs on a real server that the session starts (tests/_ledger_stores.py)."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from _ledger_stores import LedgerTarget
from pydantic import ValidationError

from serving.cli import main as tokenweir
from serving.errors import LedgerUnavailableError
from serving.metering import LedgerClient, LedgerLockedError, Meter, MeteringConfig, PriceConfig
from serving.metering._client import LocalTransport
from serving.metering._core import LedgerCore
from serving.metering._ops import Settle
from serving.metering._pg_store import PostgresStore
from serving.metering._storage import SCHEMA_VERSION, TABLE_COLUMNS, LedgerFencedError, WriteBatch
from serving.metering._store import SqliteStore
from serving.tenancy import TenantCreate, TenantLimits

pytestmark = pytest.mark.postgres

DATA = Path(__file__).parent.parent / "data"
U = 1_000_000


class Clock:
    def __init__(self) -> None:
        self.mono = 100.0
        self.wall = 1_767_225_600.0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


@pytest.fixture
def pg(tmp_path: Path, postgres_dsn: str) -> LedgerTarget:
    return LedgerTarget("postgres", tmp_path, postgres_dsn)


def make_core(target: LedgerTarget, clock: Clock, **kw: Any) -> LedgerCore:
    return LedgerCore(
        target.config(postgres_lock_wait_s=0, **kw), clock=lambda: clock.mono, wall=lambda: clock.wall
    )


async def org_with_key(client: LedgerClient, tenant_id: str, credits: float) -> str:
    await client.create_tenant(
        TenantCreate(tenant_id=tenant_id, name=tenant_id, credits=credits, limits=TenantLimits())
    )
    return (await client.create_key(tenant_id)).api_key


def kill(dsn: str, backend_pid: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (backend_pid,))


# -- fencing ---------------------------------------------------------------------------------------
async def test_second_writer_is_refused_then_fences_the_first_once_it_lost_its_lock(pg: LedgerTarget) -> None:
    """While the first writer holds the advisory lock, a second is refused. Once the first's lock
    connection is gone (killed by the server) a second starts, bumps the epoch, and from then on the
    first cannot commit anything: its writes fail with 503 and its state rebuilds keep failing,
    while the second commits and sees everything the first had committed."""
    clock = Clock()
    first = make_core(pg, clock)
    await first.start()
    a = LedgerClient(LocalTransport(first))
    key = await org_with_key(a, "acme", 1_000)
    held = await Meter(a).authorize(key, "m", 10, 10, "held")

    with pytest.raises(LedgerLockedError, match="advisory lock"):
        await make_core(pg, clock).start()

    store = first._store
    assert isinstance(store, PostgresStore)
    kill(pg.dsn or "", store._lock.info.backend_pid)  # the first's lock connection is lost
    await a.create_tenant(TenantCreate(tenant_id="still-mine", name="x"))  # the epoch is still its own

    second = make_core(pg, clock)
    await second.start()
    assert isinstance(second._store, PostgresStore) and second._store.epoch == store.epoch + 1
    assert pg.rows("SELECT epoch FROM ledger_meta") == [(store.epoch + 1,)]
    b = LedgerClient(LocalTransport(second))
    assert {t.tenant_id for t in (await b.list_tenants()).data} == {"acme", "still-mine"}
    assert (await b.get_tenant("acme")).in_flight == 1  # the first's reservation, reloaded

    with pytest.raises(LedgerUnavailableError):
        await a.create_tenant(TenantCreate(tenant_id="lost", name="x"))
    with pytest.raises(LedgerUnavailableError):
        await Meter(a).settle(held, 10, 10)
    assert store._fenced_by == store.epoch + 1  # refused by the epoch (its connection is alive)
    with pytest.raises(LedgerFencedError):
        store.commit(WriteBatch())  # for good: even an empty batch is refused
    assert pg.rows("SELECT count(*) FROM tenants WHERE tenant_id = 'lost'") == [(0,)]

    s = await b.submit(Settle("held", 10, 5, pool="p", gpu_type="sim"))
    assert s.charged_ucredits == 15 * U
    assert await b.audit() == []
    await second.close()
    await first.close()


def test_lock_wait_takes_over_when_the_holder_closes(postgres_dsn: str) -> None:
    """``postgres_lock_wait_s``: a starting writer retries the lock while the old one still holds
    it (here the old one goes away during the first back-off), and gets it once that session ends;
    without a wait it is refused at once."""
    holder = PostgresStore(postgres_dsn)
    waits: list[float] = []

    def sleep(delay_s: float) -> None:
        waits.append(delay_s)
        holder.close()
        time.sleep(0.01)

    second = PostgresStore(postgres_dsn, lock_wait_s=30, sleep=sleep)
    assert waits and second.epoch == holder.epoch + 1
    with pytest.raises(LedgerLockedError):
        PostgresStore(postgres_dsn, lock_wait_s=0)
    second.close()


# -- restart and reconnection ------------------------------------------------------------------------
async def test_restart_elsewhere_reloads_state_after_the_old_writer_died(pg: LedgerTarget) -> None:
    """The ledger actor restarted on another node: the old process is gone without closing (the
    server drops its sessions), the new one takes the lock and reloads organizations, keys, open
    reservations and recent settlements from the database."""
    clock = Clock()
    old = make_core(pg, clock, restart_grace_s=30)
    await old.start()
    a = LedgerClient(LocalTransport(old))
    key = await org_with_key(a, "acme", 100)
    r = await Meter(a).authorize(key, "m", 10, 20, "open")
    done = await Meter(a).authorize(key, "m", 1, 1, "done")
    await Meter(a).settle(done, 1, 1)
    store = old._store
    assert isinstance(store, PostgresStore)
    for conn in (store._lock, store._w, store._r):  # the process died: every session of it ends
        assert conn is not None
        kill(pg.dsn or "", conn.info.backend_pid)

    new = make_core(pg, clock, restart_grace_s=30)
    await new.start()
    b = LedgerClient(LocalTransport(new))
    t = await b.get_tenant("acme")
    assert t.in_flight == 1 and t.reserved_credits == 30 and t.credits == 98
    again = await Meter(b).settle(done, 1, 1)
    assert again.duplicate  # known from the durable log
    s = await Meter(b).settle(r, 10, 15)
    assert s.charged_ucredits == 25 * U and (await b.get_tenant("acme")).credits == 73
    assert await Meter(b).authorize(key, "m", 1, 1, "after") is not None  # the key is known
    await new.close()
    await old.close()  # closing a dead writer's connections is harmless


async def test_a_lost_writer_connection_fails_one_batch_then_reconnects(pg: LedgerTarget) -> None:
    clock = Clock()
    core = make_core(pg, clock)
    await core.start()
    c = LedgerClient(LocalTransport(core))
    await org_with_key(c, "acme", 10)
    store = core._store
    assert isinstance(store, PostgresStore) and store._w is not None
    kill(pg.dsn or "", store._w.info.backend_pid)
    with pytest.raises(LedgerUnavailableError):
        await c.create_tenant(TenantCreate(tenant_id="during", name="x"))
    for _ in range(100):  # the state is rebuilt on a new connection
        try:
            await c.create_tenant(TenantCreate(tenant_id="after", name="x"))
            break
        except LedgerUnavailableError:
            await asyncio.sleep(0.05)
    assert {t.tenant_id for t in (await c.list_tenants()).data} == {"acme", "after"}
    assert await c.audit() == []
    await core.close()


# -- the schema ---------------------------------------------------------------------------------------
def test_both_stores_hold_the_same_tables_and_columns(tmp_path: Path, postgres_dsn: str) -> None:
    """A schema step added to one store only fails here (the statement builders and the migration
    copy go by :data:`TABLE_COLUMNS`)."""
    SqliteStore(tmp_path / "l.sqlite3").close()
    PostgresStore(postgres_dsn).close()
    with sqlite3.connect(tmp_path / "l.sqlite3") as db:
        lite = {
            t: tuple(r[1] for r in db.execute(f"PRAGMA table_info({t})"))
            for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        lite_indexes = {
            n
            for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        }
    with psycopg.connect(postgres_dsn) as conn:
        cols: dict[str, list[str]] = {}
        for t, c in conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() ORDER BY table_name, ordinal_position"
        ):
            cols.setdefault(t, []).append(c)
        pg_indexes = {
            n
            for (n,) in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema()"
                " AND indexname NOT LIKE '%_pkey' AND indexname NOT LIKE '%_key'"
            )
        }
        version = conn.execute("SELECT schema_version FROM ledger_meta").fetchone()
    assert lite == TABLE_COLUMNS
    assert {t: tuple(c) for t, c in cols.items() if t != "ledger_meta"} == TABLE_COLUMNS
    assert pg_indexes == lite_indexes
    assert version == (SCHEMA_VERSION,)


# -- migrate-to-postgres ------------------------------------------------------------------------------
async def test_migrate_a_schema_1_file_to_postgres_and_run_on_it(
    tmp_path: Path, postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The round-1 ledger file (tests/data) is migrated to schema 2 and copied: the same tenants,
    balances, grants, keys and events; its open reservation is still held and settles on
    PostgreSQL; new events continue after the copied ids; a second migration into the now
    non-empty database is refused and writes nothing."""
    path = tmp_path / "ledger.sqlite3"
    shutil.copy(DATA / "ledger_v1.sqlite3", path)
    keys = dict(line.split() for line in (DATA / "ledger_v1_keys.txt").read_text().splitlines())
    assert tokenweir(["ledger", "migrate-to-postgres", "--from", str(path), "--dsn", postgres_dsn]) == 0
    out = capsys.readouterr().out
    import json

    report = json.loads(out)
    with sqlite3.connect(path) as db:
        counts = {t: db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLE_COLUMNS}
        balances = dict(db.execute("SELECT tenant_id, balance_ucredits FROM tenants").fetchall())
        max_event = db.execute("SELECT max(event_id) FROM usage_events").fetchone()[0]
    assert report["rows"] == counts and report["audit_sqlite"] == report["audit_postgres"] == []
    assert counts["tenants"] > 1 and counts["usage_events"] == 6 and counts["reservations"] == 1
    pg = LedgerTarget("postgres", tmp_path / "pg", postgres_dsn)
    assert dict(pg.rows("SELECT tenant_id, balance_ucredits FROM tenants")) == balances
    done = pg.rows("SELECT relname, last_vacuum, last_analyze FROM pg_stat_user_tables")
    unvacuumed = [t for t, v, a in done if t in TABLE_COLUMNS and (v is None or a is None)]
    assert unvacuumed == []  # vacuumed and analyzed after the bulk copy, not left to autovacuum

    clock = Clock()
    clock.wall = 1_767_330_100.0  # within the open reservation's TTL (as the schema test does)
    prices = {"priced": PriceConfig(prompt_credits_per_1k_tokens=1, completion_credits_per_1k_tokens=2)}
    core = make_core(pg, clock, prices=prices)
    await core.start()
    c = LedgerClient(LocalTransport(core))
    assert (await c.get_tenant("acme")).in_flight == 1
    s = await c.submit(Settle("req-open", 200, 50, pool="p", gpu_type="sim"))
    assert s.charged_ucredits == 200 * 1000 + 50 * 2000
    r = await Meter(c).authorize(keys["acme"], "priced", 10, 5, "after-migration")
    await Meter(c).settle(r, 10, 5, "completed", "p", "sim")
    assert await c.audit() == []
    ids = pg.rows("SELECT event_id FROM usage_events WHERE request_id IN ('req-open', 'after-migration')")
    assert sorted(i for (i,) in ids) == [max_event + 1, max_event + 2]
    await core.close()

    before = pg.rows("SELECT count(*) FROM usage_events")
    assert tokenweir(["ledger", "migrate-to-postgres", "--from", str(path), "--dsn", postgres_dsn]) == 1
    assert "already holds a ledger" in capsys.readouterr().err
    assert pg.rows("SELECT count(*) FROM usage_events") == before


async def test_migration_is_refused_while_a_ledger_runs_on_either_side(
    tmp_path: Path, postgres_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = Clock()
    lite = LedgerTarget("sqlite", tmp_path)
    core = make_core(lite, clock)
    await core.start()
    await org_with_key(LedgerClient(LocalTransport(core)), "acme", 5)
    path = str(tmp_path / "ledger.sqlite3")
    assert tokenweir(["ledger", "migrate-to-postgres", "--from", path, "--dsn", postgres_dsn]) == 1
    assert "in use by another ledger" in capsys.readouterr().err
    await core.close()
    running = PostgresStore(postgres_dsn)  # a ledger holds the (empty) target database
    assert tokenweir(["ledger", "migrate-to-postgres", "--from", path, "--dsn", postgres_dsn]) == 1
    assert "advisory lock" in capsys.readouterr().err
    running.close()
    assert tokenweir(["ledger", "migrate-to-postgres", "--from", path, "--dsn", postgres_dsn]) == 0
    assert tokenweir(["ledger", "migrate-to-postgres", "--from", str(tmp_path / "none"), "--dsn", "x"]) == 2


# -- config ---------------------------------------------------------------------------------------------
def test_postgres_config_keeps_passwords_out_and_does_not_pin_the_ledger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lite = MeteringConfig()
    assert lite.ledger_pin_resource == lite.ledger_node_resource == "node:__internal_head__"
    pg = MeteringConfig(store="postgres", postgres_dsn="host=db.internal dbname=ledger user=tw")
    assert pg.ledger_pin_resource is None
    assert pg.postgres_conninfo() == "host=db.internal dbname=ledger user=tw"
    for dsn in ("host=db dbname=l password=hunter2", "postgresql://tw:hunter2@db/ledger"):
        with pytest.raises(ValidationError, match="carries a password"):
            MeteringConfig(store="postgres", postgres_dsn=dsn)
    from_env = MeteringConfig(store="postgres", postgres_dsn_env="TW_TEST_DSN")
    monkeypatch.delenv("TW_TEST_DSN", raising=False)
    with pytest.raises(ValueError, match=r"TW_TEST_DSN"):
        from_env.postgres_conninfo()
    monkeypatch.setenv("TW_TEST_DSN", "postgresql://tw:secret@db/ledger")
    assert from_env.postgres_conninfo() == "postgresql://tw:secret@db/ledger"
    assert "secret" not in from_env.for_actors().model_dump_json()


def test_the_postgres_ledger_actor_asks_for_no_node_resource(monkeypatch: pytest.MonkeyPatch) -> None:
    """What Ray is asked for (captured at the Ray boundary): on SQLite a sliver of the file's node
    resource, so Ray restarts it only there; on PostgreSQL nothing, so it restarts on any node."""
    from serving.metering import _actor

    asked: list[dict[str, Any]] = []

    class Remote:
        def options(self, **kw: Any) -> Any:
            asked.append(kw)
            return self

        def remote(self, *args: Any) -> str:
            return "handle"

    monkeypatch.setattr(_actor.ray, "remote", lambda cls: Remote())
    _actor.get_or_create_ledger_actor(MeteringConfig())
    _actor.get_or_create_ledger_actor(MeteringConfig(store="postgres", postgres_dsn="host=db dbname=l"))
    assert asked[0]["resources"] == {"node:__internal_head__": 0.001}
    assert asked[1]["resources"] == {} and asked[1]["max_restarts"] == -1
