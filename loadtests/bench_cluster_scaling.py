"""Gateway capacity across nodes: gateway replicas on one node, then on two, each node on a core of its own.

A Ray cluster in network namespaces (:mod:`loadtests.netns`, the multi-node test's machinery): a
head (``10.77.0.10``: GCS, Serve's controller, the ledger and ``--pool-replicas`` simulated H100
pool replicas, on any CPU) and gateway nodes ``a`` (``10.77.0.11``, its every process in a cpuset
of CPU 0) and ``b`` (``10.77.0.12``, CPU 1), each advertising ``tokenweir_gateway: 1``; Ray's token
auth, a home, state directory and ``--temp-dir`` per node. The app is deployed as an operator
would: ``tokenweir deploy render --target serve``, then ``serve run`` on the head.

1. phase ``1 node``: the head and ``a`` only, one gateway replica (on ``a``); clients send to ``a``;
2. phase ``2 nodes``: ``b`` joins, the config is redeployed with two gateway replicas (one on each
   node); clients send to both addresses, half the workers each.

Each phase runs two closed-loop workloads from ``--clients`` client processes on this host (the
bridge's address), 32-token prompts (exact, after the chat template), ``ignore_eos``:
streams of ``--stream-tokens`` tokens at ``--stream-concurrency``, then short requests
(``max_tokens`` 1, streamed) at ``--short-concurrency``, ``--phase-s`` seconds each after a short
warm-up. The pool is simulated ``--sim-speedup`` times faster than real time, so its speed is never
the limit (its CPU is part of the head's). Measured: streamed tokens/s and requests/s at the clients, and CPU-seconds per request from
``/proc`` (utime + stime of each process, before and after): each gateway node's processes (its Ray
daemons and workers, the gateway replica among them) over the requests sent to it, the head's
(pools, ledger, Serve's controller) and the clients'; how busy each gateway node kept its core,
and the host's two cores (``/proc/stat``); ``gateway capacity`` is each node's requests per
CPU-second summed over the nodes, what the gateways would serve with each core to itself. Before
the workloads, a few seconds with nothing in flight give each node's idle CPU-ms per second.

A cpuset keeps a node's processes on its core, not other processes off it: on two cores the head
and the clients share the gateways' cores (there is no third). With one gateway node they mostly
have the other core; with two, the host's cores are full (``host busy``) before the gateways are,
so the throughput ratio here is bounded by the host, and ``gateway capacity`` (from CPU-seconds per
request) is what two gateway machines would serve.

Root only (``ip netns``, cgroups). About 3 minutes; under the integration lock, as every Ray run here:

    flock /tmp/tw-integration.lock .venv/bin/python loadtests/bench_cluster_scaling.py [--metering]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from loadtests.bench_peers import (  # noqa: E402
    ADMIN_KEY,
    RequestResult,
    build_prompts,
    run_for,
    summarize,
)
from loadtests.netns import (  # noqa: E402
    GCS_PORT,
    NetnsCluster,
    Node,
    allowed_cpus,
    can_make_namespaces,
    cpuset_kind,
    port_open,
    process_cpu_s,
    wait_until,
)
from models.tiny import build_tiny_model  # noqa: E402

MODEL = "tiny-llama"
PORT = 8000
GATEWAY_RESOURCE = "tokenweir_gateway"


def _config(
    state_dir: Path, gateways: int, pool_replicas: int, metering: bool, speedup: float
) -> dict[str, Any]:
    return {
        "gateway": {"host": "node", "port": PORT, "replicas": gateways, "node_resource": GATEWAY_RESOURCE},
        "ray": {"address": "auto"},
        "state_dir": str(state_dir),  # the head's own directory: the ledger's file is there
        "metering": {"enabled": metering},
        "pools": [
            {
                "name": "sim-h100",
                "model": MODEL,
                "accelerator": "H100",
                "engine": "sim",
                "replicas": pool_replicas,
                "sim_speedup": speedup,
                "slo": {"ttft_ms": 60000, "tpot_ms": 1000},
            }
        ],
    }


# ----------------------------------------------------------------------------- clients
def _client(
    bases: list[str], prompts: list[str], concurrency: int, max_tokens: int, duration_s: float,
    key: str | None, start_at: float,
) -> tuple[dict[str, list[RequestResult]], float]:  # fmt: skip
    """One client process: wait for the common start (``time.monotonic`` is the machine's), then
    a closed loop of ``concurrency`` workers for ``duration_s``."""
    time.sleep(max(0.0, start_at - time.monotonic()))
    return asyncio.run(run_for(bases, prompts, concurrency, max_tokens, duration_s, key))


def _started(_: int) -> int:
    time.sleep(0.5)  # long enough that each client process gets one
    return os.getpid()


@dataclass
class Workload:
    name: str
    concurrency: int
    max_tokens: int


def _delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU-seconds the processes spent between the two readings (one started between them counts
    from zero; one that ended between them is missed, as ``/proc`` no longer lists it)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


def _host_busy_s() -> tuple[float, float]:
    """This host's CPU-seconds busy and in all, over every core, since boot (``/proc/stat``)."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks[:8]) - idle) / hz, sum(ticks[:8]) / hz


class CpuMeter:
    """CPU-seconds of each gateway node's processes, the head's, the clients' and the host's,
    between :meth:`start` and :meth:`stop`."""

    def __init__(self, cluster: NetnsCluster, gateway_nodes: list[Node]) -> None:
        self.cluster, self.nodes = cluster, gateway_nodes

    def _reading(self) -> dict[str, Any]:
        me = psutil.Process()
        ours = {pid for n in self.cluster.nodes.values() for pid in self.cluster.pids(n)}  # `ray start`s too
        clients = [me.pid, *(c.pid for c in me.children() if c.pid not in ours)]
        out: dict[str, Any] = {n.name: self.cluster.cpu_s(n) for n in self.nodes}
        out["head"] = self.cluster.cpu_s(self.cluster.head)
        out["clients"] = {pid: process_cpu_s(pid) for pid in clients}
        out["host"] = _host_busy_s()
        return out

    def start(self) -> None:
        self._before = self._reading()

    def stop(self) -> dict[str, float]:
        after = self._reading()
        out = {k: _delta(self._before[k], after[k]) for k in after if k != "host"}
        (busy0, all0), (busy1, all1) = self._before["host"], after["host"]
        out["host_busy"] = (busy1 - busy0) / max(all1 - all0, 1e-9)
        return out


def _idle(meter: CpuMeter, seconds: float) -> dict[str, float]:
    """What the gateway nodes and the head spend with no request in flight: CPU-ms per second."""
    meter.start()
    time.sleep(seconds)  # an idle window of fixed length is the measurement itself
    cpu = meter.stop()
    return {k: 1e3 * v / seconds for k, v in cpu.items() if k not in ("clients", "host_busy")}


def _measure(
    meter: CpuMeter,
    pool: concurrent.futures.ProcessPoolExecutor,
    clients: int,
    bases: list[str],
    prompts: list[str],
    load: Workload,
    duration_s: float,
    key: str | None,
) -> dict[str, Any]:
    start_at = time.monotonic() + 0.5
    futures = [
        pool.submit(
            _client,
            bases,
            prompts[i::clients],
            load.concurrency // clients,
            load.max_tokens,
            duration_s,
            key,
            start_at,
        )
        for i in range(clients)
    ]
    time.sleep(max(0.0, start_at - time.monotonic()))
    meter.start()
    by_base: dict[str, list[RequestResult]] = {b: [] for b in bases}
    duration = 0.0
    for f in futures:
        r, d = f.result()
        for base, results in r.items():
            by_base[base] += results
        duration = max(duration, d)
    cpu = meter.stop()
    s = summarize([r for rs in by_base.values() for r in rs], load.concurrency, duration, load.max_tokens)
    done = max(s["completed"], 1)
    nodes = {n.name: sum(r.ok for r in by_base[b]) for n, b in zip(meter.nodes, bases, strict=True)}
    gateway_cpu = sum(cpu[n] for n in nodes)
    return {
        "requests_per_s": s["request_per_s"],
        "output_tokens_per_s": s["output_tokens_per_s"],
        "completed": s["completed"],
        "completed_by_node": nodes,
        "failed": s["failed"],
        "errors": s["errors"],
        "short_outputs": s["short_outputs"],
        "duration_s": duration,
        "ttft_p50_ms": s["ttft_p50_ms"],
        "itl_p99_ms": s["itl_p99_ms"],
        "host_busy": cpu["host_busy"],
        "gateway_cpu_ms_per_request": 1e3 * gateway_cpu / done,
        "gateway_cpu_ms_per_request_by_node": {n: 1e3 * cpu[n] / max(c, 1) for n, c in nodes.items()},
        "gateway_busy_by_node": {n: cpu[n] / duration for n in nodes},
        # What the gateways would serve with each one's core to itself: each node's requests per
        # CPU-second, summed over the nodes.
        "gateway_capacity_requests_per_s": sum(c / max(cpu[n], 1e-9) for n, c in nodes.items()),
        "head_cpu_ms_per_request": 1e3 * cpu["head"] / done,
        "client_cpu_ms_per_request": 1e3 * cpu["clients"] / done,
    }


# ----------------------------------------------------------------------------- the cluster
def _ready(bases: list[str], timeout_s: float) -> None:
    for base in bases:  # the gateway's own readiness (its ledger link), then every pool's
        for path in ("/readyz", "/readyz/pools"):
            url = base + path

            def answers(url: str = url) -> bool:
                return httpx.get(url, timeout=5).status_code == 200

            wait_until(answers, timeout_s, url, ignore=(httpx.HTTPError, OSError))


def _tenant_key(base: str) -> str:
    """A tenant with ample credits and a key for it, through the admin API."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    tid = "bench-scaling"
    r = httpx.post(
        f"{base}/admin/v1/tenants",
        json={"tenant_id": tid, "name": tid, "credits": 1e12},
        headers=admin,
        timeout=30,
    )
    r.raise_for_status()
    r = httpx.post(f"{base}/admin/v1/tenants/{tid}/keys", json={}, headers=admin, timeout=30)
    r.raise_for_status()
    return str(r.json()["api_key"])


def _pinning(cluster: NetnsCluster, nodes: list[Node]) -> dict[str, dict[str, Any]]:
    """For each pinned node: its CPUs and how many of its processes may run only there."""
    out = {}
    for n in nodes:
        pids = cluster.pids(n)
        seen = [allowed_cpus(p) for p in pids]
        out[n.name] = {
            "cpus": n.cpus,
            "processes": len(pids),
            "confined": sum(1 for s in seen if s == n.cpus),
            "others": sorted({s for s in seen if s not in (None, n.cpus)}),
        }
    return out


def _phase(
    name: str,
    cluster: NetnsCluster,
    gateway_nodes: list[Node],
    pool: concurrent.futures.ProcessPoolExecutor,
    args: argparse.Namespace,
    prompts: list[str],
    key: str | None,
) -> dict[str, Any]:
    bases = [f"http://{n.ip}:{PORT}" for n in gateway_nodes]
    asyncio.run(run_for(bases, prompts, 16, 8, args.warmup_s, key))  # connections open, code paths warm
    meter = CpuMeter(cluster, gateway_nodes)
    idle = _idle(meter, args.idle_s)
    print(f"[{name}] idle CPU-ms/s: {', '.join(f'{k} {v:.0f}' for k, v in idle.items())}", flush=True)
    out: dict[str, Any] = {"gateway_nodes": [n.name for n in gateway_nodes], "addresses": bases, "idle": idle}
    for load in (
        Workload("stream", args.stream_concurrency, args.stream_tokens),
        Workload("short", args.short_concurrency, 1),
    ):
        r = _measure(meter, pool, args.clients, bases, prompts, load, args.phase_s, key)
        out[load.name] = r
        print(
            f"[{name}] {load.name}: {r['requests_per_s']:.0f} req/s, {r['output_tokens_per_s']:.0f} tokens/s, "
            f"gateway {r['gateway_cpu_ms_per_request']:.2f} CPU-ms/request, host busy {r['host_busy']:.0%}, "
            f"failed {r['failed']} {r['errors']}",
            flush=True,
        )
    return out


def _table(one: dict[str, Any], two: dict[str, Any], args: argparse.Namespace) -> str:
    rows = ["| workload | measured | 1 gateway node | 2 gateway nodes | 2 / 1 |", "|---|---|---|---|---|"]

    def by_node(d: dict[str, float], fmt: str) -> str:
        return ", ".join(f"{n} {v:{fmt}}" for n, v in d.items())

    def row(load: str, label: str, key: str, fmt: str) -> None:
        a, b = one[load][key], two[load][key]
        if isinstance(a, dict):
            rows.append(f"| {load} | {label} | {by_node(a, fmt)} | {by_node(b, fmt)} | |")
        else:
            ratio = f"{b / a:.2f}" if a and not fmt.endswith("%") else ""
            rows.append(f"| {load} | {label} | {a:{fmt}} | {b:{fmt}} | {ratio} |")

    titles = {
        "stream": f"{args.stream_tokens}-token streams, c={args.stream_concurrency}",
        "short": f"max_tokens 1, c={args.short_concurrency}",
    }
    for load, title in titles.items():
        rows.append(f"| **{load}** | {title} | | | |")
        if load == "stream":
            row(load, "streamed tokens/s", "output_tokens_per_s", ",.0f")
        row(load, "requests/s", "requests_per_s", ",.0f")
        row(load, "gateway nodes CPU-ms/request", "gateway_cpu_ms_per_request", ".2f")
        row(load, "  by node", "gateway_cpu_ms_per_request_by_node", ".2f")
        row(load, "gateway node busy (of its core)", "gateway_busy_by_node", ".0%")
        row(load, "gateway capacity, req/s at 100% of each core", "gateway_capacity_requests_per_s", ",.0f")
        row(load, "head CPU-ms/request (pools, ledger)", "head_cpu_ms_per_request", ".2f")
        row(load, "clients CPU-ms/request", "client_cpu_ms_per_request", ".2f")
        row(load, "host busy (both cores)", "host_busy", ".0%")
        row(load, "TTFT p50 ms", "ttft_p50_ms", ".1f")
    idle = [
        f"| idle | CPU-ms/s, no request in flight | {by_node(one['idle'], '.0f')} | {by_node(two['idle'], '.0f')} | |"
    ]
    return "\n".join(rows + idle)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--metering", action="store_true", help="meter every request (the ledger on the head)")
    ap.add_argument("--phase-s", type=float, default=20.0, help="seconds of each workload in each phase")
    ap.add_argument("--warmup-s", type=float, default=3.0)
    ap.add_argument("--idle-s", type=float, default=3.0, help="seconds of the idle reading in each phase")
    ap.add_argument("--stream-concurrency", type=int, default=64)
    ap.add_argument("--stream-tokens", type=int, default=32)
    ap.add_argument("--short-concurrency", type=int, default=64)
    ap.add_argument(
        "--clients", type=int, default=2, help="client processes (the same number in both phases)"
    )
    ap.add_argument("--pool-replicas", type=int, default=2, help="simulated pool replicas, on the head")
    ap.add_argument("--sim-speedup", type=float, default=10.0, help="simulated pool speed vs real time")
    ap.add_argument("--cpus", default="0,1", help="the CPUs of gateway nodes a and b")
    ap.add_argument("--ready-timeout-s", type=float, default=240.0)
    ap.add_argument("--json-out", type=Path, default=None, help="also write the result JSON to this file")
    args = ap.parse_args(argv)
    if (why := can_make_namespaces()) is not None:
        print(f"bench_cluster_scaling: {why}", file=sys.stderr)
        return 2
    if args.stream_concurrency % args.clients or args.short_concurrency % args.clients:
        ap.error("--clients must divide both concurrencies")
    cpu_a, cpu_b = args.cpus.split(",")
    t0 = time.monotonic()
    prompts = build_prompts(build_tiny_model(), 1024, 32, 0)
    root = Path(tempfile.mkdtemp(prefix="twmn-", dir="/tmp"))  # short: Ray's socket paths live under it
    cluster = NetnsCluster(root)
    cluster.env_extra = {"TOKENWEIR_ADMIN_KEY": ADMIN_KEY}  # what the gateways' admin API checks
    spawn = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(args.clients, mp_context=spawn)
    ok = False
    try:
        list(pool.map(_started, range(args.clients)))  # the client processes started (and aiohttp imported)
        head = cluster.add_node("head", 10, {"accelerator_type:H100": 1}, head=True)
        wait_until(lambda: port_open(head.ip, GCS_PORT), 60, "the head's GCS")
        a = cluster.add_node("a", 11, {GATEWAY_RESOURCE: 1}, cpus=cpu_a)
        cfg = _config(head.state, 1, args.pool_replicas, args.metering, args.sim_speedup)
        cluster.deploy(cfg, "one-node")
        cluster.wait_deployed(timeout_s=args.ready_timeout_s)
        _ready([f"http://{a.ip}:{PORT}"], args.ready_timeout_s)
        print(
            f"[cluster] head and node a up, deployed and ready in {time.monotonic() - t0:.0f} s", flush=True
        )
        key = _tenant_key(f"http://{a.ip}:{PORT}") if args.metering else None
        one = _phase("1 node", cluster, [a], pool, args, prompts, key)

        b = cluster.add_node("b", 12, {GATEWAY_RESOURCE: 1}, cpus=cpu_b)
        cluster.deploy(cfg | {"gateway": cfg["gateway"] | {"replicas": 2}}, "two-nodes")
        # A redeploy replaces a's replica too: wait until the old one is gone, not just until one answers.
        cluster.wait_deployed(timeout_s=args.ready_timeout_s)
        _ready([f"http://{n.ip}:{PORT}" for n in (a, b)], args.ready_timeout_s)
        two = _phase("2 nodes", cluster, [a, b], pool, args, prompts, key)
        pinning = _pinning(cluster, [a, b])
        ok = all(p["confined"] == p["processes"] > 0 for p in pinning.values())
    finally:
        pool.shutdown(cancel_futures=True)
        cluster.close()
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "one_node": one,
        "two_nodes": two,
        "pinning": pinning,
        "meta": {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "cpuset": cpuset_kind(),
            "prompt_tokens": 32,
            "host": f"{os.cpu_count()} CPUs, {platform.platform()}, load avg {os.getloadavg()[0]:.2f}",
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "wall_s": round(time.monotonic() - t0),
        },
    }
    print(json.dumps(result, indent=2))
    print()
    print(_table(one, two, args))
    print(
        "\npinning ("
        + cpuset_kind()
        + "): "
        + "; ".join(
            f"node {n}: {p['confined']}/{p['processes']} processes on CPU {p['cpus']}"
            for n, p in pinning.items()
        )
        + f"; metering {'on' if args.metering else 'off'}; {result['meta']['wall_s']} s in all"
    )
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2))
    failed = sum(p[w]["failed"] for p in (one, two) for w in ("stream", "short"))
    return 0 if ok and not failed else 1


if __name__ == "__main__":
    raise SystemExit(main())
