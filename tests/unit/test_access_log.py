"""The access log's line format and the traceparent filter (the live path is in
tests/integration/test_openai_api.py)."""

from __future__ import annotations

import json
import stat
from pathlib import Path

from serving.gateway.access_log import AccessLog, AccessRecord, valid_traceparent


def test_traceparent_only_when_well_formed() -> None:
    good = "00-" + "0af7651916cd43dd8448eb211c80319c" + "-" + "b7ad6b7169203331" + "-01"
    assert valid_traceparent(good) == good
    for bad in (None, "", good.upper(), good + "x", "00-xyz", good.replace("-", "_"), "\n" + good[1:]):
        assert valid_traceparent(bad) is None


def test_one_json_line_per_record_without_unknown_fields(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "access.log"
    log = AccessLog(True, str(path))
    log.write(AccessRecord(ts=1.5, status=401, error="invalid_api_key", kind="chat"))
    log.write(
        AccessRecord(
            ts=2.0, status=200, request_id="r", model="m", prompt_tokens=3, completion_tokens=4, credits=7.0
        )
    )
    log.close()
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines == [
        {"ts": 1.5, "status": 401, "kind": "chat", "error": "invalid_api_key"},
        {
            "ts": 2.0,
            "status": 200,
            "request_id": "r",
            "model": "m",
            "prompt_tokens": 3,
            "completion_tokens": 4,
            "credits": 7.0,
        },
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    off = AccessLog(False, str(tmp_path / "never.log"))
    off.write(AccessRecord(ts=0.0, status=200))
    assert not (tmp_path / "never.log").exists()
