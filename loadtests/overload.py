"""A simulated fleet under overload: the deployment, the load drivers and the measurements that
``tests/overload`` (behaviour: counts, statuses, RSS growth, the ledger's writes) and
``loadtests/bench_overload.py`` (timings) share; the flooding tenant's runs are ``loadtests/flood.py``.

One Tokenweir application in a namespace of its own (its own ledger and load board), on whatever
local Ray is running (a new one if none), with one gateway replica and two simulated pools:

* ``sim-a10`` (model :data:`OVERLOAD_MODEL`): the bottleneck of the overload runs, an 8B model on a
  simulated A10 at twice real time, a few sequences and a short queue, so that a few requests a
  second saturate it and the rest are refused by its admission core;
* ``sim-h100`` (model :data:`FLOOD_MODEL`): never the bottleneck, a fast simulated H100 with 256
  sequences, so that two tenants' closed loops saturate the gateway before the pool.

The clients are aiohttp streams (``stream_options.include_usage``), one task per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

APP = "tw-overload"
NAMESPACE = "tokenweir-overload"
OVERLOAD_MODEL = "llama-3.1-8b-instruct"
FLOOD_MODEL = "qwen2.5-7b-instruct"
ADMIN_KEY = "tw-admin-overload-" + "o" * 24
OVERLOAD_TTFT_SLO_MS = 2000.0
FLOOD_TTFT_SLO_MS = 2000.0
POOL_REFUSAL_CODES = frozenset(
    {"tenant_queue_full", "pool_queue_full", "predicted_wait", "queue_deadline", "displaced"}
)
"""Error codes of refusals by a pool's admission core (serving.admission.RefusalReason)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fleet_config(state_dir: Path, *, gateway_extra: dict[str, Any] | None = None) -> Any:
    """The application's config (a :class:`serving.config.TokenweirConfig`)."""
    from serving.config import parse_config

    return parse_config(
        {
            "gateway": {
                "host": "127.0.0.1",
                "port": free_port(),
                "internal_port": free_port(),
                "replicas": 1,
                "access_log_file": str(state_dir / "access.log"),
                **(gateway_extra or {}),
            },
            "metering": {"admin_key": ADMIN_KEY},
            "models": {
                OVERLOAD_MODEL: {"tokenizer": "builtin:tiny-llama"},
                FLOOD_MODEL: {"tokenizer": "builtin:tiny-llama"},
            },
            "ray": {"num_cpus": 8, "namespace": NAMESPACE},
            "state_dir": str(state_dir),
            "pools": [
                {
                    "name": "sim-a10",
                    "model": OVERLOAD_MODEL,
                    "accelerator": "A10",
                    "engine": "sim",
                    "sim_speedup": 2,
                    "engine_args": {"max_num_seqs": 4},
                    "admission": {"max_queued_requests": 8},
                    "slo": {"ttft_ms": OVERLOAD_TTFT_SLO_MS, "tpot_ms": 100},
                },
                {
                    "name": "sim-h100",
                    "model": FLOOD_MODEL,
                    "accelerator": "H100",
                    "engine": "sim",
                    "sim_speedup": 20,
                    "engine_args": {"max_num_seqs": 256},
                    "slo": {"ttft_ms": FLOOD_TTFT_SLO_MS, "tpot_ms": 100},
                },
            ],
        }
    )


@dataclass(frozen=True)
class Fleet:
    """The deployed application, as its clients and checks see it."""

    url: str
    internal_url: str
    state_dir: Path

    @property
    def access_log(self) -> Path:
        return self.state_dir / "access.log"

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)

    def tenant(self, tenant_id: str, weight: float = 1.0) -> str:
        """Create a tenant without limits of its own (plenty of credits); its API key."""
        with self.admin() as a:
            r = a.post(
                "/admin/v1/tenants",
                json={
                    "tenant_id": tenant_id,
                    "name": tenant_id,
                    "credits": 1e10,
                    "weight": weight,
                    "limits": {"rpm": 10_000_000, "tpm": 10_000_000_000},
                },
            )
            assert r.status_code == 201, r.text
            r = a.post(f"/admin/v1/tenants/{tenant_id}/keys", json={})
            assert r.status_code == 201, r.text
            return str(r.json()["api_key"])


@contextlib.contextmanager
def deployed(state_dir: Path, cfg: Any = None, **config: Any) -> Iterator[Fleet]:
    """Deploy the application (``cfg``, else :func:`fleet_config` with ``config``), starting a local
    Ray if none is up, and remove it afterwards."""
    import ray
    from ray import serve

    from serving.app import build_app
    from serving.cli import runtime

    state_dir.mkdir(parents=True, exist_ok=True)
    cfg = cfg if cfg is not None else fleet_config(state_dir, **config)
    own_ray = not ray.is_initialized()
    runtime.init_ray(cfg)
    serve.start(http_options={"location": "NoServer"})
    try:
        serve.run(build_app(cfg), name=APP, route_prefix=None, blocking=False)
        url = f"http://{cfg.gateway.host}:{cfg.gateway.port}"
        runtime.wait_ready(url, timeout_s=300)
        yield Fleet(url, f"http://{cfg.gateway.internal_host}:{cfg.gateway.internal_port}", state_dir)
    finally:
        with contextlib.suppress(Exception):
            serve.delete(APP)
        if own_ray:
            runtime.shutdown()


# -- processes -------------------------------------------------------------------------------------
def replica_pids(app: str = APP) -> dict[str, int]:
    """The process of each live Serve replica of ``app``, by deployment (``gateway``, ``pool-...``),
    from the GCS actor table."""
    from ray._private.state import actors

    prefix = f"ServeReplica:{app}:"
    out: dict[str, int] = {}
    for a in actors().values():
        name = a.get("ActorClassName") or ""
        if a["State"] == "ALIVE" and name.startswith(prefix):
            out[name[len(prefix) :]] = int(a["Pid"])
    return out


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (``/proc/<pid>/statm``)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- metrics ---------------------------------------------------------------------------------------
def scrape(internal_url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The operator listener's /metrics: family sample name -> labels -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{internal_url}/metrics", timeout=30).text
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def ledger_writes(internal_url: str) -> dict[str, float]:
    """``tokenweir_ledger_writes_total`` by kind, and ``commits`` (group commits)."""
    m = scrape(internal_url)
    out = {dict(k)["kind"]: v for k, v in m.get("tokenweir_ledger_writes_total", {}).items()}
    out["commits"] = sum(m.get("tokenweir_ledger_commits_total", {}).values())
    return out


def access_lines(path: Path, since_ts: float, until_ts: float) -> list[dict[str, Any]]:
    """Access-log lines of requests that ended between the two times."""
    out = []
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if since_ts <= rec["ts"] <= until_ts:
                out.append(rec)
    return out


def quantile(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of ``values``; NaN for none."""
    if not values:
        return math.nan
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]


# -- clients ---------------------------------------------------------------------------------------
@dataclass(slots=True)
class Result:
    """What the client saw of one request (times from ``time.monotonic()``)."""

    tenant: str
    sent: float
    status: int = 0
    """HTTP status; 0 when no response came."""
    ttft_s: float | None = None
    done: float = 0.0
    completion_tokens: int = 0
    error: dict[str, Any] | None = None
    """The error body of a refusal, or of an error event inside a stream."""
    retry_after: str | None = None
    content_type: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None and self.completion_tokens > 0

    def good(self, ttft_slo_s: float) -> bool:
        """Served, within the TTFT target."""
        return self.ok and self.ttft_s is not None and self.ttft_s <= ttft_slo_s


def stream_body(model: str, max_tokens: int = 32) -> dict[str, Any]:
    return {
        "model": model,
        "prompt": "Tell me about weirs and how a river flows over them.",
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }


async def one_request(
    session: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any], tenant: str = ""
) -> Result:
    """One streamed completion, read to its end."""
    r = Result(tenant, time.monotonic())
    try:
        async with session.post(
            f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as resp:
            r.status, r.content_type = resp.status, resp.headers.get("content-type", "")
            r.retry_after = resp.headers.get("retry-after")
            if resp.status != 200:
                with contextlib.suppress(ValueError, aiohttp.ContentTypeError):
                    r.error = await resp.json(content_type=None)
                return r
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: {"):
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    r.error = obj
                    break
                if obj.get("choices") and r.ttft_s is None:
                    r.ttft_s = time.monotonic() - r.sent
                if obj.get("usage"):
                    r.completion_tokens = int(obj["usage"]["completion_tokens"])
    except (TimeoutError, aiohttp.ClientError) as e:
        r.error = {"client": type(e).__name__}
    finally:
        r.done = time.monotonic()
    return r


def session(timeout_s: float = 60.0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=False),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    )


async def open_loop(
    url: str, key: str, body: dict[str, Any], rate_rps: float, duration_s: float
) -> list[Result]:
    """Send at ``rate_rps`` (evenly spaced) for ``duration_s``, whatever the answers; return every
    request's result once all have ended."""
    async with session() as s:
        tasks: list[asyncio.Task[Result]] = []
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        n = max(1, int(rate_rps * duration_s))
        for i in range(n):
            delay = t0 + i / rate_rps - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # the schedule's next send time
            tasks.append(asyncio.create_task(one_request(s, url, key, body)))
        return list(await asyncio.gather(*tasks))


@dataclass
class Closed:
    """One tenant's closed loop: ``concurrency`` clients, each sending its next request when the
    previous one has ended."""

    tenant: str
    key: str
    concurrency: int
    results: list[Result] = field(default_factory=list)


async def closed_loops(
    url: str, loops: list[Closed], body: dict[str, Any], duration_s: float, backoff: bool = False
) -> None:
    """Run every tenant's closed loop for ``duration_s`` (requests in flight then run to their end);
    ``backoff``: a client refused with 429/503 waits its ``Retry-After`` (at most 2 s) before the next
    request, as the OpenAI SDK does."""
    async with session() as s:
        end = time.monotonic() + duration_s

        async def client(c: Closed) -> None:
            while time.monotonic() < end:
                r = await one_request(s, url, c.key, body, c.tenant)
                c.results.append(r)
                if backoff and r.status in (429, 503):
                    await asyncio.sleep(min(2.0, max(0.0, end - time.monotonic()), _seconds(r.retry_after)))

        await asyncio.gather(*(client(c) for c in loops for _ in range(c.concurrency)))


def _seconds(retry_after: str | None) -> float:
    """A ``Retry-After`` header's seconds (1 when it is missing or not a number)."""
    try:
        return max(0.0, float(retry_after or "1"))
    except ValueError:
        return 1.0


def served_tokens(results: list[Result], since: float, until: float) -> int:
    """Completion tokens of the requests served that ended within the window."""
    return sum(r.completion_tokens for r in results if r.ok and since <= r.done <= until)


# -- the overload run ------------------------------------------------------------------------------
@dataclass
class OverloadRun:
    """What one overload run measured (the test asserts on it, the benchmark prints it)."""

    saturation_rps: float
    """Requests/s the pool served under a closed loop that keeps it full."""
    normal: list[Result]
    """Half the saturation rate, before the overload: what "normal" goodput is."""
    overload: list[Result]
    """:data:`OVERLOAD_FACTOR` times the saturation rate."""
    recovery: list[Result]
    """Half the saturation rate again, from the moment the overload stopped."""
    overload_started: float
    dropped: float
    """When the overload's last request had ended (``time.monotonic()``)."""
    rss_before: dict[str, int]
    rss_after: dict[str, int]
    writes_before: dict[str, float]
    writes_after: dict[str, float]
    refusal_durations_s: list[float]
    """Server-side time of each refusal in the overload (the access log's ``duration_s``)."""
    normal_durations_s: list[float]
    """Server-side time to the end of each request served before the overload (the baseline)."""

    @property
    def pool_refused(self) -> list[Result]:
        return [r for r in self.overload if r.status in (429, 503) and _code(r) in POOL_REFUSAL_CODES]

    @property
    def served(self) -> list[Result]:
        return [r for r in self.overload if r.ok]

    def writes(self, kind: str) -> float:
        return self.writes_after.get(kind, 0.0) - self.writes_before.get(kind, 0.0)

    def recovery_s(self, ttft_slo_s: float, window_s: float = 1.0) -> float | None:
        """Seconds from the drop until goodput was back: the start of the first window of sends
        after which every request is served within the TTFT target (None: never, in this run)."""
        bad = [r.sent - self.dropped for r in self.recovery if not r.good(ttft_slo_s)]
        if not bad:
            return 0.0
        last = max(bad)
        end = max(r.sent for r in self.recovery) - self.dropped
        back = math.ceil(last / window_s) * window_s
        return back if back <= end else None


OVERLOAD_FACTOR = 5.0


def _code(r: Result) -> str | None:
    err = (r.error or {}).get("error")
    return err.get("code") if isinstance(err, dict) else None


def _pid_rss(pids: dict[str, int]) -> dict[str, int]:
    return {name: rss_bytes(pid) for name, pid in pids.items()}


async def _settled(fleet: Fleet, timeout_s: float = 20.0) -> dict[str, float]:
    """The ledger's writes once every reservation has been resolved (reserves = settles + releases
    since the ledger started: every request that reached it has ended)."""
    deadline = time.monotonic() + timeout_s
    while True:
        w = await asyncio.to_thread(ledger_writes, fleet.internal_url)
        if w.get("reserve", 0) == w.get("settle", 0) + w.get("release", 0) or time.monotonic() > deadline:
            return w
        await asyncio.sleep(0.1)


async def run_overload(fleet: Fleet, key: str, duration_s: float, recovery_s: float = 12.0) -> OverloadRun:
    """Saturation (closed loop), normal load, :data:`OVERLOAD_FACTOR` x saturation for
    ``duration_s``, then normal load again for ``recovery_s``, all on the ``sim-a10`` pool."""
    body = stream_body(OVERLOAD_MODEL)
    sat = Closed("saturation", key, 8)  # two per sequence: the pool is always full
    t0 = time.monotonic()
    await closed_loops(fleet.url, [sat], body, 4.0)
    served = [r for r in sat.results if r.ok]
    saturation = len(served) / (max(r.done for r in sat.results) - t0)
    wall0 = time.time()
    normal = await open_loop(fleet.url, key, body, saturation / 2, 4.0)
    normal_lines = access_lines(fleet.access_log, wall0, time.time())
    pids = replica_pids()
    pids = {k: v for k, v in pids.items() if k in ("gateway", "pool-sim-a10")}
    writes_before = await _settled(fleet)
    rss_before = _pid_rss(pids)
    started, wall1 = time.monotonic(), time.time()
    overload = await open_loop(fleet.url, key, body, OVERLOAD_FACTOR * saturation, duration_s)
    dropped, wall2 = time.monotonic(), time.time()
    commits_at_drop = (await asyncio.to_thread(ledger_writes, fleet.internal_url))["commits"]
    recovery_task = asyncio.create_task(open_loop(fleet.url, key, body, saturation / 2, recovery_s))
    rss_after = _pid_rss(pids)
    recovery = await recovery_task
    writes_after = await _settled(fleet)
    # The overload's writes only: the recovery phase's are counted apart, by the client.
    rec_served = sum(1 for r in recovery if r.ok)
    rec_refused = sum(1 for r in recovery if r.status in (429, 503) and _code(r) in POOL_REFUSAL_CODES)
    for kind, n in (("reserve", rec_served + rec_refused), ("settle", rec_served), ("release", rec_refused)):
        writes_after[kind] = writes_after.get(kind, 0.0) - n
    writes_after["commits"] = commits_at_drop
    lines = access_lines(fleet.access_log, wall1, wall2)
    return OverloadRun(
        saturation_rps=saturation,
        normal=normal,
        overload=overload,
        recovery=recovery,
        overload_started=started,
        dropped=dropped,
        rss_before=rss_before,
        rss_after=rss_after,
        writes_before=writes_before,
        writes_after=writes_after,
        refusal_durations_s=[x["duration_s"] for x in lines if x["status"] in (429, 503)],
        normal_durations_s=[x["duration_s"] for x in normal_lines if x["status"] == 200],
    )
