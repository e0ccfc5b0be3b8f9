"""A flooding tenant (issue 13): two organizations of equal weight, closed loops of 32-token streams,
one with five times the other's clients, on a pool fast enough never to be the bottleneck, so that
the gateway replica's event loop is. Without the gateway's fair gate the backlog forms in the loop's
FIFO and service follows concurrency (about 5x); with it the heavy tenant's extra requests wait at
the gate, before their body is read, and the two are served alike.

It checks behaviour: every request served, the gate engaged, served tokens within 15% of each
other, and the light tenant's TTFT p99 within the pool's TTFT target. The figures (and the run
without the gate) are printed by ``loadtests/bench_flood.py``.
"""

from __future__ import annotations

import os

import pytest

from loadtests.flood import run_flood
from loadtests.overload import FLOOD_TTFT_SLO_MS, Fleet, quantile

pytestmark = [pytest.mark.flood, pytest.mark.integration, pytest.mark.timeout(300)]

DURATION_S = float(os.environ.get("TOKENWEIR_FLOOD_S", "15"))
LIGHT_CLIENTS = 16


async def test_a_flooding_tenant_does_not_take_a_saturated_gateway(fleet: Fleet) -> None:
    run = await run_flood(
        fleet, fleet.tenant("flood-heavy"), fleet.tenant("flood-light"), LIGHT_CLIENTS, DURATION_S
    )
    heavy_ttft, light_ttft = run.ttft_s(run.heavy), run.ttft_s(run.light)
    print(
        f"\n[flood] {run.heavy.concurrency} vs {run.light.concurrency} clients for {DURATION_S:g} s: "
        f"tokens heavy {run.tokens(run.heavy)} light {run.tokens(run.light)} (ratio {run.ratio:.2f}); "
        f"TTFT p50/p99 heavy {quantile(heavy_ttft, 0.5) * 1e3:.0f}/{quantile(heavy_ttft, 0.99) * 1e3:.0f} ms, "
        f"light {quantile(light_ttft, 0.5) * 1e3:.0f}/{quantile(light_ttft, 0.99) * 1e3:.0f} ms; "
        f"{run.gate_waited:g} waited at the gate, limit {run.gate_limits}, "
        f"inside {run.inside}, loop demand {[round(d, 2) for d in run.demands]}"
    )
    assert not run.failed(), [(r.tenant, r.status, r.error) for r in run.failed()[:10]]
    assert run.gate_waited > 0  # the gateway was the bottleneck, and the waiting happened at its gate
    assert 1 / 1.15 <= run.ratio <= 1.15, run.ratio
    assert quantile(light_ttft, 0.99) <= FLOOD_TTFT_SLO_MS / 1000
