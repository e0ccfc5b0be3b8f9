"""Run a scenario end to end: safety checks, keys, each sweep point, meter check, result files."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loadtests.client import LiveStats, RunResult, Target, run_plan
from loadtests.gateway_api import (
    MeterReading,
    MeterRow,
    meter_rows,
    provision_keys,
    read_prefix_cache,
    read_usage,
)
from loadtests.metrics import RunSummary, summarize
from loadtests.plan import Plan, build_plan
from loadtests.plots import plot_run, plot_sweep
from loadtests.progress import live_progress
from loadtests.report import markdown_report, write_records
from loadtests.scenario import AgentWorkload, Scenario, ScenarioError, is_loopback_url

__all__ = ["RemoteTargetError", "RunOutcome", "run_scenario"]

_METER_SETTLE_S = 3.0
"""After a run, how long the meter may take to reflect the last settlements."""


class RemoteTargetError(ScenarioError):
    """A non-loopback target without ``allow_remote``."""


@dataclass(slots=True)
class RunOutcome:
    """Where the results are and how the run went."""

    out_dir: Path
    summaries: list[RunSummary]
    report: Path

    @property
    def all_failed(self) -> bool:
        return sum(s.succeeded for s in self.summaries) == 0


def _run_async(coro: Any) -> RunResult:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


async def _drive(
    scenario: Scenario, plan: Plan, keys: dict[str, str], progress: bool, title: str
) -> RunResult:
    target = Target(scenario.target_url, scenario.model, scenario.endpoint, keys, dict(scenario.extra_body))
    live = LiveStats()
    async with live_progress(title, live, scenario.bounds.duration_s, progress):
        return await run_plan(plan, target, scenario.bounds, live)


def _meter(
    scenario: Scenario, keys: dict[str, str], before: dict[str, MeterReading], result: RunResult
) -> list[MeterRow] | str:
    deadline = time.monotonic() + _METER_SETTLE_S
    while True:
        after, why = read_usage(scenario.target_url, keys.values())
        if after is None:
            return why or "unreadable"
        rows = meter_rows(result.records, keys, before, after)
        if all(r.diff_tokens == 0 for r in rows) or time.monotonic() >= deadline:
            return rows
        time.sleep(0.25)  # polling the gateway's meter for its last settlements, bounded by the deadline


def _header(scenario: Scenario, sweep_value: float | None) -> dict[str, Any]:
    h: dict[str, Any] = {
        "scenario": scenario.name,
        "description": scenario.description,
        "target": scenario.target_url,
        "model": scenario.model,
        "endpoint": scenario.endpoint,
        "seed": scenario.seed,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "duration bound (s)": scenario.bounds.duration_s,
        "request bound": scenario.bounds.max_requests,
        "arrival": scenario.arrival.model_dump() if scenario.arrival else "per tenant",
    }
    if sweep_value is not None:
        h["sweep value"] = sweep_value
    return h


def _one_point(
    scenario: Scenario,
    keys: dict[str, str],
    out_dir: Path,
    progress: bool,
    label: str,
    sweep_value: float | None,
) -> RunSummary:
    out_dir.mkdir(parents=True, exist_ok=True)
    header = _header(scenario, sweep_value)
    before, why = read_usage(scenario.target_url, keys.values())
    title = f"{scenario.name}" + (f" @ {sweep_value:g}" if sweep_value is not None else "")
    plan = build_plan(scenario)
    cache_before = read_prefix_cache(scenario.metrics_url)[0] if scenario.metrics_url else None
    result = _run_async(_drive(scenario, plan, keys, progress, title))
    server_cache = None
    if cache_before is not None and scenario.metrics_url:
        cache_after, cache_why = read_prefix_cache(scenario.metrics_url)
        if cache_after is not None:
            server_cache = (cache_after.queries - cache_before.queries, cache_after.hits - cache_before.hits)
        else:
            print(f"warning: prefix-cache counters unreadable after the run: {cache_why}", file=sys.stderr)
    meter: list[MeterRow] | None = None
    if before is not None:
        got = _meter(scenario, keys, before, result)
        meter, why = (got, None) if isinstance(got, list) else (None, got)
    shares = {t.name: t.share for t in scenario.tenants}
    turns = {
        t.name: wl.turns
        for t in scenario.tenants
        if isinstance(wl := t.workload or scenario.workload, AgentWorkload)
    }
    summary = summarize(
        result.records, result.duration_s, scenario.slo, shares,
        send_window_s=result.send_window_s, offered_rate_rps=plan.offered_rate_rps,
        planned_turns=turns, server_prefix_cache=server_cache,
    )  # fmt: skip
    write_records(result.records, out_dir / "requests.jsonl")
    tenants = [t.name for t in scenario.tenants]
    plots = plot_run(result.records, tenants, result.duration_s, out_dir, title)
    doc: dict[str, Any] = {
        "label": label,
        "header": header,
        "summary": summary.to_dict(),
        "meter": [asdict(m) for m in meter] if meter is not None else None,
        "meter_unavailable": why if meter is None else None,
    }
    (out_dir / "summary.json").write_text(json.dumps(doc, indent=2))
    md = markdown_report(doc["summary"], header, meter, why, [p.name for p in plots])
    (out_dir / "report.md").write_text(md)
    for w in summary.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return summary


def run_scenario(
    scenario: Scenario,
    out_dir: Path,
    *,
    allow_remote: bool = False,
    progress: bool = True,
    label: str | None = None,
) -> RunOutcome:
    """Run every point of ``scenario`` and write results under ``out_dir``."""
    hosts = [scenario.target_url] + (
        [scenario.admin.base_url] if scenario.admin and scenario.admin.base_url else []
    )
    if scenario.metrics_url:
        hosts.append(scenario.metrics_url)
    remote = [h for h in hosts if not is_loopback_url(h)]
    if remote and not allow_remote:
        raise RemoteTargetError(f"target {remote} is not a loopback address; pass --allow-remote to load it")
    keys = provision_keys(scenario)
    label = label or scenario.name
    if scenario.sweep is None:
        s = _one_point(scenario, keys, out_dir, progress, label, None)
        return RunOutcome(out_dir, [s], out_dir / "report.md")
    sweep = scenario.sweep
    summaries: list[RunSummary] = []
    points: list[dict[str, Any]] = []
    for i, value in enumerate(sweep.values):
        point = scenario.with_sweep_value(value)
        sub = out_dir / f"{i:02d}-{sweep.parameter}-{value:g}"
        s = _one_point(point, keys, sub, progress, f"{label}@{value:g}", value)
        summaries.append(s)
        points.append({"value": value, "dir": sub.name, "request_throughput_rps": s.request_throughput_rps,
                       "goodput_rps": s.goodput_rps, "output_throughput_tps": s.output_throughput_tps,
                       "ttft_p99_ms": s.ttft.p99_ms, "tpot_p99_ms": s.tpot.p99_ms, "failed": s.failed,
                       "lateness_p99_ms": s.lateness.p99_ms})  # fmt: skip
    (out_dir / "sweep.json").write_text(
        json.dumps({"parameter": sweep.parameter, "points": points}, indent=2)
    )
    png = plot_sweep(points, sweep.parameter, out_dir / "sweep_goodput.png", scenario.name)
    lines = [f"# Sweep: {scenario.name} over {sweep.parameter}", "",
             "| value | throughput (req/s) | goodput (req/s) | output tok/s | TTFT p99 (ms) | TPOT p99 (ms) "
             "| failed | lateness p99 (ms) | report |", "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    for p in points:
        lines.append(
            f"| {p['value']:g} | {f(p['request_throughput_rps'])} | {f(p['goodput_rps'])} "
            f"| {f(p['output_throughput_tps'])} | {f(p['ttft_p99_ms'])} | {f(p['tpot_p99_ms'])} | {p['failed']} "
            f"| {f(p['lateness_p99_ms'])} | [{p['dir']}]({p['dir']}/report.md) |"
        )
    lines += ["", f"![goodput vs offered load]({png.name})", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return RunOutcome(out_dir, summaries, report)
