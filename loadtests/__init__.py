"""Tokenweir's load-test harness: multi-tenant, open-loop, SLO- and quota-aware.

Run ``python -m loadtests run loadtests/scenarios/smoke.yaml --out DIR``; see ``loadtests/README.md``.
``run_scenario`` and ``RunOutcome`` are imported on first use (they pull in matplotlib).
"""

from typing import Any

from loadtests.cli import main
from loadtests.client import RequestRecord, RunResult, Target, run_plan
from loadtests.metrics import RunSummary, summarize
from loadtests.plan import Plan, build_plan
from loadtests.scenario import Scenario, ScenarioError, load_scenario

__all__ = [
    "Plan",
    "RequestRecord",
    "RunOutcome",
    "RunResult",
    "RunSummary",
    "Scenario",
    "ScenarioError",
    "Target",
    "build_plan",
    "load_scenario",
    "main",
    "run_plan",
    "run_scenario",
    "summarize",
]


def __getattr__(name: str) -> Any:
    if name in ("run_scenario", "RunOutcome"):
        from loadtests import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'loadtests' has no attribute {name!r}")
