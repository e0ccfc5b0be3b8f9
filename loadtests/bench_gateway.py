"""The gateway's own cost through the full stack: HTTP in, gateway replica, pool replica, stream out,
with a simulated pool fast enough never to be the limit (the tiny model's shape on an H100 profile,
10x faster than real time), so what is measured is Tokenweir and Ray Serve, not an engine.

Two workloads, closed loop, on 127.0.0.1, 32-token prompts (exact, after the chat template) and a fixed
output length (``ignore_eos``):
- streaming: long streams (``--stream-tokens`` output tokens each) at ``--stream-concurrency``;
  reports streamed output tokens/s, ITL p50/p99 and CPU microseconds per streamed token;
- short: 1-token non-trivial requests at ``--short-concurrency``; reports requests/s and CPU
  microseconds per request.
CPU is summed over every process on the machine except this benchmark's own client.

``--metering`` meters every request: the ledger is on and the requests carry the key of a tenant created
through the admin API. ``--tree`` serves another source tree's Tokenweir with this script's client and
workload (that tree first on ``PYTHONPATH`` and as the working directory of ``tokenweir serve``, whose
Ray workers inherit both; the entry point is the one the tree's ``pyproject.toml`` declares), which is
how ``loadtests/bench_ab.py`` compares two commits. The config below uses only keys both sides of issue
12's redesign accept (admission at its defaults, which never refuse this load). The result is printed
as JSON and, with ``--json-out``, written to a file with the settings it ran with.

    .venv/bin/python loadtests/bench_gateway.py [--metering] [--gateway-replicas 1] [--json-out r.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from loadtests.bench_peers import ADMIN_KEY, build_prompts, run_level, server, tokenweir_launch  # noqa: E402
from models.tiny import build_tiny_model  # noqa: E402


def _cpu() -> dict[int, tuple[str, float]]:
    out = {}
    for p in psutil.process_iter(["pid", "name"]):
        try:
            t = p.cpu_times()
            out[p.pid] = (p.info["name"] or "", t.user + t.system)
        except psutil.Error:
            pass
    return out


def _cpu_delta(a: dict[int, tuple[str, float]], b: dict[int, tuple[str, float]], exclude: int) -> float:
    return sum(t - a.get(pid, (n, 0.0))[1] for pid, (n, t) in b.items() if pid != exclude)


def _measure(
    base: str, prompts: list[str], concurrency: int, max_tokens: int, api_key: str | None
) -> dict[str, Any]:
    me = psutil.Process().pid
    a = _cpu()
    r = asyncio.run(run_level(base, prompts, concurrency, max_tokens, api_key))
    b = _cpu()
    r["server_cpu_s"] = _cpu_delta(a, b, me)
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=18600)
    ap.add_argument("--gateway-replicas", type=int, default=1)
    ap.add_argument("--metering", action="store_true", help="meter every request (a tenant key is created)")
    ap.add_argument("--stream-concurrency", type=int, default=64)
    ap.add_argument("--stream-tokens", type=int, default=512)
    ap.add_argument("--stream-requests", type=int, default=256)
    ap.add_argument("--short-concurrency", type=int, default=64)
    ap.add_argument("--short-requests", type=int, default=2000)
    ap.add_argument(
        "--sim-speedup",
        type=float,
        default=10.0,
        help="simulated pool speed vs real time (10: never the limit; lower offers fewer tokens/s)",
    )
    ap.add_argument("--tree", type=Path, default=REPO, help="the source tree whose Tokenweir is served")
    ap.add_argument("--json-out", type=Path, default=None, help="also write the result JSON to this file")
    ap.add_argument("--ready-timeout-s", type=float, default=300.0)
    args = ap.parse_args(argv)
    tree = args.tree.resolve()
    work = Path(tempfile.mkdtemp(prefix="bench_gateway_"))
    cfg = {
        "gateway": {"host": "127.0.0.1", "port": args.port, "replicas": args.gateway_replicas},
        "ray": {"num_cpus": 8},
        "state_dir": str(work / "state"),
        "metering": {"enabled": True, "admin_key": ADMIN_KEY} if args.metering else {"enabled": False},
        "pools": [
            {
                "name": "sim-fast",
                "model": "tiny-llama",
                "accelerator": "H100",
                "engine": "sim",
                "sim_speedup": args.sim_speedup,
                "slo": {"ttft_ms": 60000, "tpot_ms": 1000},
            }
        ],
    }
    kind = "tokenweir-metered" if args.metering else "tokenweir"
    launch = tokenweir_launch(tree, cfg, work / "cfg.yaml")
    print(f"[{kind}] settings: {json.dumps(launch.settings)}", flush=True)
    prompts = build_prompts(build_tiny_model(), max(args.short_requests, args.stream_requests) + 64, 32, 0)
    with server(kind, launch, args.port, work, args.ready_timeout_s) as (base, key):
        asyncio.run(run_level(base, prompts[:64], 16, 16, key))  # warm-up
        s = _measure(base, prompts[: args.stream_requests], args.stream_concurrency, args.stream_tokens, key)
        q = _measure(base, prompts[: args.short_requests], args.short_concurrency, 1, key)
    tokens = s["output_tokens_per_s"] * s["duration_s"]
    result = {
        "stream": {
            "concurrency": args.stream_concurrency,
            "output_tokens_per_s": round(s["output_tokens_per_s"]),
            "itl_p50_ms": round(s["itl_p50_ms"], 1),
            "itl_p99_ms": round(s["itl_p99_ms"], 1),
            "ttft_p50_ms": round(s["ttft_p50_ms"], 1),
            "cpu_us_per_token": round(1e6 * s["server_cpu_s"] / max(tokens, 1), 1),
            "failed": s["failed"],
            "errors": s["errors"],
        },
        "short": {
            "concurrency": args.short_concurrency,
            "requests_per_s": round(q["request_per_s"]),
            "ttft_p50_ms": round(q["ttft_p50_ms"], 1),
            "cpu_us_per_request": round(1e6 * q["server_cpu_s"] / max(q["completed"], 1)),
            "failed": q["failed"],
            "errors": q["errors"],
        },
        "goals": {"stream_tokens_per_s": 20000, "short_requests_per_s": 500, "itl_p99_ms": 50},
        "meta": {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "prompt_tokens": 32,
            "settings": launch.settings,
            "host": f"{os.cpu_count()} CPUs, {platform.platform()}, load avg {os.getloadavg()[0]:.2f}",
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "server_log": str(work / f"{kind}.log"),
        },
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2))
    failed = s["failed"] + q["failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
