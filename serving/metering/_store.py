"""The ledger's SQLite file: versioned schema, loading, group commits and reads.

One connection writes (owned by the ledger's commit thread); a second, read-only one serves
exports and usage queries. WAL journal with ``synchronous=FULL``: a commit returns only after the
WAL is fsynced, so every acknowledged operation survives ``kill -9`` and power loss.

What one commit writes is a :class:`WriteBatch`, coalesced in memory first: the ledger applies each
operation to its state at once and records the resulting row changes there. A reservation opened
and settled within the same batch never touches the ``reservations`` table; balances are written
once per tenant per batch with their final value.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

__all__ = ["SCHEMA_VERSION", "LedgerStore", "WriteBatch"]

# Versioned migrations: index i upgrades user_version i -> i + 1. Append, never edit.
_MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE tenants (
            tenant_id TEXT PRIMARY KEY, name TEXT NOT NULL, weight REAL NOT NULL,
            allowed_models TEXT, balance_ucredits INTEGER NOT NULL, limits TEXT NOT NULL,
            created_at REAL NOT NULL, updated_at REAL NOT NULL)""",
        """CREATE TABLE api_keys (
            key_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id),
            key_hash TEXT NOT NULL UNIQUE, display_prefix TEXT NOT NULL, name TEXT NOT NULL,
            created_at REAL NOT NULL, revoked_at REAL)""",
        """CREATE TABLE credit_grants (
            grant_id INTEGER PRIMARY KEY, tenant_id TEXT NOT NULL, ucredits INTEGER NOT NULL,
            note TEXT NOT NULL, granted_at REAL NOT NULL)""",
        """CREATE TABLE reservations (
            request_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, key_id TEXT NOT NULL,
            model TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, max_tokens INTEGER NOT NULL,
            reserved_ucredits INTEGER NOT NULL, reserved_tokens INTEGER NOT NULL,
            created_at REAL NOT NULL, expires_at REAL NOT NULL, progress_tokens INTEGER)""",
        """CREATE TABLE usage_events (
            event_id INTEGER PRIMARY KEY, request_id TEXT NOT NULL UNIQUE, tenant_id TEXT NOT NULL,
            key_id TEXT NOT NULL, model TEXT NOT NULL, pool TEXT NOT NULL, gpu_type TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
            prompt_ucredits INTEGER NOT NULL, completion_ucredits INTEGER NOT NULL,
            ucredits INTEGER NOT NULL, reserved_at REAL NOT NULL, settled_at REAL NOT NULL,
            outcome TEXT NOT NULL)""",
        "CREATE INDEX usage_events_tenant_time ON usage_events(tenant_id, settled_at)",
        "CREATE INDEX usage_events_time ON usage_events(settled_at)",
    ],
]
SCHEMA_VERSION = len(_MIGRATIONS)

_INSERT_RES = "INSERT INTO reservations VALUES (?,?,?,?,?,?,?,?,?,?,NULL)"
_PROGRESS = "UPDATE reservations SET progress_tokens = ? WHERE request_id = ?"
_DELETE_RES = "DELETE FROM reservations WHERE request_id = ?"
_INSERT_EVENT = (
    "INSERT INTO usage_events (request_id, tenant_id, key_id, model, pool, gpu_type, prompt_tokens,"
    " completion_tokens, prompt_ucredits, completion_ucredits, ucredits, reserved_at, settled_at, outcome)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_BALANCE = "UPDATE tenants SET balance_ucredits = ? WHERE tenant_id = ?"
EXPORT_COLUMNS = (
    "request_id", "tenant_id", "key_id", "model", "pool", "gpu_type", "prompt_tokens",
    "completion_tokens", "prompt_ucredits", "completion_ucredits", "ucredits", "reserved_at",
    "settled_at", "outcome",
)  # fmt: skip


def _connect(path: Path, readonly: bool, busy_timeout_ms: int) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
    return conn


def _private(path: Path) -> None:
    """Create the ledger file readable by its owner only (it holds every tenant's key hashes and
    balances), or tighten an existing one: SQLite creates its WAL and shm files with this mode."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


ReservationRow = tuple[str, str, str, str, int, int, int, int, float, float]
"""request_id, tenant_id, key_id, model, prompt_tokens, max_tokens, reserved_ucredits,
reserved_tokens, created_at, expires_at."""

EventRow = tuple[str, str, str, str, str, str, int, int, int, int, int, float, float, str]
"""request_id, tenant_id, key_id, model, pool, gpu_type, prompt_tokens, completion_tokens,
prompt_ucredits, completion_ucredits, ucredits, reserved_at, settled_at, outcome."""


class WriteBatch:
    """Row changes pending for the next commit, in an order that replays correctly."""

    __slots__ = ("balances", "deletes", "events", "inserts", "num_ops", "progress", "statements")

    def __init__(self) -> None:
        self.statements: list[tuple[str, tuple[Any, ...]]] = []
        """Admin statements, executed first and in order."""
        self.inserts: dict[str, ReservationRow] = {}
        self.progress: dict[str, int] = {}
        self.deletes: set[str] = set()
        self.events: list[EventRow] = []
        self.balances: dict[str, int] = {}
        self.num_ops = 0

    def __bool__(self) -> bool:
        return bool(
            self.statements or self.inserts or self.progress or self.deletes or self.events or self.balances
        )

    def open_reservation(self, row: ReservationRow) -> None:
        self.inserts[row[0]] = row

    def record_progress(self, request_id: str, completion_tokens: int) -> None:
        self.progress[request_id] = completion_tokens

    def close_reservation(
        self, request_id: str, event: EventRow, tenant_id: str, balance_ucredits: int
    ) -> None:
        self.progress.pop(request_id, None)
        if self.inserts.pop(request_id, None) is None:
            self.deletes.add(request_id)
        self.events.append(event)
        self.balances[tenant_id] = balance_ucredits

    def set_balance(self, tenant_id: str, balance_ucredits: int) -> None:
        self.balances[tenant_id] = balance_ucredits


class LedgerStore:
    """SQLite persistence. Call :meth:`commit` from one thread at a time; reads from another."""

    def __init__(self, path: Path | str, *, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _private(self.path)
        self._w = _connect(self.path, readonly=False, busy_timeout_ms=busy_timeout_ms)
        self._migrate()
        for suffix in ("-wal", "-shm"):  # SQLite gives them the file's mode; older files: tighten
            if (side := Path(f"{self.path}{suffix}")).exists():
                side.chmod(0o600)
        self._r = _connect(self.path, readonly=True, busy_timeout_ms=busy_timeout_ms)

    def _migrate(self) -> None:
        version = self._w.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"ledger file {self.path} has schema {version}, newer than {SCHEMA_VERSION}")
        for target in range(version, SCHEMA_VERSION):
            self._w.execute("BEGIN IMMEDIATE")
            try:
                for sql in _MIGRATIONS[target]:
                    self._w.execute(sql)
                self._w.execute(f"PRAGMA user_version = {target + 1}")
                self._w.execute("COMMIT")
            except BaseException:
                self._w.execute("ROLLBACK")
                raise

    def schema_version(self) -> int:
        return int(self._w.execute("PRAGMA user_version").fetchone()[0])

    def close(self) -> None:
        self._r.close()
        self._w.close()

    # -- loading ---------------------------------------------------------------------------------
    def load(self) -> tuple[list[sqlite3.Row], list[sqlite3.Row], list[sqlite3.Row]]:
        """Tenants, keys and open reservations, as rows."""
        self._w.row_factory = sqlite3.Row
        try:
            tenants = self._w.execute(
                "SELECT t.*, (SELECT coalesce(sum(ucredits), 0) FROM credit_grants g"
                " WHERE g.tenant_id = t.tenant_id) AS granted_ucredits FROM tenants t"
            ).fetchall()
            keys = self._w.execute("SELECT * FROM api_keys").fetchall()
            res = self._w.execute("SELECT * FROM reservations").fetchall()
        finally:
            self._w.row_factory = None
        return tenants, keys, res

    # -- writing ---------------------------------------------------------------------------------
    def commit(self, batch: WriteBatch) -> None:
        """Apply one batch in one transaction (one fsync)."""
        w = self._w
        w.execute("BEGIN IMMEDIATE")
        try:
            for sql, params in batch.statements:
                w.execute(sql, params)
            if batch.inserts:
                w.executemany(_INSERT_RES, batch.inserts.values())
            if batch.progress:
                w.executemany(_PROGRESS, ((v, k) for k, v in batch.progress.items()))
            if batch.deletes:
                w.executemany(_DELETE_RES, ((r,) for r in batch.deletes))
            if batch.events:
                w.executemany(_INSERT_EVENT, batch.events)
            if batch.balances:
                w.executemany(_BALANCE, ((v, k) for k, v in batch.balances.items()))
            w.execute("COMMIT")
        except BaseException:
            w.execute("ROLLBACK")
            raise

    def recent_settled(self, limit: int) -> list[tuple[str, int]]:
        """The ``limit`` most recent settlements as ``(request_id, ucredits)``, oldest first (the
        ledger keeps them in memory so a replayed request id is known after a restart)."""
        rows = self._w.execute(
            "SELECT request_id, ucredits FROM usage_events ORDER BY event_id DESC LIMIT ?", (limit,)
        ).fetchall()
        return [(r, int(u)) for r, u in reversed(rows)]

    # -- reading (read-only connection) ----------------------------------------------------------
    def settled_charge(self, request_id: str) -> int | None:
        row = self._r.execute(
            "SELECT ucredits FROM usage_events WHERE request_id = ?", (request_id,)
        ).fetchone()
        return None if row is None else int(row[0])

    def usage_by_day(self, tenant_id: str, since_ts: float | None) -> list[tuple[Any, ...]]:
        return self._r.execute(
            "SELECT date(settled_at, 'unixepoch') AS day, model, count(*), sum(prompt_tokens),"
            " sum(completion_tokens), sum(ucredits) FROM usage_events"
            " WHERE tenant_id = ? AND settled_at >= ? GROUP BY day, model ORDER BY day, model",
            (tenant_id, since_ts if since_ts is not None else 0.0),
        ).fetchall()

    def export(
        self, tenant_id: str | None, since_ts: float | None, until_ts: float | None
    ) -> list[tuple[Any, ...]]:
        sql = f"SELECT {', '.join(EXPORT_COLUMNS)} FROM usage_events WHERE settled_at >= ? AND settled_at < ?"
        params: list[Any] = [
            since_ts if since_ts is not None else 0.0,
            until_ts if until_ts is not None else 1e18,
        ]
        if tenant_id is not None:
            sql += " AND tenant_id = ?"
            params.append(tenant_id)
        return self._r.execute(sql + " ORDER BY event_id", params).fetchall()

    def audit(self) -> list[str]:
        """Invariant violations (empty when consistent): for every tenant,
        ``balance == sum(grants) - sum(charges)`` and ``balance >= 0``."""
        problems: list[str] = []
        rows = self._r.execute(
            "SELECT t.tenant_id, t.balance_ucredits,"
            " (SELECT coalesce(sum(ucredits), 0) FROM credit_grants g WHERE g.tenant_id = t.tenant_id),"
            " (SELECT coalesce(sum(ucredits), 0) FROM usage_events e WHERE e.tenant_id = t.tenant_id)"
            " FROM tenants t"
        ).fetchall()
        for tenant_id, balance, granted, charged in rows:
            if balance != granted - charged:
                problems.append(f"{tenant_id}: balance {balance} != granted {granted} - charged {charged}")
            if balance < 0:
                problems.append(f"{tenant_id}: negative balance {balance}")
        return problems


def dumps_models(models: list[str] | None) -> str | None:
    return None if models is None else json.dumps(sorted(models))
