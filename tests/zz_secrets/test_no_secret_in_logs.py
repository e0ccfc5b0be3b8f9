"""No secret in any log: after every other test of the session (this directory sorts last), the
logs of every Ray session the test session started (its tiers each start their own: the fuzz tier,
the integration tier's shared deployment, the overload and flood tiers, the ledger's own-Ray unit
tests), that is gateway and pool replicas, ledger actors, Serve's controllers and the workers'
stdout/stderr, and the live gateway's access log, hold neither an admin key nor any API key, not
even the malformed or unknown ones that the tests and the fuzzer sent.

The multi-node and PostgreSQL tiers are sessions of their own (``deploy/check.sh``) and are not
read here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loadtests.overload import ADMIN_KEY as OVERLOAD_ADMIN_KEY
from tests.conftest import SESSION_STARTED_AT
from tests.fuzz.test_fuzz_gateway import ADMIN_KEY as FUZZ_ADMIN_KEY
from tests.fuzz.test_fuzz_gateway import API_ADMIN_KEY as FUZZ_API_ADMIN_KEY

pytestmark = pytest.mark.integration

_KEY_SHAPED = re.compile(rb"tw-[A-Za-z0-9_-]{20,}")
"""Tokenweir API keys are ``tw-`` and 43 url-safe characters (``serving/tenancy/_keys.py``)."""

_RAY_TEMP = Path("/tmp/ray")
"""Where the test session's Ray instances keep their sessions (Ray's default temp dir)."""


def _session_logs() -> list[Path]:
    """The log files of every Ray session started since this pytest session began."""
    sessions = [
        d
        for d in _RAY_TEMP.glob("session_2*")
        if d.is_dir() and not d.is_symlink() and d.stat().st_ctime >= SESSION_STARTED_AT - 1.0
    ]
    return [p for d in sessions for p in (d / "logs").rglob("*") if p.is_file()]


def test_no_key_appears_in_any_log(live: dict) -> None:
    logs = _session_logs()
    assert logs, "no Ray session logs found"
    logs.append(Path(live["state_dir"]) / "access.log")  # the gateway's access log file
    secrets = [
        s.encode()
        for s in (live["admin_key"], live["api_key"], OVERLOAD_ADMIN_KEY, FUZZ_ADMIN_KEY, FUZZ_API_ADMIN_KEY)
    ]
    leaks = []
    for path in logs:
        data = path.read_bytes()
        hit = next((s for s in secrets if s in data), None) or (
            m.group(0) if (m := _KEY_SHAPED.search(data)) else None
        )
        if hit is not None:
            leaks.append(f"{path}: {hit[:12]!r}...")
    print(f"secrets: {len(logs)} log files of this session's Ray sessions read, {len(leaks)} with a key")
    assert not leaks, leaks
