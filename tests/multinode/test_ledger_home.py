"""The ledger's home: the ledger actor runs on the node that holds its file and nowhere else.

A real Ray cluster of three nodes on this machine (``ray.cluster_utils.Cluster``: a head, the
ledger's node advertising ``tokenweir_ledger``, a spare with free CPUs) and a short GCS health
check, so a dead node is noticed in about two seconds:

* by default the ledger runs on the head (Ray's ``node:__internal_head__``), as Ray's actor table says;
* pinned by ``metering.ledger_node_resource`` it runs on the node that advertises it; when that
  node dies, metered calls get 503 ``ledger_unavailable`` (never an answer without the ledger) and
  Ray does not start the ledger on the spare, onto another file; when a node with the resource
  joins again, the ledger restarts there on the same file, with every acknowledged charge in it.

Alone: ``pytest tests/multinode/test_ledger_home.py`` (about 40 s).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serving.errors import LedgerUnavailableError
from serving.metering import Meter, MeteringConfig, connect, ledger_home
from serving.metering._actor import get_or_create_ledger_actor
from serving.metering._ops import Audit, GetTenant
from serving.tenancy import TenantCreate

pytestmark = [pytest.mark.integration, pytest.mark.multinode]
NAMESPACE = "test-ledger-home"
U = 1_000_000
# Ray's GCS marks a node dead after this many missed health checks of this period.
HEALTH = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": False, "_system_config": HEALTH},
    )
    try:
        c.add_node(num_cpus=1, resources={"tokenweir_ledger": 1})
        c.add_node(num_cpus=2)  # a spare with room for the ledger, were it allowed elsewhere
        c.wait_for_nodes()
        ray.init(address=c.address, namespace=NAMESPACE, log_to_driver=False)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _node_with(resource: str) -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"]]


def _wait(cond: Any, timeout_s: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.1)  # a polled condition with a deadline
    return time.monotonic() - t0


def test_the_ledger_runs_on_the_head_by_default(cluster: Any, tmp_path: Path) -> None:
    import ray

    config = MeteringConfig(state_dir=tmp_path, ledger_actor_name="ledger-default")
    assert config.ledger_node_resource == "node:__internal_head__"
    ledger = get_or_create_ledger_actor(config, namespace=NAMESPACE)
    ray.get(ledger.ping.remote(), timeout=60)
    home = ledger_home(config, namespace=NAMESPACE)
    (head,) = _node_with("node:__internal_head__")
    assert (home.state, home.node_id) == ("ALIVE", head)
    assert home.pid == ray.get(ledger.ping.remote())
    ray.kill(ledger)


def test_ledger_node_loss_refuses_metered_calls_and_restarts_only_on_its_node(
    cluster: Any, tmp_path: Path
) -> None:
    import ray

    config = MeteringConfig(
        state_dir=tmp_path,
        ledger_actor_name="ledger-pinned",
        ledger_node_resource="tokenweir_ledger",
        call_timeout_s=5,
    )
    ledger = get_or_create_ledger_actor(config, namespace=NAMESPACE)
    ray.get(ledger.ping.remote(), timeout=60)
    (home_node,) = _node_with("tokenweir_ledger")
    assert ledger_home(config, namespace=NAMESPACE).node_id == home_node

    async def run() -> None:
        client = connect(config, namespace=NAMESPACE)
        meter = Meter(client)
        await client.create_tenant(TenantCreate(tenant_id="t", name="t", credits=10_000))
        key = (await client.create_key("t")).api_key

        async def one(rid: str, completion: int) -> int:
            r = await meter.authorize(key, "m", 10, 50, rid)
            return (await meter.settle(r, 10, completion, "completed")).charged_ucredits

        before = sum([await one(f"before-{i}", i) for i in range(20)])  # acknowledged charges

        (node,) = [n for n in cluster.worker_nodes if n.node_id == home_node]
        cluster.remove_node(node, allow_graceful=False)  # kill -9 of that node's Ray processes
        killed = time.monotonic()
        await asyncio.to_thread(_wait, lambda: not _node_with("tokenweir_ledger"), 30, "the node's death")
        refused_in: list[float] = []
        for i in range(3):  # metered calls are refused, promptly and with the ledger's code
            t0 = time.monotonic()
            with pytest.raises(LedgerUnavailableError) as e:
                await one(f"during-{i}", 1)
            refused_in.append(time.monotonic() - t0)
            assert e.value.code == "ledger_unavailable" and e.value.status_code == 503
        # At once, not after a call timed out: the transport sees no live node of the ledger's resource.
        assert max(refused_in) < config.call_timeout_s, refused_in
        # The spare has room, but Ray does not start the ledger there: over a few seconds (a restart
        # elsewhere would take under one) the actor stays waiting for a node of its resource.
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            home = ledger_home(config, namespace=NAMESPACE)
            assert home.state != "ALIVE", home
            await asyncio.sleep(0.2)
        cluster.add_node(num_cpus=1, resources={"tokenweir_ledger": 1})  # the ledger's machine is back
        back = await asyncio.to_thread(
            _wait, lambda: ledger_home(config, namespace=NAMESPACE).state == "ALIVE", 60, "the ledger"
        )
        (new_node,) = _node_with("tokenweir_ledger")
        home = ledger_home(config, namespace=NAMESPACE)
        assert home.node_id == new_node != home_node and home.restarts >= 1
        after = 0
        deadline = time.monotonic() + 30
        while True:  # the gateway's link reconnects to the restarted ledger
            try:
                after += await one(f"after-{len(str(after))}-{time.monotonic()}", 5)
                break
            except LedgerUnavailableError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
        tenant = await client.get_tenant("t")
        # Nothing acknowledged was lost: the restarted ledger opened the same file.
        assert round(tenant.credits * U) == 10_000 * U - before - after
        assert tenant.reserved_credits == 0 and tenant.in_flight == 0
        assert await client._read(Audit()) == []
        print(
            f"\n[ledger node loss] refused in {', '.join(f'{t:.2f}' for t in refused_in)} s (call_timeout_s "
            f"{config.call_timeout_s:g}); back {back:.1f} s after the node rejoined "
            f"({time.monotonic() - killed:.1f} s after the kill); balance "
            f"{tenant.credits:g} = 10000 - {(before + after) / U:g}"
        )
        await client.transport.close()  # type: ignore[attr-defined]

    asyncio.run(run())
    assert ray.get(ledger.read.remote(GetTenant("t"))).in_flight == 0
    ray.kill(ledger)
