"""A Ray driver for the multi-node test, run inside the head's namespace (a Ray driver must run on
a Ray node): one JSON command per line on stdin, one JSON answer per line on stdout (prefixed
``@@``, so Ray's own chatter on stdout cannot be mistaken for one).

Commands: ``{"op": "nodes"}`` (Ray's node table) and ``{"op": "actors"}`` (its actor table, each
actor with its node's address), both through Ray's public state API (``ray.util.state``, served by
the dashboard the head runs for it); ``{"op": "ledger"}`` (where the ledger actor lives, as
:func:`serving.metering.ledger_home` says: what ``tokenweir status`` shows).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any

LIMIT = 10_000  # every row (the API's default is 100), dead actors of the node losses included


def _answer(op: str) -> Any:
    from ray.util.state import list_actors, list_nodes

    from serving.metering import MeteringConfig, ledger_home

    if op == "nodes":
        return [
            {
                "node_id": n.node_id,
                "ip": n.node_ip,
                "alive": n.state == "ALIVE",
                "resources": n.resources_total,
            }
            for n in list_nodes(limit=LIMIT)
        ]
    if op == "actors":
        ips = {n.node_id: n.node_ip for n in list_nodes(limit=LIMIT)}
        return [
            {
                "class": a.class_name,
                "name": a.name,
                "state": a.state,
                "node_id": a.node_id,
                "ip": ips.get(a.node_id or ""),
                "pid": a.pid,
            }
            for a in list_actors(limit=LIMIT)
        ]
    if op == "ledger":
        return dataclasses.asdict(ledger_home(MeteringConfig(), namespace="tokenweir"))
    raise ValueError(f"unknown op {op!r}")


def main(address: str) -> None:
    import ray
    from ray.util.state import list_nodes

    ray.init(address=address, namespace="tokenweir", log_to_driver=False)
    deadline = time.monotonic() + 60
    while True:  # the state API answers once the head's dashboard is up
        try:
            list_nodes(limit=1)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)  # a polled condition with a deadline
    print("@@" + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            out = {"ok": _answer(cmd["op"])}
        except Exception as e:  # answered, so the test sees it
            out = {"error": f"{type(e).__name__}: {e}"}
        print("@@" + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
