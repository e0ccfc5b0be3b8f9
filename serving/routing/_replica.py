"""Replica choice within a pool: the less loaded of two random candidates (power of two choices).

Pool choice (:mod:`._router`) decides *which GPU type* serves a request; this decides *which
replica* of that pool. Load is what the caller counts: a gateway's own open requests on each replica
(no shared state, no staleness). Pools whose engines cache prefixes choose by cached prefix
instead (:mod:`._prefix`), falling back to this when no replica holds any of the prompt.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

__all__ = ["pick_replica"]


def pick_replica(candidates: Sequence[str], load: Mapping[str, int], rng: random.Random) -> str | None:
    """One of ``candidates`` (None if there are none): of two drawn at random, the one with the
    smaller ``load`` (a replica missing from ``load`` counts 0)."""
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    a, b = rng.sample(candidates, 2)
    return a if load.get(a, 0) <= load.get(b, 0) else b
