"""The Grafana dashboard (``deploy/grafana/tokenweir.json``) outside Grafana: its panels' queries,
run against a Prometheus HTTP API, and a PNG of the panels drawn with matplotlib from the results.

Grafana is not needed to check that every panel has data or to show what it looks like: the test
of the ops tier (``tests/integration/test_ops_prometheus.py``) runs every query after a known load
and renders ``docs/dashboard.png`` from the same results.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "DASHBOARD",
    "Panel",
    "Target",
    "grafana_expr",
    "load_panels",
    "padding",
    "query_range",
    "render_png",
]

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "tokenweir.json"
_PADDING = re.compile(r"\bvector\s*\(|\bor\s+on\s*\(\s*\)\s*[-+]?\d")
"""A constant standing in for a missing series (``or vector(0)``, ``or on() 0``) makes an empty
panel look healthy."""


@dataclass(frozen=True)
class Target:
    ref: str
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    targets: tuple[Target, ...]
    right_axis: dict[str, str] = field(default_factory=dict)
    """refId -> unit of the targets drawn on a right-hand axis."""


def load_panels(path: Path = DASHBOARD) -> list[Panel]:
    """The dashboard's graph panels (rows left out), in layout order."""
    dash = json.loads(path.read_text())
    out = []
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        right = {}
        for o in p.get("fieldConfig", {}).get("overrides", []):
            props = {q["id"]: q["value"] for q in o["properties"]}
            if props.get("custom.axisPlacement") == "right":
                right[o["matcher"]["options"]] = props.get("unit", "short")
        targets = tuple(Target(t["refId"], t["expr"], t.get("legendFormat", "")) for t in p["targets"])
        out.append(Panel(p["title"], p["fieldConfig"]["defaults"].get("unit", "short"), targets, right))
    return out


def padding(expr: str) -> bool:
    """Whether ``expr`` pads a missing series with a constant."""
    return bool(_PADDING.search(expr))


def grafana_expr(expr: str, rate_interval: str) -> str:
    """The query Grafana would send: its interval variables replaced."""
    return expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)


def query_range(
    client: httpx.Client, expr: str, start: float, end: float, step_s: float
) -> list[dict[str, Any]]:
    """``/api/v1/query_range``; raises on an HTTP or PromQL error, returns the matrix."""
    r = client.get("/api/v1/query_range", params={"query": expr, "start": start, "end": end, "step": step_s})
    body = r.json()
    if r.status_code != 200 or body.get("status") != "success":
        raise ValueError(f"query failed: {expr!r}: {body.get('errorType')}: {body.get('error')}")
    assert body["data"]["resultType"] == "matrix", body["data"]["resultType"]
    return list(body["data"]["result"])


def _legend(fmt: str, metric: dict[str, str]) -> str:
    if not fmt:
        return ",".join(f"{k}={v}" for k, v in sorted(metric.items()) if k != "__name__") or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt)


def render_png(
    panels: list[Panel], results: dict[tuple[str, str], list[dict[str, Any]]], path: Path, title: str
) -> None:
    """Draw every panel (``results[(panel title, refId)]`` is its target's matrix) in a grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 3.1 * rows), squeeze=False)
    t0 = min(
        (float(v[0]) for res in results.values() for s in res for v in s["values"]),
        default=0.0,
    )
    for ax, panel in zip(axes.flat, panels, strict=False):
        right = ax.twinx() if panel.right_axis else None
        for t in panel.targets:
            target_ax = right if right is not None and t.ref in panel.right_axis else ax
            for s in results.get((panel.title, t.ref), []):
                xs = [float(v[0]) - t0 for v in s["values"]]
                ys = [float(v[1]) for v in s["values"]]
                style = "--" if "SLO" in t.legend or "target" in t.legend or "configured" in t.legend else "-"
                target_ax.plot(xs, ys, style, linewidth=1.2, label=_legend(t.legend, s["metric"])[:48])
        # seconds span targets of minutes and measurements of milliseconds: a log axis shows both
        for a, unit in ((ax, panel.unit), (right, "/".join(set(panel.right_axis.values())))):
            if a is not None and unit == "s" and a.has_data():
                a.set_yscale("log")
        ax.set_title(panel.title, fontsize=10)
        ax.set_ylabel(panel.unit, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if right is not None:
            right.set_ylabel("/".join(sorted(set(panel.right_axis.values()))), fontsize=8)
            right.tick_params(labelsize=7)
            h2, l2 = right.get_legend_handles_labels()
            handles, labels = handles + h2, labels + l2
        if handles:
            ax.legend(handles[:6], labels[:6], fontsize=6, loc="upper left", framealpha=0.6)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("seconds", fontsize=8)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
