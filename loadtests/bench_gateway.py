"""The gateway's own cost through the full stack: HTTP in, gateway replica, pool replica, stream out,
with a simulated pool fast enough never to be the limit (the tiny model's shape on an H100 profile,
10x faster than real time), so what is measured is Tokenweir and Ray Serve, not an engine.

Two workloads, closed loop, on 127.0.0.1:
- streaming: long streams (``--stream-tokens`` output tokens each) at ``--stream-concurrency``;
  reports streamed output tokens/s, ITL p50/p99 and CPU microseconds per streamed token;
- short: 1-token non-trivial requests at ``--short-concurrency``; reports requests/s and CPU
  microseconds per request.
CPU is summed over every process on the machine except this benchmark's own client.

    .venv/bin/python loadtests/bench_gateway.py [--metering] [--gateway-replicas 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from loadtests.bench_peers import build_prompts, run_level  # noqa: E402
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


def _measure(base: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict[str, Any]:
    me = psutil.Process().pid
    a = _cpu()
    r = asyncio.run(run_level(base, prompts, concurrency, max_tokens))
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
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_gateway_"))
    cfg = {
        "gateway": {"host": "127.0.0.1", "port": args.port, "replicas": args.gateway_replicas},
        "ray": {"num_cpus": 8},
        "state_dir": str(work / "state"),
        "metering": {"enabled": False},
        "pools": [
            {
                "name": "sim-fast",
                "model": "tiny-llama",
                "accelerator": "H100",
                "engine": "sim",
                "sim_speedup": args.sim_speedup,
                "slo": {"ttft_ms": 60000, "tpot_ms": 1000},
                "admission": {"max_queued_requests": 100000, "max_queued_tokens": 100_000_000},
            }
        ],
    }
    (work / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    log = open(work / "serve.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("tokenweir")), "serve", "--config", str(work / "cfg.yaml")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise SystemExit(f"tokenweir serve exited; see {work / 'serve.log'}")
            time.sleep(0.5)
        prompts = build_prompts(
            build_tiny_model(), max(args.short_requests, args.stream_requests) + 64, 32, 0
        )
        asyncio.run(run_level(base, prompts[:64], 16, 16))  # warm-up
        s = _measure(base, prompts[: args.stream_requests], args.stream_concurrency, args.stream_tokens)
        tokens = s["output_tokens_per_s"] * s["duration_s"]
        q = _measure(base, prompts[: args.short_requests], args.short_concurrency, 1)
        result = {
            "stream": {
                "concurrency": args.stream_concurrency,
                "output_tokens_per_s": round(s["output_tokens_per_s"]),
                "itl_p50_ms": round(s["itl_p50_ms"], 1),
                "itl_p99_ms": round(s["itl_p99_ms"], 1),
                "ttft_p50_ms": round(s["ttft_p50_ms"], 1),
                "cpu_us_per_token": round(1e6 * s["server_cpu_s"] / max(tokens, 1), 1),
                "failed": s["failed"],
            },
            "short": {
                "concurrency": args.short_concurrency,
                "requests_per_s": round(q["request_per_s"]),
                "ttft_p50_ms": round(q["ttft_p50_ms"], 1),
                "cpu_us_per_request": round(1e6 * q["server_cpu_s"] / max(q["completed"], 1)),
                "failed": q["failed"],
            },
            "goals": {"stream_tokens_per_s": 20000, "short_requests_per_s": 500, "itl_p99_ms": 50},
        }
        print(json.dumps(result, indent=2))
        return 0
    finally:
        proc.send_signal(2)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    raise SystemExit(main())
