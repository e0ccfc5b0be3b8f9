"""Predicting a queued request's wait (pure): the work ahead of it in fair order, and how many
requests the queue surely releases within the deadline.

A request waits for the releases of the work ahead of it and then its own. Releases come when
running requests finish; with many requests in flight of mixed lengths, finishes form close to a
Poisson process, so the number released within the deadline ``D`` at a rate of ``r`` per second is
Poisson with mean ``r * D``. A request that needs ``n`` releases (itself included) waits longer
than ``D`` with probability ``P(Poisson(r * D) < n)``; admission refuses it at once when that
exceeds a small bound, rather than letting it wait out its deadline. (Where releases come in lumps
the caller widens the Poisson by their measured dispersion.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from statistics import NormalDist

from serving.admission._fair_queue import TenantState

_EXACT_BELOW = 200.0
"""Expected releases up to which the Poisson sum is computed exactly (a normal approximation above)."""


def sure_releases(expected: float, miss_probability: float) -> int:
    """The most releases that happen with probability at least ``1 - miss_probability`` when
    ``expected`` are expected (Poisson): the largest ``n`` with ``P(Poisson(expected) < n) <= p``."""
    if not 0.0 < miss_probability < 1.0:
        raise ValueError(f"miss_probability must lie in (0, 1), got {miss_probability}")
    if expected <= 0.0:
        return 0
    if expected > _EXACT_BELOW:
        z = NormalDist().inv_cdf(miss_probability)
        return max(0, math.floor(expected + 0.5 + z * math.sqrt(expected)))
    log_m = math.log(expected)
    log_term = -expected  # log P(X = 0)
    cdf = 0.0
    n = 0
    while True:
        cdf += math.exp(log_term)  # P(X <= n)
        if cdf > miss_probability:
            return n  # P(X < n) <= p, P(X < n + 1) > p
        n += 1
        log_term += log_m - math.log(n)


def work_ahead_tokens(
    t: TenantState,
    counter: float,
    cost_tokens: int,
    backlogged: Iterable[TenantState],
    own_ahead_tokens: float | None = None,
) -> float:
    """The queue tokens that must be released for a new request of tenant ``t`` to be released,
    its own included: what its tenant serves before it, the request, and what fair order serves of
    the other tenants before it.

    VTC releases the backlogged tenant with the smallest counter. ``t`` reaches the request once
    its counter has grown by the work it serves first, ``own_ahead_tokens`` (its project's queue
    and what its other projects are served meanwhile, :meth:`FairQueue.ahead_in_tenant`; None: the
    tenant's whole queue); by then every other tenant ``u`` has been served up to that counter
    level, ``(level - counter_u) * weight_u`` (bounded by ``u``'s queue). ``counter`` is ``t``'s
    counter once active (lifted if it is idle). Counters price served tokens while the queue counts
    prompt + max_tokens, so this is an estimate.
    """
    own = float(t.queued_tokens) if own_ahead_tokens is None else own_ahead_tokens
    level = counter + own / t.weight
    ahead = own + cost_tokens
    for u in backlogged:
        if u is not t:
            ahead += min(float(u.queued_tokens), max(0.0, (level - u.counter) * u.weight))
    return ahead
