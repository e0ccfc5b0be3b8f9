"""The ``tokenweir`` command line: help of every command, the plan table, a tenancy round trip on a
real ledger file (no gateway running: the CLI opens the file itself), exit codes, and ``load``
without the harness installed."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.cli import _main
from serving.cli import main as tokenweir

REPO = Path(__file__).resolve().parents[2]

COMMANDS = [
    [],
    ["serve"],
    ["status"],
    ["plan"],
    ["models"],
    ["models", "build-tiny"],
    ["tenants"],
    ["tenants", "create"],
    ["tenants", "list"],
    ["tenants", "show"],
    ["tenants", "update"],
    ["tenants", "top-up"],
    ["keys"],
    ["keys", "create"],
    ["keys", "list"],
    ["keys", "revoke"],
    ["usage"],
    ["usage", "export"],
    ["ledger"],
    ["ledger", "migrate-to-postgres"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "tokenweir")
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert tokenweir([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"Usage: tokenweir {' '.join(command)}".rstrip() in " ".join(out.split())
    assert "--help" in out


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert tokenweir(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("serve", "status", "plan", "models", "tenants", "keys", "usage", "load"):
        assert f" {name} " in out, name


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert tokenweir([]) == 2
    assert tokenweir(["no-such-command"]) == 2
    assert tokenweir(["usage", "export", "--format", "xml"]) == 2
    assert tokenweir(["plan", "--config", "/nonexistent.yaml"]) == 2
    assert "config file not found: /nonexistent.yaml" in capsys.readouterr().err


def test_plan_prints_a_row_per_gpu_pool(capsys: pytest.CaptureFixture[str]) -> None:
    assert tokenweir(["plan", "--config", str(REPO / "deploy" / "sim-fleet.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == list(_main.PLAN_COLUMNS)
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.strip()}
    assert set(rows) == {"h20", "h100", "l20", "a10"}
    assert rows["h100"][1] == "H100" and rows["h100"][4].startswith("0.")


def test_plan_exits_1_when_a_pool_cannot_be_planned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = yaml.safe_load((REPO / "deploy" / "sim-fleet.yaml").read_text())
    cfg["pools"] = cfg["pools"][:1]
    cfg["pools"][0]["slo"] = {"ttft_ms": 1, "tpot_ms": 1}  # no GPU meets a 1 ms step
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert tokenweir(["plan", "--config", str(path)]) == 1
    assert f"{cfg['pools'][0]['name']}: cannot plan:" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ledger_config(tmp_path: Path) -> list[str]:
    """A config whose gateway is not running (a closed port) and whose ledger is a fresh file."""
    cfg = yaml.safe_load((REPO / "deploy" / "local.yaml").read_text())
    cfg["gateway"]["port"] = _free_port()
    cfg["state_dir"] = str(tmp_path / "state")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["--config", str(path)]


def _json(capsys: pytest.CaptureFixture[str]) -> Any:
    return json.loads(capsys.readouterr().out)


def test_tenancy_round_trip_on_the_ledger_file(
    ledger_config: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = ledger_config
    assert (
        tokenweir(["tenants", "create", "Acme", "--id", "acme", "--credits", "1000", "--rpm", "600", *c]) == 0
    )
    created = _json(capsys)
    assert created["tenant_id"] == "acme" and created["credits"] == 1000
    assert created["limits"]["rpm"] == 600
    assert tokenweir(["tenants", "top-up", "acme", "50", "--note", "inv-1", *c]) == 0
    assert _json(capsys)["credits"] == 1050
    assert tokenweir(["tenants", "update", "acme", "--tpm", "9000", "--models", "tiny-llama", *c]) == 0
    updated = _json(capsys)
    assert updated["limits"]["tpm"] == 9000 and updated["allowed_models"] == ["tiny-llama"]
    assert tokenweir(["tenants", "list", *c]) == 0
    assert [t["tenant_id"] for t in _json(capsys)["data"]] == ["acme"]

    assert tokenweir(["keys", "create", "acme", "--name", "ci", *c]) == 0
    out, err = capsys.readouterr()
    key = json.loads(out)
    assert f"API key (shown once): {key['api_key']}" in err
    assert tokenweir(["keys", "create", "acme", "--key-only", *c]) == 0
    bare = capsys.readouterr().out.strip()
    assert bare.startswith("tw-") and bare != key["api_key"]
    assert tokenweir(["keys", "list", "acme", *c]) == 0
    assert len(_json(capsys)["data"]) == 2
    assert tokenweir(["keys", "revoke", key["key_id"], *c]) == 0
    assert _json(capsys)["key_id"] == key["key_id"]

    out_file = tmp_path / "usage.json"
    assert (
        tokenweir(["usage", "export", "--tenant", "acme", "--format", "json", "--out", str(out_file), *c])
        == 0
    )
    assert f"wrote {out_file}" in capsys.readouterr().err
    assert isinstance(json.loads(out_file.read_text()), list | dict)

    assert tokenweir(["tenants", "show", "nobody", *c]) == 1  # refused by the ledger
    assert "nobody" in capsys.readouterr().err
    assert tokenweir(["tenants", "create", "Bad", "--weight", "0", *c]) == 2  # invalid input
    assert "weight" in capsys.readouterr().err


def test_projects_grants_and_reports_from_the_command_line(
    ledger_config: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = ledger_config
    assert tokenweir(["tenants", "create", "Uni", "--id", "uni", *c]) == 0
    capsys.readouterr()
    cmd = [
        "projects",
        "create",
        "uni",
        "alice",
        "--credit-cap",
        "50",
        "--cap-period",
        "monthly",
        "--rpm",
        "60",
    ]
    assert tokenweir([*cmd, "--weight", "3", *c]) == 0
    p = _json(capsys)
    assert (p["credit_cap"], p["cap_period"], p["weight"], p["limits"]["rpm"]) == (50, "monthly", 3, 60)
    cmd = [
        "grants",
        "create",
        "uni",
        "lab-2026",
        "200",
        "--program",
        "innovation-lab",
        "--expires",
        "2099-12-31",
    ]
    assert tokenweir([*cmd, *c]) == 0
    g = _json(capsys)
    assert g["program"] == "innovation-lab" and g["remaining_credits"] == 200 and g["expires_at"] > 4e9
    assert tokenweir([*cmd, *c]) == 0  # a retry of the same grant id is a no-op
    assert _json(capsys)["grant_id"] == "lab-2026"
    assert tokenweir(["grants", "list", "uni", *c]) == 0
    assert [x["grant_id"] for x in _json(capsys)] == ["lab-2026"]
    assert tokenweir(["keys", "create", "uni", "--project", "alice", *c]) == 0
    k = json.loads(capsys.readouterr().out)
    assert k["project_id"] == "alice" and k["role"] == "member"
    assert tokenweir(["keys", "create", "uni", "--org-admin", *c]) == 0
    assert json.loads(capsys.readouterr().out)["role"] == "admin"
    assert tokenweir(["keys", "list", "uni", "--project", "alice", *c]) == 0
    assert [x["key_id"] for x in _json(capsys)["data"]] == [k["key_id"]]
    assert tokenweir(["projects", "update", "uni", "alice", "--no-cap", *c]) == 0
    assert _json(capsys)["credit_cap"] is None
    assert tokenweir(["projects", "list", "uni", "--limit", "1", *c]) == 0
    page = _json(capsys)
    assert page["has_more"] and [x["project_id"] for x in page["data"]] == ["alice"]
    assert tokenweir(["usage", "report", "--group-by", "tenant_id,model", *c]) == 0
    assert capsys.readouterr().out.startswith("tenant_id,model,requests")
    assert tokenweir(["tenants", "figures", "uni", *c]) == 0
    assert _json(capsys)["tenant"]["credits"] == 200


def test_load_without_the_harness_says_how_to_get_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(_main, "entry_points", lambda **_: [])
    assert tokenweir(["load", "run", "smoke"]) == 2
    assert "pip install" in capsys.readouterr().err

    class Broken:
        def load(self) -> Any:
            raise ModuleNotFoundError("No module named 'aiohttp'")

    monkeypatch.setattr(_main, "entry_points", lambda **_: [Broken()])
    assert tokenweir(["load", "list"]) == 2
    err = capsys.readouterr().err
    assert "aiohttp" in err and "tokenweir[load]" in err


def test_load_passes_its_arguments_to_the_harness(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    class Plugin:
        def load(self) -> Any:
            return lambda argv, prog_name: seen.append((argv, prog_name)) or 7

    monkeypatch.setattr(_main, "entry_points", lambda **_: [Plugin()])
    assert tokenweir(["load", "run", "smoke", "--set", "seed=3", "--help"]) == 7
    assert seen == [(["run", "smoke", "--set", "seed=3", "--help"], "tokenweir load")]
