"""Stateful property test of the ledger core (hypothesis): random interleavings of reserve, settle,
progress, expiry, restart, top-up, revoke and failed commits keep the books.

Real :class:`LedgerCore` on a real SQLite file, with hand-moved clocks. A failed commit is real too:
another connection holds the file's write lock. After every step:

* the file's audit holds (each balance = its grants - its charges, none negative);
* each tenant's balance equals what the model says was granted minus what was charged;
* reserved credits and in-flight counts equal the sum over the model's open reservations;
* no request is charged twice, and every acknowledged settlement's charge is in the file.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from serving.errors import APIError, LedgerUnavailableError
from serving.metering import LedgerClient, Meter, MeteringConfig, Reservation
from serving.metering._client import LocalTransport
from serving.metering._core import LedgerCore
from serving.metering._ops import Audit, GetTenant
from serving.tenancy import TenantCreate, TopUp

U = 1_000_000
pytestmark = pytest.mark.slow

TENANTS = ("a", "b")
TTL_S = 50.0


class Clock:
    def __init__(self) -> None:
        self.mono, self.wall = 100.0, 1_700_000_000.0

    def advance(self, s: float) -> None:
        self.mono += s
        self.wall += s


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = Path(tempfile.mkdtemp(prefix="tw-ledger-prop-"))
        self.clock = Clock()
        self.core: LedgerCore | None = None
        self.granted = {t: 0 for t in TENANTS}
        self.charged = {t: 0 for t in TENANTS}
        self.open: dict[str, tuple[str, Reservation, int | None]] = {}  # id -> tenant, res, progress
        self.settled: dict[str, int] = {}  # acknowledged charges
        self.keys: dict[str, str] = {}
        self.key_ids: dict[str, str] = {}
        self.revoked: set[str] = set()
        self.n = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def _start(self) -> None:
        cfg = MeteringConfig(
            state_dir=self.dir, reservation_ttl_s=TTL_S, restart_grace_s=TTL_S, busy_timeout_ms=50
        )
        self.core = LedgerCore(cfg, clock=lambda: self.clock.mono, wall=lambda: self.clock.wall)
        self.run(self.core.start())
        self.client = LedgerClient(LocalTransport(self.core))
        self.meter = Meter(self.client)

    @initialize()
    def setup(self) -> None:
        self._start()
        for t in TENANTS:
            self.run(self.client.create_tenant(TenantCreate(tenant_id=t, name=t, credits=500)))
            self.granted[t] = 500 * U
            k = self.run(self.client.create_key(t))
            self.keys[t], self.key_ids[t] = k.api_key, k.key_id

    def teardown(self) -> None:
        if self.core is not None:
            self.run(self.core.close())
        self.loop.close()

    # -- rules ---------------------------------------------------------------------------------------
    @rule(tenant=st.sampled_from(TENANTS), prompt=st.integers(1, 60), max_tokens=st.integers(1, 120))
    def reserve(self, tenant: str, prompt: int, max_tokens: int) -> None:
        self.n += 1
        rid = f"r{self.n}"
        try:
            r = self.run(self.meter.authorize(self.keys[tenant], "m", prompt, max_tokens, rid))
        except APIError as e:
            if tenant in self.revoked:
                assert e.code == "invalid_api_key"
            return
        assert tenant not in self.revoked, "a revoked key reserved"
        self.open[rid] = (tenant, r, None)

    @precondition(lambda self: self.open)
    @rule(data=st.data(), twice=st.booleans())
    def settle(self, data: st.DataObject, twice: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.open)))
        tenant, r, _ = self.open[rid]
        completion = data.draw(st.integers(0, r.max_tokens))
        s = self.run(self.meter.settle(r, r.prompt_tokens, completion))
        if s.duplicate:  # expired meanwhile: the expiry's charge stands
            assert rid not in self.core._state.open  # type: ignore[union-attr]
        else:
            assert s.charged_ucredits == (r.prompt_tokens + completion) * U
        self._closed(rid, tenant)
        if twice:
            again = self.run(self.meter.settle(r, r.prompt_tokens, completion))
            assert again.duplicate and again.charged_ucredits == s.charged_ucredits

    @precondition(lambda self: self.open)
    @rule(data=st.data())
    def progress(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.open)))
        tenant, r, _ = self.open[rid]
        tokens = data.draw(st.integers(0, r.max_tokens))
        self.run(self.meter.progress(r, tokens))
        self.open[rid] = (tenant, r, tokens)

    @rule(seconds=st.sampled_from([1.0, TTL_S + 1]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.run(self.core.expire_due())  # type: ignore[union-attr]
        for rid in [rid for rid in self.open if rid not in self.core._state.open]:  # type: ignore[union-attr]
            self._closed(rid, self.open[rid][0])

    @rule()
    def restart(self) -> None:
        self.run(self.core.close())  # type: ignore[union-attr]
        self._start()

    @rule(tenant=st.sampled_from(TENANTS), credits=st.integers(1, 300))
    def top_up(self, tenant: str, credits: int) -> None:
        view = self.run(self.client.top_up(tenant, TopUp(credits=credits)))
        self.granted[tenant] += credits * U
        assert round(view.credits * U) == self.granted[tenant] - self.charged[tenant]

    @precondition(lambda self: len(self.revoked) < len(TENANTS))
    @rule(tenant=st.sampled_from(TENANTS))
    def revoke(self, tenant: str) -> None:
        self.run(self.client.revoke_key(self.key_ids[tenant]))
        self.revoked.add(tenant)

    @rule(tenant=st.sampled_from(TENANTS), credits=st.integers(1, 300))
    def failed_commit(self, tenant: str, credits: int) -> None:
        db = sqlite3.connect(self.dir / "ledger.sqlite3", isolation_level=None)
        db.execute("BEGIN IMMEDIATE")  # another process holds the write lock: the commit fails
        try:
            try:
                self.run(self.client.top_up(tenant, TopUp(credits=credits)))
                raise AssertionError("a commit under another writer's lock was acknowledged")
            except LedgerUnavailableError:
                pass
        finally:
            db.execute("ROLLBACK")
            db.close()
        self.run(self._until_writable())

    async def _until_writable(self) -> None:
        while not self.core._writable.is_set():  # type: ignore[union-attr]
            await asyncio.sleep(0.01)

    def _closed(self, rid: str, tenant: str) -> None:
        del self.open[rid]
        with sqlite3.connect(self.dir / "ledger.sqlite3") as db:
            (ucredits,) = db.execute(
                "SELECT ucredits FROM usage_events WHERE request_id = ?", (rid,)
            ).fetchone()
        self.settled[rid] = ucredits
        self.charged[tenant] += ucredits

    # -- invariants ----------------------------------------------------------------------------------
    @invariant()
    def books_balance(self) -> None:
        if self.core is None:
            return
        assert self.run(self.core.read(Audit())) == []
        for t in TENANTS:
            view = self.run(self.core.read(GetTenant(t)))
            assert round(view.credits * U) == self.granted[t] - self.charged[t]
            mine = [r for tenant, r, _ in self.open.values() if tenant == t]
            assert view.in_flight == len(mine)
            assert round(view.reserved_credits * U) == sum(r.reserved_ucredits for r in mine)
        with sqlite3.connect(self.dir / "ledger.sqlite3") as db:
            events = dict(db.execute("SELECT request_id, ucredits FROM usage_events").fetchall())
        assert len(events) == len(self.settled)  # no request charged twice, none lost
        assert all(events[rid] == c for rid, c in self.settled.items())


LedgerMachine.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
TestLedgerProperties = LedgerMachine.TestCase
