"""Flooding-tenant benchmark: two organizations of equal weight, closed loops of 32-token streams, the
heavy one with five times the light one's clients, on a simulated pool fast enough never to be the
bottleneck, so that the one gateway replica is (the run of ``tests/overload/test_flood.py``, longer,
and beside the same load on a gateway without its fair gate, ``gateway.fair_gate: false``).

Prints, for each light concurrency and each side: the served tokens of each tenant (after a 4 s
warm-up) and their ratio, the total, TTFT p50/p99 of each tenant (client side), and the gate's limit.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python loadtests/bench_flood.py [--duration-s 20] [--light 8,16]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's serving and loadtests
from loadtests.overload import FloodRun, deployed, quantile, run_flood


def _line(side: str, run: FloodRun) -> str:
    h, lt = run.ttft_s(run.heavy), run.ttft_s(run.light)
    window = run.until - run.since
    total = (run.tokens(run.heavy) + run.tokens(run.light)) / window
    limits = f"limit median {statistics.median(run.gate_limits):g}" if run.gate_limits else ""
    return (
        f"{side:9s} light {run.light.concurrency:3d} / heavy {run.heavy.concurrency:3d} clients: "
        f"tokens heavy {run.tokens(run.heavy):7d} light {run.tokens(run.light):7d} ratio {run.ratio:5.2f}; "
        f"total {total:6.0f} tokens/s; TTFT p50/p99 heavy {quantile(h, 0.5) * 1e3:4.0f}/{quantile(h, 0.99) * 1e3:4.0f} ms"
        f" light {quantile(lt, 0.5) * 1e3:4.0f}/{quantile(lt, 0.99) * 1e3:4.0f} ms; failed {len(run.failed())}; {limits}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration-s", type=float, default=20.0, help="length of each run")
    ap.add_argument("--light", default="8,16", help="the light tenant's clients, one run each")
    args = ap.parse_args()
    lights = [int(x) for x in args.light.split(",")]
    lines = []
    for side, gate in (("fair gate", True), ("no gate", False)):
        root = Path(tempfile.mkdtemp(prefix="tw-bench-flood-"))
        with deployed(root, gateway_extra={"fair_gate": gate}) as fleet:
            for n in lights:
                heavy, light = fleet.tenant(f"heavy-{n}"), fleet.tenant(f"light-{n}")
                run = asyncio.run(run_flood(fleet, heavy, light, n, args.duration_s))
                lines.append(_line(side, run))
                print(lines[-1], flush=True)
    print("\n".join(["", *lines]))


if __name__ == "__main__":
    main()
