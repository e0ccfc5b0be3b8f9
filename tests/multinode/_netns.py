"""Ray nodes in Linux network namespaces, for the multi-node test.

Each node is a network namespace of its own (``ip netns``), joined to the others by a veth pair on
one bridge, with a private address (``10.77.0.<n>/24``); the namespace holds only that interface
and its own loopback, so a node reaches another only at that node's address, and nothing works by
accident over 127.0.0.1. This process (the test's client) reaches them from the bridge's own
address, ``10.77.0.1``. Namespaces isolate only the network, so each node also gets its own home,
state and ``--temp-dir`` directories under the test's root, and its own ``--object-store-memory``.

A node is stopped by the process ids the kernel lists in its namespace (``ip netns pids``), never
with ``ray stop`` (which would find every Ray on this machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUBNET = "10.77.0"
CLIENT_IP = f"{SUBNET}.1"
GCS_PORT = 6379
VENV_BIN = Path(sys.executable).parent


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def can_make_namespaces() -> str | None:
    """None when this process may create network namespaces, else why not."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN)"
    return None


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
    proc: subprocess.Popen[bytes] | None = None

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def state(self) -> Path:
        return self.root / "state"


class NetnsCluster:
    """A bridge, namespaces on it and the Ray nodes in them; :meth:`close` removes all of it."""

    def __init__(self, root: Path, *, system_config: dict[str, Any] | None = None) -> None:
        self.root = root
        self.tag = secrets.token_hex(2)
        self.bridge = f"twmn{self.tag}br"
        self.token = secrets.token_hex(32)  # Ray's auth token, the same on every node
        self.env_extra: dict[str, str] = {}
        self.system_config = system_config or {}
        self.nodes: dict[str, Node] = {}
        self._drop_stale()
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{CLIENT_IP}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    @staticmethod
    def _drop_stale() -> None:
        """Remove what a killed earlier run of this test left (its names start with ``twmn``)."""
        for ns in _ip("netns", "list", check=False).stdout.split("\n"):
            name = ns.split(" ")[0]
            if name.startswith("twmn"):
                for pid in _ip("netns", "pids", name, check=False).stdout.split():
                    _kill(int(pid))
                _ip("netns", "del", name, check=False)
        for line in _ip("-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
            name = line.split(":")[1].strip().split("@")[0]
            if name.startswith("twmn"):
                _ip("link", "del", name, check=False)

    # ------------------------------------------------------------------ nodes
    def add_node(self, name: str, host: int, resources: dict[str, float], *, head: bool = False) -> Node:
        """Make the namespace of node ``name`` at ``10.77.0.<host>`` and start Ray in it."""
        ns, veth = f"twmn{self.tag}-{name}", f"tw{self.tag}{name}"[:15]
        node = Node(name, f"{SUBNET}.{host}", ns, veth, self.root / name, resources, head)
        for d in ("home", "state", "ray", "log"):
            (node.root / d).mkdir(parents=True, exist_ok=True)
        _ip("netns", "add", ns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        _ip("-n", ns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        self.nodes[name] = node
        self._start_ray(node)
        return node

    @property
    def head(self) -> Node:
        (head,) = [n for n in self.nodes.values() if n.head]
        return head

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{GCS_PORT}"

    def env(self, node: Node) -> dict[str, str]:
        """The environment of every process of ``node``: its own home, Ray's token, this repo."""
        repo = Path(__file__).resolve().parents[2]
        return {
            "PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(node.home),
            "TOKENWEIR_HOME": str(node.home / ".cache" / "tokenweir"),
            "PYTHONPATH": str(repo),
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
        argv = [
            str(VENV_BIN / "ray"),
            "start",
            "--block",
            f"--node-ip-address={node.ip}",
            f"--temp-dir={node.root / 'ray'}",
            "--object-store-memory=100000000",
            "--num-cpus=4",
            f"--resources={json.dumps(node.resources)}",
            "--disable-usage-stats",
        ]
        if node.head:
            argv += [f"--port={GCS_PORT}", "--head", "--include-dashboard=false"]
            if self.system_config:
                argv.append(f"--system-config={json.dumps(self.system_config)}")
        else:
            argv.append(f"--address={self.address}")
        log = open(node.root / "log" / "ray-start.log", "wb")  # noqa: SIM115  # the process keeps it
        node.proc = self.popen(node, argv, stdout=log, stderr=subprocess.STDOUT)

    def popen(self, node: Node, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        """Run ``argv`` inside ``node``'s namespace with its environment."""
        return subprocess.Popen(
            ["ip", "netns", "exec", node.netns, *argv], env=self.env(node), cwd=node.home, **kw
        )

    def run(self, node: Node, argv: list[str], timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` to completion inside ``node``'s namespace; its output as text."""
        return subprocess.run(
            ["ip", "netns", "exec", node.netns, *argv],
            env=self.env(node) | {"RAY_ADDRESS": self.address},
            cwd=node.home,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def pids(self, node: Node) -> list[int]:
        return [int(p) for p in _ip("netns", "pids", node.netns, check=False).stdout.split()]

    def cut(self, node: Node) -> None:
        """Take ``node``'s cable out: its peers get no FIN or RST from it, as from a dead machine."""
        _ip("link", "set", node.veth, "down")

    def kill(self, node: Node, timeout_s: float = 30) -> None:
        """``kill -9`` every process in ``node``'s namespace, until none is left."""
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
        """Stop every node by its processes' ids, then remove the namespaces and the bridge."""
        for node in self.nodes.values():
            if not node.head:
                self.kill(node)
        for node in self.nodes.values():
            if node.head:
                self.kill(node)
        for node in self.nodes.values():
            _ip("netns", "del", node.netns, check=False)
        _ip("link", "del", self.bridge, check=False)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
