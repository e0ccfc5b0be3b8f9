"""No secret in any log: after the whole integration session (this module runs last but one), the
logs of every Ray process of the session (gateway and pool replicas, the ledger actor, Serve's
controller, the workers' stdout/stderr) hold neither the admin key nor any API key, not even the
malformed or unknown ones that the tests sent."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

_KEY_SHAPED = re.compile(rb"tw-[A-Za-z0-9_-]{20,}")
"""Tokenweir API keys are ``tw-`` and 43 url-safe characters (``serving/tenancy/_keys.py``)."""


def _session_logs() -> list[Path]:
    """The running session's log files (the test session started Ray with its default temp dir)."""
    logs = (Path("/tmp/ray/session_latest") / "logs").resolve()
    return [p for p in logs.rglob("*") if p.is_file()]


def test_no_key_appears_in_any_log(live: dict) -> None:
    logs = _session_logs()
    assert logs, "no Ray session logs found"
    logs.append(Path(live["state_dir"]) / "access.log")  # the gateway's access log file
    secrets = [live["admin_key"].encode(), live["api_key"].encode()]
    leaks = []
    for path in logs:
        data = path.read_bytes()
        if any(s in data for s in secrets) or _KEY_SHAPED.search(data):
            m = _KEY_SHAPED.search(data)
            leaks.append(f"{path}: {m.group(0)[:12]!r}..." if m else str(path))
    assert not leaks, leaks
