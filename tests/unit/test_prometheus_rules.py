"""deploy/prometheus/: the rules and configs pass promtool, every alert has unit tests that see it
fire and see it stay quiet, and the Kubernetes files keep to one scrape target for the fleet.

promtool comes from Debian's `prometheus` package (deploy/setup.sh installs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
RULES = sorted((PROM / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))


def promtool(*args: str, cwd: Path = ROOT) -> str:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: run deploy/setup.sh (it installs Debian's prometheus package)"
    r = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_names() -> list[str]:
    return [r["alert"] for g in load(PROM / "rules" / "alerts.yml")["groups"] for r in g["rules"]]


def test_rules_and_local_config_pass_promtool_check() -> None:
    assert RULES and RULE_TESTS
    out = promtool("check", "rules", *map(str, RULES))
    assert out.count("SUCCESS") == len(RULES)
    promtool("check", "config", str(PROM / "prometheus.yml"))


def test_rule_unit_tests_pass() -> None:
    out = promtool("test", "rules", *map(str, RULE_TESTS))
    assert "FAILED" not in out


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for t in load(path)["tests"]:
            for case in t.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = alert_names()
    assert len(names) == len(set(names))
    assert not set(names) - fired, f"alerts never seen firing: {sorted(set(names) - fired)}"
    assert not set(names) - quiet, f"alerts never seen quiet: {sorted(set(names) - quiet)}"
    assert not (fired | quiet) - set(names), "tests of alerts that do not exist"


def test_alerts_select_the_one_fleet_job() -> None:
    """The scrape job is `tokenweir` in every config we ship (the alert on `up` names it)."""
    local = load(PROM / "prometheus.yml")
    k8s = load(PROM / "kubernetes" / "prometheus-kubernetes.yml")
    jobs = [j["job_name"] for j in local["scrape_configs"]] + [j["job_name"] for j in k8s["scrape_configs"]]
    assert jobs == ["tokenweir", "tokenweir"]
    (static,) = local["scrape_configs"][0]["static_configs"]
    assert static["targets"] == ["127.0.0.1:9464"]  # one target: the default operator listener


def test_kubernetes_config_discovers_the_service_not_the_pods(tmp_path: Path) -> None:
    """One target per fleet: role `service` (not pod or endpoints). Debian's Prometheus is built
    without Kubernetes discovery, so promtool checks the rest of the job (relabelling, rule files)
    with the discovery swapped for a static target."""
    cfg = load(PROM / "kubernetes" / "prometheus-kubernetes.yml")
    job = cfg["scrape_configs"][0]
    assert [sd["role"] for sd in job["kubernetes_sd_configs"]] == ["service"]
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [{"targets": ["tokenweir-metrics.default.svc:9464"]}]
    cfg["rule_files"] = [str(p) for p in RULES]
    (tmp_path / "k8s.yml").write_text(yaml.safe_dump(cfg))
    promtool("check", "config", str(tmp_path / "k8s.yml"))


def test_servicemonitor_makes_every_endpoint_the_same_target() -> None:
    svc, sm = yaml.safe_load_all((PROM / "kubernetes" / "servicemonitor.yaml").read_text())
    assert svc["kind"] == "Service" and sm["kind"] == "ServiceMonitor"
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "tokenweir"
    (ep,) = sm["spec"]["endpoints"]
    (port,) = svc["spec"]["ports"]
    assert ep["port"] == port["name"] and port["targetPort"] == 9464
    rl = ep["relabelings"]
    address = next(r for r in rl if r.get("targetLabel") == "__address__")
    assert address["sourceLabels"] == ["__meta_kubernetes_service_name", "__meta_kubernetes_namespace"]
    assert address["replacement"] == f"${{1}}.svc:{port['port']}"
    assert any(r.get("targetLabel") == "instance" and "sourceLabels" not in r for r in rl)
    drop = next(r for r in rl if r.get("action") == "labeldrop")
    assert set(drop["regex"].split("|")) >= {"pod", "container"}


@pytest.mark.parametrize("path", RULES, ids=lambda p: p.name)
def test_rules_never_pad_with_constants(path: Path) -> None:
    """`or vector(0)` turns a missing series into a healthy-looking zero."""
    text = path.read_text()
    assert "vector(0)" not in text.replace(" ", "")
