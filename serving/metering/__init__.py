"""Token metering and hard quotas on a durable, single-writer ledger.

A gateway gets its ledger client with :func:`connect` (or opens the file here with
:func:`local_ledger`) and meters every request through :class:`Meter`. Read :mod:`._core` for the
group commit and the crash rule, :mod:`._ops` for the typed operations, :mod:`._state` for
enforcement, :mod:`._policy` for the pure arithmetic, :mod:`._budget` for a request's ``max_tokens``,
:mod:`._storage` for the two stores (:mod:`._store`, SQLite; :mod:`._pg_store`, PostgreSQL).
"""

from pathlib import Path

from ._actor import LedgerHome, ledger_home
from ._budget import TokenBudget
from ._client import LedgerClient, connect, local_ledger
from ._config import HEAD_NODE_RESOURCE, MeteringConfig, PriceConfig
from ._meter import Meter
from ._ops import Refusal, Reservation, Settlement
from ._storage import LedgerFencedError, LedgerLockedError, MigrationRefusedError, MigrationReport

__all__ = [
    "HEAD_NODE_RESOURCE",
    "LedgerClient",
    "LedgerFencedError",
    "LedgerHome",
    "LedgerLockedError",
    "Meter",
    "MeteringConfig",
    "MigrationRefusedError",
    "MigrationReport",
    "PriceConfig",
    "Refusal",
    "Reservation",
    "Settlement",
    "TokenBudget",
    "connect",
    "ledger_home",
    "local_ledger",
    "migrate_to_postgres",
]


def migrate_to_postgres(path: Path | str, dsn: str) -> MigrationReport:
    """Copy the SQLite ledger file at ``path`` (migrated to the current schema first) into the empty
    PostgreSQL database ``dsn`` in one transaction, verified by row counts and the audit on both
    sides before it commits (``tokenweir ledger migrate-to-postgres``). Raises
    :class:`MigrationRefusedError` or :class:`LedgerLockedError`, having written nothing."""
    from ._pg_store import copy_sqlite_to_postgres  # psycopg only for those who use it

    return copy_sqlite_to_postgres(path, dsn)
