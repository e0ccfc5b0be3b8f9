"""Usage rows to text, one page at a time (CSV, a JSON array, or JSON lines), so that an export of
millions of events streams from the ledger to the client without being built in memory."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ._backend import ExportFormat

__all__ = ["MEDIA_TYPES", "render_rows"]

MEDIA_TYPES: dict[str, str] = {"csv": "text/csv", "json": "application/json", "jsonl": "application/x-ndjson"}


async def render_rows(
    columns: Sequence[str], pages: AsyncIterator[list[tuple[Any, ...]]], fmt: ExportFormat
) -> AsyncIterator[str]:
    """Yield the header (CSV) or opening bracket (JSON) first, then one chunk per page."""
    first = True
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(columns)
        yield buf.getvalue()
    elif fmt == "json":
        yield "["
    async for rows in pages:
        if not rows:
            continue
        if fmt == "csv":
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(rows)
            yield buf.getvalue()
        elif fmt == "json":
            body = ",".join(json.dumps(dict(zip(columns, r, strict=True))) for r in rows)
            yield body if first else "," + body
        else:
            yield "".join(json.dumps(dict(zip(columns, r, strict=True))) + "\n" for r in rows)
        first = False
    if fmt == "json":
        yield "]"
