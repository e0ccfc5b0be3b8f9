"""Ray nodes in Linux network namespaces, for the multi-node test and ``bench_cluster_scaling.py``.

Each node is a network namespace of its own (``ip netns``), joined to the others by a veth pair on
one bridge, with a private address (``10.77.0.<n>/24``); the namespace holds only that interface
and its own loopback, so a node reaches another only at that node's address, and nothing works by
accident over 127.0.0.1. This process (the client) reaches them from the bridge's own address,
``10.77.0.1``. Namespaces isolate only the network, so each node also gets its own home, state and
``--temp-dir`` directories under the cluster's root, and its own ``--object-store-memory``; a node
given ``cpus`` also gets a cpuset of its own (a cgroup, v2 or v1, that every process started in it
inherits; ``taskset``'s affinity where no cpuset cgroup can be made), so two nodes on one host do
not share cores.

A node is stopped by the process ids the kernel lists in its namespace (``ip netns pids``) and in
its cgroup, never with ``ray stop`` (which would find every Ray on this machine).

    cluster = NetnsCluster(root)
    head = cluster.add_node("head", 10, {}, head=True)
    cluster.add_node("a", 11, {"tokenweir_gateway": 1}, cpus="0")
    cluster.deploy(tokenweir_config_dict)      # deploy render --target serve, then serve run on the head
    cluster.wait_deployed()                    # Serve done: no replica starting or stopping
    cluster.cut(a); cluster.kill(a)            # node loss: no FIN or RST from it, its processes gone
    cluster.restart(a)                         # and it comes back (a new Ray node, same address)
    ...
    cluster.close()
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

SUBNET = "10.77.0"
CLIENT_IP = f"{SUBNET}.1"
GCS_PORT = 6379
VENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
_PREFIX = "twmn"  # every name this module makes (namespaces, bridge, cgroups) starts with it
_CGROUP_V2 = Path("/sys/fs/cgroup")
_CGROUP_V1_CPUSET = Path("/sys/fs/cgroup/cpuset")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def can_make_namespaces() -> str | None:
    """None when this process may create network namespaces, else why not."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    return None


def wait_until(
    cond: Callable[[], Any],
    timeout_s: float,
    what: str,
    *,
    every_s: float = 0.25,
    ignore: tuple[type[BaseException], ...] = (OSError,),
) -> float:
    """Poll ``cond`` until it is true (raising one of ``ignore`` counts as false); the seconds it
    took. Raises ``TimeoutError`` naming ``what`` after ``timeout_s``."""
    t0 = time.monotonic()
    while True:
        try:
            if cond():
                return time.monotonic() - t0
        except ignore:
            pass
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)  # a polled condition with a deadline


def port_open(ip: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex((ip, port)) == 0


# ---------------------------------------------------------------------- cpusets
def _v2_cpuset() -> bool:
    ctl = _CGROUP_V2 / "cgroup.controllers"
    return ctl.exists() and "cpuset" in ctl.read_text().split()


def _v1_cpuset() -> bool:
    return (_CGROUP_V1_CPUSET / "cpuset.cpus").exists()


def cpuset_kind() -> str:
    """How a node's CPUs are fenced here: ``cgroup2`` or ``cgroup1`` (a cpuset cgroup), else ``taskset``."""
    if os.geteuid() == 0 and _v2_cpuset():
        return "cgroup2"
    if os.geteuid() == 0 and _v1_cpuset():
        return "cgroup1"
    return "taskset"


def _make_cpuset(name: str, cpus: str) -> Path | None:
    """A cpuset cgroup ``name`` holding ``cpus``; its ``cgroup.procs`` path, or None (use taskset)."""
    kind = cpuset_kind()
    if kind == "taskset":
        return None
    base = _CGROUP_V2 if kind == "cgroup2" else _CGROUP_V1_CPUSET
    group = base / name
    if kind == "cgroup2":
        (base / "cgroup.subtree_control").write_text("+cpuset")
    group.mkdir(exist_ok=True)
    if kind == "cgroup1":  # a v1 cpuset takes no task before it has its memory nodes
        (group / "cpuset.mems").write_text((base / "cpuset.mems").read_text().strip())
    (group / "cpuset.cpus").write_text(cpus)
    return group / "cgroup.procs"


def _stale_cpusets() -> list[Path]:
    found: list[Path] = []
    for base in (_CGROUP_V2, _CGROUP_V1_CPUSET):
        if base.is_dir():
            found += [p for p in base.glob(f"{_PREFIX}*") if p.is_dir()]
    return found


def _empty(procs: Path) -> bool:
    return not _cgroup_pids(procs)


def _cgroup_pids(procs: Path | None) -> list[int]:
    if procs is None or not procs.exists():
        return []
    return [int(p) for p in procs.read_text().split()]


def process_cpu_s(pid: int) -> float:
    """utime + stime of one live process, seconds (0 for one that is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14, 15 of stat


def allowed_cpus(pid: int) -> str | None:
    """The CPUs a process may run on (``Cpus_allowed_list`` of ``/proc/<pid>/status``)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------- nodes
@dataclass
class Node:
    name: str
    ip: str
    netns: str
    veth: str
    root: Path
    """This node's own directories: ``home``, ``state``, ``ray`` (its --temp-dir), ``log``."""
    resources: dict[str, float]
    head: bool
    cpus: str | None = None
    """The CPUs its processes may use (``"0"``, ``"0-1"``), or None: any."""
    cgroup_procs: Path | None = None
    """Its cpuset cgroup's ``cgroup.procs``, when ``cpus`` is fenced by a cgroup."""
    num_cpus: int = 4
    """The logical CPUs its Ray advertises."""
    starts: int = 0
    """How many times Ray was started on it (:meth:`NetnsCluster.restart` starts it again)."""
    proc: subprocess.Popen[bytes] | None = None

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def temp_dir(self) -> Path:
        """Ray's ``--temp-dir`` of its latest start: one of its own per start, since a killed
        raylet's socket files stay where it left them."""
        return self.root / ("ray" if self.starts <= 1 else f"ray-{self.starts}")


class NetnsCluster:
    """A bridge, namespaces on it and the Ray nodes in them; :meth:`close` removes all of it."""

    def __init__(
        self, root: Path, *, system_config: dict[str, Any] | None = None, dashboard: bool = False
    ) -> None:
        """``dashboard``: start the head with Ray's dashboard, which serves Ray's state API
        (``ray.util.state``); about 1.5 s of CPU to start, on the head."""
        self.root = root
        self.tag = secrets.token_hex(2)
        self.bridge = f"{_PREFIX}{self.tag}br"
        self.token = secrets.token_hex(32)  # Ray's auth token, the same on every node
        self.env_extra: dict[str, str] = {}
        self.system_config = system_config or {}
        self.dashboard = dashboard
        self.nodes: dict[str, Node] = {}
        self._drop_stale()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{CLIENT_IP}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    @staticmethod
    def _drop_stale() -> None:
        """Remove what a killed earlier run left (its names start with ``twmn``)."""
        for ns in _ip("netns", "list", check=False).stdout.split("\n"):
            name = ns.split(" ")[0]
            if name.startswith(_PREFIX):
                for pid in _ip("netns", "pids", name, check=False).stdout.split():
                    _kill(int(pid))
                _ip("netns", "del", name, check=False)
        for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if name.startswith(_PREFIX):
                _ip("link", "del", name, check=False)
        for group in _stale_cpusets():
            procs = group / "cgroup.procs"
            for task in _cgroup_pids(procs):
                _kill(task)
            with contextlib.suppress(OSError):  # a timeout too: a cgroup left over is harmless
                wait_until(functools.partial(_empty, procs), 10, f"{group} empty")
                group.rmdir()

    def add_node(
        self,
        name: str,
        host: int,
        resources: dict[str, float],
        *,
        head: bool = False,
        cpus: str | None = None,
        num_cpus: int = 4,
    ) -> Node:
        """Make the namespace of node ``name`` at ``10.77.0.<host>`` (its processes on ``cpus``,
        when given) and start Ray in it with ``num_cpus`` logical CPUs."""
        ns, veth = f"{_PREFIX}{self.tag}-{name}", f"tw{self.tag}{name}"[:15]
        node = Node(
            name, f"{SUBNET}.{host}", ns, veth, self.root / name, resources, head, cpus, num_cpus=num_cpus
        )
        for d in ("home", "state", "log"):
            (node.root / d).mkdir(parents=True, exist_ok=True)
        if cpus is not None:
            node.cgroup_procs = _make_cpuset(ns, cpus)
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        self.nodes[name] = node
        self._start_ray(node)
        return node

    def restart(self, node: Node) -> None:
        """Plug a worker that :meth:`cut` and :meth:`kill` took down back in and start Ray on it
        again, as a machine that rebooted: the same address, home, state and resources, a new Ray
        node id (the caller waits for it to be alive)."""
        if node.head:
            raise ValueError("the head holds the GCS: a restarted head is a new cluster")
        if self.pids(node):
            raise RuntimeError(f"node {node.name} still runs processes: kill it first")
        _ip("link", "set", node.veth, "up")
        self._start_ray(node)

    @property
    def head(self) -> Node:
        (head,) = [n for n in self.nodes.values() if n.head]
        return head

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{GCS_PORT}"

    def env(self, node: Node) -> dict[str, str]:
        """The environment of every process of ``node``: its own home, Ray's token, this repo."""
        return {
            "PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(node.home),
            "TOKENWEIR_HOME": str(node.home / ".cache" / "tokenweir"),
            "PYTHONPATH": str(REPO),
            "LANG": "C.UTF-8",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            **self.env_extra,
        }

    def _start_ray(self, node: Node) -> None:
        node.starts += 1
        node.temp_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(VENV_BIN / "ray"),
            "start",
            "--block",
            f"--node-ip-address={node.ip}",
            f"--temp-dir={node.temp_dir}",
            "--object-store-memory=100000000",
            f"--num-cpus={node.num_cpus}",
            f"--resources={json.dumps(node.resources)}",
            "--disable-usage-stats",
        ]
        if node.head:
            argv += [f"--port={GCS_PORT}", "--head", f"--include-dashboard={str(self.dashboard).lower()}"]
            if self.system_config:
                argv.append(f"--system-config={json.dumps(self.system_config)}")
        else:
            argv.append(f"--address={self.address}")
        log = open(node.root / "log" / f"ray-start-{node.starts}.log", "wb")  # noqa: SIM115  # the process keeps it
        node.proc = self.popen(node, argv, stdout=log, stderr=subprocess.STDOUT)

    @staticmethod
    def _argv(node: Node, argv: list[str]) -> list[str]:
        """``argv`` inside ``node``'s namespace, and in its cpuset: the shell joins the cgroup, then
        becomes the command, so nothing of the node ever runs outside it."""
        inner = ["ip", "netns", "exec", node.netns, *argv]
        if node.cpus is None:
            return inner
        if node.cgroup_procs is None:
            return ["taskset", "-c", node.cpus, *inner]
        return ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(node.cgroup_procs), *inner]

    def popen(self, node: Node, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Run ``argv`` inside ``node``'s namespace with its environment."""
        return subprocess.Popen(self._argv(node, argv), env=self.env(node), cwd=node.home, **kw)

    def run(self, node: Node, argv: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion inside ``node``'s namespace; its output as text."""
        return subprocess.run(
            self._argv(node, argv),
            env=self.env(node) | {"RAY_ADDRESS": self.address},
            cwd=node.home,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def deploy(self, config: dict[str, Any], name: str = "tokenweir", timeout_s: float = 180) -> Path:
        """Deploy a Tokenweir config as an operator would: write it to ``<root>/<name>.yaml``,
        ``tokenweir deploy render --target serve`` it, then ``serve run --non-blocking`` the
        rendered file from the head's namespace (it returns once Serve has the config; the caller
        waits for readiness). Returns the config file's path."""
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        out = self.root / f"render-{name}"
        render = ["deploy", "render", "--target", "serve", "--config", str(path), "--out", str(out)]
        subprocess.run(
            [str(VENV_BIN / "tokenweir"), *render],
            check=True,
            capture_output=True,
            env={"PATH": str(VENV_BIN), "PYTHONPATH": str(REPO), "HOME": str(self.root), "LANG": "C.UTF-8"},
        )
        serve = [str(VENV_BIN / "serve"), "run", "--non-blocking", str(out / "serve.yaml")]
        done = self.run(self.head, serve, timeout_s=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"serve run failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return path

    def wait_deployed(self, app: str = "tokenweir", timeout_s: float = 240) -> float:
        """Wait until Serve has finished deploying ``app``: the application RUNNING, every deployment
        HEALTHY with only RUNNING replicas (after a redeploy: no old replica still STOPPING, none new
        still STARTING), as ``serve.status()`` says to a driver on the head (``serve status`` needs
        the dashboard, which these nodes run only when asked for). The seconds it took; its readiness endpoints
        are the caller's to check after."""
        argv = [sys.executable, "-c", _SETTLED, self.address, app, str(timeout_s)]
        done = self.run(self.head, argv, timeout_s=timeout_s + 60)
        if done.returncode != 0:
            raise TimeoutError(
                f"Serve did not finish deploying {app}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        return float(done.stdout.split()[-1])

    def pids(self, node: Node) -> list[int]:
        """Every process of ``node``: those in its namespace and in its cpuset cgroup."""
        listed = {int(p) for p in _ip("netns", "pids", node.netns, check=False).stdout.split()}
        return sorted(listed | set(_cgroup_pids(node.cgroup_procs)))

    def cpu_s(self, node: Node) -> dict[int, float]:
        """utime + stime of each live process of ``node``, seconds (from ``/proc``)."""
        return {pid: process_cpu_s(pid) for pid in self.pids(node)}

    def cut(self, node: Node) -> None:
        """Take ``node``'s cable out: its peers get no FIN or RST from it, as from a dead machine."""
        _ip("link", "set", node.veth, "down")

    def kill(self, node: Node, timeout_s: float = 30) -> None:
        """``kill -9`` every process of ``node``, until none is left."""
        deadline = time.monotonic() + timeout_s
        while pids := self.pids(node):
            for pid in pids:
                _kill(pid)
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of node {node.name} survive kill -9: {pids}")
            time.sleep(0.05)  # a process group may fork a child between listing and killing
        if node.proc is not None:
            node.proc.wait(timeout=10)

    def close(self) -> None:
        """Stop every node by its processes' ids, then remove the namespaces, cgroups and bridge."""
        for node in self.nodes.values():
            if not node.head:
                self.kill(node)
        for node in self.nodes.values():
            if node.head:
                self.kill(node)
        for node in self.nodes.values():
            _ip("netns", "del", node.netns, check=False)
            if node.cgroup_procs is not None:
                with contextlib.suppress(OSError):
                    node.cgroup_procs.parent.rmdir()
        _ip("link", "del", self.bridge, check=False)


_SETTLED = """
import sys, time
import ray
from ray import serve

address, app, timeout_s = sys.argv[1], sys.argv[2], float(sys.argv[3])
ray.init(address=address, log_to_driver=False)
t0 = time.monotonic()
while True:
    shown = serve.status().applications.get(app)
    deps = list(shown.deployments.values()) if shown else []
    if shown and shown.status == "RUNNING" and deps and all(
        d.status == "HEALTHY" and set(d.replica_states) == {"RUNNING"} for d in deps
    ):
        print(f"{time.monotonic() - t0:.1f}")
        break
    if time.monotonic() - t0 > timeout_s:
        print(shown)
        sys.exit(1)
    time.sleep(0.5)  # polling the controller, bounded by the deadline above
"""
"""A driver on the head that waits until Serve has settled ``app`` (:meth:`NetnsCluster.wait_deployed`)."""


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
