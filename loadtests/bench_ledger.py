"""Ledger throughput: reserve+settle pairs per second from 4 gateway replicas, every commit durable.

Each replica is a Ray actor with its own :class:`LedgerClient` (as in the gateway) running
``--concurrency`` request loops against the one ledger actor (SQLite, WAL, ``synchronous=FULL``;
or ``--store postgres``: PostgreSQL, ``synchronous_commit=on``, on a throwaway server this starts
with ``fsync=on`` (loadtests/pg_server.py), or on the database ``--dsn`` names).

    python loadtests/bench_ledger.py [--pairs 20000] [--replicas 4] [--concurrency 128] [--transport actor]
        [--store postgres [--dsn DSN]]

``--transport socket`` (the gateway's) sends hot batches on the ledger's TCP socket; ``actor`` sends
them as Ray actor calls, for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from serving.gateway.request import new_request_id
from serving.metering import LedgerClient, Meter, MeteringConfig
from serving.metering._actor import ActorTransport, get_or_create_ledger_actor
from serving.metering._ops import Audit, Stats
from serving.tenancy import TenantCreate, TenantLimits


def make_meter(ledger: Any, transport: str) -> Meter:
    return Meter(LedgerClient(ActorTransport(ledger, socket=transport == "socket")))


class Replica:
    """A gateway replica stand-in: authorize, then settle, in ``concurrency`` loops."""

    def __init__(self, ledger: Any, api_key: str, transport: str) -> None:
        self.meter = make_meter(ledger, transport)
        self.key = api_key

    async def run(self, name: str, pairs: int, concurrency: int) -> tuple[int, float, float]:
        done = 0
        t0 = time.perf_counter()

        async def loop(w: int) -> None:
            nonlocal done
            for i in range(w, pairs, concurrency):
                r = await self.meter.authorize(self.key, "bench", 100, 200, new_request_id())
                await self.meter.settle(r, 100, i % 200, "completed", "pool", "cpu")
                done += 1

        await asyncio.gather(*(loop(w) for w in range(concurrency)))
        return done, t0, time.perf_counter()


async def idle_latency_ms(ledger: Any, api_key: str, transport: str, n: int = 200) -> tuple[float, float]:
    """p50 of authorize and of settle with one request at a time (what one request pays)."""
    meter = make_meter(ledger, transport)
    auth, settle = [], []
    for i in range(n):
        t0 = time.perf_counter()
        r = await meter.authorize(api_key, "bench", 100, 200, f"lat-{i}")
        t1 = time.perf_counter()
        await meter.settle(r, 100, 50, "completed", "pool", "cpu")
        auth.append(t1 - t0)
        settle.append(time.perf_counter() - t1)
    return 1000 * sorted(auth)[n // 2], 1000 * sorted(settle)[n // 2]


async def setup(ledger: Any, tenants: int) -> list[str]:
    client = LedgerClient(ActorTransport(ledger))
    keys = []
    for t in range(tenants):
        await client.create_tenant(
            TenantCreate(
                tenant_id=f"bench-{t}",
                name=f"bench {t}",
                credits=1e10,
                limits=TenantLimits(rpm=10_000_000, tpm=10_000_000_000, max_concurrency=100_000),
            )
        )
        keys.append((await client.create_key(f"bench-{t}")).api_key)
    return keys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=20_000, help="reserve+settle pairs per replica")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=128, help="request loops per replica")
    ap.add_argument("--transport", choices=("socket", "actor"), default="socket")
    ap.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument("--dsn", help="an empty PostgreSQL database (default: a throwaway server, fsync on)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    state_dir = Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    server = None
    store: dict[str, Any] = {}
    if args.store == "postgres":
        dsn = args.dsn
        if dsn is None:
            from loadtests.pg_server import PostgresServer

            server = PostgresServer(fsync=True)
            dsn = server.create_database()
        store = {"store": "postgres", "postgres_dsn": dsn}
    ray.init(
        address="local",  # a Ray of its own, never another cluster on this machine
        num_cpus=args.replicas + 1,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        namespace="bench-ledger",
        log_to_driver=False,
    )
    try:
        cfg = MeteringConfig(state_dir=state_dir, ledger_actor_name="bench-ledger", **store)
        ledger = get_or_create_ledger_actor(cfg, namespace="bench-ledger")
        ray.get(ledger.ping.remote())
        keys = asyncio.run(setup(ledger, args.replicas))
        replicas = [
            ray.remote(Replica).options(num_cpus=1).remote(ledger, keys[i], args.transport)
            for i in range(args.replicas)
        ]  # type: ignore[attr-defined]
        ray.get([r.run.remote(f"warm{i}", 500, 32) for i, r in enumerate(replicas)])
        results = ray.get(
            [r.run.remote(f"r{i}", args.pairs, args.concurrency) for i, r in enumerate(replicas)]
        )
        total = sum(n for n, _, _ in results)
        elapsed = max(e for _, _, e in results) - min(s for _, s, _ in results)
        stats = ray.get(ledger.read.remote(Stats()))
        problems = ray.get(ledger.read.remote(Audit()))
        h = stats.commit_latency
        print(
            f"store={args.store} transport={args.transport} replicas={args.replicas}"
            f" concurrency={args.concurrency} pairs={total} elapsed_s={elapsed:.2f}"
        )
        print(f"reserve+settle pairs/s: {total / elapsed:,.0f}")
        print(
            f"commits={stats.commits_total} ops/commit={stats.ops_total / max(1, stats.commits_total):.1f}"
            f" mean_commit_ms={1000 * h.sum_s / max(1, h.count):.2f}"
            f" {'synchronous_commit=on' if store else 'synchronous=FULL'} audit_problems={len(problems)}"
        )
        auth_ms, settle_ms = asyncio.run(idle_latency_ms(ledger, keys[0], args.transport))
        print(
            f"idle p50 authorize_ms={auth_ms:.2f} settle_ms={settle_ms:.2f} (one request at a time, durable)"
        )
        ray.get(ledger.shutdown.remote())
        ray.kill(ledger)
    finally:
        ray.shutdown()
        shutil.rmtree(state_dir, ignore_errors=True)
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
