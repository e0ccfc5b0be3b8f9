"""Open the ledger file in this process (the CLI on a stopped gateway; tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from ._client import LedgerClient, LocalTransport
from ._config import MeteringConfig
from ._core import LedgerCore

__all__ = ["local_ledger"]


@asynccontextmanager
async def local_ledger(config: MeteringConfig) -> AsyncIterator[LedgerClient]:
    """A :class:`LedgerClient` over a ledger started here on ``config.ledger_path``.

    Raises :class:`LedgerLockedError` while another process (a running gateway's ledger actor) holds
    the file: use the admin HTTP API then.
    """
    core = LedgerCore(config)
    await core.start()
    try:
        yield LedgerClient(LocalTransport(core), max_batch_ops=config.max_batch_ops)
    finally:
        await core.close()
