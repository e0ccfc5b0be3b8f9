"""Benchmark: how fast can the harness send, open loop, before its own lateness grows?

Starts the stub server (``loadtests.stub_server``) in a subprocess on 127.0.0.1 and drives it open loop
at ``--rate`` for ``--duration-s``; prints achieved rate, send lateness percentiles and client CPU.
Target: >= 500 req/s with send lateness p99 <= 5 ms.

    .venv/bin/python -m loadtests.bench_harness --rate 500 --duration-s 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import time

from loadtests.client import Target, run_plan
from loadtests.metrics import summarize
from loadtests.plan import build_plan
from loadtests.scenario import Scenario


def _start_stub() -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtests.stub_server", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the stub prints LISTENING <port> (or exits)
    if not line.startswith("LISTENING"):
        proc.kill()
        raise RuntimeError(f"stub server did not start: {line!r}")
    return proc, int(line.split()[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=500.0)
    p.add_argument("--duration-s", type=float, default=10.0)
    p.add_argument("--arrival", choices=["constant", "poisson"], default="poisson")
    p.add_argument("--output-tokens", type=int, default=4)
    p.add_argument("--no-uvloop", action="store_true")
    a = p.parse_args()
    proc, port = _start_stub()
    try:
        scenario = Scenario.model_validate({
            "name": "bench-harness", "target_url": f"http://127.0.0.1:{port}", "model": "stub", "seed": 0,
            "tenants": [{"name": "t0", "api_key": "sk-a"}, {"name": "t1", "api_key": "sk-b"}],
            "arrival": {"kind": a.arrival, "rate_rps": a.rate},
            "workload": {"kind": "synthetic", "prompt": {"kind": "fixed", "tokens": 32},
                         "output": {"kind": "fixed", "tokens": a.output_tokens}},
            "bounds": {"duration_s": a.duration_s, "max_requests": 1_000_000, "drain_timeout_s": 10},
        })  # fmt: skip
        plan = build_plan(scenario)
        target = Target(scenario.target_url, "stub", "chat", {"t0": "sk-a", "t1": "sk-b"})
        ru0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        coro = run_plan(plan, target, scenario.bounds)
        if a.no_uvloop:
            result = asyncio.run(coro)
        else:
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                result = runner.run(coro)
        wall, ru1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
        s = summarize(result.records, result.duration_s, scenario.slo, {"t0": 1, "t1": 1},
                      send_window_s=result.send_window_s)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    sent_rate = s.requests_sent / result.send_window_s
    print(
        f"loop: {'asyncio' if a.no_uvloop else 'uvloop'}; cores: {os.cpu_count()}; load avg: {os.getloadavg()[0]:.2f}"
    )
    print(
        f"offered {a.rate:.0f} req/s ({a.arrival}) for {a.duration_s:.0f} s, {a.output_tokens} output tokens each"
    )
    print(
        f"sent {s.requests_sent} ({sent_rate:.1f} req/s), ok {s.succeeded}, failed {s.failed} {s.refusals or ''}"
    )
    print(f"completed {s.request_throughput_rps:.1f} req/s, {s.output_throughput_tps:.0f} output tok/s")
    lt = s.lateness
    print(f"send lateness ms: mean {lt.mean_ms:.3f}  p50 {lt.median_ms:.3f}  p90 {lt.p90_ms:.3f}  "
          f"p99 {lt.p99_ms:.3f}  max {lt.max_ms:.3f}")  # fmt: skip
    print(f"TTFT p50 {s.ttft.median_ms:.2f} ms, p99 {s.ttft.p99_ms:.2f} ms (stub answers at once)")
    print(f"client CPU: {cpu:.2f} s over {wall:.2f} s wall = {100 * cpu / wall:.0f}% of one core")
    ok = sent_rate >= 0.97 * a.rate and (lt.p99_ms or 0) <= 5.0
    print(f"target (>= {a.rate:.0f} req/s, lateness p99 <= 5 ms): {'MET' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()
