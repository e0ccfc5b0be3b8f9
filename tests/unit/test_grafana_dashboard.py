"""deploy/grafana/tokenweir.json: well-formed, every query valid PromQL (promtool parses them as
rules) and none padded with constants. That each returns data is the ops tier's check
(tests/integration/test_ops_prometheus.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from loadtests.dashboard import DASHBOARD, grafana_expr, load_panels, padding

RECORDING = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules" / "recording.yml"


def test_dashboard_layout_and_ids() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "tokenweir" and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            assert p["targets"], p["title"]
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names == ["datasource"]


def test_every_query_parses_and_none_is_padded(tmp_path: Path) -> None:
    panels = load_panels()
    assert len(panels) >= 15
    rules = []
    for p in panels:
        for t in p.targets:
            assert not padding(t.expr), (p.title, t.expr)
            rules.append({"record": f"panel:{len(rules)}", "expr": grafana_expr(t.expr, "1m")})
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: run deploy/setup.sh"
    r = subprocess.run([exe, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_padding_detector() -> None:
    assert padding("sum(rate(x[5m])) or vector(0)")
    assert padding("x or on() 0")
    assert not padding("sum by (vector) (x)")


def test_panels_read_recorded_series_that_exist() -> None:
    """A panel that names a `tokenweir:` series must name a recording rule."""
    recorded = {r["record"] for g in yaml.safe_load(RECORDING.read_text())["groups"] for r in g["rules"]}
    used = {
        m for p in load_panels() for t in p.targets for m in re.findall(r"\btokenweir:[a-z0-9_:]+", t.expr)
    }
    assert used and used <= recorded, used - recorded
