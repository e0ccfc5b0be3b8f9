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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._state import GrantRecord, OpenReservation

__all__ = ["EXPORT_COLUMNS", "REPORT_DIMENSIONS", "SCHEMA_VERSION", "LedgerStore", "LoadedRows", "WriteBatch"]

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
]
SCHEMA_VERSION = len(_MIGRATIONS)

_INSERT_RES = (
    "INSERT INTO reservations (request_id, tenant_id, key_id, model, prompt_tokens, max_tokens,"
    " reserved_ucredits, reserved_tokens, created_at, expires_at, project_id, slices)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
)
_PROGRESS = "UPDATE reservations SET progress_tokens = ? WHERE request_id = ?"
_DELETE_RES = "DELETE FROM reservations WHERE request_id = ?"
_INSERT_EVENT = (
    "INSERT INTO usage_events (request_id, tenant_id, key_id, model, pool, gpu_type, prompt_tokens,"
    " completion_tokens, prompt_ucredits, completion_ucredits, ucredits, reserved_at, settled_at, outcome,"
    " project_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_BALANCE = "UPDATE tenants SET balance_ucredits = ? WHERE tenant_id = ?"
_GRANT = (
    "UPDATE grants SET remaining_ucredits = ?, written_off_ucredits = ?, expired_at = ?"
    " WHERE tenant_id = ? AND grant_id = ?"
)
_GRANT_EVENT = "INSERT INTO grant_events (tenant_id, grant_id, kind, ucredits, ts, request_id, actor) VALUES (?,?,?,?,?,?,?)"
_PROJECT = "UPDATE projects SET spent_ucredits = ?, period_start = ? WHERE tenant_id = ? AND project_id = ?"
_DAILY = (
    "INSERT INTO usage_daily VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (tenant_id, project_id, day, model)"
    " DO UPDATE SET requests = requests + excluded.requests,"
    " prompt_tokens = prompt_tokens + excluded.prompt_tokens,"
    " completion_tokens = completion_tokens + excluded.completion_tokens,"
    " ucredits = ucredits + excluded.ucredits"
)
EXPORT_COLUMNS = (
    "event_id", "request_id", "tenant_id", "project_id", "key_id", "model", "pool", "gpu_type",
    "prompt_tokens", "completion_tokens", "prompt_ucredits", "completion_ucredits", "ucredits",
    "reserved_at", "settled_at", "outcome",
)  # fmt: skip
REPORT_DIMENSIONS = ("tenant_id", "project_id", "model", "day")
"""What a usage report may group by (its rows come from the daily roll-up)."""


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


EventRow = tuple[str, str, str, str, str, str, int, int, int, int, int, float, float, str, str]
"""request_id, tenant_id, key_id, model, pool, gpu_type, prompt_tokens, completion_tokens,
prompt_ucredits, completion_ucredits, ucredits, reserved_at, settled_at, outcome, project_id."""


def dumps_slices(slices: tuple[tuple[str, int], ...]) -> str:
    return json.dumps(slices, separators=(",", ":"))


class WriteBatch:
    """Row changes pending for the next commit, in an order that replays correctly."""

    __slots__ = (
        "balances", "daily", "deletes", "events", "grant_events", "grants", "inserts", "num_ops",
        "progress", "projects", "statements",
    )  # fmt: skip

    def __init__(self) -> None:
        self.statements: list[tuple[str, tuple[Any, ...]]] = []
        """Admin statements, executed first and in order."""
        self.inserts: dict[str, OpenReservation] = {}
        self.progress: dict[str, int] = {}
        self.deletes: set[str] = set()
        self.events: list[EventRow] = []
        self.balances: dict[str, int] = {}
        self.grants: dict[tuple[str, str], GrantRecord] = {}
        self.grant_events: list[tuple[str, str, str, int, float, str | None, str]] = []
        self.projects: dict[tuple[str, str], tuple[int, float]] = {}
        self.daily: dict[tuple[str, str, str, str], list[int]] = {}
        """(day, tenant, project, model) -> [requests, prompt tokens, completion tokens, ucredits]."""
        self.num_ops = 0

    def __bool__(self) -> bool:
        return bool(
            self.statements
            or self.inserts
            or self.progress
            or self.deletes
            or self.events
            or self.balances
            or self.grants
            or self.grant_events
            or self.projects
        )

    def open_reservation(self, r: OpenReservation) -> None:
        self.inserts[r.request_id] = r

    def record_progress(self, request_id: str, completion_tokens: int) -> None:
        self.progress[request_id] = completion_tokens

    def close_reservation(
        self, request_id: str, event: EventRow, day: str, tenant_id: str, balance_ucredits: int
    ) -> None:
        self.progress.pop(request_id, None)
        if self.inserts.pop(request_id, None) is None:
            self.deletes.add(request_id)
        self.events.append(event)
        self.balances[tenant_id] = balance_ucredits
        k = (day, tenant_id, event[14], event[3])
        d = self.daily.get(k)
        if d is None:
            self.daily[k] = [1, event[6], event[7], event[10]]
        else:
            d[0] += 1
            d[1] += event[6]
            d[2] += event[7]
            d[3] += event[10]

    def set_balance(self, tenant_id: str, balance_ucredits: int) -> None:
        self.balances[tenant_id] = balance_ucredits

    def set_grant(self, g: GrantRecord) -> None:
        """Write the grant's remaining credits (its final value in this batch)."""
        self.grants[(g.tenant_id, g.grant_id)] = g

    def grant_event(
        self,
        g: GrantRecord,
        kind: str,
        ucredits: int,
        ts: float,
        request_id: str | None,
        actor: str = "ledger",
    ) -> None:
        self.grant_events.append((g.tenant_id, g.grant_id, kind, ucredits, ts, request_id, actor))

    def set_project(self, tenant_id: str, project_id: str, spent_ucredits: int, period_start: float) -> None:
        self.projects[(tenant_id, project_id)] = (spent_ucredits, period_start)


LoadedRows = dict[str, list[sqlite3.Row]]
"""Table name -> rows: ``tenants``, ``projects``, ``grants``, ``api_keys``, ``reservations``."""


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
            for sql, params in batch.statements:
                w.execute(sql, params)
            if batch.inserts:
                w.executemany(
                    _INSERT_RES,
                    (
                        (
                            r.request_id,
                            r.tenant_id,
                            r.key_id,
                            r.model,
                            r.prompt_tokens,
                            r.max_tokens,
                            r.reserved_ucredits,
                            r.reserved_tokens,
                            r.created_at,
                            r.expires_at,
                            r.project_id,
                            dumps_slices(r.slices),
                        )
                        for r in batch.inserts.values()
                    ),
                )
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
                w.executemany(
                    _GRANT,
                    (
                        (g.remaining, g.written_off, g.expires_at if g.expired else None, t, gid)
                        for (t, gid), g in batch.grants.items()
                    ),
                )
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
        """``(day, project, model, requests, prompt, completion, ucredits)`` from the roll-up."""
        sql = (
            "SELECT day, project_id, model, requests, prompt_tokens, completion_tokens, ucredits"
            " FROM usage_daily WHERE tenant_id = ? AND day >= date(?, 'unixepoch')"
        )
        params: list[Any] = [tenant_id, since_ts if since_ts is not None else 0.0]
        if project_id is not None:
            sql += " AND project_id = ?"
            params.append(project_id)
        return self._r.execute(sql + " ORDER BY day, project_id, model", params).fetchall()

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
        sql = (
            f"SELECT {', '.join(EXPORT_COLUMNS)} FROM usage_events WHERE event_id > ?"
            " AND settled_at >= ? AND settled_at < ?"
        )
        params: list[Any] = [
            after_event_id,
            since_ts if since_ts is not None else 0.0,
            until_ts if until_ts is not None else 1e18,
        ]
        for column, value in sorted(filters.items()):
            assert column in ("tenant_id", "project_id", "model")
            sql += f" AND {column} = ?"
            params.append(value)
        return self._r.execute(sql + " ORDER BY event_id LIMIT ?", [*params, limit]).fetchall()

    def report_page(
        self,
        group_by: tuple[str, ...],
        filters: dict[str, str],
        since_day: str | None,
        until_day: str | None,
        after: tuple[str, ...] | None,
        limit: int,
    ) -> list[tuple[Any, ...]]:
        """Up to ``limit`` groups after the group ``after``: sums of requests, tokens and credits from
        the daily roll-up grouped by ``group_by`` (a subset of :data:`REPORT_DIMENSIONS`). Keyset
        paging on the group key, which leads the roll-up's primary key or its day index."""
        if (
            not group_by
            or not all(g in REPORT_DIMENSIONS for g in group_by)
            or len(set(group_by)) != len(group_by)
        ):
            raise ValueError(f"group_by must be distinct names of {REPORT_DIMENSIONS}")
        cols = ", ".join(group_by)
        sql = (
            f"SELECT {cols}, sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(ucredits)"
            " FROM usage_daily WHERE day >= ? AND day <= ?"
        )
        params: list[Any] = [since_day or "0000-00-00", until_day or "9999-99-99"]
        for column, value in sorted(filters.items()):
            assert column in ("tenant_id", "project_id", "model")
            sql += f" AND {column} = ?"
            params.append(value)
        if after is not None:
            if len(after) != len(group_by):
                raise ValueError("after must name one value per group_by column")
            sql += f" AND ({cols}) > ({', '.join('?' * len(after))})"
            params.extend(after)
        sql += f" GROUP BY {cols} ORDER BY {cols} LIMIT ?"
        return self._r.execute(sql, [*params, limit]).fetchall()

    def grant_events(self, tenant_id: str, limit: int = 1000) -> list[tuple[Any, ...]]:
        return self._r.execute(
            "SELECT grant_id, kind, ucredits, ts, request_id, actor FROM grant_events WHERE tenant_id = ?"
            " ORDER BY event_id DESC LIMIT ?",
            (tenant_id, limit),
        ).fetchall()

    def audit(self) -> list[str]:
        """Invariant violations (empty when consistent): for every organization, ``balance ==
        sum(remaining of its grants) == sum(grants) - sum(charges) - sum(write-offs)`` (charges from
        the daily roll-up, which retention never prunes) and ``balance >= 0``; every grant's
        remainder in ``[0, credits]``."""
        problems: list[str] = []
        rows = self._r.execute(
            "SELECT t.tenant_id, t.balance_ucredits,"
            " (SELECT coalesce(sum(ucredits), 0) FROM grants g WHERE g.tenant_id = t.tenant_id),"
            " (SELECT coalesce(sum(remaining_ucredits), 0) FROM grants g WHERE g.tenant_id = t.tenant_id),"
            " (SELECT coalesce(sum(written_off_ucredits), 0) FROM grants g WHERE g.tenant_id = t.tenant_id),"
            " (SELECT coalesce(sum(ucredits), 0) FROM usage_daily d WHERE d.tenant_id = t.tenant_id)"
            " FROM tenants t"
        ).fetchall()
        for tenant_id, balance, granted, remaining, written_off, charged in rows:
            if balance != granted - charged - written_off:
                problems.append(
                    f"{tenant_id}: balance {balance} != granted {granted} - charged {charged}"
                    f" - written off {written_off}"
                )
            if balance != remaining:
                problems.append(f"{tenant_id}: balance {balance} != remaining of its grants {remaining}")
            if balance < 0:
                problems.append(f"{tenant_id}: negative balance {balance}")
        for tenant_id, grant_id, ucredits, remaining in self._r.execute(
            "SELECT tenant_id, grant_id, ucredits, remaining_ucredits FROM grants"
            " WHERE remaining_ucredits < 0 OR remaining_ucredits > ucredits"
        ):
            problems.append(f"{tenant_id}/{grant_id}: remaining {remaining} outside [0, {ucredits}]")
        return problems


def dumps_models(models: list[str] | None) -> str | None:
    return None if models is None else json.dumps(sorted(models))
