"""Benchmark: do the harness's TTFT, TPOT and throughput agree with ``vllm bench serve``'s?

Starts vLLM's OpenAI server (CPU build) on the tiny model at 127.0.0.1:8100, then runs the same workload
twice: once with this harness, once with vLLM's own benchmark client (the ``vllm.benchmarks.serve``
module: ``add_cli_args`` then ``main(args)``; the ``vllm`` command fails on the CPU build's metadata).

Same workload: the harness plans the requests (seeded arrivals, prompts, output lengths); the plan is
written as a ``timed_trace`` file (each request's send time, prompt length in the model's tokens, output
length), which vLLM's client replays with ``--self-timed``. So both clients send at the same instants,
prompts of the same token length (vLLM's trace replay uses random token ids of that length) and exactly
the same output lengths (``ignore_eos``), to ``/v1/completions``. Prints a table; target: within 10%.

    .venv/bin/python -m loadtests.bench_vs_vllm --rate 2 --requests 60
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from loadtests.client import Target, run_plan
from loadtests.metrics import summarize
from loadtests.plan import Plan, PlannedRequest, build_plan
from loadtests.scenario import Scenario


@contextlib.contextmanager
def vllm_server(model: Path, port: int, log: Path) -> Iterator[str]:
    """vLLM's API server on 127.0.0.1:port, stopped (its whole process group) on exit."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", "tiny-llama", "--port", str(port), "--host", "127.0.0.1"]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {proc.returncode}; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/v1/models", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM server not ready after 300 s; see {log}")
            time.sleep(1)  # polling a child process's readiness, bounded by the deadline
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@contextlib.contextmanager
def stub_server(ttft_ms: float, itl_ms: float) -> Iterator[str]:
    """The fake OpenAI server (``loadtests.stub_server``) with fixed TTFT and inter-token gap."""
    cmd = [
        sys.executable,
        "-m",
        "loadtests.stub_server",
        "--port",
        "0",
        "--ttft-ms",
        str(ttft_ms),
        "--itl-ms",
        str(itl_ms),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "LISTENING <port>" once it accepts, or EOF if it died
        if not line.startswith("LISTENING"):
            raise RuntimeError(f"stub server did not start: {line!r}")
        yield f"http://127.0.0.1:{int(line.split()[1])}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _scenario(a: argparse.Namespace, base: str) -> Scenario:
    return Scenario.model_validate({
        "name": "vs-vllm", "target_url": base, "model": "tiny-llama", "endpoint": "completions", "seed": a.seed,
        "tenants": [{"name": "bench", "api_key": "EMPTY"}],
        "arrival": {"kind": "poisson", "rate_rps": a.rate},
        "workload": {"kind": "synthetic", "prompt": {"kind": "fixed", "tokens": a.prompt_tokens},
                     "tokenizer": str(a.model),
                     "output": {"kind": "fixed", "tokens": a.output_tokens}},
        "bounds": {"duration_s": 3600, "max_requests": a.requests, "drain_timeout_s": 120},
    })  # fmt: skip


def run_harness(scenario: Scenario, plan: Plan) -> dict[str, float | None]:
    import uvloop

    target = Target(scenario.target_url, scenario.model, scenario.endpoint, {"bench": "EMPTY"})
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(run_plan(plan, target, scenario.bounds))
    s = summarize(result.records, result.duration_s, scenario.slo, {"bench": 1.0})
    return {
        "completed": s.succeeded, "duration_s": s.duration_s,
        "request_throughput": s.request_throughput_rps, "output_throughput": s.output_throughput_tps,
        "mean_ttft_ms": s.ttft.mean_ms, "median_ttft_ms": s.ttft.median_ms, "p99_ttft_ms": s.ttft.p99_ms,
        "mean_tpot_ms": s.tpot.mean_ms, "median_tpot_ms": s.tpot.median_ms, "p99_tpot_ms": s.tpot.p99_ms,
        "mean_itl_ms": s.itl.mean_ms, "mean_e2el_ms": s.e2el.mean_ms,
        "total_input_tokens": s.total_input_tokens, "lateness_p99_ms": s.lateness.p99_ms,
    }  # fmt: skip


def run_vllm_bench(model: Path, base: str, trace: Path, a: argparse.Namespace) -> dict[str, Any]:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "openai", "--base-url", base, "--endpoint", "/v1/completions",
        "--model", str(model), "--served-model-name", "tiny-llama", "--tokenizer", str(model),
        "--dataset-name", "timed_trace", "--dataset-path", str(trace), "--num-prompts", str(a.requests),
        "--seed", str(a.seed), "--ignore-eos", "--temperature", "0", "--num-warmups", "0", "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
    ])  # fmt: skip
    return main(args)


def _write_trace(plan: Plan, model: Path, path: Path) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    lengths = []
    with path.open("w") as f:
        for i, r in enumerate(plan.open_requests):
            assert isinstance(r, PlannedRequest), "agent sessions have no single-request trace"
            n = len(tok(r.prompt).input_ids)
            lengths.append(n)
            hashes = [i * 10_000 + k for k in range((n + 15) // 16)]  # unique blocks: no prefix-cache hits
            row = {
                "timestamp": r.send_at_s,
                "input_length": n,
                "output_length": r.max_tokens,
                "hash_ids": hashes,
            }
            f.write(json.dumps(row) + "\n")
    return lengths


_ROWS = [("request throughput (req/s)", "request_throughput"), ("output throughput (tok/s)", "output_throughput"),
         ("mean TTFT (ms)", "mean_ttft_ms"), ("median TTFT (ms)", "median_ttft_ms"),
         ("mean TPOT (ms)", "mean_tpot_ms"), ("median TPOT (ms)", "median_tpot_ms"),
         ("mean ITL (ms)", "mean_itl_ms"), ("mean E2EL (ms)", "mean_e2el_ms"),
         ("p99 TTFT (ms)", "p99_ttft_ms"), ("p99 TPOT (ms)", "p99_tpot_ms")]  # fmt: skip


def _table(title: str, ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    print(f"\n{title}\n{'metric':30s} {'tokenweir':>12s} {'vllm bench':>12s} {'diff':>8s}")
    for label, key in _ROWS:
        x, y = ours.get(key), theirs.get(key)
        diff = f"{100 * (x - y) / y:+.1f}%" if x is not None and y else "-"
        print(
            f"{label:30s} {x if x is None else f'{x:12.2f}':>12} {y if y is None else f'{y:12.2f}':>12} {diff:>8s}"
        )


def _mean(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        k: sum(r[k] for r in runs) / len(runs) for _, k in _ROWS if all(r.get(k) is not None for r in runs)
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=2.0)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in the tiny model's tokens")
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="alternating harness / vllm-bench runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--server", choices=["vllm", "stub"], default="vllm",
                   help="stub: the fake server with fixed latencies (--stub-ttft-ms, --stub-itl-ms), to compare "
                   "the two clients without the server's own variance")  # fmt: skip
    p.add_argument("--stub-ttft-ms", type=float, default=50.0)
    p.add_argument("--stub-itl-ms", type=float, default=10.0)
    a = p.parse_args()
    from models.tiny import build_tiny_model

    model = a.model = build_tiny_model()
    work = Path(tempfile.mkdtemp(prefix="bench-vs-vllm-"))
    ours_runs: list[dict[str, Any]] = []
    theirs_runs: list[dict[str, Any]] = []
    server = (
        vllm_server(model, a.port, work / "vllm-server.log")
        if a.server == "vllm"
        else stub_server(a.stub_ttft_ms, a.stub_itl_ms)
    )
    with server as base:
        sc = _scenario(a, base)
        plan = build_plan(sc)
        lengths = _write_trace(plan, model, work / "trace.jsonl")
        print(f"server: {a.server}; workload: {len(plan.open_requests)} requests, Poisson {a.rate}/s (seed {a.seed}), prompt "
              f"{min(lengths)}-{max(lengths)} tokens, output {a.output_tokens} tokens; server log {work}")  # fmt: skip
        run_harness(sc, Plan(plan.open_requests[:8], [], None))  # warm-up, not reported
        for r in range(a.rounds):
            load = os.getloadavg()[0]
            ours_runs.append(run_harness(sc, plan))
            theirs_runs.append(run_vllm_bench(model, base, work / "trace.jsonl", a))
            _table(f"round {r + 1} (load avg {load:.1f}; harness first, then vllm bench; harness send lateness "
                   f"p99 {ours_runs[-1]['lateness_p99_ms']:.1f} ms)", ours_runs[-1], theirs_runs[-1])  # fmt: skip
    _table(f"mean over {a.rounds} rounds", _mean(ours_runs), _mean(theirs_runs))
    print(f"completed per run: tokenweir {[o['completed'] for o in ours_runs]}, "
          f"vllm bench {[t.get('completed') for t in theirs_runs]}")  # fmt: skip


if __name__ == "__main__":
    main()
