"""Tokenweir on a real multi-node Ray cluster: five Ray nodes, each in its own network namespace.

The cluster (:mod:`loadtests.netns`): a head (``10.77.0.10``: GCS, Serve's controller, the ledger, a
gateway) and four workers: ``w1`` (``10.77.0.11``: a gateway and an L20), ``w2`` and ``w3``
(``10.77.0.12``/``.13``: an H100 each, so that a replica can come back after its node is lost) and
``w4`` (``10.77.0.14``: ``accelerator_type:CPU``, the tiny model on vLLM's CPU build, a real engine).
The GPUs are fake (``--resources '{"accelerator_type:H100": 1}'``) and run simulated pools;
every node has its own home, state and ``--temp-dir`` directories and object store, and the same
``RAY_AUTH_MODE=token`` token; GCS health checks are short, so a lost node is noticed in seconds.
The app is deployed as an operator would: ``tokenweir deploy render --target serve``, then ``serve
run --non-blocking serve.yaml`` by a driver inside the head's namespace. This process is the client,
on the bridge's address, and reaches the gateways only at their nodes' addresses.

What it shows (the test functions run in this order, on one deployment):

1. every pool replica runs on a node of its GPU type (Ray's state API, ``ray.util.state``: the head
   runs the dashboard that serves it), and the ledger on the head (the state API, and ``tokenweir
   status`` run on the head); Ray refuses a driver without the token;
2. a request pinned to each type through either gateway node is served there (``x-tokenweir-pool``,
   ``-gpu``, ``-node``), tokens crossing nodes on the token channel; TTFT through a gateway on the
   pool's own node vs another node is printed;
3. the tiny model on vLLM's CPU build (its EngineCore process on ``w4``) serves requests pinned to
   ``CPU`` through both gateways, neither on its node, charged exactly what vLLM reported;
4. metering is exact across nodes: 300 concurrent requests split over both gateway nodes overspend
   nothing and end with ``final = initial - sum(charged)`` and no reservation left;
5. node loss with a spare: the H100 replica's node is cut off and its Ray processes killed mid-load.
   Its streams end with an error event and an exact charge. Requests in flight on it before their
   first token at the kill (sent once it is off the network, routed to its replica: the gateways'
   routing counters on ``/metrics`` count them) are retried once: the unpinned ones on the L20
   pool, served in full (``x-tokenweir-node`` names w1) and charged exactly; the ones pinned to
   ``H100`` find no replica of their type (the replacement is not up yet) and get a clean 503
   ``pool_unavailable``. L20 streams finish untouched; the replica comes back on the other H100
   node; the time to the retried answers, to the last affected answer and to full readiness is
   printed;
6. node loss without a spare: the other H100 node goes too, so no node of the type is left. The
   H100 pool reports not ready (``/readyz/pools`` 503 naming it; each gateway's own ``/readyz``
   stays 200), requests pinned to it are refused at once with 503 ``pool_unavailable``, the L20 and
   CPU pools serve on; when the node comes back (a new Ray node at the same address), the replica
   starts there and the pool is ready again. Times from the kill to not-ready, to the last
   affected answer, and from the return to ready are printed.

Alone: ``flock /tmp/tw-integration.lock .venv/bin/python -m pytest -m multinode
tests/multinode/test_cluster.py -s`` as root (about 2.5 minutes on two cores: a minute to start the
nodes and deploy, vLLM's start on ``w4`` in parallel with the rest, then the requests, the two node
losses and recoveries; the whole tier with ``test_ledger_home.py``, 2.6 to 3.3 minutes in three runs on
2026-12-06). Skipped where network namespaces cannot be made (no root, no iproute2).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadtests.netns import VENV_BIN, NetnsCluster, Node, can_make_namespaces, port_open

pytestmark = [
    pytest.mark.integration,
    pytest.mark.multinode,
    pytest.mark.skipif(can_make_namespaces() is not None, reason=str(can_make_namespaces())),
]
MODEL = "llama-3.1-8b-instruct"
TINY = "tiny-llama"
ADMIN_KEY = "tw-admin-multinode-" + "k" * 24
PORT = 8000
INTERNAL_PORT = 9464  # the operator's listener: /metrics
U = 1_000_000
# A node is declared dead after 4 missed checks of 1 s (Ray's default: 5 of 3 s, plus a 5 s timeout).
HEALTH = {
    "health_check_period_ms": 1000,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 4,
}
POOLS = {"sim-h100": "H100", "sim-l20": "L20", "tiny-cpu": "CPU"}
MODELS = {"sim-h100": MODEL, "sim-l20": MODEL, "tiny-cpu": TINY}


def _config(state_dir: Path) -> dict[str, Any]:
    slo = {"ttft_ms": 5000, "tpot_ms": 100}
    vllm_cpu = {
        "name": "tiny-cpu",
        "model": TINY,
        "accelerator": "CPU",
        "engine": "vllm",
        "engine_args": {"kv_cache_space_gib": 1, "max_num_seqs": 16},
        # A CPU shared with four other nodes: targets about the API, not admission under load.
        "slo": {"ttft_ms": 60000, "tpot_ms": 5000},
    }
    return {
        "gateway": {
            "host": "node",
            "port": PORT,
            "internal_host": "node",
            "internal_port": INTERNAL_PORT,
            "replicas": 2,
            "node_resource": "tokenweir_gateway",
            "first_token_timeout_s": 60,
            "request_timeout_s": 180,
        },
        "ray": {"address": "auto"},
        "state_dir": str(state_dir),  # the head's own directory: the ledger's file is there
        "metering": {"lease_grace_s": 3},
        "models": {MODEL: {"tokenizer": "builtin:tiny-llama"}},
        "pools": [
            *(
                {"name": name, "model": MODEL, "accelerator": gpu, "engine": "sim", "slo": slo}
                for name, gpu in POOLS.items()
                if gpu != "CPU"
            ),
            vllm_cpu,
        ],
    }


class Probe:
    """The driver in the head's namespace (``_probe.py``): Ray's node and actor tables, through its
    state API."""

    def __init__(self, cluster: NetnsCluster) -> None:
        script = str(Path(__file__).with_name("_probe.py"))
        self.proc = cluster.popen(
            cluster.head,
            [sys.executable, script, cluster.address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(cluster.head.root / "log" / "probe.log", "wb"),  # noqa: SIM115
            text=True,
        )
        self._read()

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError("the probe driver exited")

    def ask(self, op: str) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op}) + "\n")
        self.proc.stdin.flush()
        out = self._read()
        assert "ok" in out, out
        return out["ok"]

    def replicas(self, deployment: str) -> list[dict[str, Any]]:
        """Live actors of a Serve deployment (class ``ServeReplica:<app>:<deployment>``)."""
        return [
            a for a in self.ask("actors") if a["state"] == "ALIVE" and a["class"].endswith(f":{deployment}")
        ]

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _wait(cond: Any, timeout_s: float, what: str, every_s: float = 0.25) -> float:
    t0 = time.monotonic()
    while True:
        try:
            if cond():
                return time.monotonic() - t0
        except (httpx.HTTPError, OSError):
            pass
        assert time.monotonic() - t0 < timeout_s, f"timed out after {timeout_s} s waiting for {what}"
        time.sleep(every_s)  # a polled condition with a deadline


@pytest.fixture(scope="module")
def fleet(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    t0 = time.monotonic()
    failed_before = request.session.testsfailed
    root = Path(tempfile.mkdtemp(prefix="twmn-", dir="/tmp"))  # short: Ray's socket paths live under it
    cluster = NetnsCluster(root, system_config=HEALTH, dashboard=True)  # for Ray's state API
    cluster.env_extra = {"TOKENWEIR_ADMIN_KEY": ADMIN_KEY}  # what the gateways' admin API checks
    probe = None
    try:
        head = cluster.add_node("head", 10, {"tokenweir_gateway": 1}, head=True)
        _wait(lambda: port_open(head.ip, 6379), 60, "the head's GCS")
        cluster.add_node("w1", 11, {"tokenweir_gateway": 1, "accelerator_type:L20": 1})
        cluster.add_node("w2", 12, {"accelerator_type:H100": 1})
        cluster.add_node("w3", 13, {"accelerator_type:H100": 1})
        cluster.add_node("w4", 14, {"accelerator_type:CPU": 1})
        probe = Probe(cluster)
        _wait(lambda: sum(n["alive"] for n in probe.ask("nodes")) == 5, 90, "five nodes")
        started = time.monotonic() - t0

        # Deploy the rendered Serve config, as `serve run` (what `serve deploy` also submits). Serve
        # starts every replica at once: vLLM's on w4 (the longest) beside the gateways and sim pools.
        config = cluster.deploy(_config(head.state))
        gateways = {n: cluster.nodes[n] for n in ("head", "w1")}
        urls = {n: f"http://{node.ip}:{PORT}" for n, node in gateways.items()}
        for url in urls.values():  # each gateway's own readiness (its ledger link), then every pool's
            for path in ("/readyz", "/readyz/pools"):
                _wait(lambda u=url + path: httpx.get(u, timeout=5).status_code == 200, 240, url + path)
        print(
            f"\n[multinode] 5 nodes up in {started:.1f} s, deployed and ready (vLLM's CPU pool "
            f"included) in {time.monotonic() - t0 - started:.1f} s more"
        )
        yield {"cluster": cluster, "probe": probe, "urls": urls, "state": head.state, "config": config}
    finally:
        if probe is not None:
            probe.close()
        cluster.close()
        if request.session.testsfailed == failed_before:  # else the nodes' logs stay, for a look
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"\n[multinode] the nodes' directories (Ray's logs): {root}")


def _admin(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)


def _tenant(url: str, credits: float) -> tuple[str, str]:
    tid = "mn-" + uuid.uuid4().hex[:8]
    with _admin(url) as a:
        r = a.post("/admin/v1/tenants", json={"tenant_id": tid, "name": tid, "credits": credits})
        assert r.status_code == 201, r.text
        return tid, a.post(f"/admin/v1/tenants/{tid}/keys", json={}).json()["api_key"]


def _nodes_with(probe: Probe, resource: str) -> dict[str, str]:
    """Live nodes advertising ``resource``: node id -> address."""
    return {n["node_id"]: n["ip"] for n in probe.ask("nodes") if n["alive"] and resource in n["resources"]}


# ----------------------------------------------------------------------------- placement
def test_every_pool_replica_runs_on_a_node_of_its_gpu_type(fleet: dict[str, Any]) -> None:
    probe: Probe = fleet["probe"]
    for pool, gpu in POOLS.items():
        replicas = probe.replicas(f"pool-{pool}")
        typed = _nodes_with(probe, f"accelerator_type:{gpu}")
        assert replicas and all(r["node_id"] in typed for r in replicas), (pool, replicas, typed)
    cluster: NetnsCluster = fleet["cluster"]
    gateways = probe.replicas("gateway")
    on = {r["ip"] for r in gateways}
    assert len(gateways) == 2 and on == {cluster.nodes["head"].ip, cluster.nodes["w1"].ip}
    # Each gateway resolved the `builtin:` tokenizer on its own node, into that node's cache (a
    # path from the node that built the app would name nothing on another machine).
    built = {
        n for n, node in cluster.nodes.items() if list(node.home.glob(".cache/tokenweir/models/*/.complete"))
    }
    assert built == {"head", "w1", "w4"}, built  # w4: the vLLM pool's weights


def test_the_ledger_and_the_load_board_run_on_the_head(fleet: dict[str, Any]) -> None:
    cluster: NetnsCluster = fleet["cluster"]
    probe: Probe = fleet["probe"]
    (head_id,) = _nodes_with(probe, "node:__internal_head__")
    ledger = probe.ask("ledger")  # serving.metering.ledger_home: what `tokenweir status` shows
    assert (ledger["state"], ledger["node_id"], ledger["node_ip"]) == ("ALIVE", head_id, cluster.head.ip)
    named = [a for a in probe.ask("actors") if a["name"] == "tokenweir-ledger" and a["state"] == "ALIVE"]
    assert [(a["node_id"], a["ip"], a["pid"]) for a in named] == [(head_id, cluster.head.ip, ledger["pid"])]
    # The load board too: lost with a worker, it would come back empty elsewhere, and gateways
    # reading it then would drop the replicas it did not list yet (tiny-cpu, in an earlier run).
    boards = [a for a in probe.ask("actors") if a["class"] == "LoadBoard" and a["state"] == "ALIVE"]
    assert [b["node_id"] for b in boards] == [head_id], boards
    assert (fleet["state"] / "ledger.sqlite3").exists()
    # What an operator sees: `tokenweir status` on the head says the same.
    config = fleet["config"]
    argv = ["status", "--json", "--config", str(config), "--url", fleet["urls"]["head"]]
    status = cluster.run(cluster.head, [str(VENV_BIN / "tokenweir"), *argv])
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert shown["ledger"]["node_id"] == head_id and shown["ledger"]["node_ip"] == cluster.head.ip
    assert {p["pool"]: p["replicas"] for p in shown["pools"]} == {p: "1/1" for p in POOLS}


def test_ray_refuses_a_driver_without_the_token(fleet: dict[str, Any]) -> None:
    cluster: NetnsCluster = fleet["cluster"]
    code = f"import ray; ray.init(address={cluster.address!r})"
    env = cluster.env(cluster.head) | {"RAY_AUTH_TOKEN": "0" * 64}
    r = subprocess.run(
        ["ip", "netns", "exec", cluster.head.netns, sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert "auth" in (r.stdout + r.stderr).lower(), r.stderr[-2000:]


# ----------------------------------------------------------------------------- requests
def _chat(max_tokens: int, stream: bool = False, model: str = MODEL) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hello from another node"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


def test_a_request_pinned_to_each_type_is_served_there_through_either_gateway(fleet: dict[str, Any]) -> None:
    probe: Probe = fleet["probe"]
    _tid, key = _tenant(fleet["urls"]["head"], 100_000)
    for gw, url in fleet["urls"].items():
        for pool, gpu in POOLS.items():
            r = httpx.post(
                f"{url}/v1/chat/completions",
                json=_chat(6, model=MODELS[pool]),
                headers={"Authorization": f"Bearer {key}", "x-tokenweir-gpu": gpu},
                timeout=60,
            )
            assert r.status_code == 200, (gw, gpu, r.text)
            assert r.json()["usage"]["completion_tokens"] == 6
            assert (r.headers["x-tokenweir-pool"], r.headers["x-tokenweir-gpu"]) == (pool, gpu)
            assert r.headers["x-tokenweir-node"] in _nodes_with(probe, f"accelerator_type:{gpu}").values()


def _proc_title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _settled(url: str, tid: str) -> dict[str, Any]:
    """The tenant's figures once no reservation of it is left (settlement follows a stream's end)."""
    with _admin(url) as a:
        _wait(
            lambda: (
                (v := a.get(f"/admin/v1/tenants/{tid}").json())["in_flight"] == 0
                and v["reserved_credits"] == 0
            ),
            60,
            "every reservation settled",
        )
        return dict(a.get(f"/admin/v1/tenants/{tid}").json())


def test_the_tiny_model_on_vllm_cpu_is_served_on_its_node_with_exact_metering(fleet: dict[str, Any]) -> None:
    """The CPU pool is a real vLLM engine (its EngineCore process runs in w4's namespace); requests
    pinned to ``CPU`` through the head's and w1's gateways are served by the replica on w4, and each
    is charged what vLLM reported (its prompt, cached and completion tokens)."""
    cluster: NetnsCluster = fleet["cluster"]
    probe: Probe = fleet["probe"]
    urls: dict[str, str] = fleet["urls"]
    w4 = cluster.nodes["w4"]
    assert [r["ip"] for r in probe.replicas("pool-tiny-cpu")] == [w4.ip]
    engines = [pid for pid in cluster.pids(w4) if "EngineCore" in _proc_title(pid)]
    assert engines, [(pid, _proc_title(pid)[:80]) for pid in cluster.pids(w4)]
    initial = 10_000
    tid, key = _tenant(urls["head"], initial)
    served: dict[str, dict[str, Any]] = {}
    for gw, url in urls.items():
        assert cluster.nodes[gw].ip != w4.ip
        for max_tokens in (5, 17):
            r = httpx.post(
                f"{url}/v1/chat/completions",
                json=_chat(max_tokens, model=TINY),
                headers={"Authorization": f"Bearer {key}", "x-tokenweir-gpu": "CPU"},
                timeout=120,
            )
            assert r.status_code == 200, (gw, r.text)
            where = tuple(r.headers[f"x-tokenweir-{h}"] for h in ("pool", "gpu", "node"))
            assert where == ("tiny-cpu", "CPU", w4.ip), (gw, where)
            usage = r.json()["usage"]
            assert usage["completion_tokens"] == max_tokens
            served[r.json()["id"].split("-", 1)[1]] = usage
    stream = Stream(urls["w1"], None, 40, TINY)  # unpinned: only the CPU pool serves the tiny model
    asyncio.run(stream.run(key))
    assert (stream.status, stream.node) == ("done", w4.ip), (stream.status, stream.error)
    view = _settled(urls["w1"], tid)
    events = _events(fleet["state"], tid)
    for rid, usage in served.items():
        assert events[rid] == ("completed", usage["prompt_tokens"], usage["completion_tokens"], _cost(usage))
    assert stream.request_id is not None and events[stream.request_id][:3:2] == ("completed", 40)
    charged = sum(u for *_, u in events.values())
    assert set(events) == {*served, stream.request_id}
    assert round(view["credits"] * U) == initial * U - charged
    print(
        f"\n[multinode] vLLM CPU pool on w4 (EngineCore pid {engines[0]}): {len(served) + 1} requests "
        f"through the gateways on head and w1, served on {w4.ip}; final {view['credits']:g} = "
        f"{initial} - {charged / U:g}"
    )


async def _ttft(client: httpx.AsyncClient, key: str, gpu: str) -> float:
    """Seconds from sending a streamed request to its first content chunk (the response's headers
    come with the first token), on a kept-alive connection."""
    headers = {"Authorization": f"Bearer {key}", "x-tokenweir-gpu": gpu}
    ttft = None
    t0 = time.perf_counter()
    async with client.stream(
        "POST", "/v1/chat/completions", json=_chat(2, stream=True), headers=headers
    ) as r:
        async for line in r.aiter_lines():  # read to the end: the request finishes before the next
            if ttft is None and line.startswith("data: {") and '"content"' in line:
                ttft = time.perf_counter() - t0
    assert r.status_code == 200 and ttft is not None
    return ttft


def test_cross_node_hop_ttft(fleet: dict[str, Any]) -> None:
    """The L20 pool runs on w1: through w1's gateway its tokens stay on the node, through the
    head's they cross the bridge. Prints both TTFT p50s (same run, interleaved)."""
    urls = fleet["urls"]
    _tid, key = _tenant(urls["head"], 100_000)

    async def run() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {"same": [], "cross": []}
        async with (
            httpx.AsyncClient(base_url=urls["w1"], timeout=60) as same,
            httpx.AsyncClient(base_url=urls["head"], timeout=60) as cross,
        ):
            for _ in range(3):  # connections open, pools warm
                await _ttft(same, key, "L20"), await _ttft(cross, key, "L20")
            for _ in range(30):
                out["same"].append(await _ttft(same, key, "L20"))
                out["cross"].append(await _ttft(cross, key, "L20"))
        return out

    t = asyncio.run(run())
    same, cross = (statistics.median(t[k]) * 1000 for k in ("same", "cross"))
    print(
        f"\n[multinode] TTFT p50, L20 pool on w1: gateway on the same node {same:.1f} ms, on another "
        f"node {cross:.1f} ms (cross-node hop {cross - same:+.1f} ms; {len(t['same'])} requests each)"
    )
    assert len(t["same"]) == len(t["cross"]) == 30


async def test_metering_is_exact_across_two_gateway_nodes(fleet: dict[str, Any]) -> None:
    urls = list(fleet["urls"].values())
    initial = 2_000.0  # a fraction of what 300 requests of ~30 tokens each would need
    tid, key = _tenant(urls[0], initial)
    limits = httpx.Limits(max_connections=200)
    clients = [httpx.AsyncClient(base_url=u, timeout=120, limits=limits) for u in urls]

    async def one(i: int) -> float | str:
        r = await clients[i % 2].post(
            "/v1/chat/completions", json=_chat(8), headers={"Authorization": f"Bearer {key}"}
        )
        if r.status_code == 200:
            return _cost(r.json()["usage"]) / U
        return str(r.json()["error"]["code"])

    results = await asyncio.gather(*(one(i) for i in range(300)))
    for c in clients:
        await c.aclose()
    charged = [x for x in results if isinstance(x, float)]
    refused = [x for x in results if isinstance(x, str)]
    assert charged and refused and set(refused) == {"insufficient_quota"}, set(refused)
    with _admin(urls[1]) as a:
        view = a.get(f"/admin/v1/tenants/{tid}").json()
    print(
        f"\n[multinode] 300 concurrent over 2 gateway nodes: served {len(charged)}, refused {len(refused)}; "
        f"final {view['credits']:g} = {initial:g} - {sum(charged):g}"
    )
    assert sum(charged) <= initial
    assert view["credits"] == pytest.approx(initial - sum(charged))
    assert view["reserved_credits"] == 0 and view["in_flight"] == 0


# ----------------------------------------------------------------------------- node loss
class Stream:
    """One streamed request on its own connection, as the client saw it."""

    def __init__(self, url: str, gpu: str | None, max_tokens: int, model: str = MODEL) -> None:
        self.url, self.gpu, self.max_tokens, self.model = url, gpu, max_tokens, model
        self.request_id: str | None = None
        self.events = 0
        self.status = "pending"
        self.error: dict[str, Any] | None = None
        self.http_status: int | None = None
        self.node: str | None = None
        self.started_at = self.ended_at = 0.0

    async def run(self, key: str) -> None:
        self.started_at = time.monotonic()
        headers = {"Authorization": f"Bearer {key}"} | ({"x-tokenweir-gpu": self.gpu} if self.gpu else {})
        try:
            async with (
                httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10)) as c,
                c.stream(
                    "POST",
                    f"{self.url}/v1/chat/completions",
                    json=_chat(self.max_tokens, True, self.model),
                    headers=headers,
                ) as r,
            ):
                self.http_status = r.status_code
                self.node = r.headers.get("x-tokenweir-node")
                if r.status_code != 200:
                    self.status = "refused"
                    self.error = json.loads(await r.aread())["error"]
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    obj = json.loads(line[6:])
                    if "error" in obj:
                        self.error, self.status = obj["error"], "error"
                        return
                    self.request_id = self.request_id or obj["id"].split("-", 1)[1]
                    self.events += 1
                self.status = "done"
        except (httpx.HTTPError, ConnectionError):
            self.status = "broken"
        finally:
            self.ended_at = time.monotonic()


def _cost(usage: dict[str, Any]) -> int:
    """Micro-credits a response's usage costs at the default prices: a credit per prompt and per
    completion token, half a credit per prompt token the engine found in its prefix cache."""
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return (usage["prompt_tokens"] - cached) * U + cached * U // 2 + usage["completion_tokens"] * U


def _events(state_dir: Path, tenant: str) -> dict[str, tuple[str, int, int, int]]:
    """The tenant's usage events: request id -> (outcome, prompt, completion tokens, micro-credits),
    each event's charge checked against its own token counts (:func:`_cost`)."""
    with sqlite3.connect(f"file:{state_dir / 'ledger.sqlite3'}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT request_id, outcome, prompt_tokens, completion_tokens, cached_tokens, ucredits"
            " FROM usage_events WHERE tenant_id = ?",
            (tenant,),
        ).fetchall()
    out = {}
    for r, o, p, c, cached, u in rows:
        usage = {
            "prompt_tokens": p,
            "completion_tokens": c,
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        assert u == _cost(usage), (r, o, p, c, cached, u)
        out[r] = (o, p, c, u)
    return out


async def _until(cond: Any, timeout_s: float, what: str) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _routed(url: str, pool: str) -> tuple[int, int]:
    """Routing decisions for ``pool`` so far, summed over the gateway replicas (``/metrics`` on the
    operator's listener of the gateway at ``url``'s node: each gateway publishes its router's
    counters to the load board): ``(unpinned, pinned)``. A pinned request's decision is
    ``only_candidate``; an unpinned one's, for a model two pools serve, never is. A retry onto
    another pool is not a routing decision (it takes the other pool)."""
    host = httpx.URL(url).host
    r = httpx.get(f"http://{host}:{INTERNAL_PORT}/metrics", timeout=10)
    r.raise_for_status()
    text = r.text
    unpinned = pinned = 0
    for fam in text_string_to_metric_families(text):
        if fam.name != "tokenweir_routing_decisions":
            continue
        for s in fam.samples:
            if s.name.endswith("_total") and s.labels["pool"] == pool:
                if s.labels["reason"] == "only_candidate":
                    pinned += int(s.value)
                else:
                    unpinned += int(s.value)
    return unpinned, pinned


async def test_node_loss_mid_load(fleet: dict[str, Any]) -> None:
    cluster: NetnsCluster = fleet["cluster"]
    probe: Probe = fleet["probe"]
    urls = list(fleet["urls"].values())
    tid, key = _tenant(urls[0], 1_000_000)
    (replica,) = probe.replicas("pool-sim-h100")
    victim: Node = next(n for n in cluster.nodes.values() if n.ip == replica["ip"])
    survivor: Node = next(
        n for n in cluster.nodes.values() if "accelerator_type:H100" in n.resources and n is not victim
    )

    # Mid-load: long H100 streams (on the node about to die) and L20 streams, over both gateways.
    h100 = [Stream(urls[i % 2], "H100", 3000) for i in range(6)]
    l20 = [Stream(urls[i % 2], "L20", 700) for i in range(4)]
    (l20_node,) = (r["ip"] for r in probe.replicas("pool-sim-l20"))
    routed_before = await asyncio.to_thread(_routed, urls[0], "sim-h100")
    tasks = [asyncio.create_task(s.run(key)) for s in h100 + l20]
    await _until(lambda: all(s.events > 0 for s in h100 + l20), 60, "every stream's first tokens")
    assert all(s.node == victim.ip for s in h100)
    cluster.cut(victim)  # the machine drops off the network: no FIN, no RST from it
    lost_at = time.monotonic()
    # In flight before their first token when the node dies: sent once it is off the network, so
    # no token of theirs can come back, to the replica the gateways still list (until its board
    # entry expires, 5 s after its last publish): the router sends the unpinned ones there too (the
    # H100 pool is the cheaper per token). When the entry goes, their channel closes; the gateway
    # retries each once elsewhere: an unpinned one on the L20 pool, served in full; a pinned one
    # finds no replica of its type (the replacement starts later) and is refused at once, 503.
    unpinned_early = [Stream(urls[i % 2], None, 16) for i in range(4)]
    pinned_early = [Stream(urls[i % 2], "H100", 16) for i in range(2)]
    early = unpinned_early + pinned_early
    tasks += [asyncio.create_task(s.run(key)) for s in early]

    def routed_early() -> tuple[int, int]:
        now = _routed(urls[0], "sim-h100")
        return now[0] - routed_before[0], now[1] - routed_before[1]

    routed = (len(unpinned_early), len(h100) + len(pinned_early))  # the pinned streams' too
    await asyncio.to_thread(
        _wait,
        lambda: all(n >= want for n, want in zip(routed_early(), routed, strict=True)),
        20,
        "the gateways routing the early requests to the H100 replica",
    )
    routed_at_kill = routed_early()
    assert routed_at_kill == routed, routed_at_kill
    waiting = [s for s in early if s.events == 0 and s.http_status is None]  # headers come with a token
    assert waiting == early, [(s.events, s.http_status, s.status) for s in early]
    cluster.kill(victim)  # and its Ray processes are gone
    killed_at = time.monotonic()
    # Sent right after: unpinned ones may be routed to the dead replica (retried on L20 before
    # their first token); H100-pinned ones wait for a replica (served by the replacement, or 503).
    after = [Stream(urls[i % 2], None, 8) for i in range(8)] + [
        Stream(urls[i % 2], "H100", 8) for i in range(2)
    ]
    await asyncio.gather(*tasks, *(s.run(key) for s in after))
    last_answer = max(s.ended_at for s in h100 + early + after) - lost_at
    retried_after = max(s.ended_at for s in unpinned_early) - lost_at

    # Before the first token: the unpinned ones retried on the L20 replica (its node, not the lost
    # one, named by x-tokenweir-node) and served in full; the pinned ones refused with a clean 503.
    assert all(s.status == "done" and s.node == l20_node != victim.ip for s in unpinned_early), [
        (s.status, s.node, s.error) for s in unpinned_early
    ]
    for s in pinned_early:
        assert (s.status, s.http_status) == ("refused", 503), (s.status, s.http_status, s.error)
        assert s.error is not None and s.error["code"] == "pool_unavailable", s.error
    assert all(s.status == "error" for s in h100), [(s.status, s.error) for s in h100]
    assert all(s.error and s.error["code"] == "service_unavailable" for s in h100)
    assert all(s.status == "done" for s in l20), [(s.status, s.error) for s in l20]  # other pool untouched
    assert all(s.status == "done" for s in after[:8]), [(s.status, s.error) for s in after[:8]]
    pinned = after[8:]
    assert all(
        (s.status == "done" and s.node == survivor.ip)
        or (s.status == "refused" and s.http_status == 503 and s.error is not None)
        for s in pinned
    ), [(s.status, s.http_status, s.node, s.error) for s in pinned]

    # Full readiness: the H100 replica is back, on the other H100 node, and both gateways reach it.
    await asyncio.to_thread(
        _wait,
        lambda: [r["ip"] for r in probe.replicas("pool-sim-h100")] == [survivor.ip],
        180,
        "the H100 replica on the surviving node",
    )
    for url in urls:
        await asyncio.to_thread(
            _wait, lambda u=url: httpx.get(f"{u}/readyz/pools", timeout=5).status_code == 200, 120, url
        )
    ready_after = time.monotonic() - lost_at
    back = await asyncio.to_thread(
        httpx.post,
        f"{urls[0]}/v1/chat/completions",
        json=_chat(4),
        headers={"Authorization": f"Bearer {key}", "x-tokenweir-gpu": "H100"},
        timeout=60,
    )
    assert back.status_code == 200 and back.headers["x-tokenweir-node"] == survivor.ip, back.text

    # The books: every request charged exactly what it produced (each event's charge is checked
    # against its tokens by _events), nothing left reserved.
    view = await asyncio.to_thread(_settled, urls[1], tid)
    events = _events(fleet["state"], tid)
    for s in h100:
        outcome, _prompt, completion, _u = events[s.request_id]  # type: ignore[index]
        assert outcome == "error" and 0 < completion < 3000
    for s in l20 + unpinned_early + [s for s in after if s.status == "done"]:
        outcome, _prompt, completion, _u = events[s.request_id]  # type: ignore[index]
        assert (outcome, completion) == ("completed", s.max_tokens)
    # The refused ones (pinned, before a first token) are charged nothing: every event of the
    # tenant's is one of a request that produced tokens, or is free.
    produced = {s.request_id for s in h100 + l20 + early + after if s.request_id}
    produced.add(back.json()["id"].split("-", 1)[1])
    unproduced = {r: e for r, e in events.items() if r not in produced}
    assert all(u == 0 for *_, u in unproduced.values()), unproduced
    charged = sum(u for *_, u in events.values())
    assert round(view["credits"] * U) == 1_000_000 * U - charged
    by: dict[str, int] = {}
    for s in after:
        by[s.status] = by.get(s.status, 0) + 1
    print(
        f"\n[multinode] node loss ({victim.name}, H100; cut, its processes killed "
        f"{killed_at - lost_at:.1f} s later): {len(h100)} streams on it ended with an error event and "
        f"an exact charge; {len(early)} requests in flight on it before their first token at the kill "
        f"(routed there: {routed_at_kill[0]} unpinned, {routed_at_kill[1] - len(h100)} pinned): the "
        f"{len(unpinned_early)} "
        f"unpinned retried on L20 ({l20_node}) and served in full, exact charge, "
        f"{retried_after:.1f} s after the cut; the {len(pinned_early)} pinned refused 503 "
        f"pool_unavailable; {len(l20)} L20 streams finished; {len(after)} sent after the kill {by}; "
        f"last affected request answered {last_answer:.1f} s after the cut; the replica back on "
        f"{survivor.name} and every gateway ready {ready_after:.1f} s after the cut; "
        f"balance {view['credits']:g} = 1e6 - {charged / U:g}"
    )


def _readiness(url: str) -> tuple[int, str, int]:
    """``/readyz/pools``'s status and message (its error's, when not ready), ``/readyz``'s status."""
    pools = httpx.get(f"{url}/readyz/pools", timeout=5)
    own = httpx.get(f"{url}/readyz", timeout=5)
    body = pools.json()
    return pools.status_code, str(body["error"]["message"] if "error" in body else body), own.status_code


async def test_node_loss_without_a_spare(fleet: dict[str, Any]) -> None:
    """The H100 replica's node goes while the other H100 node is already gone (the previous test):
    no node of the type is left, so the pool cannot come back until one does."""
    cluster: NetnsCluster = fleet["cluster"]
    probe: Probe = fleet["probe"]
    urls = list(fleet["urls"].values())
    tid, key = _tenant(urls[0], 1_000_000)
    (replica,) = probe.replicas("pool-sim-h100")
    victim: Node = next(n for n in cluster.nodes.values() if n.ip == replica["ip"])
    assert list(_nodes_with(probe, "accelerator_type:H100").values()) == [victim.ip]  # no spare
    w1, w4 = cluster.nodes["w1"], cluster.nodes["w4"]

    h100 = [Stream(urls[i % 2], "H100", 3000) for i in range(4)]
    others = [Stream(urls[i % 2], "L20", 700) for i in range(2)] + [
        Stream(urls[i % 2], "CPU", 600, TINY) for i in range(2)
    ]
    tasks = [asyncio.create_task(s.run(key)) for s in h100 + others]
    await _until(lambda: all(s.events > 0 for s in h100 + others), 60, "every stream's first tokens")
    cluster.cut(victim)
    cluster.kill(victim)
    killed_at = time.monotonic()

    # Not ready: each gateway's every-pool readiness names the H100 pool; its own stays ready.
    def h100_down(url: str) -> bool:
        status, message, _own = _readiness(url)
        return status == 503 and "'sim-h100': 'not ready" in message

    for url in urls:
        await asyncio.to_thread(_wait, lambda u=url: h100_down(u), 60, f"{url}: the H100 pool not ready")
    not_ready_after = time.monotonic() - killed_at
    for url in urls:
        status, message, own = _readiness(url)
        assert (status, own) == (503, 200), (url, status, own, message)
        assert "'sim-l20': 'ready'" in message and "'tiny-cpu': 'ready'" in message, message

    # Requests pinned to the pool are refused at once (503, OpenAI error body); the others serve on.
    pinned = [Stream(urls[i % 2], "H100", 8) for i in range(4)]
    unpinned = [Stream(urls[i % 2], None, 8) for i in range(4)]
    on_cpu = [Stream(urls[i % 2], "CPU", 8, TINY) for i in range(2)]
    await asyncio.gather(*tasks, *(s.run(key) for s in pinned + unpinned + on_cpu))
    last_answer = max(s.ended_at for s in h100 + pinned) - killed_at
    assert all(s.status == "error" and s.error and s.error["code"] == "service_unavailable" for s in h100), [
        (s.status, s.error) for s in h100
    ]
    assert all(s.status == "done" for s in others), [(s.status, s.error) for s in others]
    for s in pinned:
        assert (s.status, s.http_status) == ("refused", 503), (s.status, s.http_status, s.error)
        assert s.error is not None and set(s.error) == {"message", "type", "param", "code"}
        assert s.error["code"] == "pool_unavailable" and "sim-h100" in s.error["message"], s.error
    refusal_s = max(s.ended_at - s.started_at for s in pinned)
    assert all(s.status == "done" and s.node == w1.ip for s in unpinned), [
        (s.status, s.node, s.error) for s in unpinned
    ]
    assert all(s.status == "done" and s.node == w4.ip for s in on_cpu), [(s.status, s.error) for s in on_cpu]

    # The node returns (a new Ray node at the same address): the replica starts there, ready again.
    cluster.restart(victim)
    back_at = time.monotonic()
    await asyncio.to_thread(
        _wait,
        lambda: [r["ip"] for r in probe.replicas("pool-sim-h100")] == [victim.ip],
        180,
        f"the H100 replica on {victim.name} again",
    )
    for url in urls:
        await asyncio.to_thread(_wait, lambda u=url: _readiness(u)[0] == 200, 120, f"{url}/readyz/pools")
    ready_after = time.monotonic() - back_at
    back = await asyncio.to_thread(
        httpx.post,
        f"{urls[1]}/v1/chat/completions",
        json=_chat(4),
        headers={"Authorization": f"Bearer {key}", "x-tokenweir-gpu": "H100"},
        timeout=60,
    )
    assert back.status_code == 200 and back.headers["x-tokenweir-node"] == victim.ip, back.text

    # The books: the cut streams charged what they produced, the refusals nothing.
    view = await asyncio.to_thread(_settled, urls[1], tid)
    events = _events(fleet["state"], tid)
    for s in h100:
        outcome, _prompt, completion, _u = events[s.request_id]  # type: ignore[index]
        assert outcome == "error" and 0 < completion < 3000
    for s in others + unpinned + on_cpu:
        outcome, _prompt, completion, _u = events[s.request_id]  # type: ignore[index]
        assert (outcome, completion) == ("completed", s.max_tokens)
    charged = sum(u for *_, u in events.values())
    assert round(view["credits"] * U) == 1_000_000 * U - charged
    print(
        f"\n[multinode] node loss without a spare ({victim.name}, the last H100 node): the pool not "
        f"ready on both gateways {not_ready_after:.1f} s after the kill (their own /readyz 200); last "
        f"affected request answered {last_answer:.1f} s after the kill; {len(pinned)} requests pinned "
        f"to it refused with 503 pool_unavailable, each within {refusal_s * 1000:.0f} ms; "
        f"{len(others)} L20/CPU streams and {len(unpinned) + len(on_cpu)} other requests served; "
        f"{victim.name} back: the pool ready {ready_after:.1f} s after its Ray started "
        f"({time.monotonic() - killed_at:.1f} s after the kill); balance {view['credits']:g} = "
        f"1e6 - {charged / U:g}"
    )
