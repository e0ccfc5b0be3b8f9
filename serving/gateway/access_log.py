"""The access log: one JSON line per request, written when its response has ended.

Fields (absent when not known, e.g. no pool for a request refused before dispatch):
``ts`` (unix seconds, at the end), ``request_id`` (ours), ``client_request_id`` (the caller's
``x-request-id``, as sent), ``traceparent`` (W3C, as sent; also passed to the pool's engine),
``tenant`` (the organization; never a key), ``project``, ``model``, ``kind``, ``stream``, ``pool``, ``gpu``, ``status`` (HTTP),
``error`` (the OpenAI error code), ``outcome`` (how the generation ended), ``prompt_tokens``,
``completion_tokens``, ``cached_tokens`` (of the prompt, found in the engine's prefix cache),
``credits`` (charged), ``queue_s`` (how long it waited before the engine started it: at the
gateway's fair gate plus in the pool replica's admission queue), ``ttft_s``, ``duration_s``.

Lines go to the ``tokenweir.access`` logger (so to the replica's Ray Serve log) and, when
``gateway.access_log_file`` is set, appended to that file (one writer per replica; lines are whole
writes, so replicas sharing a file do not interleave within a line).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from serving.gateway.request import Prepared

__all__ = ["AccessLog", "AccessRecord", "request_record", "valid_traceparent"]

log = logging.getLogger("tokenweir.access")

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def valid_traceparent(value: str | None) -> str | None:
    """The header if it is a well-formed W3C ``traceparent`` (else None: never logged or passed on)."""
    if value is None or len(value) != 55 or not _TRACEPARENT.match(value):
        return None
    return value


class AccessRecord(msgspec.Struct, omit_defaults=True):
    ts: float
    status: int
    request_id: str | None = None
    client_request_id: str | None = None
    traceparent: str | None = None
    tenant: str | None = None
    project: str | None = None
    model: str | None = None
    kind: str | None = None
    stream: bool | None = None
    pool: str | None = None
    gpu: str | None = None
    error: str | None = None
    outcome: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    credits: float | None = None
    queue_s: float | None = None
    ttft_s: float | None = None
    duration_s: float | None = None


def request_record(
    p: Prepared, ts: float, status: int, error: str | None, kind: str, duration_s: float, metered: bool
) -> AccessRecord:
    """The line of a request that got as far as being prepared (``metered``: its reservation names
    the organization and project)."""
    rec = AccessRecord(ts=ts, status=status, error=error, kind=kind, duration_s=round(duration_s, 6))
    rec.request_id, rec.client_request_id, rec.traceparent = p.request_id, p.client_request_id, p.traceparent
    rec.model, rec.stream = p.entry.name, p.stream
    if p.reservation is not None and metered:
        rec.tenant = p.reservation.tenant_id
        rec.project = p.reservation.project_id
    o = p.outcome
    if o is not None:
        rec.pool, rec.gpu, rec.outcome = o.pool or None, o.accelerator or None, o.status
        rec.prompt_tokens, rec.completion_tokens = o.prompt_tokens, o.completion_tokens
        rec.cached_tokens = o.cached_tokens
        rec.queue_s = None if o.queue_s is None else round(o.queue_s, 6)
        rec.ttft_s = None if o.ttft_s is None else round(o.ttft_s, 6)
        rec.error = rec.error or o.error
    if p.charged_ucredits is not None:
        rec.credits = p.charged_ucredits / 1e6
    return rec


_ENCODER = msgspec.json.Encoder()


class AccessLog:
    """Where a replica's access lines go. ``enabled=False`` writes nothing."""

    def __init__(self, enabled: bool = True, file: str | None = None) -> None:
        self.enabled = enabled
        self._fd: int | None = None
        if enabled and file:
            path = Path(file).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(self, record: AccessRecord) -> None:
        if not self.enabled:
            return
        line = _ENCODER.encode(record)
        if log.isEnabledFor(logging.INFO):
            log.info(line.decode())
        if self._fd is not None:
            os.write(self._fd, line + b"\n")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
