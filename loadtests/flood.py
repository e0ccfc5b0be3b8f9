"""A flooding tenant (issue 13): two organizations of equal weight, closed loops of 32-token streams,
the heavy one with :data:`FLOOD_FACTOR` times the light one's clients, through one gateway replica,
wherever the bottleneck is. Shared by ``tests/overload/test_flood.py`` (behaviour) and
``loadtests/bench_flood.py`` (the figures, every setup, with the fair gate and without).

The setups (:data:`SETUPS`):

* ``gateway``: the overload tier's fleet (``loadtests/overload.py``), the flood on its fast
  ``sim-h100`` pool, never the bottleneck: the gateway replica's event loop is;
* ``pool`` (the issue's setup A): a simulated A10 at twice real time, eight sequences, the
  bottleneck: its fair queue (VTC) shares it, and its admission refuses what would outwait its queue
  deadline (clients wait the ``Retry-After`` and send again);
* ``vllm`` (setup B): the tiny model on vLLM's CPU build (``models/tiny.py``) on the same two cores
  as the gateway, which saturates first: the backlog forms at the gateway, before the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.overload import (
    ADMIN_KEY,
    FLOOD_MODEL,
    FLOOD_TTFT_SLO_MS,
    NAMESPACE,
    OVERLOAD_MODEL,
    Closed,
    Fleet,
    Result,
    closed_loops,
    fleet_config,
    free_port,
    scrape,
    served_tokens,
    stream_body,
)

FLOOD_FACTOR = 5
"""The heavy tenant keeps this many times the light one's requests at the gateway."""


@dataclass(frozen=True)
class Setup:
    """Where the bottleneck is, and the model and TTFT target of the pool the flood runs on."""

    name: str
    model: str
    ttft_slo_ms: float
    backoff: bool
    """Clients wait a refusal's ``Retry-After`` (the pool refuses part of the flood by design)."""


SETUPS = {
    "gateway": Setup("gateway", FLOOD_MODEL, FLOOD_TTFT_SLO_MS, backoff=False),
    "pool": Setup("pool", OVERLOAD_MODEL, 5000.0, backoff=True),
    "vllm": Setup("vllm", "tiny-llama", 5000.0, backoff=True),
}


def _pool(setup: Setup, admission: dict[str, Any]) -> dict[str, Any]:
    slo = {"ttft_ms": setup.ttft_slo_ms}
    if setup.name == "pool":
        return {
            "admission": admission,
            "name": "sim-a10",
            "model": setup.model,
            "accelerator": "A10",
            "engine": "sim",
            "sim_speedup": 2,
            "engine_args": {"max_num_seqs": 8},
            "slo": {**slo, "tpot_ms": 100},
        }
    return {  # as deploy/local.yaml, the embedded default
        "name": "tiny-cpu",
        "model": setup.model,
        "accelerator": "CPU",
        "engine": "vllm",
        "engine_args": {"kv_cache_space_gib": 1},
        "admission": admission,
        "slo": {**slo, "tpot_ms": 200},
    }


def setup_config(
    state_dir: Path,
    setup: Setup,
    gateway_extra: dict[str, Any] | None = None,
    pool_admission: dict[str, Any] | None = None,
) -> Any:
    """The application's config for a setup (a :class:`serving.config.TokenweirConfig`);
    ``pool_admission``: the flood pool's `admission` settings (not for the ``gateway`` setup, whose
    pool is never the bottleneck)."""
    if setup.name == "gateway":
        if pool_admission:
            raise ValueError("the gateway setup's pool is never the bottleneck: no pool admission settings")
        return fleet_config(state_dir, gateway_extra=gateway_extra)
    from serving.config import parse_config

    if setup.name == "vllm":
        from models.tiny import build_tiny_model

        build_tiny_model()  # cached after the first build
    return parse_config(
        {
            "gateway": {
                "host": "127.0.0.1",
                "port": free_port(),
                "internal_port": free_port(),
                "replicas": 1,
                "access_log_file": str(state_dir / "access.log"),
                **(gateway_extra or {}),
            },
            "metering": {"admin_key": ADMIN_KEY},
            "models": {OVERLOAD_MODEL: {"tokenizer": "builtin:tiny-llama"}},
            "ray": {"num_cpus": 8, "namespace": NAMESPACE},
            "state_dir": str(state_dir),
            "pools": [_pool(setup, pool_admission or {})],
        }
    )


@dataclass
class FloodRun:
    """One run: both closed loops, and what the gateway's gate did meanwhile."""

    heavy: Closed
    light: Closed
    since: float
    until: float
    """The measured window (``time.monotonic()``): after a warm-up, to the end of the sending."""
    gate_waited: float
    """Requests that waited at the gateway's fair gate during the run."""
    gate_limits: list[float]
    """The gate's limit, sampled every second."""
    demands: list[float]
    """The gateway loop's demand (``tokenweir_gateway_loop_demand_ratio``), sampled every second."""
    inside: list[float]
    """Requests past the gateway's gate (``tokenweir_gateway_gate_inside``), every second."""

    def tokens(self, c: Closed) -> int:
        return served_tokens(c.results, self.since, self.until)

    @property
    def ratio(self) -> float:
        """Heavy's served tokens over light's."""
        return self.tokens(self.heavy) / max(1, self.tokens(self.light))

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens(self.heavy) + self.tokens(self.light)) / (self.until - self.since)

    def ttft_s(self, c: Closed) -> list[float]:
        return [r.ttft_s for r in c.results if r.ok and r.ttft_s is not None and r.sent >= self.since]

    def refused(self, c: Closed) -> list[Result]:
        """Refusals with a status a client retries (429, 503)."""
        return [r for r in c.results if r.status in (429, 503)]

    def failed(self) -> list[Result]:
        """Every request not served, refusals included."""
        return [r for c in (self.heavy, self.light) for r in c.results if not r.ok]


def _metric(internal_url: str, name: str) -> float:
    return sum(scrape(internal_url).get(name, {}).values())


async def run_flood(
    fleet: Fleet,
    heavy_key: str,
    light_key: str,
    light_clients: int,
    duration_s: float,
    setup: Setup = SETUPS["gateway"],
    warmup_s: float = 4.0,
    factor: int = FLOOD_FACTOR,
) -> FloodRun:
    """Both closed loops for ``duration_s`` (the heavy one with ``factor`` times the light one's
    clients; 0: the light one alone, its baseline); tokens counted after ``warmup_s``."""
    heavy = Closed("heavy", heavy_key, factor * light_clients)
    light = Closed("light", light_key, light_clients)
    url = fleet.internal_url
    waited0 = await asyncio.to_thread(_metric, url, "tokenweir_gateway_gate_waited_total")
    limits: list[float] = []
    demands: list[float] = []
    inside: list[float] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 1.0)  # one sample a second until the run ends
            limits.append(await asyncio.to_thread(_metric, url, "tokenweir_gateway_gate_limit"))
            demands.append(await asyncio.to_thread(_metric, url, "tokenweir_gateway_loop_demand_ratio"))
            inside.append(await asyncio.to_thread(_metric, url, "tokenweir_gateway_gate_inside"))

    watcher = asyncio.create_task(watch())
    t0 = time.monotonic()
    body = stream_body(setup.model)
    await closed_loops(fleet.url, [heavy, light], body, duration_s, backoff=setup.backoff)
    done.set()
    await watcher
    await asyncio.sleep(1.1)  # the gateway publishes its counters every second
    waited1 = await asyncio.to_thread(_metric, url, "tokenweir_gateway_gate_waited_total")
    return FloodRun(heavy, light, t0 + warmup_s, t0 + duration_s, waited1 - waited0, limits, demands, inside)
