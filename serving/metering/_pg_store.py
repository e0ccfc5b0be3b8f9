"""The ledger in a PostgreSQL database (``metering.store: postgres``): the same tables and the same
single writer as the SQLite file, for clusters that must survive losing the ledger's node.

Three connections: one holds the writer's session advisory lock for the store's lifetime, one
writes (the ledger's commit thread: one transaction per :class:`~._storage.WriteBatch`,
``synchronous_commit=on``, so a commit returns only once the server has it durable), one reads
(exports, reports, audits).

**Fencing.** Two writers must never both commit. Opening the store takes
``pg_try_advisory_lock`` (waiting up to ``lock_wait_s`` for a writer that is going away; else
:class:`~._storage.LedgerLockedError`), then increments ``ledger_meta.epoch`` and keeps the new
value. Every commit locks the ``ledger_meta`` row and checks that the epoch is still its own before
it writes anything; a newer epoch means another writer took the ledger over (after this one's lock
connection was lost), and the commit fails with :class:`~._storage.LedgerFencedError`, as does
every later commit and every rebuild of this writer's state. The lock keeps a second writer from
starting while the first is alive; the epoch makes a writer that lost its lock without noticing
unable to commit once another has started, whatever the network did.

A connection that breaks (the server restarted, a network blip) is opened again on next use; the
lock is then taken again and the epoch checked, so a writer that nobody replaced carries on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import dict_row

from ._storage import (
    AUDIT_GRANTS_SQL,
    AUDIT_TENANTS_SQL,
    GRANT_EVENT_COLUMNS,
    INSERT_EVENT_COLUMNS,
    INSERT_RES_COLUMNS,
    SCHEMA_VERSION,
    TABLE_COLUMNS,
    LedgerFencedError,
    LedgerLockedError,
    LoadedRows,
    MigrationRefusedError,
    MigrationReport,
    WriteBatch,
    audit_problems,
    export_query,
    render_row_op,
    report_query,
    reservation_row,
    usage_by_day_query,
)

__all__ = ["PostgresStore", "copy_sqlite_to_postgres"]

T = TypeVar("T")

LOCK_KEY = 0x746F6B656E776569
"""The writer's advisory lock (``"tokenwei"``); advisory locks are per database."""

_TEXT = 'TEXT COLLATE "C"'  # byte order, as SQLite compares: ids sort and page the same on both
_SCHEMA = [
    """CREATE TABLE ledger_meta (
        id INTEGER PRIMARY KEY CHECK (id = 1), schema_version INTEGER NOT NULL,
        epoch BIGINT NOT NULL, created_at DOUBLE PRECISION NOT NULL)""",
    f"""CREATE TABLE tenants (
        tenant_id {_TEXT} PRIMARY KEY, name {_TEXT} NOT NULL, weight DOUBLE PRECISION NOT NULL,
        allowed_models {_TEXT}, balance_ucredits BIGINT NOT NULL, limits {_TEXT} NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL)""",
    f"""CREATE TABLE projects (
        tenant_id {_TEXT} NOT NULL REFERENCES tenants(tenant_id), project_id {_TEXT} NOT NULL,
        name {_TEXT} NOT NULL, weight DOUBLE PRECISION NOT NULL, allowed_models {_TEXT},
        limits {_TEXT} NOT NULL, cap_ucredits BIGINT, cap_period {_TEXT} NOT NULL,
        spent_ucredits BIGINT NOT NULL, period_start DOUBLE PRECISION NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (tenant_id, project_id))""",
    f"""CREATE TABLE api_keys (
        key_id {_TEXT} PRIMARY KEY, tenant_id {_TEXT} NOT NULL REFERENCES tenants(tenant_id),
        key_hash {_TEXT} NOT NULL UNIQUE, display_prefix {_TEXT} NOT NULL, name {_TEXT} NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, revoked_at DOUBLE PRECISION,
        project_id {_TEXT} NOT NULL DEFAULT 'default', role {_TEXT} NOT NULL DEFAULT 'member')""",
    "CREATE INDEX api_keys_tenant ON api_keys(tenant_id, key_id)",
    f"""CREATE TABLE grants (
        tenant_id {_TEXT} NOT NULL REFERENCES tenants(tenant_id), grant_id {_TEXT} NOT NULL,
        program {_TEXT} NOT NULL, ucredits BIGINT NOT NULL, remaining_ucredits BIGINT NOT NULL,
        written_off_ucredits BIGINT NOT NULL DEFAULT 0, starts_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION, expired_at DOUBLE PRECISION, note {_TEXT} NOT NULL,
        granted_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (tenant_id, grant_id))""",
    f"""CREATE TABLE reservations (
        request_id {_TEXT} PRIMARY KEY, tenant_id {_TEXT} NOT NULL, key_id {_TEXT} NOT NULL,
        model {_TEXT} NOT NULL, prompt_tokens BIGINT NOT NULL, max_tokens BIGINT NOT NULL,
        reserved_ucredits BIGINT NOT NULL, reserved_tokens BIGINT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
        progress_tokens BIGINT, project_id {_TEXT} NOT NULL DEFAULT 'default', slices {_TEXT})""",
    f"""CREATE TABLE usage_events (
        event_id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        request_id {_TEXT} NOT NULL UNIQUE, tenant_id {_TEXT} NOT NULL, key_id {_TEXT} NOT NULL,
        model {_TEXT} NOT NULL, pool {_TEXT} NOT NULL, gpu_type {_TEXT} NOT NULL,
        prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL,
        prompt_ucredits BIGINT NOT NULL, completion_ucredits BIGINT NOT NULL, ucredits BIGINT NOT NULL,
        reserved_at DOUBLE PRECISION NOT NULL, settled_at DOUBLE PRECISION NOT NULL,
        outcome {_TEXT} NOT NULL, project_id {_TEXT} NOT NULL DEFAULT 'default',
        cached_tokens BIGINT NOT NULL DEFAULT 0)""",
    "CREATE INDEX usage_events_tenant ON usage_events(tenant_id, event_id)",
    "CREATE INDEX usage_events_time ON usage_events(settled_at)",
    "CREATE INDEX usage_events_project ON usage_events(tenant_id, project_id, event_id)",
    f"""CREATE TABLE grant_events (
        event_id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, tenant_id {_TEXT} NOT NULL,
        grant_id {_TEXT} NOT NULL, kind {_TEXT} NOT NULL, ucredits BIGINT NOT NULL,
        ts DOUBLE PRECISION NOT NULL, request_id {_TEXT}, actor {_TEXT} NOT NULL DEFAULT '')""",
    "CREATE INDEX grant_events_tenant ON grant_events(tenant_id, ts)",
    f"""CREATE TABLE usage_daily (
        day {_TEXT} NOT NULL, tenant_id {_TEXT} NOT NULL, project_id {_TEXT} NOT NULL,
        model {_TEXT} NOT NULL, requests BIGINT NOT NULL, prompt_tokens BIGINT NOT NULL,
        completion_tokens BIGINT NOT NULL, ucredits BIGINT NOT NULL,
        cached_tokens BIGINT NOT NULL DEFAULT 0, PRIMARY KEY (tenant_id, project_id, day, model))""",
    "CREATE INDEX usage_daily_day ON usage_daily(day)",
]
"""The current schema, created directly (the SQLite file reaches it by migrations)."""
_SCHEMA_VERSION = 4
_UPGRADES: dict[int, list[str]] = {
    2: [
        "ALTER TABLE usage_events ADD COLUMN cached_tokens BIGINT NOT NULL DEFAULT 0",
        "DROP INDEX IF EXISTS usage_events_tenant_time",
        "DROP INDEX IF EXISTS usage_events_project_time",
        "CREATE INDEX usage_events_tenant ON usage_events(tenant_id, event_id)",
        "CREATE INDEX usage_events_project ON usage_events(tenant_id, project_id, event_id)",
    ],
    3: [
        "ALTER TABLE usage_daily ADD COLUMN cached_tokens BIGINT NOT NULL DEFAULT 0",
        # The day of an event as the ledger writes it (utc_day: the UTC date, ISO format).
        "UPDATE usage_daily SET cached_tokens = e.cached_tokens FROM (SELECT"
        " to_char(to_timestamp(settled_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, tenant_id,"
        " project_id, model, sum(cached_tokens) AS cached_tokens FROM usage_events GROUP BY 1, 2, 3, 4) AS e"
        " WHERE usage_daily.tenant_id = e.tenant_id AND usage_daily.project_id = e.project_id"
        " AND usage_daily.day = e.day AND usage_daily.model = e.model",
    ],
}
"""From schema ``v`` to ``v + 1`` (a database created by an older ledger); append, never edit."""
assert _SCHEMA_VERSION == SCHEMA_VERSION, "the PostgreSQL schema lags _storage.SCHEMA_VERSION"


# A commit's rows go in one statement per table (COPY for the inserts, UPDATE ... FROM unnest of
# one array per column for the rest): a statement per row, even pipelined, left the server parsing,
# planning and executing ~1,200 of them per commit of 500 operations.
def _copy_rows(cur: psycopg.Cursor[Any], sql: str, rows: Iterable[Sequence[Any]]) -> None:
    with cur.copy(sql) as copy:
        for row in rows:
            copy.write_row(row)


def _columns(rows: Iterable[Sequence[Any]]) -> tuple[list[Any], ...]:
    """Rows as one list per column (the arrays an ``unnest`` statement takes)."""
    return tuple(list(c) for c in zip(*rows, strict=True))


def _copy_in(table: str, columns: tuple[str, ...]) -> str:
    return f"COPY {table} ({', '.join(columns)}) FROM STDIN"


_COPY_RES = _copy_in("reservations", INSERT_RES_COLUMNS)
_COPY_EVENTS = _copy_in("usage_events", INSERT_EVENT_COLUMNS)
_COPY_GRANT_EVENTS = _copy_in("grant_events", GRANT_EVENT_COLUMNS)
_PROGRESS = (
    "UPDATE reservations AS r SET progress_tokens = v.p FROM unnest(%s::text[], %s::bigint[]) AS v(id, p)"
    " WHERE r.request_id = v.id"
)
_DELETE_RES = "DELETE FROM reservations WHERE request_id = ANY(%s::text[])"
_BALANCE = (
    "UPDATE tenants AS t SET balance_ucredits = v.b FROM unnest(%s::bigint[], %s::text[]) AS v(b, id)"
    " WHERE t.tenant_id = v.id"
)
_GRANT = (
    "UPDATE grants AS g SET remaining_ucredits = v.r, written_off_ucredits = v.w, expired_at = v.e"
    " FROM unnest(%s::bigint[], %s::bigint[], %s::double precision[], %s::text[], %s::text[])"
    " AS v(r, w, e, t, id) WHERE g.tenant_id = v.t AND g.grant_id = v.id"
)
_PROJECT = (
    "UPDATE projects AS p SET spent_ucredits = v.s, period_start = v.ps"
    " FROM unnest(%s::bigint[], %s::double precision[], %s::text[], %s::text[]) AS v(s, ps, t, id)"
    " WHERE p.tenant_id = v.t AND p.project_id = v.id"
)
_DAILY = (
    f"INSERT INTO usage_daily ({', '.join(TABLE_COLUMNS['usage_daily'])}) SELECT * FROM"
    " unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::bigint[], %s::bigint[], %s::bigint[],"
    " %s::bigint[], %s::bigint[])"
    " ON CONFLICT (tenant_id, project_id, day, model) DO UPDATE SET"
    " requests = usage_daily.requests + excluded.requests,"
    " prompt_tokens = usage_daily.prompt_tokens + excluded.prompt_tokens,"
    " completion_tokens = usage_daily.completion_tokens + excluded.completion_tokens,"
    " ucredits = usage_daily.ucredits + excluded.ucredits,"
    " cached_tokens = usage_daily.cached_tokens + excluded.cached_tokens"
)
_SESSION_KEEPALIVE = (
    # A writer whose node vanished holds its lock until the server drops its connection: detect a
    # dead peer in ~25 s instead of the kernel's two hours.
    "SET tcp_keepalives_idle = 10",
    "SET tcp_keepalives_interval = 5",
    "SET tcp_keepalives_count = 3",
)


_CLIENT_DEFAULTS = {
    # The client side of the same: a commit to a server that vanished fails in ~25 s, not hours.
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "application_name": "tokenweir-ledger",
}


def _connect(dsn: str, *, autocommit: bool = True, setup: tuple[str, ...] = ()) -> psycopg.Connection[Any]:
    """A connection with the DSN's own parameters and, where it sets none, ours."""
    given = conninfo_to_dict(dsn)
    conninfo = make_conninfo(dsn, **{k: v for k, v in _CLIENT_DEFAULTS.items() if k not in given})
    conn = psycopg.connect(conninfo, autocommit=autocommit)
    try:
        for sql in setup:
            conn.execute(sql)
    except BaseException:
        conn.close()
        raise
    return conn


def _has_schema(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT to_regclass('ledger_meta') IS NOT NULL").fetchone()
    return bool(row and row[0])


def _create_schema(conn: psycopg.Connection[Any], ts: float) -> None:
    """Create every table at the current schema (inside the caller's transaction)."""
    for sql in _SCHEMA:
        conn.execute(sql)
    conn.execute(
        "INSERT INTO ledger_meta (id, schema_version, epoch, created_at) VALUES (1, %s, 0, %s)",
        (_SCHEMA_VERSION, ts),
    )


def _upgrade(conn: psycopg.Connection[Any], version: int) -> int:
    """Bring an older schema to the current one (inside the caller's transaction, under the writer
    lock); the version reached."""
    while version in _UPGRADES:
        for sql in _UPGRADES[version]:
            conn.execute(sql)
        version += 1
        conn.execute("UPDATE ledger_meta SET schema_version = %s", (version,))
    return version


def _try_lock(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,)).fetchone()
    return bool(row and row[0])


def _lock_holder(conn: psycopg.Connection[Any]) -> str:
    """Who holds the writer lock, for the error message (best effort)."""
    row = conn.execute(
        "SELECT a.pid, coalesce(host(a.client_addr), 'local'), a.application_name FROM pg_locks l"
        " JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted"
        " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        " AND (l.classid::bigint << 32 | l.objid::bigint) = %s",
        (LOCK_KEY,),
    ).fetchone()
    return "another session" if row is None else f"server pid {row[0]} from {row[1]}"


class PostgresStore:
    """PostgreSQL persistence (a :class:`~._storage.LedgerStore`): the writer of one database."""

    def __init__(
        self,
        dsn: str,
        *,
        lock_wait_s: float = 0.0,
        lock_timeout_ms: int = 5000,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._dsn = dsn
        self._setup = (
            "SET synchronous_commit = on",  # an acknowledged commit is durable, whatever the database says
            f"SET lock_timeout = {int(lock_timeout_ms)}",
        )
        self._fenced_by: int | None = None
        self._lock = self._take_lock(lock_wait_s, clock, sleep)
        self._w: psycopg.Connection[Any] | None = None
        try:
            self._w = _connect(dsn, setup=self._setup)
            with self._w.transaction():
                if not _has_schema(self._w):
                    _create_schema(self._w, time.time())
                version = _upgrade(self._w, self._schema_version(self._w))
                if version != _SCHEMA_VERSION:
                    raise RuntimeError(
                        f"ledger database has schema {version}; this ledger knows {_SCHEMA_VERSION}"
                    )
                row = self._w.execute("UPDATE ledger_meta SET epoch = epoch + 1 RETURNING epoch").fetchone()
                assert row is not None
                self.epoch = int(row[0])
                """This writer's epoch: a commit checks that ``ledger_meta`` still holds it."""
            self._r = _connect(dsn)
        except BaseException:
            if self._w is not None:
                self._w.close()
            self._lock.close()
            raise

    def _take_lock(
        self, wait_s: float, clock: Callable[[], float], sleep: Callable[[float], None]
    ) -> psycopg.Connection[Any]:
        conn = _connect(self._dsn, setup=_SESSION_KEEPALIVE)
        deadline = clock() + wait_s
        delay_s = 0.1
        while not _try_lock(conn):
            if clock() + delay_s > deadline:
                holder = _lock_holder(conn)
                conn.close()
                raise LedgerLockedError(
                    f"the ledger database is in use by another ledger writer ({holder}'s advisory lock)"
                )
            sleep(delay_s)  # back-off while a writer that is going away still holds the lock
            delay_s = min(2.0, delay_s * 2)
        return conn

    @staticmethod
    def _schema_version(conn: psycopg.Connection[Any]) -> int:
        row = conn.execute("SELECT schema_version FROM ledger_meta").fetchone()
        assert row is not None
        return int(row[0])

    def schema_version(self) -> int:
        return self._read(self._schema_version)

    def close(self) -> None:
        for conn in (self._r, self._w, self._lock):  # the lock last: no other writer before we are done
            if conn is not None:
                conn.close()

    # -- connections -------------------------------------------------------------------------------
    def _fenced(self, epoch: int) -> LedgerFencedError:
        self._fenced_by = epoch
        return LedgerFencedError(
            f"another ledger writer (epoch {epoch}) took the database over; this one (epoch {self.epoch})"
            " may not commit"
        )

    def _writer(self) -> psycopg.Connection[Any]:
        """The writing connection, opened again (and the lock checked) if it broke; raises
        :class:`LedgerFencedError` for good once another writer has taken over."""
        if self._fenced_by is not None:
            raise self._fenced(self._fenced_by)
        assert self._w is not None
        if self._w.closed or self._w.broken:
            self._w.close()
            self._w = _connect(self._dsn, setup=self._setup)
            self._check_lock()
        return self._w

    def _check_lock(self) -> None:
        """Take the lock again if its connection was lost (the server restarted): raises
        :class:`LedgerLockedError` if another writer has it now. Asked only when the writing
        connection broke and on each rebuild, both rare; between them the epoch fences."""
        try:
            self._lock.execute("SELECT 1")
        except psycopg.Error:
            self._lock.close()
            self._lock = self._take_lock(0.0, time.monotonic, time.sleep)

    def _check_epoch(self, w: psycopg.Connection[Any]) -> None:
        """Inside a transaction: lock ``ledger_meta`` and check the epoch is this writer's."""
        row = w.execute("SELECT epoch FROM ledger_meta WHERE id = 1 FOR UPDATE").fetchone()
        assert row is not None
        if int(row[0]) != self.epoch:
            raise self._fenced(int(row[0]))

    @contextmanager
    def _fenced_transaction(self) -> Iterator[psycopg.Connection[Any]]:
        w = self._writer()
        with w.transaction():
            self._check_epoch(w)
            yield w

    def _read(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``fn`` on the reading connection; once more on a fresh one if that connection broke."""
        if self._r.closed or self._r.broken:
            self._r = _connect(self._dsn)
        try:
            return fn(self._r)
        except psycopg.OperationalError:
            if not self._r.broken:
                raise
            self._r.close()
            self._r = _connect(self._dsn)
            return fn(self._r)

    # -- loading -----------------------------------------------------------------------------------
    def load(self) -> LoadedRows:
        """Every organization, project, grant, key and open reservation, as rows (one snapshot)."""
        w = self._writer()
        self._check_lock()
        with w.transaction():
            w.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            row = w.execute("SELECT epoch FROM ledger_meta WHERE id = 1").fetchone()
            assert row is not None
            if int(row[0]) != self.epoch:
                raise self._fenced(int(row[0]))
            cur = w.cursor(row_factory=dict_row)
            return {
                "tenants": cur.execute(
                    "SELECT t.*, (SELECT coalesce(sum(ucredits), 0)::bigint FROM grants g"
                    " WHERE g.tenant_id = t.tenant_id) AS granted_ucredits FROM tenants t"
                ).fetchall(),
                "projects": cur.execute("SELECT * FROM projects").fetchall(),
                "grants": cur.execute("SELECT * FROM grants").fetchall(),
                "api_keys": cur.execute("SELECT * FROM api_keys").fetchall(),
                "reservations": cur.execute("SELECT * FROM reservations").fetchall(),
            }

    # -- writing -----------------------------------------------------------------------------------
    def commit(self, batch: WriteBatch) -> None:
        """Apply one batch in one transaction, fenced by the epoch (see the module docstring)."""
        with self._fenced_transaction() as w:
            cur = w.cursor()
            for op in batch.statements:
                cur.execute(*render_row_op(op, "%s"))
            if batch.inserts:
                _copy_rows(cur, _COPY_RES, (reservation_row(r) for r in batch.inserts.values()))
            if batch.progress:
                cur.execute(_PROGRESS, (list(batch.progress), list(batch.progress.values())))
            if batch.deletes:
                cur.execute(_DELETE_RES, (list(batch.deletes),))
            if batch.events:
                _copy_rows(cur, _COPY_EVENTS, batch.events)
            if batch.daily:
                cur.execute(_DAILY, _columns((*k, *v) for k, v in batch.daily.items()))
            if batch.balances:
                cur.execute(_BALANCE, (list(batch.balances.values()), list(batch.balances)))
            if batch.grants:
                cur.execute(_GRANT, _columns(batch.grants.values()))
            if batch.grant_events:
                _copy_rows(cur, _COPY_GRANT_EVENTS, batch.grant_events)
            if batch.projects:
                cur.execute(_PROJECT, _columns((s, ps, t, p) for (t, p), (s, ps) in batch.projects.items()))

    def recent_settled(self, limit: int) -> list[tuple[str, int]]:
        """The ``limit`` most recent settlements as ``(request_id, ucredits)``, oldest first."""
        rows = (
            self._writer()
            .execute(
                "SELECT request_id, ucredits FROM usage_events ORDER BY event_id DESC LIMIT %s", (limit,)
            )
            .fetchall()
        )
        return [(r, int(u)) for r, u in reversed(rows)]

    def prune_events(self, before_ts: float, limit: int = 10_000) -> int:
        """Delete up to ``limit`` usage events settled before ``before_ts`` (fenced like a commit)."""
        with self._fenced_transaction() as w:
            cur = w.execute(
                "DELETE FROM usage_events WHERE event_id IN (SELECT event_id FROM usage_events"
                " WHERE settled_at < %s ORDER BY event_id LIMIT %s)",
                (before_ts, limit),
            )
            return int(cur.rowcount)

    # -- reading (the reading connection) ----------------------------------------------------------
    def _fetch(self, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        return self._read(lambda r: r.execute(sql, params).fetchall())

    def settled_charge(self, request_id: str) -> int | None:
        rows = self._fetch("SELECT ucredits FROM usage_events WHERE request_id = %s", (request_id,))
        return int(rows[0][0]) if rows else None

    def usage_by_day(
        self, tenant_id: str, project_id: str | None, since_ts: float | None
    ) -> list[tuple[Any, ...]]:
        return self._fetch(*usage_by_day_query(tenant_id, project_id, since_ts, "%s"))

    def export_page(
        self,
        filters: dict[str, str],
        since_ts: float | None,
        until_ts: float | None,
        after_event_id: int,
        limit: int,
    ) -> list[tuple[Any, ...]]:
        return self._fetch(*export_query(filters, since_ts, until_ts, after_event_id, limit, "%s"))

    def report_page(
        self,
        group_by: tuple[str, ...],
        filters: dict[str, str],
        since_day: str | None,
        until_day: str | None,
        after: tuple[str, ...] | None,
        limit: int,
    ) -> list[tuple[Any, ...]]:
        return self._fetch(*report_query(group_by, filters, since_day, until_day, after, limit, "%s"))

    def grant_events(self, tenant_id: str, limit: int = 1000) -> list[tuple[Any, ...]]:
        return self._fetch(
            "SELECT grant_id, kind, ucredits, ts, request_id, actor FROM grant_events WHERE tenant_id = %s"
            " ORDER BY event_id DESC LIMIT %s",
            (tenant_id, limit),
        )

    def audit(self) -> list[str]:
        """Invariant violations (empty when consistent), see :func:`~._storage.audit_problems`."""
        return self._read(_audit)


def _audit(conn: psycopg.Connection[Any]) -> list[str]:
    return audit_problems(
        conn.execute(AUDIT_TENANTS_SQL).fetchall(), conn.execute(AUDIT_GRANTS_SQL).fetchall()
    )


# -- migration from a SQLite file ------------------------------------------------------------------
def copy_sqlite_to_postgres(path: Path | str, dsn: str) -> MigrationReport:
    """Copy the SQLite ledger at ``path`` (migrated to schema 2 first) into the empty PostgreSQL
    database ``dsn``, in one transaction, holding both writer locks (the file's and the database's:
    no ledger may run on either meanwhile). Verified before it commits: every table's row count
    equals the file's and the audit finds nothing on either side. Raises
    :class:`MigrationRefusedError` (nothing written) when the target already holds ledger rows,
    the file does not pass its audit, or the copy does not verify. The copied tables are then
    vacuumed and analyzed (outside the transaction; the copy is committed by then)."""
    from ._store import SqliteStore

    source = SqliteStore(path)
    try:
        audit_sqlite = source.audit()
        if audit_sqlite:
            raise MigrationRefusedError(
                f"{path} does not pass its audit; fix it before migrating: {audit_sqlite[:5]}"
            )
        src = source._r  # read-only connection: one snapshot of the file for the whole copy
        lock = _connect(dsn)
        try:
            if not _try_lock(lock):
                raise LedgerLockedError(
                    f"the target database is in use by a ledger writer ({_lock_holder(lock)}'s advisory lock)"
                )
            with _connect(dsn, autocommit=True, setup=("SET synchronous_commit = on",)) as dst:
                report = _copy(src, dst, audit_sqlite)
                # After a bulk load (PostgreSQL's "Populating a Database"): planner statistics, and
                # the visibility map and hint bits set now rather than by the first requests' reads
                # and an insert-triggered autovacuum over every copied row while the ledger serves.
                for table in TABLE_COLUMNS:
                    dst.execute(f"VACUUM (ANALYZE) {table}")
                return report
        finally:
            lock.close()
    finally:
        source.close()


def _copy(src: Any, dst: psycopg.Connection[Any], audit_sqlite: list[str]) -> MigrationReport:
    counts: dict[str, int] = {}
    with dst.transaction():
        src.execute("BEGIN")  # one read snapshot of the file
        try:
            if _has_schema(dst):  # a ledger started there once: fine while it holds nothing
                version = PostgresStore._schema_version(dst)
                if version != _SCHEMA_VERSION:
                    raise MigrationRefusedError(f"the target database has ledger schema {version}")
                for table in TABLE_COLUMNS:
                    if dst.execute(f"SELECT EXISTS (SELECT 1 FROM {table})").fetchone() != (False,):
                        raise MigrationRefusedError(
                            f"the target database already holds a ledger (table {table} has rows)"
                        )
            else:
                _create_schema(dst, time.time())
            for table, columns in TABLE_COLUMNS.items():
                cols = ", ".join(columns)
                n = 0
                with dst.cursor().copy(f"COPY {table} ({cols}) FROM STDIN") as copy:
                    for row in src.execute(f"SELECT {cols} FROM {table}"):
                        copy.write_row(row)
                        n += 1
                counts[table] = n
            for table in ("usage_events", "grant_events"):  # identities continue after the copied ids
                dst.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'event_id'),"
                    f" coalesce((SELECT max(event_id) FROM {table}), 0) + 1, false)"
                )
            for table in TABLE_COLUMNS:
                got = dst.execute(f"SELECT count(*) FROM {table}").fetchone()
                want = src.execute(f"SELECT count(*) FROM {table}").fetchone()
                if got is None or want is None or int(got[0]) != int(want[0]) or int(got[0]) != counts[table]:
                    raise MigrationRefusedError(f"table {table}: copied {got}, the file has {want}")
            audit_postgres = _audit(dst)
            if audit_postgres:
                raise MigrationRefusedError(f"the copy does not pass its audit: {audit_postgres[:5]}")
        finally:
            src.execute("ROLLBACK")
    return MigrationReport(counts, audit_sqlite, audit_postgres)
