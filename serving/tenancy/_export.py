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
    """Yield the header (CSV) or opening bracket (JSON) with the first page, then one chunk per
    page. The first page is read before anything is yielded, so a refusal (an unknown tenant, a bad
    filter) is raised before a response has started and can still be an error body."""
    it = aiter(pages)
    first_page = await anext(it, None)
    head = ""
    if fmt == "csv":
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(columns)
        head = buf.getvalue()
    elif fmt == "json":
        head = "["
    first = True

    async def all_pages() -> AsyncIterator[list[tuple[Any, ...]]]:
        if first_page is not None:
            yield first_page
        async for rows in it:
            yield rows

    async for rows in all_pages():
        if not rows:
            continue
        if fmt == "csv":
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(rows)
            chunk = buf.getvalue()
        elif fmt == "json":
            body = ",".join(json.dumps(dict(zip(columns, r, strict=True))) for r in rows)
            chunk = body if first else "," + body
        else:
            chunk = "".join(json.dumps(dict(zip(columns, r, strict=True))) + "\n" for r in rows)
        first = False
        yield head + chunk
        head = ""
    if fmt == "json":
        yield head + "]"
    elif head:
        yield head
