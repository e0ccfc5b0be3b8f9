"""``gateway.host: node``: the config takes it, a replica binds its Ray node's address, and a process
that cannot learn that address fails instead of listening on loopback; the CLI's default URL."""

from __future__ import annotations

import subprocess
import sys

import pytest

from serving.cli.runtime import gateway_url
from serving.config import ConfigError, parse_config
from serving.ray_env import NODE_HOST, listen_host

POOL = {"name": "a", "model": "tiny-llama", "accelerator": "CPU"}


def test_config_takes_node_for_both_listeners() -> None:
    cfg = parse_config({"gateway": {"host": "node", "internal_host": "node"}, "pools": [POOL]})
    assert cfg.gateway.host == cfg.gateway.internal_host == NODE_HOST
    with pytest.raises(ConfigError, match="internal_port"):  # one address and port for both listeners
        parse_config(
            {"gateway": {"host": "node", "internal_host": "node", "internal_port": 8000}, "pools": [POOL]}
        )


@pytest.mark.parametrize(
    ("value", "fragment"),
    [("CPU", "built-in"), ("gpu", "built-in"), ("has space", "node_resource"), ("", "node_resource")],
)
def test_gateway_node_resource_must_be_a_custom_resource(value: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_config({"gateway": {"node_resource": value}, "pools": [POOL]})
    ok = parse_config({"gateway": {"node_resource": "tokenweir_gateway"}, "pools": [POOL]})
    assert ok.gateway.node_resource == "tokenweir_gateway"


def test_a_literal_host_is_bound_as_written() -> None:
    assert listen_host("127.0.0.1") == "127.0.0.1"
    assert listen_host("0.0.0.0") == "0.0.0.0"


def test_node_without_ray_fails_loudly_instead_of_binding_loopback() -> None:
    # In a fresh process (this one may have Ray connected by another test): no Ray, no address.
    code = (
        "from serving.ray_env import NodeAddressError, listen_host\n"
        "try:\n    print(listen_host('node'))\n"
        "except NodeAddressError as e:\n    print('refused:', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.startswith("refused:"), out.stdout
    assert "not connected to Ray" in out.stdout
    assert "127.0.0.1" not in out.stdout


def test_the_pool_and_ledger_listeners_fail_loudly_without_a_node_address() -> None:
    # A pool replica's token channel and the ledger socket are reached from other nodes too: where
    # Ray gives no address they refuse to start rather than listen on loopback.
    code = (
        "from serving.ray_env import NodeAddressError\n"
        "from serving.pools.replica import node_ip\n"
        "from serving.metering._actor import _node_ip\n"
        "for f in (node_ip, _node_ip):\n"
        "    try:\n        print('bound', f())\n"
        "    except NodeAddressError as e:\n        print('refused:', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("refused:") for line in lines), out.stdout
    assert "token channel" in lines[0] and "ledger socket" in lines[1]


def test_cli_default_url_for_node(monkeypatch: pytest.MonkeyPatch) -> None:
    import serving.cli.runtime as runtime_mod

    # This process may hold the integration session's Ray (session fixtures outlive their tier):
    # the case under test is a CLI that is not connected to the cluster's Ray.
    monkeypatch.setattr(runtime_mod, "_ray_connected", lambda: False)
    local = parse_config({"gateway": {"host": "node", "port": 8123}, "pools": [POOL]})
    assert (
        gateway_url(local) == "http://127.0.0.1:8123"
    )  # the local Ray `tokenweir serve` starts is on loopback
    assert gateway_url(local, "http://10.0.0.5:8123") == "http://10.0.0.5:8123"
    cluster = parse_config({"gateway": {"host": "node"}, "ray": {"address": "auto"}, "pools": [POOL]})
    with pytest.raises(SystemExit, match="--url"):
        gateway_url(cluster)
    fixed = parse_config({"gateway": {"host": "10.1.2.3", "port": 9000}, "pools": [POOL]})
    assert gateway_url(fixed) == "http://10.1.2.3:9000"
