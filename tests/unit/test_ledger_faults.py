"""The ledger under storage faults and replays: nothing acknowledged is lost, a failed commit fails
exactly its own operations, a settled request id stays settled across restarts.

The commit failures are real: another process holds SQLite's write lock on the ledger file, so the
commit fails with ``database is locked`` after ``busy_timeout_ms``. Only the "rebuild itself fails"
case injects its fault at the store boundary (its ``load`` raises once), and says so.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from serving.errors import DuplicateRequestError, LedgerUnavailableError
from serving.metering import LedgerClient, Meter, MeteringConfig
from serving.metering._client import LocalTransport
from serving.metering._core import LedgerCore
from serving.metering._ops import Audit, GetTenant
from serving.tenancy import TenantCreate, TopUp

U = 1_000_000


async def started(path: Path, **kw: object) -> tuple[LedgerCore, LedgerClient]:
    core = LedgerCore(MeteringConfig(state_dir=path, **kw))  # type: ignore[arg-type]
    await core.start()
    return core, LedgerClient(LocalTransport(core))


class WriteLock:
    """Another process's connection holding the ledger file's write lock (``BEGIN IMMEDIATE``)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path / "ledger.sqlite3", isolation_level=None)

    def __enter__(self) -> WriteLock:
        self.db.execute("BEGIN IMMEDIATE")
        return self

    def release(self) -> None:
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def __exit__(self, *exc: object) -> None:
        self.release()
        self.db.close()


async def test_failed_commit_fails_its_ops_and_answers_later_ones_from_the_file(tmp_path: Path) -> None:
    core, client = await started(tmp_path, busy_timeout_ms=300)
    await client.create_tenant(TenantCreate(tenant_id="t", name="t", credits=1000))
    key = (await client.create_key("t")).api_key
    meter = Meter(client)
    with WriteLock(tmp_path) as lock:
        first = asyncio.create_task(client.top_up("t", TopUp(credits=500)))
        await asyncio.sleep(0.05)  # its commit is now waiting on the lock
        # These ride on state that includes the top-up the file will never get.
        second = asyncio.create_task(client.top_up("t", TopUp(credits=200)))
        reserve = asyncio.create_task(meter.authorize(key, "m", 10, 1100, "rides-on-failed-state"))
        with pytest.raises(LedgerUnavailableError) as e:
            await first
        assert e.value.status_code == 503 and e.value.code == "ledger_unavailable"
        lock.release()
        view = await second
        # 1,110 credits fit only with the failed top-up; on the rebuilt state (1,200) it still fits.
        r = await reserve
    assert view.credits == 1200  # answered from what is durable, not from the discarded state
    assert (await core.read(GetTenant("t"))).credits == 1200
    await meter.settle(r, 10, 5)
    assert await core.read(Audit()) == []
    await core.close()
    core2, _ = await started(tmp_path)
    t = await core2.read(GetTenant("t"))
    assert t.credits == 1200 - 15 and t.in_flight == 0  # every acknowledged write is in the file
    await core2.close()


@pytest.mark.chaos
async def test_a_commit_failure_mid_load_loses_no_acknowledged_write(tmp_path: Path) -> None:
    """Chaos, at the storage boundary: 40 closed loops reserve and settle while another process
    holds the ledger file's write lock for 0.6 s (every commit in that window fails). What the
    ledger acknowledged is in the file; what failed was refused (503) and charged nothing, or (a
    settlement that failed: the gateway gives up, as it does) resolved by the crash rule after a
    restart. Prints sent / served / failed / refunded and the books."""
    core, client = await started(tmp_path, busy_timeout_ms=150)
    initial = 10_000_000
    await client.create_tenant(TenantCreate(tenant_id="t", name="t", credits=initial))
    key = (await client.create_key("t")).api_key
    meter = Meter(client)
    counts = {"sent": 0, "served": 0, "refused": 0, "unsettled": 0}
    charged = 0
    stop = asyncio.Event()

    async def loop(i: int) -> None:
        nonlocal charged
        n = 0
        while not stop.is_set():
            rid = f"w{i}-{n}"
            n += 1
            counts["sent"] += 1
            try:
                r = await meter.authorize(key, "m", 10, 50, rid)
            except LedgerUnavailableError:
                counts["refused"] += 1  # the client got a 503 before any token: nothing to charge
                continue
            await asyncio.sleep(0.01)  # generating
            try:
                s = await meter.settle(r, 10, 20)
            except LedgerUnavailableError:
                counts["unsettled"] += 1  # left to the crash rule (no progress: released)
                continue
            counts["served"] += 1
            charged += s.charged_ucredits

    workers = [asyncio.create_task(loop(i)) for i in range(40)]
    await asyncio.sleep(0.3)
    with WriteLock(tmp_path):
        await asyncio.sleep(0.6)
    await asyncio.sleep(0.5)
    stop.set()
    await asyncio.gather(*workers)
    await core.close()
    # Restart: the reservations whose settlement failed are open in the file; their restart grace
    # runs out and, with no progress recorded, they are released.
    core2, _ = await started(tmp_path, restart_grace_s=0.1)
    await asyncio.sleep(0.2)
    await core2.expire_due()  # (its own timer may have been first)
    db = sqlite3.connect(tmp_path / "ledger.sqlite3")
    outcomes = dict(db.execute("SELECT outcome, count(*) FROM usage_events GROUP BY outcome").fetchall())
    db.close()
    refunded = outcomes.get("expired_released", 0)
    t = await core2.read(GetTenant("t"))
    audit = await core2.read(Audit())
    print(
        f"commit failure mid-load: sent {counts['sent']} served {counts['served']} failed "
        f"{counts['refused'] + counts['unsettled']} (refused {counts['refused']}, settlement failed "
        f"{counts['unsettled']}) refunded {refunded}; credits {initial} - charged {charged / U:g} = "
        f"{t.credits}, reserved {t.reserved_credits}, in flight {t.in_flight}, audit {audit}"
    )
    assert counts["refused"] + counts["unsettled"] > 0, "the lock window failed no commit"
    assert counts["served"] > 0
    assert set(outcomes) <= {"completed", "expired_released"}, outcomes
    assert outcomes.get("completed") == counts["served"]
    assert outcomes.get("expired_released", 0) == counts["unsettled"]
    assert t.credits * U == initial * U - charged  # every acknowledged settlement, nothing else
    assert t.reserved_credits == 0 and t.in_flight == 0 and audit == []
    await core2.close()


async def test_revoke_and_reserve_during_a_failed_commit_are_not_lost(tmp_path: Path) -> None:
    core, client = await started(tmp_path, busy_timeout_ms=300)
    await client.create_tenant(TenantCreate(tenant_id="t", name="t", credits=1000))
    created = await client.create_key("t")
    meter = Meter(client)
    with WriteLock(tmp_path) as lock:
        failed = asyncio.create_task(client.top_up("t", TopUp(credits=1)))
        await asyncio.sleep(0.05)
        revoked = asyncio.create_task(client.revoke_key(created.key_id))
        with pytest.raises(LedgerUnavailableError):
            await failed
        lock.release()
        assert (await revoked).revoked_at is not None
    with pytest.raises(Exception, match="Incorrect API key"):
        await meter.authorize(created.api_key, "m", 1, 1, "after-revoke")
    await core.close()
    core2, client2 = await started(tmp_path)
    with pytest.raises(Exception, match="Incorrect API key"):
        await Meter(client2).authorize(created.api_key, "m", 1, 1, "after-restart")
    await core2.close()


async def test_failed_commit_keeps_rate_buckets_and_live_reservations(tmp_path: Path) -> None:
    core, client = await started(tmp_path, busy_timeout_ms=200, restart_grace_s=1)
    await client.create_tenant(
        TenantCreate(tenant_id="t", name="t", credits=1000, limits={"rpm": 3})  # type: ignore[arg-type]
    )
    key = (await client.create_key("t")).api_key
    meter = Meter(client)
    live = [await meter.authorize(key, "m", 1, 1, f"r{i}") for i in range(3)]
    with WriteLock(tmp_path), pytest.raises(LedgerUnavailableError):
        await client.top_up("t", TopUp(credits=1))
    with pytest.raises(Exception, match="requests per minute"):
        await meter.authorize(key, "m", 1, 1, "r3")  # the rebuild did not refill the RPM bucket
    await asyncio.sleep(1.2)
    assert await core.expire_due() == 0  # a rebuild is not a restart: no grace cut-off
    for r in live:
        assert not (await meter.settle(r, 1, 1)).duplicate
    assert await core.read(Audit()) == []
    await core.close()


async def test_writes_refused_while_the_rebuild_fails_then_recover(tmp_path: Path) -> None:
    core, client = await started(tmp_path, busy_timeout_ms=100)
    await client.create_tenant(TenantCreate(tenant_id="t", name="t", credits=10))
    assert core._store is not None
    real_load = core._store.load
    calls = {"n": 0}

    def load_fails_for_a_while():  # the injected fault (at the store boundary): the file is unreadable
        calls["n"] += 1
        if calls["n"] <= 6:
            raise sqlite3.OperationalError("disk I/O error")
        return real_load()

    core._store.load = load_fails_for_a_while  # type: ignore[method-assign]
    with WriteLock(tmp_path), pytest.raises(LedgerUnavailableError):
        await client.top_up("t", TopUp(credits=1))
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(LedgerUnavailableError):
        await client.top_up("t", TopUp(credits=2))  # refused in bounded time, not hung
    assert asyncio.get_running_loop().time() - t0 < 3.0
    for _ in range(100):
        if core._writable.is_set():
            break
        await asyncio.sleep(0.1)
    assert (await client.top_up("t", TopUp(credits=3))).credits == 13
    await core.close()


async def test_settled_request_id_replayed_after_restart_is_refused_not_poisoning(tmp_path: Path) -> None:
    core, client = await started(tmp_path)
    for tid in ("a", "b"):
        await client.create_tenant(TenantCreate(tenant_id=tid, name=tid, credits=1000))
    ka, kb = (await client.create_key("a")).api_key, (await client.create_key("b")).api_key
    meter = Meter(client)
    r = await meter.authorize(ka, "m", 10, 10, "same-id")
    await meter.settle(r, 10, 10)
    await core.close()

    core2, client2 = await started(tmp_path)
    meter2 = Meter(client2)
    replay = asyncio.create_task(meter2.authorize(ka, "m", 10, 10, "same-id"))
    other = asyncio.create_task(meter2.authorize(kb, "m", 10, 10, "b-1"))  # same group commit
    with pytest.raises(DuplicateRequestError):
        await replay
    rb = await other
    assert (await meter2.settle(rb, 10, 1)).charged_ucredits == 11 * U
    again = await meter2.settle(r, 10, 10)
    assert again.duplicate and again.charged_ucredits == 20 * U
    assert (await core2.read(GetTenant("a"))).credits == 980
    assert (await core2.read(GetTenant("b"))).credits == 989
    assert await core2.read(Audit()) == []
    await core2.close()


def test_ledger_files_are_private(tmp_path: Path) -> None:
    async def run() -> None:
        old = os.umask(0o022)
        try:
            core, client = await started(tmp_path)
            await client.create_tenant(TenantCreate(tenant_id="t", name="t", credits=1))
            for name in ("ledger.sqlite3", "ledger.sqlite3-wal", "ledger.sqlite3-shm", "ledger.sqlite3.lock"):
                mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
                assert mode == 0o600, (name, oct(mode))
            await core.close()
        finally:
            os.umask(old)

    asyncio.run(run())
