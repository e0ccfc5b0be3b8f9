"""The ledger as the shared Ray actor: two gateway replicas (actors) on the ledger socket, exact
quota, kill -9 restart (the socket closes; replicas reconnect to the restarted actor and resend)."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray

from serving.errors import InsufficientQuotaError
from serving.metering import Meter, MeteringConfig, connect
from serving.metering._actor import get_or_create_ledger_actor
from serving.metering._ops import Audit, GetTenant, Stats
from serving.tenancy import TenantCreate

pytestmark = pytest.mark.integration
U = 1_000_000


@pytest.fixture(scope="module", autouse=True)
def ray_local() -> Iterator[None]:
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        namespace="test-ledger",
        log_to_driver=False,
    )
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


class Replica:
    """A gateway replica stand-in with its own batched client to the shared ledger."""

    def __init__(self, config: MeteringConfig, api_key: str) -> None:
        # The gateway's client: hot operations on the ledger's socket, admin over Ray.
        self.meter = Meter(connect(config, namespace="test-ledger"))
        self.key = api_key

    async def burst(self, prefix: str, n: int) -> tuple[list[tuple[str, int, int, int]], int]:
        """``n`` concurrent requests (reserve 20 + 80); returns (rid, prompt, completion, charged), refused."""
        done: list[tuple[str, int, int, int]] = []
        refused = 0

        async def one(i: int) -> None:
            nonlocal refused
            try:
                r = await self.meter.authorize(self.key, "m", 20, 80, f"{prefix}-{i}")
            except InsufficientQuotaError:
                refused += 1
                return
            completion = (i * 7) % 81
            s = await self.meter.settle(r, 20, completion, ["completed", "error", "aborted"][i % 3])
            done.append((r.request_id, 20, completion, s.charged_ucredits))

        await asyncio.gather(*(one(i) for i in range(n)))
        return done, refused

    async def loop(self, prefix: str, n: int, concurrency: int) -> dict[str, int]:
        """Reserve+settle ``n`` requests in ``concurrency`` loops; returns acknowledged charges."""
        charged: dict[str, int] = {}

        async def worker(w: int) -> None:
            for i in range(w, n, concurrency):
                r = await self.meter.authorize(self.key, "m", 10, 30, f"{prefix}-{i}")
                s = await self.meter.settle(r, 10, i % 31, "completed")
                charged[r.request_id] = s.charged_ucredits

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return charged


def setup_ledger(tmp_path: Path, name: str, credits: float) -> tuple[MeteringConfig, Any, str]:
    config = MeteringConfig(state_dir=tmp_path, ledger_actor_name=name)
    ledger = get_or_create_ledger_actor(config, namespace="test-ledger")

    async def create() -> str:
        client = connect(config, namespace="test-ledger")
        await client.create_tenant(TenantCreate(tenant_id="t", name="t", credits=credits))
        return (await client.create_key("t")).api_key

    return config, ledger, asyncio.run(create())


def test_zero_overspend_across_two_replica_actors(tmp_path: Path) -> None:
    config, ledger, key = setup_ledger(tmp_path, "ledger-overspend", credits=10_000)
    replicas = [ray.remote(Replica).remote(config, key) for _ in range(2)]
    results = ray.get([r.burst.remote(f"r{i}", 150) for i, r in enumerate(replicas)])
    done = [d for ds, _ in results for d in ds]
    refused = sum(n for _, n in results)
    total = sum(c for *_, c in done)
    assert refused > 0 and len(done) + refused == 300
    assert total <= 10_000 * U
    assert all(c == (p + comp) * U for _, p, comp, c in done)  # each charged exactly its usage
    tenant = ray.get(ledger.read.remote(GetTenant("t")))
    assert round(tenant.credits * U) == 10_000 * U - total
    assert tenant.reserved_credits == 0 and tenant.in_flight == 0  # no leaked reservations
    assert ray.get(ledger.read.remote(Audit())) == []
    ray.kill(ledger)


@pytest.mark.chaos
def test_kill_9_ledger_actor_mid_load_then_restart(tmp_path: Path) -> None:
    config, ledger, key = setup_ledger(tmp_path, "ledger-crash", credits=1_000_000)
    pid = ray.get(ledger.ping.remote())
    replicas = [ray.remote(Replica).remote(config, key) for _ in range(2)]
    runs = [r.loop.remote(f"r{i}", 2000, 32) for i, r in enumerate(replicas)]
    deadline = time.monotonic() + 60
    while ray.get(ledger.read.remote(Stats())).ops_total < 1500:  # mid-load: a polled condition
        assert time.monotonic() < deadline, "load did not start"
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    charged = {}
    for part in ray.get(runs, timeout=120):  # replicas retry through the restart
        charged.update(part)
    assert ray.get(ledger.ping.remote()) != pid  # a new process on the same file
    assert len(charged) == 4000
    with sqlite3.connect(tmp_path / "ledger.sqlite3") as db:
        events = dict(db.execute("SELECT request_id, ucredits FROM usage_events").fetchall())
        (open_rows,) = db.execute("SELECT count(*) FROM reservations").fetchone()
    assert events == charged  # every request charged exactly once, as acknowledged
    assert open_rows == 0  # reservations re-sent after the crash were idempotent: none leaked
    tenant = ray.get(ledger.read.remote(GetTenant("t")))
    print(
        f"\n[ledger kill -9] sent 4000 served {len(charged)} failed {4000 - len(charged)} refunded 0;"
        f" ledger: granted 1e+06 = balance {tenant.credits:g} + charged {sum(charged.values()) / U:g};"
        f" reservations left {open_rows}"
    )
    assert round(tenant.credits * U) == 1_000_000 * U - sum(charged.values())
    assert tenant.in_flight == 0 and ray.get(ledger.read.remote(Audit())) == []
    ray.kill(ledger)
