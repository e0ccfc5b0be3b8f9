"""A request that a pool refuses before its first token is charged nothing, and its release costs
the ledger no commit of its own (issue 13).

The gateway's request path (:class:`GatewayService`, its pool directory and token channel) against a
real replica host whose admission core refuses (one sequence, held by a long request, and a queue
deadline no request can meet), metered by a real ledger file. Then the ledger alone: a release is
answered at once and rides on the next commit, one commit takes every pending release when nothing
else writes, and a release that a failed commit lost is applied again.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from serving.admission import AdmissionCore, AdmissionRefused, AsyncAdmission
from serving.config import parse_config
from serving.config.resolved import resolve
from serving.engines.base import EngineRequest, SamplingSpec
from serving.errors import LedgerUnavailableError
from serving.gateway.pool_directory import PoolDirectory, PoolRef, pool_info
from serving.gateway.service import GatewayService
from serving.gateway.tokenization import PromptTokenizer
from serving.gateway.transport import ChannelTransport
from serving.metering import LedgerClient, Meter, MeteringConfig
from serving.metering._client import LocalTransport
from serving.metering._core import _RELEASE_COMMIT_S, LedgerCore
from serving.metering._ops import Audit, GetTenant, Stats
from serving.pools.host import ReplicaHost
from serving.pools.replica import build_engine
from serving.tenancy import TenantCreate, TopUp

pytestmark = pytest.mark.timeout(120)

MODEL = "llama-3.1-8b-instruct"
U = 1_000_000


async def until(cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll a condition another task makes true (no fixed sleeps)."""
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.01)


def file_rows(state: Path, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(f"file:{state / 'ledger.sqlite3'}?mode=ro", uri=True) as db:
        return db.execute(sql, args).fetchall()


async def ledger(state: Path, **kw: object) -> tuple[LedgerCore, LedgerClient, str]:
    core = LedgerCore(MeteringConfig(state_dir=state, **kw))  # type: ignore[arg-type]
    await core.start()
    client = LedgerClient(LocalTransport(core))
    await client.create_tenant(TenantCreate(tenant_id="t", name="t", credits=1000))
    return core, client, (await client.create_key("t")).api_key


async def commits(core: LedgerCore) -> int:
    return int((await core.read(Stats())).commits_total)


async def test_a_pool_refusal_charges_nothing_and_commits_only_its_reservation(tmp_path: Path) -> None:
    core, client, key = await ledger(tmp_path / "ledger")
    cfg = parse_config(
        {
            "models": {MODEL: {"tokenizer": "builtin:tiny-llama"}},
            "state_dir": str(tmp_path / "state"),
            "pools": [
                {
                    "name": "sim",
                    "model": MODEL,
                    "accelerator": "H100",
                    "engine": "sim",
                    "engine_args": {"max_num_seqs": 1},
                    # Nothing may wait: with the one sequence busy, every request is refused on arrival.
                    "admission": {"queue_deadline_ms": 1, "min_queued_per_tenant": 0},
                }
            ],
        }
    )
    dep = resolve(cfg)
    pool = dep.pools[0]
    engine = build_engine(pool)
    await engine.start()
    cap = engine.capacity()
    admission = AsyncAdmission(
        AdmissionCore(
            pool.admission.for_engine(
                cap.max_num_seqs, cap.kv_capacity_tokens, pool.slo.ttft_ms, pool.slo.tpot_ms
            )
        )
    )
    host = ReplicaHost(engine, admission, "127.0.0.1", "replica-1")
    transport = ChannelTransport("gw-1")
    transport.sync([("replica-1", *await host.start())])
    ref = PoolRef(pool.name, pool.model, pool.accelerator, 1, None, pool.slo.ttft_ms, pool.slo.tpot_ms)
    ref.replica_keys = ["replica-1"]
    tokenizer = await asyncio.get_running_loop().run_in_executor(
        None, PromptTokenizer, dep.models[MODEL].tokenizer_source
    )
    service = GatewayService(
        {MODEL: pool.entry},
        {MODEL: tokenizer},
        PoolDirectory([ref], [pool_info(pool)], transport),
        30.0,
        Meter(client),
    )
    await until(lambda: transport.usable("replica-1"))
    blocker = transport.submit(
        "replica-1", EngineRequest("blocker", [1, 2, 3], SamplingSpec(max_tokens=4000, ignore_eos=True))
    )
    try:
        await until(lambda: admission.stats().in_flight_seqs == 1)
        p = service.prepare("completion", {"model": MODEL, "prompt": "refused, please", "max_tokens": 16})
        before = await commits(core)
        await service.authorize(p, key)
        assert await commits(core) == before + 1  # the reservation is durable before dispatch
        with pytest.raises(AdmissionRefused) as refused:
            await service.stream(p)
        assert refused.value.status_code in (429, 503)
        await until(lambda: not service._settling)  # the release, started without waiting on it
        t = await core.read(GetTenant("t"))
        assert (t.credits, t.reserved_credits, t.in_flight) == (1000, 0, 0)  # released in memory at once
        assert await commits(core) == before + 1  # and no commit of its own
        # It rides on the next commit (here the one that takes pending releases when nothing writes).
        await until(
            lambda: not file_rows(tmp_path / "ledger", "SELECT 1 FROM reservations"), 5 * _RELEASE_COMMIT_S
        )
        rows = file_rows(
            tmp_path / "ledger",
            "SELECT outcome, prompt_tokens, completion_tokens, ucredits FROM usage_events WHERE request_id = ?",
            p.request_id,
        )
        assert rows == [("refused", 0, 0, 0)]  # nothing produced, nothing charged: not the prompt either
        assert p.outcome is not None and p.outcome.status == "refused"
        assert await core.read(Audit()) == []
    finally:
        blocker.close()
        await transport.close()
        await host.close()
        await engine.shutdown()
        await core.close()


async def test_a_release_rides_on_the_next_commit(tmp_path: Path) -> None:
    core, client, key = await ledger(tmp_path)
    meter = Meter(client)
    a = await meter.authorize(key, "m", 10, 20, "a")
    n = await commits(core)
    t0 = time.monotonic()
    assert (await meter.settle(a, 0, 0, "refused")).released_ucredits == 30 * U
    assert await commits(core) == n  # answered without a commit
    assert file_rows(tmp_path, "SELECT request_id FROM reservations") == [("a",)]
    await meter.authorize(key, "m", 10, 20, "b")  # the next write's commit carries the release
    assert await commits(core) == n + 1
    assert file_rows(tmp_path, "SELECT request_id FROM reservations") == [("b",)]
    assert file_rows(tmp_path, "SELECT outcome, ucredits FROM usage_events WHERE request_id = 'a'") == [
        ("refused", 0)
    ]
    stats = await core.read(Stats())
    assert stats.writes_total == {"reserve": 2, "release": 1, "admin": 2}
    assert time.monotonic() - t0 < _RELEASE_COMMIT_S  # the release's own timer did not do it
    await core.close()


async def test_pending_releases_take_one_commit_when_nothing_else_writes(tmp_path: Path) -> None:
    core, client, key = await ledger(tmp_path)
    meter = Meter(client)
    held = [await meter.authorize(key, "m", 10, 20, f"r{i}") for i in range(5)]
    n = await commits(core)
    for r in held:
        await meter.settle(r, 0, 0, "refused")
    assert await commits(core) == n
    await until(lambda: not file_rows(tmp_path, "SELECT 1 FROM reservations"), 5 * _RELEASE_COMMIT_S)
    assert await commits(core) == n + 1  # one commit for all five
    assert len(file_rows(tmp_path, "SELECT 1 FROM usage_events WHERE outcome = 'refused'")) == 5
    # A settlement that produced tokens is not a release: durable when answered.
    r = await meter.authorize(key, "m", 10, 20, "served")
    await meter.settle(r, 10, 5)
    assert file_rows(tmp_path, "SELECT ucredits FROM usage_events WHERE request_id = 'served'") == [(15 * U,)]
    assert (await core.read(Stats())).writes_total["settle"] == 1
    await core.close()


async def test_a_release_lost_in_a_failed_commit_is_applied_again(tmp_path: Path) -> None:
    core, client, key = await ledger(tmp_path, busy_timeout_ms=300)
    meter = Meter(client)
    r = await meter.authorize(key, "m", 10, 20, "lost")
    db = sqlite3.connect(tmp_path / "ledger.sqlite3", isolation_level=None)
    db.execute("BEGIN IMMEDIATE")  # another process holds the write lock: the next commit fails
    try:
        await meter.settle(r, 0, 0, "refused")  # answered at once, rides on the next commit
        with pytest.raises(LedgerUnavailableError):  # which fails: the release goes with it
            await client.top_up("t", TopUp(credits=5))
    finally:
        db.execute("ROLLBACK")
        db.close()
    await until(core._writable.is_set)  # the state is rebuilt from the file
    t = await core.read(GetTenant("t"))
    # The rebuilt state (from the file: the reservation held, no top-up) has it released again.
    assert (t.credits, t.in_flight, t.reserved_credits) == (1000, 0, 0)
    await until(lambda: not file_rows(tmp_path, "SELECT 1 FROM reservations"), 5 * _RELEASE_COMMIT_S)
    assert file_rows(tmp_path, "SELECT outcome, ucredits FROM usage_events") == [("refused", 0)]
    assert await core.read(Audit()) == []
    await core.close()
