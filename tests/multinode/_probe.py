"""A Ray driver for the multi-node test, run inside the head's namespace (a Ray driver must run on
a Ray node): one JSON command per line on stdin, one JSON answer per line on stdout (prefixed
``@@``, so Ray's own chatter on stdout cannot be mistaken for one).

Commands: ``{"op": "nodes"}`` (Ray's node table), ``{"op": "actors"}`` (the GCS actor table: the
state API needs the dashboard, which the test does not start), ``{"op": "ledger"}`` (where the
ledger actor lives, :func:`serving.metering.ledger_home`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any


def _answer(op: str) -> Any:
    import ray
    from ray._private.state import actors

    from serving.metering import MeteringConfig, ledger_home

    if op == "nodes":
        return [
            {
                "node_id": n["NodeID"],
                "ip": n["NodeManagerAddress"],
                "alive": n["Alive"],
                "resources": n["Resources"],
            }
            for n in ray.nodes()
        ]
    if op == "actors":
        return [
            {
                "class": a["ActorClassName"],
                "name": a["Name"],
                "state": a["State"],
                "node_id": a["Address"]["NodeID"],
                "ip": a["Address"]["IPAddress"],
                "pid": a["Pid"],
            }
            for a in actors().values()
        ]
    if op == "ledger":
        return dataclasses.asdict(ledger_home(MeteringConfig(), namespace="tokenweir"))
    raise ValueError(f"unknown op {op!r}")


def main(address: str) -> None:
    import ray

    ray.init(address=address, namespace="tokenweir", log_to_driver=False)
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
