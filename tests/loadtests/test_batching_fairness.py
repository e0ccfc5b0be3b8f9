"""Hierarchical fairness under overload, in the simulation behind bench_batching.py: one L20 replica
(the simulated engine's scheduler priced by the performance model) behind the real admission core,
where back-pressure keeps the queue short and decides who stays backlogged."""

from __future__ import annotations

import pytest

from loadtests.bench_batching import run_hierarchical


@pytest.mark.parametrize(
    ("rates", "min_ratio"),
    [
        ({"A/a1": 1.0, "A/a2": 1.0, "B/b": 2.0}, 2.7),  # both projects send alike
        ({"A/a1": 0.5, "A/a2": 1.5, "B/b": 2.0}, 2.5),  # the heavier project sends three times more
    ],
)
def test_equal_orgs_share_an_overloaded_replica_and_projects_split_by_weight(
    rates: dict[str, float], min_ratio: float
) -> None:
    """Organizations A and B (equal weights) each send twice what the replica serves; A's projects
    weigh 3:1. A and B are served within 5% of each other, and a1 about three times a2 (a project
    behind its sibling may queue on the expected releases, as a tenant behind another may: without
    that a2, sending more, takes far more than its weight's part)."""
    orgs, projects, _ = run_hierarchical("L20", rates, {"A/a1": 3.0})
    assert orgs["A"] == pytest.approx(orgs["B"], rel=0.05)
    assert min_ratio <= projects["A/a1"] / projects["A/a2"] <= 3.4
