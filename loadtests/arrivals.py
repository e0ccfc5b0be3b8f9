"""Arrival schedules: pure functions from a spec, a duration and a seeded generator to send times.

Times are seconds from the start of the run; the first request is sent at t = 0. Closed-loop arrivals
have no schedule (the runner sends when a worker is free).
"""

from __future__ import annotations

import math

import numpy as np

from loadtests.scenario import (
    ArrivalSpec,
    ClosedLoopArrival,
    ConstantArrival,
    GammaArrival,
    PoissonArrival,
    RampArrival,
)

__all__ = ["arrival_times", "mean_rate_rps"]


def mean_rate_rps(spec: ArrivalSpec, duration_s: float) -> float | None:
    """The offered rate averaged over the run; None for closed loop (it depends on the server)."""
    if isinstance(spec, ClosedLoopArrival):
        return None
    if isinstance(spec, RampArrival):
        return (spec.start_rate_rps + spec.end_rate_rps) / 2.0
    return spec.rate_rps


def _gaps(spec: ArrivalSpec, n: int, rng: np.random.Generator) -> np.ndarray:
    if isinstance(spec, ConstantArrival):
        return np.full(n, 1.0 / spec.rate_rps)
    if isinstance(spec, PoissonArrival):
        return rng.exponential(1.0 / spec.rate_rps, size=n)
    if isinstance(spec, GammaArrival):
        # As vllm bench serve: shape = burstiness, scale = 1 / (rate * burstiness); mean 1/rate.
        return rng.gamma(spec.burstiness, 1.0 / (spec.rate_rps * spec.burstiness), size=n)
    raise TypeError(f"no gaps for {type(spec).__name__}")


def _ramp_times(spec: RampArrival, duration_s: float, max_count: int, rng: np.random.Generator) -> np.ndarray:
    # Rate r(t) = r0 + (r1 - r0) t / T; cumulative Lambda(t) = r0 t + a t^2 with a = (r1 - r0) / (2T).
    # Arrivals sit where Lambda(t) = u_k (u_k = k, or partial sums of Exp(1) for Poisson).
    r0, r1, total = spec.start_rate_rps, spec.end_rate_rps, duration_s
    a = (r1 - r0) / (2.0 * total)
    lam_total = r0 * total + a * total * total
    n = min(max_count, int(lam_total + 10.0 * math.sqrt(lam_total) + 20))
    if spec.poisson:
        u = np.concatenate(([0.0], np.cumsum(rng.exponential(1.0, size=n))[:-1])) if n > 0 else np.empty(0)
    else:
        u = np.arange(n, dtype=float)
    u = u[u <= lam_total]
    disc = np.maximum(r0 * r0 + 4.0 * a * u, 0.0)
    denom = r0 + np.sqrt(disc)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(denom > 0, 2.0 * u / denom, 0.0)
    return t[t < total][:max_count]


def arrival_times(
    spec: ArrivalSpec, duration_s: float, max_count: int, rng: np.random.Generator
) -> np.ndarray:
    """Send times in ``[0, duration_s)``, at most ``max_count`` of them, sorted ascending."""
    if isinstance(spec, ClosedLoopArrival):
        raise TypeError("closed-loop arrivals have no schedule")
    if max_count <= 0:
        return np.empty(0)
    if isinstance(spec, RampArrival):
        return _ramp_times(spec, duration_s, max_count, rng)
    expected = spec.rate_rps * duration_s
    chunk = min(max_count, int(expected + 10.0 * math.sqrt(expected) + 20))
    parts: list[np.ndarray] = []
    last = 0.0
    count = 0
    first = True
    while count < max_count:
        gaps = _gaps(spec, chunk, rng)
        if first:
            times = np.concatenate(([0.0], np.cumsum(gaps)[:-1]))
            first = False
        else:
            times = last + np.cumsum(gaps)
        inside = times[times < duration_s]
        parts.append(inside)
        count += inside.size
        if inside.size < times.size:
            break
        last = float(times[-1])
    out = np.concatenate(parts) if parts else np.empty(0)
    return out[:max_count]
