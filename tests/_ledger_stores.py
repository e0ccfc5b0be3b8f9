"""The ledger's two stores under test: a SQLite file in the test's directory, or a fresh database on
a real PostgreSQL server that the test session starts itself (:class:`PostgresServer`, from
loadtests/pg_server.py: Debian's ``postgresql``, installed by ``deploy/setup.sh``; never a server
that happens to run on the machine)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from loadtests.pg_server import PostgresServer, postgres_bindir
from serving.metering import MeteringConfig

__all__ = ["LedgerTarget", "PostgresServer", "postgres_bindir"]


def _plain(v: Any) -> Any:
    """PostgreSQL's sums are numerics: compare them as SQLite's integers."""
    if isinstance(v, Decimal) and v == v.to_integral_value():
        return int(v)
    return v


@dataclass
class LedgerTarget:
    """One store a ledger test runs on: its config, and raw SQL against it (``?`` placeholders)."""

    kind: str
    """``sqlite`` or ``postgres``."""
    state_dir: Path
    dsn: str | None = None

    def config(self, **kw: Any) -> MeteringConfig:
        if self.kind == "postgres":
            kw = {"store": "postgres", "postgres_dsn": self.dsn, **kw}
        return MeteringConfig(state_dir=self.state_dir, **kw)

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        if self.kind == "sqlite":
            with sqlite3.connect(self.state_dir / "ledger.sqlite3") as db:
                return db.execute(sql, args).fetchall()
        import psycopg

        assert self.dsn is not None
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = conn.execute(sql.replace("?", "%s"), args).fetchall()  # type: ignore[arg-type]
        return [tuple(_plain(v) for v in row) for row in rows]

    def execute(self, sql: str) -> None:
        """One statement with no result, committed (a test's surgery on a closed ledger)."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.state_dir / "ledger.sqlite3") as db:
                db.execute(sql)
            return
        import psycopg

        assert self.dsn is not None
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def schema_version(self) -> int:
        if self.kind == "sqlite":
            return int(self.rows("PRAGMA user_version")[0][0])
        return int(self.rows("SELECT schema_version FROM ledger_meta")[0][0])
