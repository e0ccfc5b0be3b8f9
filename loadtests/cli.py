"""``python -m loadtests`` / ``tokenweir load``: run a scenario, compare two runs, list shipped scenarios.

``tokenweir load`` finds :func:`main` through the entry point ``load`` in the group
``tokenweir.commands`` (pyproject.toml), so the gateway never imports this package. Importing this
module raises ImportError when the ``load`` extra is not installed; ``tokenweir load`` then says so.

Exit codes: 0 the run completed (some requests succeeded); 1 every request failed; 2 configuration
error (invalid scenario, remote target without ``--allow-remote``, bad run folders).
"""

from __future__ import annotations

import importlib.util
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from loadtests.scenario import ScenarioError, load_scenario

__all__ = ["SCENARIO_DIR", "app", "main", "shipped_scenarios"]

_LOAD_EXTRA = ("aiohttp", "matplotlib")
"""What the harness imports from the ``load`` extra (checked here, imported when a run starts)."""
if _missing := [m for m in _LOAD_EXTRA if importlib.util.find_spec(m) is None]:
    raise ModuleNotFoundError(f"No module named {_missing[0]!r}", name=_missing[0])

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
"""Where the shipped scenarios live."""

app = typer.Typer(
    help="Multi-tenant open-loop load tests for OpenAI-compatible servers (see loadtests/README.md).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def shipped_scenarios() -> dict[str, Path]:
    """Name to path of every shipped scenario."""
    return {p.stem: p for p in sorted(SCENARIO_DIR.glob("*.yaml"))}


def _resolve(arg: str) -> Path:
    path = Path(arg)
    if path.exists() or path.suffix:
        return path
    return shipped_scenarios().get(arg, path)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


@app.command()
def run(
    scenario_arg: Annotated[
        str, typer.Argument(metavar="SCENARIO", help="Scenario YAML file, or the name of a shipped scenario.")
    ],
    out: Annotated[
        Path | None, typer.Option(help="Result folder (default: loadtest-results/<name>-<time>).")
    ] = None,
    allow_remote: Annotated[
        bool, typer.Option("--allow-remote", help="Allow a target that is not a loopback address.")
    ] = False,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="PATH=VALUE",
            help="Override a scenario field, e.g. --set bounds.duration_s=10 --set arrival.rate_rps=5.",
        ),
    ] = None,
    target: Annotated[str | None, typer.Option(help="Override target_url.")] = None,
    model: Annotated[str | None, typer.Option(help="Override model.")] = None,
    duration_s: Annotated[float | None, typer.Option(help="Override bounds.duration_s.")] = None,
    max_requests: Annotated[int | None, typer.Option(help="Override bounds.max_requests.")] = None,
    seed: Annotated[int | None, typer.Option(help="Override seed.")] = None,
    label: Annotated[str | None, typer.Option(help="Name of this run in comparisons.")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No live display.")] = False,
) -> None:
    """Run a scenario: requests.jsonl, summary.json, report.md and plots in the result folder."""
    from loadtests.runner import run_scenario

    sets = list(overrides or [])
    for value, key in ((target, "target_url"), (model, "model"), (duration_s, "bounds.duration_s"),
                       (max_requests, "bounds.max_requests"), (seed, "seed")):  # fmt: skip
        if value is not None:
            sets.append(f"{key}={value}")
    try:
        scenario = load_scenario(_resolve(scenario_arg), sets)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
        outcome = run_scenario(
            scenario, out or Path("loadtest-results") / f"{scenario.name}-{stamp}", allow_remote=allow_remote,
            progress=not no_progress and sys.stderr.isatty(), label=label,
        )  # fmt: skip
    except ScenarioError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from e
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
        raise typer.Exit(1)


@app.command()
def compare(
    a: Annotated[Path, typer.Argument(help="Run folder A.")],
    b: Annotated[Path, typer.Argument(help="Run folder B.")],
    out: Annotated[Path | None, typer.Option(help="Folder for compare.md (default: B's parent).")] = None,
) -> None:
    """Put two run folders side by side (compare.md and a latency CDF plot)."""
    from loadtests.report import compare_runs

    try:
        path = compare_runs(a, b, out or b.parent)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from e
    print(f"report: {path}")


@app.command("list")
def list_scenarios() -> None:
    """List shipped scenarios."""
    for name, path in shipped_scenarios().items():
        try:
            desc = load_scenario(path).description.strip().splitlines()[0]
        except (ScenarioError, IndexError):
            desc = ""
        print(f"{name:14s} {desc}")


def main(argv: list[str] | None = None, prog_name: str = "loadtests") -> int:
    """Entry point; returns the exit code (also ``tokenweir load``'s, with ``prog_name``)."""
    try:
        typer.main.get_command(app).main(args=argv, prog_name=prog_name, standalone_mode=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
