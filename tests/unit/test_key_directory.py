"""Keys are checked before any body work: each gateway replica holds the usable keys, pushed by the
ledger on its real socket (snapshot, then changes once durable). Revocation reaches the replica
within 1 s; a flood of bad keys costs the ledger nothing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from serving.errors import AuthenticationError
from serving.metering import LedgerClient, Meter, MeteringConfig
from serving.metering._client import LocalTransport
from serving.metering._core import LedgerCore
from serving.metering._keys import SNAPSHOT_CHUNK, KeyDirectory, Keys, snapshot_frames
from serving.metering._socket import LedgerLink, LedgerSocketServer
from serving.tenancy import TenantCreate, generate_api_key, hash_api_key
from tests.unit.test_ledger_progress import LinkTransport


def test_directory_snapshot_in_chunks_then_changes() -> None:
    entries = [(f"h{i}", "t") for i in range(SNAPSHOT_CHUNK * 2 + 5)]
    frames = snapshot_frames(entries)
    assert len(frames) == 3 and [f.last for f in frames] == [False, False, True]
    d = KeyDirectory()
    assert d.admits("h1") is None  # not synced: unknown, the ledger decides
    d.apply(frames[0])
    d.apply(Keys([("h1", None), ("new", "t")]))  # a change arriving mid-snapshot is kept
    assert d.admits("h1") is None
    d.apply(frames[1])
    d.apply(frames[2])
    assert d.admits("h1") is False and d.admits("new") is True and d.admits("h2") is True
    assert d.admits("nope") is False
    d.lost()
    assert d.admits("h2") is None
    empty = KeyDirectory()
    for f in snapshot_frames([]):
        empty.apply(f)
    assert empty.synced and empty.admits("x") is False


async def wait_for(cond, timeout_s: float = 1.0) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    while not cond():
        if time.perf_counter() - t0 > timeout_s:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)
    return time.perf_counter() - t0


async def test_keys_pushed_over_the_ledger_socket_revocation_within_1s(tmp_path: Path) -> None:
    core = LedgerCore(MeteringConfig(state_dir=tmp_path))
    await core.start()
    server = LedgerSocketServer(core.apply, "127.0.0.1", on_close=core.end_lease, keys=core)
    endpoint = await server.start()

    async def ep() -> tuple[str, int, bytes]:
        return endpoint

    admin = LedgerClient(LocalTransport(core))
    await admin.create_tenant(TenantCreate(tenant_id="t", name="t", credits=100))
    first = await admin.create_key("t")
    replicas = [LedgerLink(ep, KeyDirectory()) for _ in range(3)]  # three gateway replicas
    meters = [Meter(LedgerClient(LinkTransport(link, core))) for link in replicas]  # type: ignore[arg-type]
    for m in meters:
        await m.connect()
    await wait_for(lambda: all(link.keys.synced for link in replicas))  # type: ignore[union-attr]
    for m in meters:
        m.check_key(first.api_key)
    second = await admin.create_key("t")
    await wait_for(lambda: all(link.keys.admits(hash_api_key(second.api_key)) for link in replicas))  # type: ignore[union-attr]

    await admin.revoke_key(first.key_id)  # acknowledged once durable; pushed right after
    took = await wait_for(
        lambda: all(link.keys.admits(hash_api_key(first.api_key)) is False for link in replicas)  # type: ignore[union-attr]
    )
    print(f"revocation reached 3 replicas {took * 1e3:.1f} ms after it was acknowledged")
    for m in meters:
        with pytest.raises(AuthenticationError):
            m.check_key(first.api_key)

    ops_before = core._stats.ops_total
    flood = [generate_api_key().plaintext for _ in range(5000)]  # well-formed, unknown keys
    refused = 0
    for k in flood:
        try:
            meters[0].check_key(k)
        except AuthenticationError:
            refused += 1
    assert refused == len(flood) and core._stats.ops_total == ops_before  # the ledger saw none

    await replicas[1].close()  # its link drops: unknown again, so the ledger decides
    assert replicas[1].keys.admits(hash_api_key(second.api_key)) is None  # type: ignore[union-attr]
    for link in replicas:
        await link.close()
    await server.close()
    await core.close()


async def test_in_process_directory_follows_the_core(tmp_path: Path) -> None:
    core = LedgerCore(MeteringConfig(state_dir=tmp_path))
    await core.start()
    client = LedgerClient(LocalTransport(core))
    meter = Meter(client)
    await client.create_tenant(TenantCreate(tenant_id="t", name="t", credits=100))
    key = await client.create_key("t")
    await meter.connect()
    meter.check_key(key.api_key)
    with pytest.raises(AuthenticationError):
        meter.check_key("sk-not-a-key")
    await client.revoke_key(key.key_id)
    with pytest.raises(AuthenticationError):
        meter.check_key(key.api_key)
    await core.close()
