"""Flooding-tenant benchmark (issue 13): two organizations of equal weight, closed loops of 32-token
streams, the heavy one with five times the light one's clients, through one gateway replica, in each
setup of ``loadtests/flood.py`` (``gateway``: a fast simulated pool, the gateway is the bottleneck;
``pool``: a simulated A10 is; ``vllm``: the tiny model on vLLM's CPU build, the gateway saturated),
each with the gateway's fair gate and without it (``gateway.fair_gate: false``), and (side ``share``,
not in the ``gateway`` setup) with the gate and the pool's batch shared by served tokens
(``pools[].admission.batch_share``), one deployment each.

Prints, for each setup, side and light concurrency: each tenant's served tokens (after a 4 s warm-up)
and their ratio, the total tokens/s, TTFT p50/p99 of each tenant (client side, the gate's wait
included), refusals (429/503, waited out by the clients where the pool refuses by design), other
failures, and the median of the gate's limit and of the loop's demand.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python loadtests/bench_flood.py \\
        [--setups gateway,pool,vllm] [--light 16,8] [--duration-s 20] [--sides gate,nogate,share]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's serving and loadtests
from loadtests.flood import SETUPS, FloodRun, Setup, run_flood, setup_config
from loadtests.overload import deployed, quantile


def _ms(values: list[float], q: float) -> str:
    return f"{quantile(values, q) * 1e3:5.0f}"


def _line(setup: Setup, side: str, run: FloodRun) -> str:
    h, lt = run.ttft_s(run.heavy), run.ttft_s(run.light)
    failed = len(run.failed()) - len(run.refused(run.heavy)) - len(run.refused(run.light))
    limit = f"{statistics.median(run.gate_limits):g}" if run.gate_limits else "-"
    demand = f"{statistics.median(run.demands):.2f}" if run.demands else "-"
    return (
        f"{setup.name:7s} {side:9s} {run.heavy.concurrency:3d}/{run.light.concurrency:<3d} "
        f"tokens {run.tokens(run.heavy):7d}/{run.tokens(run.light):<7d} ratio {run.ratio:5.2f} "
        f"total {run.tokens_per_s:6.0f} tok/s  TTFT p50/p99 ms heavy {_ms(h, 0.5)}/{_ms(h, 0.99)} "
        f"light {_ms(lt, 0.5)}/{_ms(lt, 0.99)} (SLO {setup.ttft_slo_ms:g})  "
        f"refused {len(run.refused(run.heavy))}/{len(run.refused(run.light))} failed {failed}  "
        f"gate limit {limit} demand {demand}"
    )


_SIDES = {"gate": "fair gate", "nogate": "no gate", "share": "share"}

HEADER = (
    "setup   gateway   heavy/light clients, served tokens heavy/light (their ratio), total, TTFT, "
    "refusals heavy/light, other failures, the gate's median limit and the loop's median demand"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", default="gateway,pool,vllm", help=f"of {', '.join(SETUPS)}")
    ap.add_argument("--light", default="16,8", help="the light tenant's clients, one run each")
    ap.add_argument("--duration-s", type=float, default=20.0, help="length of each run")
    ap.add_argument(
        "--sides",
        default="gate,nogate",
        help="of gate (the fair gate), nogate, share (the gate and the pool's batch_share)",
    )
    ap.add_argument("--alone", action="store_true", help="first run the light tenant alone (its baseline)")
    args = ap.parse_args()
    lights = [int(x) for x in args.light.split(",")]
    sides = [s for s in args.sides.split(",") if s]
    if unknown := set(sides) - set(_SIDES):
        ap.error(f"unknown sides {sorted(unknown)}: of {', '.join(_SIDES)}")
    lines = []
    for name in args.setups.split(","):
        setup = SETUPS[name]
        for side in sides:
            if side == "share" and name == "gateway":
                continue  # its pool is never the bottleneck
            root = Path(tempfile.mkdtemp(prefix=f"tw-bench-flood-{name}-"))
            share = {"batch_share": True} if side == "share" else None
            cfg = setup_config(root, setup, {"fair_gate": side != "nogate"}, share)
            with deployed(root, cfg) as fleet:
                for n in lights:
                    heavy, light = fleet.tenant(f"heavy-{n}"), fleet.tenant(f"light-{n}")
                    if args.alone and side == sides[0]:  # what the light tenant gets on its own
                        run = asyncio.run(run_flood(fleet, heavy, light, n, args.duration_s, setup, factor=0))
                        lines.append(_line(setup, "alone", run))
                        print(lines[-1], flush=True)
                    run = asyncio.run(run_flood(fleet, heavy, light, n, args.duration_s, setup))
                    lines.append(_line(setup, _SIDES[side], run))
                    print(lines[-1], flush=True)
    print("\n".join(["", HEADER, *lines]))


if __name__ == "__main__":
    main()
