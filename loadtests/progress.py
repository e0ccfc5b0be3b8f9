"""Live progress while a run goes: a rich table on stderr, refreshed a few times per second."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from rich.console import Console
from rich.live import Live
from rich.table import Table

from loadtests.client import LiveStats

__all__ = ["live_progress"]

_REFRESH_S = 0.5


def _table(title: str, live: LiveStats, now: float, duration_s: float, last: tuple[float, int, int]) -> Table:
    elapsed = max(0.0, now - live.started_at)
    t_prev, fin_prev, tok_prev = last
    dt = max(1e-9, now - t_prev)
    table = Table(title=title, show_header=False, expand=False)
    table.add_row("elapsed", f"{min(elapsed, duration_s):6.1f} / {duration_s:.0f} s")
    table.add_row("sent / finished / failed", f"{live.sent} / {live.finished} / {live.failed}")
    table.add_row("in flight", str(live.in_flight))
    table.add_row("finished/s (recent)", f"{(live.finished - fin_prev) / dt:7.1f}")
    table.add_row("output tokens/s (recent)", f"{(live.output_tokens - tok_prev) / dt:7.1f}")
    late = f"{live.max_lateness_s * 1e3:.1f} ms max, {live.late_over_10ms} sends > 10 ms late"
    table.add_row("send lateness", late if live.late_over_10ms == 0 else f"[yellow]{late}[/yellow]")
    return table


@contextlib.asynccontextmanager
async def live_progress(title: str, live: LiveStats, duration_s: float, enabled: bool) -> AsyncIterator[None]:
    """Show ``live`` while the body runs (no-op when not ``enabled``)."""
    if not enabled:
        yield
        return
    console = Console(stderr=True)
    stop = asyncio.Event()

    async def refresh(view: Live) -> None:
        last = (time.perf_counter(), 0, 0)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), _REFRESH_S)
            now = time.perf_counter()
            view.update(_table(title, live, now, duration_s, last), refresh=True)
            last = (now, live.finished, live.output_tokens)

    with Live(_table(title, live, time.perf_counter(), duration_s, (time.perf_counter(), 0, 0)), console=console,
              auto_refresh=False, transient=False) as view:  # fmt: skip
        task = asyncio.create_task(refresh(view))
        try:
            yield
        finally:
            stop.set()
            await task
            view.refresh()
