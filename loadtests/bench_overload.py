"""Overload benchmark: five times the saturation rate for 60 s on a simulated pool through the live
gateway (the same run as ``tests/overload/test_overload.py``, longer, with its timings).

Prints the refusal latency p50/p99 measured by the server (the gateway's access log: headers in to
response out) and by the client, beside the server-side time of the requests served at normal load
before the overload (the baseline of the same run); the gateway's and the pool replica's resident
memory before and after; how long after the load dropped goodput was back; and the ledger's writes
(reservations, settlements, releases riding on other commits, commits).

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 .venv/bin/python loadtests/bench_overload.py [--duration-s 60]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this tree's serving and loadtests
from loadtests.overload import (
    OVERLOAD_FACTOR,
    OVERLOAD_TTFT_SLO_MS,
    deployed,
    quantile,
    run_overload,
)


def _ms(values: list[float]) -> str:
    return f"p50 {quantile(values, 0.5) * 1000:.1f} ms, p99 {quantile(values, 0.99) * 1000:.1f} ms (n={len(values)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration-s", type=float, default=60.0, help="length of the overload")
    args = ap.parse_args()
    with deployed(Path(tempfile.mkdtemp(prefix="tw-bench-overload-"))) as fleet:
        run = asyncio.run(run_overload(fleet, fleet.tenant("bench"), args.duration_s))
    served, refused = run.served, run.pool_refused
    print(f"saturation (closed loop, 8 clients on 4 sequences): {run.saturation_rps:.2f} req/s served")
    print(
        f"overload: {OVERLOAD_FACTOR:g}x for {args.duration_s:g} s: {len(run.overload)} sent, "
        f"{len(served)} served ({len(served) / args.duration_s:.2f}/s), {len(refused)} refused by the pool, "
        f"{len(run.overload) - len(served) - len(refused)} other"
    )
    print(f"refusal latency, server side: {_ms(run.refusal_durations_s)}")
    print(f"refusal latency, client side: {_ms([r.done - r.sent for r in refused])}")
    print(f"baseline: served requests at normal load, server side: {_ms(run.normal_durations_s)}")
    for name, before in run.rss_before.items():
        after = run.rss_after[name]
        print(
            f"RSS {name}: {before / 2**20:.1f} -> {after / 2**20:.1f} MiB ({(after / before - 1) * 100:+.2f}%)"
        )
    rec = run.recovery_s(OVERLOAD_TTFT_SLO_MS / 1000)
    print(f"recovery: goodput back {rec} s after the load dropped (1 s windows; every request good after)")
    print(
        "ledger during the overload: "
        + ", ".join(
            f"{k} +{run.writes(k):g}" for k in ("reserve", "settle", "release", "progress", "commits")
        )
    )


if __name__ == "__main__":
    main()
