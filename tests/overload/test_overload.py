"""Overload (issue 13): five times the saturation rate on a simulated pool through the live gateway.

The pool (``sim-a10``: 4 sequences, 8 queue places) is saturated by a closed loop first, which
gives the rate it serves; then normal load (half that rate, open loop), then five times the
saturation rate for ``TOKENWEIR_OVERLOAD_S`` seconds (default 15; the benchmark runs 60), then
normal load again. It checks behaviour, not speed:

* every refusal is 429 or 503 with the OpenAI error body and a ``Retry-After``;
* the gateway's and the pool replica's resident memory grow by at most 10% over the overload;
* goodput is back within 10 s of the load dropping (every request after that is served within the
  pool's TTFT target);
* a pool refusal costs no durable ledger write of its own: the ledger's settlements during the
  overload are exactly the requests served, and the refusals' releases ride on other commits.

Timings (refusal latency, recovery time) are printed by ``loadtests/bench_overload.py``.
"""

from __future__ import annotations

import os

import pytest

from loadtests.overload import OVERLOAD_TTFT_SLO_MS, Fleet, quantile, run_overload

pytestmark = [pytest.mark.overload, pytest.mark.integration, pytest.mark.timeout(300)]

DURATION_S = float(os.environ.get("TOKENWEIR_OVERLOAD_S", "15"))


async def test_five_times_saturation_refuses_cleanly_and_recovers(fleet: Fleet) -> None:
    run = await run_overload(fleet, fleet.tenant("overload"), DURATION_S)
    slo_s = OVERLOAD_TTFT_SLO_MS / 1000
    served, refused = run.served, run.pool_refused
    others = [r for r in run.overload if not r.ok and r not in refused]
    recovery = run.recovery_s(slo_s)
    ms = [d * 1000 for d in run.refusal_durations_s]
    print(
        f"\n[overload] saturation {run.saturation_rps:.1f} req/s; {len(run.overload)} sent at "
        f"{len(run.overload) / DURATION_S:.1f} req/s for {DURATION_S:g} s: {len(served)} served, "
        f"{len(refused)} refused by the pool, {len(others)} other; refusal p50/p99 "
        f"{quantile(ms, 0.5):.1f}/{quantile(ms, 0.99):.1f} ms (server); recovery {recovery} s"
    )
    for name, before in run.rss_before.items():
        print(f"[overload] RSS {name}: {before / 2**20:.1f} -> {run.rss_after[name] / 2**20:.1f} MiB")
    print(
        "[overload] ledger: "
        + ", ".join(
            f"{k} +{run.writes(k):g}" for k in ("reserve", "settle", "release", "progress", "commits")
        )
    )

    # Normal load is served in full, within the target (what "goodput back" returns to).
    assert all(r.good(slo_s) for r in run.normal), [(r.status, r.error, r.ttft_s) for r in run.normal]
    # Overloaded: the pool serves about what it can and refuses the rest, each refusal clean.
    assert served and len(refused) > len(run.overload) / 2, (len(served), len(refused), len(run.overload))
    assert not others, [(r.status, r.error) for r in others[:10]]
    for r in refused:
        assert r.status in (429, 503) and r.content_type.startswith("application/json"), r
        err = r.error["error"]  # type: ignore[index]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        assert r.retry_after is not None and int(r.retry_after) >= 1, r
    # Memory stays put.
    for name, before in run.rss_before.items():
        assert run.rss_after[name] <= 1.10 * before, (name, before, run.rss_after[name])
    # Goodput is back within 10 s of the load dropping.
    assert recovery is not None and recovery <= 10.0, (
        recovery,
        [(r.sent - run.dropped, r.status) for r in run.recovery],
    )
    # No durable write per refusal: every reservation resolved, settlements = requests served.
    assert run.writes("reserve") == len(served) + len(refused)
    assert run.writes("settle") == len(served)
    assert run.writes("release") == len(refused)
