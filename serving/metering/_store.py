"""The ledger's SQLite file (the embedded store): versioned schema, loading, group commits, reads.

One connection writes (owned by the ledger's commit thread); a second, read-only one serves
exports and usage queries. WAL journal with ``synchronous=FULL``: a commit returns only after the
WAL is fsynced, so every acknowledged operation survives ``kill -9`` and power loss. One process
at a time: opening the store takes an exclusive lock on ``<file>.lock``.

What one commit writes is a :class:`~._storage.WriteBatch` (see :mod:`._storage` for the interface
both stores implement).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._storage import (
    AUDIT_GRANTS_SQL,
    AUDIT_TENANTS_SQL,
    GRANT_EVENT_COLUMNS,
    INSERT_EVENT_COLUMNS,
    INSERT_RES_COLUMNS,
    SCHEMA_VERSION,
    LedgerLockedError,
    LoadedRows,
    WriteBatch,
    audit_problems,
    export_query,
    render_row_op,
    report_query,
    reservation_row,
    usage_by_day_query,
)

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

Migration = list[str | Callable[[sqlite3.Connection], None]]
"""A schema step: SQL statements and functions of the connection, run in order in one transaction."""


def _v2_grants_from_credit_grants(db: sqlite3.Connection) -> None:
    """Schema-1 grants never expire and carry no id: each becomes a grant of program ``migrated``
    whose remainder is what is left after charging the tenant's usage to its grants oldest first,
    so that every tenant's ``sum(remaining) == balance``."""
    tenants = db.execute("SELECT tenant_id, balance_ucredits FROM tenants").fetchall()
    for tenant_id, balance in tenants:
        grants = db.execute(
            "SELECT grant_id, ucredits, note, granted_at FROM credit_grants WHERE tenant_id = ? ORDER BY grant_id",
            (tenant_id,),
        ).fetchall()
        used = sum(g[1] for g in grants) - balance
        for n, (_, ucredits, note, granted_at) in enumerate(grants):
            take = min(ucredits, max(0, used))
            used -= take
            db.execute(
                "INSERT INTO grants (tenant_id, grant_id, program, ucredits, remaining_ucredits, starts_at,"
                " expires_at, note, granted_at) VALUES (?,?,?,?,?,?,NULL,?,?)",
                (
                    tenant_id,
                    f"migrated-{n + 1}",
                    "migrated",
                    ucredits,
                    ucredits - take,
                    granted_at,
                    note,
                    granted_at,
                ),
            )


# Versioned migrations: index i upgrades user_version i -> i + 1. Append, never edit.
_MIGRATIONS: list[Migration] = [
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
    # 2: organizations (the tenants) and their projects; credit grants with programs and expiry;
    # org admin keys; the daily usage roll-up. Every tenant gets a project "default" holding its keys.
    [
        """CREATE TABLE projects (
            tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id), project_id TEXT NOT NULL,
            name TEXT NOT NULL, weight REAL NOT NULL, allowed_models TEXT, limits TEXT NOT NULL,
            cap_ucredits INTEGER, cap_period TEXT NOT NULL, spent_ucredits INTEGER NOT NULL,
            period_start REAL NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
            PRIMARY KEY (tenant_id, project_id))""",
        "INSERT INTO projects SELECT tenant_id, 'default', 'Default project', 1.0, NULL, '{}', NULL,"
        " 'lifetime', 0, 0.0, created_at, created_at FROM tenants",
        "ALTER TABLE api_keys ADD COLUMN project_id TEXT NOT NULL DEFAULT 'default'",
        "ALTER TABLE api_keys ADD COLUMN role TEXT NOT NULL DEFAULT 'member'",
        "CREATE INDEX api_keys_tenant ON api_keys(tenant_id, key_id)",
        "ALTER TABLE reservations ADD COLUMN project_id TEXT NOT NULL DEFAULT 'default'",
        "ALTER TABLE reservations ADD COLUMN slices TEXT",
        "ALTER TABLE usage_events ADD COLUMN project_id TEXT NOT NULL DEFAULT 'default'",
        """CREATE TABLE grants (
            tenant_id TEXT NOT NULL REFERENCES tenants(tenant_id), grant_id TEXT NOT NULL,
            program TEXT NOT NULL, ucredits INTEGER NOT NULL, remaining_ucredits INTEGER NOT NULL,
            written_off_ucredits INTEGER NOT NULL DEFAULT 0, starts_at REAL NOT NULL,
            expires_at REAL, expired_at REAL, note TEXT NOT NULL, granted_at REAL NOT NULL,
            PRIMARY KEY (tenant_id, grant_id))""",
        """CREATE TABLE grant_events (
            event_id INTEGER PRIMARY KEY, tenant_id TEXT NOT NULL, grant_id TEXT NOT NULL,
            kind TEXT NOT NULL, ucredits INTEGER NOT NULL, ts REAL NOT NULL, request_id TEXT,
            actor TEXT NOT NULL DEFAULT '')""",
        "CREATE INDEX grant_events_tenant ON grant_events(tenant_id, ts)",
        _v2_grants_from_credit_grants,
        "INSERT INTO grant_events (tenant_id, grant_id, kind, ucredits, ts, actor) SELECT tenant_id,"
        " grant_id, 'granted', ucredits, granted_at, 'migration' FROM grants",
        "DROP TABLE credit_grants",
        """CREATE TABLE usage_daily (
            day TEXT NOT NULL, tenant_id TEXT NOT NULL, project_id TEXT NOT NULL, model TEXT NOT NULL,
            requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL, ucredits INTEGER NOT NULL,
            PRIMARY KEY (tenant_id, project_id, day, model))""",
        "CREATE INDEX usage_daily_day ON usage_daily(day)",
        "INSERT INTO usage_daily SELECT date(settled_at, 'unixepoch'), tenant_id, project_id, model,"
        " count(*), sum(prompt_tokens), sum(completion_tokens), sum(ucredits) FROM usage_events"
        " GROUP BY 1, 2, 3, 4",
        "CREATE INDEX usage_events_project_time ON usage_events(tenant_id, project_id, settled_at)",
    ],
    # 3: the prompt tokens an engine found in its prefix cache (charged at the cached price); the
    # per-organization and per-project indexes follow event_id, the export's keyset order (a page is
    # a range read, not a sort of everything the organization ever used).
    [
        "ALTER TABLE usage_events ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0",
        "DROP INDEX usage_events_tenant_time",
        "DROP INDEX usage_events_project_time",
        "CREATE INDEX usage_events_tenant ON usage_events(tenant_id, event_id)",
        "CREATE INDEX usage_events_project ON usage_events(tenant_id, project_id, event_id)",
    ],
    # 4: the daily roll-up sums cached prompt tokens too; existing days get the sums of their
    # events (a day whose events retention already deleted keeps 0: the events were its only record).
    [
        "ALTER TABLE usage_daily ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0",
        "UPDATE usage_daily SET cached_tokens = e.cached_tokens FROM (SELECT date(settled_at, 'unixepoch')"
        " AS day, tenant_id, project_id, model, sum(cached_tokens) AS cached_tokens FROM usage_events"
        " GROUP BY 1, 2, 3, 4) AS e WHERE usage_daily.tenant_id = e.tenant_id"
        " AND usage_daily.project_id = e.project_id AND usage_daily.day = e.day AND usage_daily.model = e.model",
    ],
]
assert len(_MIGRATIONS) == SCHEMA_VERSION, "a schema step is missing here or in _storage.SCHEMA_VERSION"

_INSERT_RES = (
    f"INSERT INTO reservations ({', '.join(INSERT_RES_COLUMNS)})"
    f" VALUES ({','.join('?' * len(INSERT_RES_COLUMNS))})"
)
_PROGRESS = "UPDATE reservations SET progress_tokens = ? WHERE request_id = ?"
_DELETE_RES = "DELETE FROM reservations WHERE request_id = ?"
_INSERT_EVENT = (
    f"INSERT INTO usage_events ({', '.join(INSERT_EVENT_COLUMNS)})"
    f" VALUES ({','.join('?' * len(INSERT_EVENT_COLUMNS))})"
)
_BALANCE = "UPDATE tenants SET balance_ucredits = ? WHERE tenant_id = ?"
_GRANT = (
    "UPDATE grants SET remaining_ucredits = ?, written_off_ucredits = ?, expired_at = ?"
    " WHERE tenant_id = ? AND grant_id = ?"
)
_GRANT_EVENT = f"INSERT INTO grant_events ({', '.join(GRANT_EVENT_COLUMNS)}) VALUES (?,?,?,?,?,?,?)"
_PROJECT = "UPDATE projects SET spent_ucredits = ?, period_start = ? WHERE tenant_id = ? AND project_id = ?"
_DAILY = (
    "INSERT INTO usage_daily (day, tenant_id, project_id, model, requests, prompt_tokens,"
    " completion_tokens, ucredits, cached_tokens) VALUES (?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (tenant_id, project_id, day, model)"
    " DO UPDATE SET requests = requests + excluded.requests,"
    " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
    " completion_tokens = completion_tokens + excluded.completion_tokens,"
    " ucredits = ucredits + excluded.ucredits,"
    " cached_tokens = cached_tokens + excluded.cached_tokens"
)


def _connect(path: Path, readonly: bool, busy_timeout_ms: int) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        # Index pages of 10 million usage events and their roll-up: a 64 MiB page cache keeps the
        # ones each commit touches (SQLite's default is 2 MiB).
        conn.execute("PRAGMA cache_size=-65536")
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


def _lock_file(path: Path) -> int:
    """Take ``<path>.lock`` exclusively (released when the descriptor closes, or the process dies)."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        os.close(fd)
        raise LedgerLockedError(f"{path} is in use by another ledger process") from e
    return fd


class SqliteStore:
    """SQLite persistence (a :class:`~._storage.LedgerStore`). Call :meth:`commit` from one thread
    at a time; reads from another."""

    def __init__(self, path: Path | str, *, busy_timeout_ms: int = 5000) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _lock_file(self.path)
        try:
            _private(self.path)
            self._w = _connect(self.path, readonly=False, busy_timeout_ms=busy_timeout_ms)
            self._migrate()
            for suffix in ("-wal", "-shm"):  # SQLite gives them the file's mode; older files: tighten
                if (side := Path(f"{self.path}{suffix}")).exists():
                    side.chmod(0o600)
            self._r = _connect(self.path, readonly=True, busy_timeout_ms=busy_timeout_ms)
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _migrate(self) -> None:
        version = self._w.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"ledger file {self.path} has schema {version}, newer than {SCHEMA_VERSION}")
        for target in range(version, SCHEMA_VERSION):
            self._w.execute("BEGIN IMMEDIATE")
            try:
                for item in _MIGRATIONS[target]:
                    if callable(item):
                        item(self._w)
                    else:
                        self._w.execute(item)
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
        os.close(self._lock_fd)

    # -- loading ---------------------------------------------------------------------------------
    def load(self) -> LoadedRows:
        """Every organization, project, grant, key and open reservation, as rows."""
        self._w.row_factory = sqlite3.Row
        try:
            return {
                "tenants": self._w.execute(
                    "SELECT t.*, (SELECT coalesce(sum(ucredits), 0) FROM grants g"
                    " WHERE g.tenant_id = t.tenant_id) AS granted_ucredits FROM tenants t"
                ).fetchall(),
                "projects": self._w.execute("SELECT * FROM projects").fetchall(),
                "grants": self._w.execute("SELECT * FROM grants").fetchall(),
                "api_keys": self._w.execute("SELECT * FROM api_keys").fetchall(),
                "reservations": self._w.execute("SELECT * FROM reservations").fetchall(),
            }
        finally:
            self._w.row_factory = None

    # -- writing ---------------------------------------------------------------------------------
    def commit(self, batch: WriteBatch) -> None:
        """Apply one batch in one transaction (one fsync)."""
        w = self._w
        w.execute("BEGIN IMMEDIATE")
        try:
            for op in batch.statements:
                w.execute(*render_row_op(op, "?"))
            if batch.inserts:
                w.executemany(_INSERT_RES, (reservation_row(r) for r in batch.inserts.values()))
            if batch.progress:
                w.executemany(_PROGRESS, ((v, k) for k, v in batch.progress.items()))
            if batch.deletes:
                w.executemany(_DELETE_RES, ((r,) for r in batch.deletes))
            if batch.events:
                w.executemany(_INSERT_EVENT, batch.events)
            if batch.daily:
                w.executemany(_DAILY, ((*k, *v) for k, v in batch.daily.items()))
            if batch.balances:
                w.executemany(_BALANCE, ((v, k) for k, v in batch.balances.items()))
            if batch.grants:
                w.executemany(_GRANT, batch.grants.values())
            if batch.grant_events:
                w.executemany(_GRANT_EVENT, batch.grant_events)
            if batch.projects:
                w.executemany(_PROJECT, ((s, ps, t, p) for (t, p), (s, ps) in batch.projects.items()))
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

    def prune_events(self, before_ts: float, limit: int = 10_000) -> int:
        """Delete up to ``limit`` usage events settled before ``before_ts`` (their sums stay in the
        daily roll-up); returns how many. The retention rule calls it in small steps."""
        cur = self._w.execute(
            "DELETE FROM usage_events WHERE event_id IN (SELECT event_id FROM usage_events"
            " WHERE settled_at < ? ORDER BY event_id LIMIT ?)",
            (before_ts, limit),
        )
        return int(cur.rowcount)

    # -- reading (read-only connection) ----------------------------------------------------------
    def settled_charge(self, request_id: str) -> int | None:
        row = self._r.execute(
            "SELECT ucredits FROM usage_events WHERE request_id = ?", (request_id,)
        ).fetchone()
        return None if row is None else int(row[0])

    def usage_by_day(
        self, tenant_id: str, project_id: str | None, since_ts: float | None
    ) -> list[tuple[Any, ...]]:
        """``(day, project, model, requests, prompt, completion, cached, ucredits)`` from the roll-up."""
        return self._r.execute(*usage_by_day_query(tenant_id, project_id, since_ts, "?")).fetchall()

    def export_page(
        self,
        filters: dict[str, str],
        since_ts: float | None,
        until_ts: float | None,
        after_event_id: int,
        limit: int,
    ) -> list[tuple[Any, ...]]:
        """Up to ``limit`` events after ``after_event_id`` (keyset paging: each page is one indexed
        range scan, so an export of millions of events never sits in memory)."""
        sql, params = export_query(filters, since_ts, until_ts, after_event_id, limit, "?")
        return self._r.execute(sql, params).fetchall()

    def report_page(
        self,
        group_by: tuple[str, ...],
        filters: dict[str, str],
        since_day: str | None,
        until_day: str | None,
        after: tuple[str, ...] | None,
        limit: int,
    ) -> list[tuple[Any, ...]]:
        """Up to ``limit`` groups after the group ``after`` (see :func:`~._storage.report_query`)."""
        sql, params = report_query(group_by, filters, since_day, until_day, after, limit, "?")
        return self._r.execute(sql, params).fetchall()

    def grant_events(self, tenant_id: str, limit: int = 1000) -> list[tuple[Any, ...]]:
        return self._r.execute(
            "SELECT grant_id, kind, ucredits, ts, request_id, actor FROM grant_events WHERE tenant_id = ?"
            " ORDER BY event_id DESC LIMIT ?",
            (tenant_id, limit),
        ).fetchall()

    def audit(self) -> list[str]:
        """Invariant violations (empty when consistent), see :func:`~._storage.audit_problems`."""
        return audit_problems(
            self._r.execute(AUDIT_TENANTS_SQL).fetchall(), self._r.execute(AUDIT_GRANTS_SQL).fetchall()
        )
