"""Produced tokens are recorded, and a gateway that vanishes is charged what it produced soon after
its ledger connection drops (a lease), not at the reservation's TTL. Real ledger core on each store
(SQLite; PostgreSQL, marker ``postgres``), real ledger socket on loopback."""

from __future__ import annotations

import asyncio

from _ledger_stores import LedgerTarget

from serving.metering import LedgerClient, Meter
from serving.metering._client import LocalTransport
from serving.metering._core import LedgerCore
from serving.metering._ops import GetTenant
from serving.metering._socket import LedgerLink, LedgerSocketServer
from serving.tenancy import TenantCreate

U = 1_000_000


class LinkTransport:
    """Hot operations over the real ledger socket (as a gateway replica sends them)."""

    def __init__(self, link: LedgerLink, core: LedgerCore) -> None:
        self.link, self.core = link, core
        self.keys = link.keys

    async def connect(self) -> None:
        await self.link.connect()

    async def hot(self, ops):  # type: ignore[no-untyped-def]
        return await self.link.call(ops)

    async def admin(self, op):  # type: ignore[no-untyped-def]
        (r,) = await self.core.apply([op])
        return r

    async def read(self, op):  # type: ignore[no-untyped-def]
        return await self.core.read(op)


def outcomes(target: LedgerTarget) -> dict[str, tuple[str, int]]:
    rows = target.rows("SELECT request_id, outcome, completion_tokens FROM usage_events")
    return {r: (o, c) for r, o, c in rows}


async def test_flush_sends_progress_of_every_live_request_that_produced_tokens(
    ledger_target: LedgerTarget,
) -> None:
    core = LedgerCore(ledger_target.config())
    await core.start()
    client = LedgerClient(LocalTransport(core))
    await client.create_tenant(TenantCreate(tenant_id="t", name="t", credits=1000))
    key = (await client.create_key("t")).api_key
    meter = Meter(client)
    r = await meter.authorize(key, "m", 10, 100, "long")
    assert meter.flush_progress() == 0  # no token yet
    meter.note_progress("long", 5)
    # The first flush after its first token records it, however young: a gateway that dies before
    # the next one still gets it charged all but at most one interval's tokens.
    assert meter.flush_progress() == 1
    meter.note_progress("long", 9)
    assert meter.flush_progress() == 1
    assert meter.flush_progress() == 0  # nothing new since
    await asyncio.sleep(0.05)
    assert core._state.open["long"].progress_tokens == 9
    await meter.settle(r, 10, 12)
    meter.note_progress("long", 20)  # after settlement: ignored
    assert meter.flush_progress() == 0
    await core.close()


async def test_dead_gateway_is_charged_its_progress_when_its_lease_ends(ledger_target: LedgerTarget) -> None:
    cfg = ledger_target.config(lease_grace_s=0.3)
    core = LedgerCore(cfg)
    await core.start()
    server = LedgerSocketServer(core.apply, "127.0.0.1", on_close=core.end_lease)
    endpoint = await server.start()

    async def ep() -> tuple[str, int, bytes]:
        return endpoint

    admin = LedgerClient(LocalTransport(core))
    await admin.create_tenant(TenantCreate(tenant_id="t", name="t", credits=1000))
    key = (await admin.create_key("t")).api_key

    link = LedgerLink(ep)
    meter = Meter(LedgerClient(LinkTransport(link, core)))  # type: ignore[arg-type]
    streaming = await meter.authorize(key, "m", 10, 200, "streaming")
    silent = await meter.authorize(key, "m", 10, 200, "silent")
    assert streaming.reserved_ucredits == 210 * U
    for produced in (3, 40, 77):  # the gateway's once-a-second flushes
        meter.note_progress("streaming", produced)
        meter.flush_progress()
    for _ in range(200):  # the flushes are sent without waiting; the ledger has the last one when
        r = core._state.open.get("streaming")
        if r is not None and r.progress_tokens == 77:
            break
        await asyncio.sleep(0.01)
    await link.close()  # the gateway dies: its connection drops, nothing is settled
    for _ in range(100):
        if not core._state.open:
            break
        await asyncio.sleep(0.05)
        await core.expire_due()
    assert not core._state.open, "reservations of a dropped connection must be resolved soon"
    assert outcomes(ledger_target) == {
        "streaming": ("expired_charged", 77),
        "silent": ("expired_released", 0),
    }
    t = await core.read(GetTenant("t"))
    assert t.credits == 1000 - 10 - 77 and t.in_flight == 0 and t.reserved_credits == 0
    assert silent.request_id == "silent"
    await server.close()
    await core.close()


async def test_a_resent_reserve_moves_the_lease_to_the_new_connection(ledger_target: LedgerTarget) -> None:
    core = LedgerCore(ledger_target.config(lease_grace_s=0.2))
    await core.start()
    admin = LedgerClient(LocalTransport(core))
    await admin.create_tenant(TenantCreate(tenant_id="t", name="t", credits=1000))
    key = (await admin.create_key("t")).api_key
    from serving.metering._ops import Reserve
    from serving.tenancy import hash_api_key

    op = Reserve("r", hash_api_key(key), "m", 1, 1, None)
    await core.apply([op], lease=1)
    await core.apply([op], lease=2)  # reconnected and resent
    assert core.end_lease(1) == 0 and core.end_lease(2) == 1
    await core.close()
