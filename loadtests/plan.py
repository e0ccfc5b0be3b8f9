"""Turn a scenario into what the runner sends: a timed list (open loop) plus closed-loop streams.

Pure and deterministic: the same scenario and seed give the same requests in the same order. Every
random draw has its own generator, keyed by (seed, purpose, tenant), so adding a tenant does not change
another tenant's requests.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from loadtests.arrivals import arrival_times, mean_rate_rps
from loadtests.scenario import ClosedLoopArrival, Scenario, TenantSpec
from loadtests.workload import DrawnRequest, DrawnSession, make_sampler

__all__ = ["ClosedStream", "Plan", "PlannedRequest", "PlannedSession", "build_plan"]

_ARRIVAL, _CHOICE, _WORKLOAD = 1, 2, 3
_SCENARIO_STREAM = 1_000_000
_CHUNK = 64


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    """One request to send."""

    tenant: str
    send_at_s: float | None
    """Seconds after the run's start; None for closed loop (sent when a worker frees up)."""
    prompt: str
    prompt_tokens_target: int
    max_tokens: int


@dataclass(frozen=True, slots=True)
class PlannedSession:
    """One agent session to run: its turns go out one after another (see ``AgentWorkload``)."""

    tenant: str
    send_at_s: float | None
    """When its first turn goes out (None for closed loop)."""
    agent: str
    """``<tenant>/<agent index>``."""
    system_prompt: str
    system_prompt_tokens: int
    user_prompts: tuple[str, ...]
    max_tokens: tuple[int, ...]
    think_time_s: float


Planned = PlannedRequest | PlannedSession


@dataclass(slots=True)
class ClosedStream:
    """``concurrency`` workers pulling from one endless, seeded iterator of requests or sessions."""

    label: str
    concurrency: int
    think_time_s: float
    requests: Iterator[Planned]


@dataclass(slots=True)
class Plan:
    """All a run sends; the runner enforces the duration and the global request bound."""

    open_requests: list[Planned]
    closed_streams: list[ClosedStream]
    offered_rate_rps: float | None
    """Mean open-loop rate summed over streams; None when any stream is closed-loop."""


def _rng(seed: int, purpose: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, purpose, stream])


def _planned(tenant: TenantSpec, at: float | None, d: DrawnRequest | DrawnSession, think: float) -> Planned:
    if isinstance(d, DrawnRequest):
        return PlannedRequest(tenant.name, at, d.prompt, d.prompt_tokens_target, d.max_tokens)
    return PlannedSession(
        tenant.name, at, f"{tenant.name}/{d.agent}", d.system_prompt, d.system_prompt_tokens,
        d.user_prompts, d.max_tokens, think,
    )  # fmt: skip


def _think(tenant: TenantSpec, scenario: Scenario) -> float:
    wl = tenant.workload or scenario.workload
    return float(getattr(wl, "think_time_s", 0.0))


def _closed_iter(tenants: list[TenantSpec], indices: list[int], scenario: Scenario) -> Iterator[Planned]:
    stream = indices[0] if len(indices) == 1 else _SCENARIO_STREAM
    choice = _rng(scenario.seed, _CHOICE, stream)
    weights = np.array([t.share for t in tenants], dtype=float)
    weights /= weights.sum()
    samplers = [
        make_sampler(t.workload or scenario.workload, _rng(scenario.seed, _WORKLOAD, i))
        for t, i in zip(tenants, indices, strict=True)
    ]
    thinks = [_think(t, scenario) for t in tenants]
    while True:
        picks = choice.choice(len(tenants), size=_CHUNK, p=weights)
        counts = np.bincount(picks, minlength=len(tenants))
        drawn = [iter(samplers[k].draw(int(c))) if c else iter(()) for k, c in enumerate(counts)]
        for k in picks:
            yield _planned(tenants[k], None, next(drawn[k]), thinks[k])


def build_plan(scenario: Scenario) -> Plan:
    """The scenario's requests (open loop capped at ``bounds.max_requests``)."""
    bounds = scenario.bounds
    duration, cap = bounds.duration_s, bounds.max_requests
    timed: list[tuple[float, int, Planned]] = []
    closed: list[ClosedStream] = []
    rate_sum: float | None = 0.0
    shared = [(i, t) for i, t in enumerate(scenario.tenants) if t.arrival is None]

    def add_open(tenants: list[TenantSpec], indices: list[int], times: np.ndarray, stream: int) -> None:
        weights = np.array([t.share for t in tenants], dtype=float)
        weights /= weights.sum()
        picks = _rng(scenario.seed, _CHOICE, stream).choice(len(tenants), size=times.size, p=weights)
        for k, (tenant, idx) in enumerate(zip(tenants, indices, strict=True)):
            mine = times[picks == k]
            drawn = make_sampler(tenant.workload or scenario.workload, _rng(scenario.seed, _WORKLOAD, idx))
            think = _think(tenant, scenario)
            batch: list[DrawnRequest | DrawnSession] = list(drawn.draw(mine.size))
            for at, d in zip(mine.tolist(), batch, strict=True):
                timed.append((at, len(timed), _planned(tenant, at, d, think)))

    if shared:
        assert scenario.arrival is not None
        tenants = [t for _, t in shared]
        indices = [i for i, _ in shared]
        spec = scenario.arrival
        if isinstance(spec, ClosedLoopArrival):
            closed.append(
                ClosedStream(
                    "scenario", spec.concurrency, spec.think_time_s, _closed_iter(tenants, indices, scenario)
                )
            )
            rate_sum = None
        else:
            times = arrival_times(spec, duration, cap, _rng(scenario.seed, _ARRIVAL, _SCENARIO_STREAM))
            add_open(tenants, indices, times, _SCENARIO_STREAM)
            rate_sum = (rate_sum or 0.0) + (mean_rate_rps(spec, duration) or 0.0)
    for i, tenant in enumerate(scenario.tenants):
        own = tenant.arrival
        if own is None:
            continue
        if isinstance(own, ClosedLoopArrival):
            closed.append(
                ClosedStream(
                    tenant.name, own.concurrency, own.think_time_s, _closed_iter([tenant], [i], scenario)
                )
            )
            rate_sum = None
        else:
            times = arrival_times(own, duration, cap, _rng(scenario.seed, _ARRIVAL, i))
            add_open([tenant], [i], times, i)
            if rate_sum is not None:
                rate_sum += mean_rate_rps(own, duration) or 0.0
    timed.sort(key=lambda x: (x[0], x[1]))
    return Plan([r for _, _, r in timed[:cap]], closed, rate_sum)
