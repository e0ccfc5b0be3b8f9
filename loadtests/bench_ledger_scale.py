"""The ledger at competency-center scale, side by side with a small one (issue 15's numbers).

Builds (once, cached under ``--dir``) a ledger file with ``--orgs`` organizations, ``--projects``
projects, ``--keys`` keys and ``--events`` usage events (with their daily roll-up), and a small one
with 100 organizations; then, for each:

* ledger start time and resident memory (the ledger opened in this process: load of every
  organization, project, grant and key, and the recent settlements);
* durable reserve+settle pairs/s from 4 gateway-replica actors on the ledger socket (as
  ``bench_ledger.py``), runs alternated small/large so drift hits both alike. Both ledgers get the
  same workload: ``--hot`` keys (default 100, each of its own organization and project: all the
  small ledger has), so the comparison changes only the ledger's size. How many organizations a
  commit touches is a property of the workload, and it costs on any ledger: every one adds a row to
  each of the commit's balance, grant, project and roll-up writes and an index page to the usage
  events' per-organization and per-project indexes. ``--wide`` adds a run of the large ledger with
  64 keys per replica (256 organizations hot) to show that cost;
* key lookup on the request path: p50/p99 of one :class:`KeyDirectory` check (the gateway's) and one
  ledger key-table lookup, at 1,000 and at ``--keys`` keys;
* ``/metrics``: the ledger's families rendered (size, series, time) with every project loaded.

    python loadtests/bench_ledger_scale.py [--orgs 5000 --projects 100000 --keys 150000 --events 10000000]
        [--store postgres]

``--store postgres`` copies each built file into a database of its own on a throwaway PostgreSQL
server (fsync on; loadtests/pg_server.py) with ``tokenweir ledger migrate-to-postgres``'s function,
printing how long that took (the copy, then its VACUUM ANALYZE), checkpoints, and measures the ledger
there.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import resource
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from loadtests.bench_ledger import Replica
from serving.gateway.request import new_request_id
from serving.metering import MeteringConfig
from serving.metering._actor import get_or_create_ledger_actor
from serving.metering._core import LedgerCore
from serving.metering._keys import KeyDirectory, Keys
from serving.metering._ops import Audit, Stats
from serving.metering._stats import LedgerCollector
from serving.metering._store import SqliteStore
from serving.metrics import render
from serving.tenancy import TenantLimits, generate_api_key

DAY = 86_400
T0 = 1_767_225_600.0  # 2026-01-01
LIMITS = TenantLimits(rpm=10_000_000, tpm=10_000_000_000, max_concurrency=100_000).model_dump_json()


def build(path: Path, orgs: int, projects: int, keys: int, events: int, seed: int = 15) -> list[str]:
    """Write a schema-2 ledger file directly (bulk SQL: the ledger's own writes would take an hour
    for 10 million events); returns the plaintext of a sample of its keys, one per organization
    first."""
    rng = random.Random(seed)
    SqliteStore(path).close()  # the current schema
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    db.executemany(
        "INSERT INTO tenants VALUES (?,?,?,NULL,?,?,?,?)",
        ((f"org-{o:05d}", f"Org {o}", 1.0, 10**16, LIMITS, T0, T0) for o in range(orgs)),
    )
    db.executemany(
        "INSERT INTO grants (tenant_id, grant_id, program, ucredits, remaining_ucredits, starts_at, expires_at,"
        " note, granted_at) VALUES (?,?,?,?,?,?,?,?,?)",
        ((f"org-{o:05d}", "initial", "paid-plan", 10**16, 10**16, T0, None, "", T0) for o in range(orgs)),
    )
    proj = [(o, f"p-{p:06d}") for p in range(projects) for o in [p % orgs]]
    db.executemany(
        "INSERT INTO projects VALUES (?,?,?,1.0,NULL,'{}',NULL,'lifetime',0,0.0,?,?)",
        ((f"org-{o:05d}", pid, pid, T0, T0) for o, pid in proj),
    )
    sample: list[str] = []
    rows = []
    for k in range(keys):
        o, pid = proj[k % projects]
        key = generate_api_key()
        if k < 4096:
            sample.append(key.plaintext)
        rows.append(
            (key.key_id, f"org-{o:05d}", key.key_hash, key.display_prefix, "", T0, None, pid, "member")
        )
    db.executemany("INSERT INTO api_keys VALUES (?,?,?,?,?,?,?,?,?)", rows)
    del rows
    indexes = db.execute(  # the schema's own (rebuilt after the bulk load, as they were)
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'usage_events'"
        " AND sql IS NOT NULL"
    ).fetchall()
    for name, _sql in indexes:
        db.execute(f"DROP INDEX {name}")
    days = 90
    daily: dict[tuple[str, str, str, str], list[int]] = {}
    chunk = 200_000
    for start in range(0, events, chunk):
        batch = []
        for i in range(start, min(events, start + chunk)):
            o, pid = proj[rng.randrange(projects)]
            ts = T0 + (i / events) * days * DAY
            p, c = 100 + i % 400, i % 300
            tid = f"org-{o:05d}"
            batch.append(
                (
                    f"ev-{i:09d}",
                    tid,
                    "key_x",
                    "bench",
                    "pool",
                    "cpu",
                    p,
                    c,
                    p * 1000,
                    c * 1000,
                    (p + c) * 1000,
                    ts,
                    ts,
                    "completed",
                    pid,
                )
            )
            d = daily.setdefault(
                (time.strftime("%Y-%m-%d", time.gmtime(ts)), tid, pid, "bench"), [0, 0, 0, 0]
            )
            d[0] += 1
            d[1] += p
            d[2] += c
            d[3] += (p + c) * 1000
        db.executemany(
            "INSERT INTO usage_events (request_id, tenant_id, key_id, model, pool, gpu_type, prompt_tokens,"
            " completion_tokens, prompt_ucredits, completion_ucredits, ucredits, reserved_at, settled_at, outcome,"
            " project_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            batch,
        )
    db.executemany(
        "INSERT INTO usage_daily (day, tenant_id, project_id, model, requests, prompt_tokens,"
        " completion_tokens, ucredits) VALUES (?,?,?,?,?,?,?,?)",
        ((*k, *v) for k, v in daily.items()),
    )
    charged: dict[str, int] = {}
    for (_, tid, _, _), v in daily.items():
        charged[tid] = charged.get(tid, 0) + v[3]
    db.executemany(
        "UPDATE tenants SET balance_ucredits = balance_ucredits - ? WHERE tenant_id = ?",
        ((u, t) for t, u in charged.items()),
    )
    db.executemany(
        "UPDATE grants SET remaining_ucredits = remaining_ucredits - ? WHERE tenant_id = ?",
        ((u, t) for t, u in charged.items()),
    )
    for _name, sql in indexes:
        db.execute(sql)
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return sample


def cached(root: Path, name: str, **size: int) -> tuple[Path, list[str]]:
    d = root / name
    marker = d / "built.json"
    if marker.exists() and json.loads(marker.read_text())["size"] == size:
        return d, json.loads(marker.read_text())["keys"]
    d.mkdir(parents=True, exist_ok=True)
    for f in d.iterdir():
        f.unlink()
    t0 = time.perf_counter()
    sample = build(d / "ledger.sqlite3", **size)
    marker.write_text(json.dumps({"size": size, "keys": sample}))
    print(
        f"built {name}: {size} in {time.perf_counter() - t0:.0f} s ({(d / 'ledger.sqlite3').stat().st_size / 2**30:.2f} GiB)"
    )
    return d, sample


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def start_in_process(d: Path, store: dict[str, Any]) -> dict[str, Any]:
    """Start time, resident memory and lookups/metrics figures of the ledger opened here."""
    gc.collect()
    before = rss_mib()
    core = LedgerCore(MeteringConfig(state_dir=d, usage_event_retention_days=None, **store))
    t0 = time.perf_counter()
    await core.start()
    start_s = time.perf_counter() - t0
    gc.collect()
    grown = rss_mib() - before
    st = core._state
    t0 = time.perf_counter()
    stats = await core.read(Stats())
    collector = LedgerCollector()
    collector.update(stats)
    body = render([collector])
    scrape_s = time.perf_counter() - t0
    series = sum(1 for line in body.decode().splitlines() if line and not line.startswith("#"))
    hashes = list(st.keys_by_hash)
    out = {
        "organizations": len(st.tenants),
        "projects": sum(len(t.projects) for t in st.tenants.values()),
        "keys": len(hashes),
        "start_s": start_s,
        "rss_mib": grown,
        "metrics_bytes": len(body),
        "metrics_series": series,
        "metrics_s": scrape_s,
        "aggregated": stats.aggregated_tenants,
        "hashes": hashes,
        "audit": await core.read(Audit()) if len(st.tenants) <= 100 else None,
    }
    await core.close()
    return out


def lookup_ns(hashes: list[str], n: int = 200_000) -> dict[str, tuple[float, float]]:
    """p50/p99 nanoseconds of one gateway KeyDirectory check and one ledger table lookup."""
    directory = KeyDirectory()
    directory.apply(Keys([(h, "t") for h in hashes], snapshot=True, last=True))
    table = {h: object() for h in hashes}
    rng = random.Random(1)
    probes = [rng.choice(hashes) if i % 2 else f"{i:064x}" for i in range(n)]
    out = {}
    for name, fn in (("directory", directory.admits), ("ledger_table", table.get)):
        samples = []
        clock = time.perf_counter_ns
        for h in probes:
            t0 = clock()
            fn(h)
            samples.append(clock() - t0)
        base = []
        for _ in range(20_000):
            t0 = clock()
            base.append(clock() - t0)
        overhead = statistics.median(base)
        samples.sort()
        out[name] = (samples[len(samples) // 2] - overhead, samples[int(len(samples) * 0.99)] - overhead)
    return out


def pairs_per_s(
    d: Path, store: dict[str, Any], keys: list[str], replicas: int, pairs: int, concurrency: int, tag: str
) -> float:
    cfg = MeteringConfig(
        state_dir=d, ledger_actor_name=f"scale-{tag}", usage_event_retention_days=None, **store
    )
    ledger = get_or_create_ledger_actor(cfg, namespace="bench-scale")
    ray.get(ledger.ping.remote())
    try:
        actors = [
            ray.remote(ScaleReplica).options(num_cpus=1).remote(ledger, keys[i::replicas][:64], "socket")
            for i in range(replicas)
        ]
        ray.get([a.run.remote(f"{tag}-warm{i}", 400, 32) for i, a in enumerate(actors)])
        res = ray.get([a.run.remote(f"{tag}-{i}", pairs, concurrency) for i, a in enumerate(actors)])
        total = sum(n for n, _, _ in res)
        elapsed = max(e for _, _, e in res) - min(s for _, s, _ in res)
        for a in actors:
            ray.kill(a)
        return total / elapsed
    finally:
        ray.get(ledger.shutdown.remote())
        ray.kill(ledger)


class ScaleReplica(Replica):
    """A gateway replica whose request loops use keys of many organizations and projects."""

    def __init__(self, ledger: Any, keys: list[str], transport: str) -> None:
        super().__init__(ledger, keys[0], transport)
        self.keys = keys

    async def run(self, name: str, pairs: int, concurrency: int) -> tuple[int, float, float]:
        done = 0
        t0 = time.perf_counter()

        async def loop(w: int) -> None:
            nonlocal done
            key = self.keys[w % len(self.keys)]
            for i in range(w, pairs, concurrency):
                r = await self.meter.authorize(key, "bench", 100, 200, new_request_id())
                await self.meter.settle(r, 100, i % 200, "completed", "pool", "cpu")
                done += 1

        await asyncio.gather(*(loop(w) for w in range(concurrency)))
        return done, t0, time.perf_counter()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--orgs", type=int, default=5_000)
    ap.add_argument("--projects", type=int, default=100_000)
    ap.add_argument("--keys", type=int, default=150_000)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "tokenweir-scale"))
    ap.add_argument("--pairs", type=int, default=10_000, help="reserve+settle pairs per replica per run")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=128)
    ap.add_argument(
        "--rounds", type=int, default=2, help="alternated small/large runs of the pairs benchmark"
    )
    ap.add_argument("--store", choices=("sqlite", "postgres"), default="sqlite")
    ap.add_argument(
        "--hot",
        type=int,
        default=100,
        help="keys (each of its own organization) the request loops use, the same number on both"
        " ledgers (the small one has 100); a commit writes one row per organization, project and"
        " index page it touches, so this and not the ledger's size sets most of a commit's work",
    )
    ap.add_argument(
        "--wide",
        action="store_true",
        help="also run the large ledger with 64 keys per replica (256 organizations hot at 4 replicas)",
    )
    args = ap.parse_args()
    root = Path(args.dir)
    small_dir, small_keys = cached(root, "small", orgs=100, projects=100, keys=100, events=10_000)
    large_dir, large_keys = cached(
        root, "large", orgs=args.orgs, projects=args.projects, keys=args.keys, events=args.events
    )
    server = None
    stores: dict[str, dict[str, Any]] = {"small": {}, "large": {}}
    if args.store == "postgres":
        from loadtests.pg_server import PostgresServer
        from serving.metering import migrate_to_postgres

        server = PostgresServer(fsync=True)
        for name, d in (("small", small_dir), ("large", large_dir)):
            dsn = server.create_database()
            t0 = time.perf_counter()
            report = migrate_to_postgres(d / "ledger.sqlite3", dsn)
            print(
                f"migrated {name} to PostgreSQL: {sum(report.rows.values()):,} rows in"
                f" {time.perf_counter() - t0:.0f} s"
            )
            stores[name] = {"store": "postgres", "postgres_dsn": dsn}
        import psycopg

        with psycopg.connect(server.dsn(), autocommit=True) as conn:
            conn.execute("CHECKPOINT")  # the copies' dirty pages written before anything is measured
    try:
        run(args, small_dir, small_keys, large_dir, large_keys, stores)
    finally:
        if server is not None:
            server.stop()


def run(
    args: argparse.Namespace,
    small_dir: Path,
    small_keys: list[str],
    large_dir: Path,
    large_keys: list[str],
    stores: dict[str, dict[str, Any]],
) -> None:
    figures = {
        name: asyncio.run(start_in_process(d, stores[name]))
        for name, d in (("small", small_dir), ("large", large_dir))
    }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for name, f in figures.items():
        print(
            f"{name}: {f['organizations']} organizations, {f['projects']} projects, {f['keys']} keys:"
            f" start {f['start_s']:.2f} s, resident +{f['rss_mib']:.0f} MiB;"
            f" /metrics (ledger families) {f['metrics_bytes'] / 1024:.0f} KiB, {f['metrics_series']} series"
            f' ({f["aggregated"]} organizations under tenant="_other"), rendered in {1000 * f["metrics_s"]:.0f} ms'
        )
    print(f"(peak RSS of this process {peak:.0f} MiB)")
    big = figures["large"]["hashes"]
    for n in (1_000, len(big)):
        lk = lookup_ns(big[:n])
        print(
            f"key lookup at {n:,} keys: gateway directory p50 {lk['directory'][0]:.0f} ns p99 {lk['directory'][1]:.0f} ns;"
            f" ledger table p50 {lk['ledger_table'][0]:.0f} ns p99 {lk['ledger_table'][1]:.0f} ns"
        )
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        address="local",  # a Ray of its own, never another cluster on this machine
        num_cpus=args.replicas + 1,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        namespace="bench-scale",
        log_to_driver=False,
    )
    rates: dict[str, list[float]] = {"small": [], "large": []}
    wide_hot = 64 * args.replicas
    try:
        rng = random.Random(3)
        runs = [("small", small_dir, small_keys, args.hot), ("large", large_dir, large_keys, args.hot)]
        if args.wide:
            rates["wide"] = []
            runs.append(("wide", large_dir, large_keys, wide_hot))
        for r in range(args.rounds):
            for name, d, keys, hot in runs:
                picked = rng.sample(keys, min(len(keys), hot))
                rate = pairs_per_s(
                    d,
                    stores["large" if name == "wide" else name],
                    picked,
                    args.replicas,
                    args.pairs,
                    args.concurrency,
                    f"{name}{r}-{time.time_ns()}",
                )
                rates[name].append(rate)
                print(
                    f"round {r} {name}: {rate:,.0f} durable reserve+settle pairs/s"
                    f" ({len(picked)} organizations hot)"
                )
    finally:
        ray.shutdown()
    s, g = statistics.median(rates["small"]), statistics.median(rates["large"])
    wide = (
        f", large with {wide_hot} organizations hot {statistics.median(rates['wide']):,.0f}"
        if args.wide
        else ""
    )
    paired = statistics.median(b / a for a, b in zip(rates["small"], rates["large"], strict=True))
    print(
        f"pairs/s median: small {s:,.0f}, large {g:,.0f}, large/small {g / s:.3f}"
        f" (median of the rounds' ratios {paired:.3f}){wide}"
        f" ({args.replicas} gateway replicas x {args.concurrency} loops,"
        f" {'PostgreSQL synchronous_commit=on' if args.store == 'postgres' else 'SQLite synchronous=FULL'})"
    )


if __name__ == "__main__":
    main()
