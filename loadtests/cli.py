"""``python -m loadtests`` / ``tokenweir load``: run a scenario, compare two runs, list shipped scenarios.

Exit codes: 0 the run completed (some requests succeeded); 1 every request failed; 2 configuration
error (invalid scenario, remote target without ``--allow-remote``, bad run folders).
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from loadtests.scenario import ScenarioError, load_scenario

__all__ = ["SCENARIO_DIR", "build_parser", "main", "shipped_scenarios"]

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
"""Where the shipped scenarios live."""


def shipped_scenarios() -> dict[str, Path]:
    """Name to path of every shipped scenario."""
    return {p.stem: p for p in sorted(SCENARIO_DIR.glob("*.yaml"))}


def _resolve(arg: str) -> Path:
    path = Path(arg)
    if path.exists() or path.suffix:
        return path
    return shipped_scenarios().get(arg, path)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed so ``tokenweir load`` can embed it)."""
    p = argparse.ArgumentParser(
        prog="loadtests", description="Multi-tenant open-loop load tests for OpenAI-compatible servers."
    )
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a scenario")
    r.add_argument("scenario", help="scenario YAML file, or the name of a shipped scenario")
    r.add_argument(
        "--out", type=Path, default=None, help="result folder (default: loadtest-results/<name>-<time>)"
    )
    r.add_argument(
        "--allow-remote", action="store_true", help="allow a target that is not a loopback address"
    )
    r.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override a scenario field, e.g. --set bounds.duration_s=10 --set arrival.rate_rps=5",
    )
    r.add_argument("--target", help="override target_url")
    r.add_argument("--model", help="override model")
    r.add_argument("--duration-s", type=float, help="override bounds.duration_s")
    r.add_argument("--max-requests", type=int, help="override bounds.max_requests")
    r.add_argument("--seed", type=int, help="override seed")
    r.add_argument("--label", help="name of this run in comparisons")
    r.add_argument("--no-progress", action="store_true", help="no live display")
    c = sub.add_parser("compare", help="put two run folders side by side")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--out", type=Path, default=None, help="folder for compare.md (default: B's parent)")
    sub.add_parser("list", help="list shipped scenarios")
    return p


def _run(args: argparse.Namespace) -> int:
    from loadtests.runner import run_scenario

    overrides = list(args.overrides)
    for flag, key in (("target", "target_url"), ("model", "model"), ("duration_s", "bounds.duration_s"),
                      ("max_requests", "bounds.max_requests"), ("seed", "seed")):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        scenario = load_scenario(_resolve(args.scenario), overrides)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        out = args.out or Path("loadtest-results") / f"{scenario.name}-{stamp}"
        outcome = run_scenario(
            scenario, out, allow_remote=args.allow_remote, progress=not args.no_progress and sys.stderr.isatty(),
            label=args.label,
        )  # fmt: skip
    except ScenarioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for s in outcome.summaries:
        print(
            f"{s.succeeded}/{s.requests_sent} ok, {s.request_throughput_rps:.2f} req/s, "
            f"{s.output_throughput_tps:.1f} out tok/s, goodput {s.goodput_rps:.2f} req/s, "
            f"TTFT p50 {_ms(s.ttft.median_ms)}, TPOT p50 {_ms(s.tpot.median_ms)}, "
            f"lateness p99 {_ms(s.lateness.p99_ms)}"
        )
    print(f"report: {outcome.report}")
    if outcome.all_failed:
        print("error: every request failed", file=sys.stderr)
        return 1
    return 0


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "list":
        for name, path in shipped_scenarios().items():
            try:
                desc = load_scenario(path).description.strip().splitlines()[0]
            except (ScenarioError, IndexError):
                desc = ""
            print(f"{name:14s} {desc}")
        return 0
    if args.command == "compare":
        from loadtests.report import compare_runs

        try:
            path = compare_runs(args.a, args.b, args.out or args.b.parent)
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"report: {path}")
        return 0
    return _run(args)
