"""The load board: where pool and gateway replicas publish plain-data snapshots and stats, and
where gateways read them (for routing, at most ~1 s stale, and for a ``/metrics`` that is complete
across replicas).

One small named Ray actor per cluster, on the head node (Ray's ``node:__internal_head__``), which
a cluster does not outlive. Anywhere else, the loss of its node would restart it empty elsewhere,
and gateways reading it before every replica had published again would drop the live replicas it
did not list yet (and their streams with them). Publishing is fire-and-forget; entries expire when
their replica stops publishing, so a dead replica's load and stats vanish from routing within seconds.
"""

from __future__ import annotations

import time
from typing import Any

from serving.metering import HEAD_NODE_RESOURCE

BOARD_NAME = "tokenweir-loadboard"
PUBLISH_INTERVAL_S = 0.5
EXPIRE_AFTER_S = 5.0


class LoadBoard:
    """Latest payload per (kind, key), stamped on arrival with this process's wall clock."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[float, Any]] = {}

    def publish(self, kind: str, key: str, payload: Any) -> None:
        """Replace the entry of one replica (``kind``: ``pool`` or ``gateway``)."""
        self._entries[(kind, key)] = (time.time(), payload)

    def read(self, kind: str | None = None) -> list[tuple[str, str, float, Any]]:
        """Fresh entries as ``(kind, key, age_s, payload)``; expired ones are dropped."""
        now = time.time()
        out = []
        for (k, key), (at, payload) in list(self._entries.items()):
            if now - at > EXPIRE_AFTER_S:
                del self._entries[(k, key)]
            elif kind is None or k == kind:
                out.append((k, key, now - at, payload))
        return out


def get_board(namespace: str) -> Any:
    """The cluster's board actor, created on first use (0 CPUs, on the head; detached so replicas
    can come and go)."""
    import ray

    return (
        ray.remote(LoadBoard)
        .options(
            name=BOARD_NAME,
            namespace=namespace,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            resources={HEAD_NODE_RESOURCE: 0.001},
            max_restarts=-1,
            max_concurrency=64,
        )
        .remote()
    )
