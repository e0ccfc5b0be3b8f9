"""What a ledger store is: the interface both stores implement (SQLite in :mod:`._store`,
PostgreSQL in :mod:`._pg_store`), the batch one commit writes, and the queries they share.

A store has one writer. :meth:`LedgerStore.commit` applies a :class:`WriteBatch` in one
transaction and returns only once it is durable; :meth:`LedgerStore.load` gives back every row the
ledger keeps in memory. The statements a batch carries are store-neutral: row inserts and updates
by column name (:class:`RowInsert`, :class:`RowUpdate`), which each store renders in its own SQL
dialect and placeholder style. Both stores hold the same tables (:data:`TABLE_COLUMNS`) at the
same :data:`SCHEMA_VERSION`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

from ._policy import utc_day

__all__ = [
    "EXPORT_COLUMNS",
    "REPORT_DIMENSIONS",
    "REPORT_SUMS",
    "SCHEMA_VERSION",
    "TABLE_COLUMNS",
    "EventRow",
    "LedgerFencedError",
    "LedgerLockedError",
    "LedgerStore",
    "LoadedRows",
    "MigrationRefusedError",
    "MigrationReport",
    "RowInsert",
    "RowOp",
    "RowUpdate",
    "WriteBatch",
    "audit_problems",
    "dumps_models",
    "dumps_slices",
    "render_row_op",
]

SCHEMA_VERSION = 4
"""The schema both stores are at (SQLite reaches it by its migrations, PostgreSQL creates it)."""

TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "tenants": (
        "tenant_id", "name", "weight", "allowed_models", "balance_ucredits", "limits", "created_at",
        "updated_at",
    ),
    "projects": (
        "tenant_id", "project_id", "name", "weight", "allowed_models", "limits", "cap_ucredits",
        "cap_period", "spent_ucredits", "period_start", "created_at", "updated_at",
    ),
    "api_keys": (
        "key_id", "tenant_id", "key_hash", "display_prefix", "name", "created_at", "revoked_at",
        "project_id", "role",
    ),
    "grants": (
        "tenant_id", "grant_id", "program", "ucredits", "remaining_ucredits", "written_off_ucredits",
        "starts_at", "expires_at", "expired_at", "note", "granted_at",
    ),
    "reservations": (
        "request_id", "tenant_id", "key_id", "model", "prompt_tokens", "max_tokens", "reserved_ucredits",
        "reserved_tokens", "created_at", "expires_at", "progress_tokens", "project_id", "slices",
    ),
    "usage_events": (
        "event_id", "request_id", "tenant_id", "key_id", "model", "pool", "gpu_type", "prompt_tokens",
        "completion_tokens", "prompt_ucredits", "completion_ucredits", "ucredits", "reserved_at",
        "settled_at", "outcome", "project_id", "cached_tokens",
    ),
    "grant_events": ("event_id", "tenant_id", "grant_id", "kind", "ucredits", "ts", "request_id", "actor"),
    "usage_daily": (
        "day", "tenant_id", "project_id", "model", "requests", "prompt_tokens", "completion_tokens",
        "ucredits", "cached_tokens",
    ),
}  # fmt: skip
"""Every table of the schema and its columns, parents before children (the order a copy takes)."""

EXPORT_COLUMNS = (
    "event_id", "request_id", "tenant_id", "project_id", "key_id", "model", "pool", "gpu_type",
    "prompt_tokens", "completion_tokens", "cached_tokens", "prompt_ucredits", "completion_ucredits",
    "ucredits", "reserved_at", "settled_at", "outcome",
)  # fmt: skip
REPORT_DIMENSIONS = ("tenant_id", "project_id", "model", "day")
"""What a usage report may group by (its rows come from the daily roll-up)."""
REPORT_SUMS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "ucredits")
"""The columns of a usage report after its group key (the order of :func:`report_query`'s sums;
``cached_tokens`` after ``completion_tokens``, as in :data:`EXPORT_COLUMNS`)."""


class LedgerLockedError(RuntimeError):
    """Another writer holds the ledger: the file's lock (SQLite) or the database's advisory lock
    (PostgreSQL). With the gateway running, use the admin API."""


class LedgerFencedError(RuntimeError):
    """Another writer took the PostgreSQL ledger over (its epoch is newer): this one may not commit
    any more, ever. Its commits fail, and so does every rebuild of its state."""


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """What a copy of a SQLite ledger into PostgreSQL copied, table by table, and the audits of
    both sides (empty: consistent)."""

    rows: dict[str, int]
    audit_sqlite: list[str]
    audit_postgres: list[str]


class MigrationRefusedError(RuntimeError):
    """The copy was not made: the target holds a ledger already, the file does not pass its audit,
    or the copy did not verify."""


# -- statements --------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RowInsert:
    """``INSERT INTO table (columns) VALUES (...)``."""

    table: str
    values: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RowUpdate:
    """``UPDATE table SET values WHERE key`` (every key column equal)."""

    table: str
    key: dict[str, Any]
    values: dict[str, Any]


RowOp = RowInsert | RowUpdate
"""An admin statement, store-neutral."""


@lru_cache(maxsize=256)
def _row_sql(kind: str, table: str, cols: tuple[str, ...], keys: tuple[str, ...], ph: str) -> str:
    known = TABLE_COLUMNS.get(table)
    if known is None or not set(cols) | set(keys) <= set(known):
        raise ValueError(f"unknown table or columns: {table}({', '.join(cols + keys)})")
    if kind == "insert":
        return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join([ph] * len(cols))})"
    sets = ", ".join(f"{c} = {ph}" for c in cols)
    return f"UPDATE {table} SET {sets} WHERE {' AND '.join(f'{k} = {ph}' for k in keys)}"


def render_row_op(op: RowOp, ph: str) -> tuple[str, tuple[Any, ...]]:
    """The statement as SQL with placeholder ``ph`` (``?`` or ``%s``) and its parameters; table and
    column names are checked against :data:`TABLE_COLUMNS` (they come from code, never from data)."""
    match op:
        case RowInsert(table, values):
            return _row_sql("insert", table, tuple(values), (), ph), tuple(values.values())
        case RowUpdate(table, key, values):
            sql = _row_sql("update", table, tuple(values), tuple(key), ph)
            return sql, (*values.values(), *key.values())


# -- the batch ---------------------------------------------------------------------------------------
class OpenReservation(Protocol):
    """What a batch writes of an open reservation (``_state.OpenReservation``; a protocol, so that
    the state imports this module and not the other way round)."""

    request_id: str
    tenant_id: str
    key_id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    reserved_ucredits: int
    reserved_tokens: int
    created_at: float
    expires_at: float
    project_id: str
    slices: tuple[tuple[str, int], ...]


class GrantRecord(Protocol):
    """What a batch writes of a grant (``_state.GrantRecord``)."""

    tenant_id: str
    grant_id: str
    remaining: int
    written_off: int
    expires_at: float | None
    expired: bool


EventRow = tuple[str, str, str, str, str, str, int, int, int, int, int, float, float, str, str, int]
"""request_id, tenant_id, key_id, model, pool, gpu_type, prompt_tokens, completion_tokens,
prompt_ucredits, completion_ucredits, ucredits, reserved_at, settled_at, outcome, project_id,
cached_tokens."""


def dumps_slices(slices: tuple[tuple[str, int], ...]) -> str:
    return json.dumps(slices, separators=(",", ":"))


def dumps_models(models: list[str] | None) -> str | None:
    return None if models is None else json.dumps(sorted(models))


class WriteBatch:
    """Row changes pending for the next commit, in an order that replays correctly.

    Coalesced in memory first: the ledger applies each operation to its state at once and records
    the resulting row changes here. A reservation opened and settled within the same batch never
    touches the ``reservations`` table; balances are written once per tenant per batch with their
    final value."""

    __slots__ = (
        "balances", "daily", "deletes", "events", "grant_events", "grants", "inserts", "num_ops",
        "progress", "projects", "statements",
    )  # fmt: skip

    def __init__(self) -> None:
        self.statements: list[RowOp] = []
        """Admin statements, executed first and in order."""
        self.inserts: dict[str, OpenReservation] = {}
        self.progress: dict[str, int] = {}
        self.deletes: set[str] = set()
        self.events: list[EventRow] = []
        self.balances: dict[str, int] = {}
        self.grants: dict[tuple[str, str], tuple[Any, ...]] = {}
        """(tenant, grant) -> its update's parameters (:func:`grant_row`)."""
        self.grant_events: list[tuple[str, str, str, int, float, str | None, str]] = []
        self.projects: dict[tuple[str, str], tuple[int, float]] = {}
        self.daily: dict[tuple[str, str, str, str], list[int]] = {}
        """(day, tenant, project, model) -> [requests, prompt tokens, completion tokens, ucredits,
        cached tokens] (the roll-up's columns after its key, in :data:`TABLE_COLUMNS` order)."""
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

    def insert_row(self, table: str, **values: Any) -> None:
        self.statements.append(RowInsert(table, values))

    def update_row(self, table: str, key: dict[str, Any], **values: Any) -> None:
        self.statements.append(RowUpdate(table, key, values))

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
            self.daily[k] = [1, event[6], event[7], event[10], event[15]]
        else:
            d[0] += 1
            d[1] += event[6]
            d[2] += event[7]
            d[3] += event[10]
            d[4] += event[15]

    def set_balance(self, tenant_id: str, balance_ucredits: int) -> None:
        self.balances[tenant_id] = balance_ucredits

    def set_grant(self, g: GrantRecord) -> None:
        """Write the grant's remaining credits (its final value in this batch), as they are now: the
        row is taken here, not at commit, because the operations of the next batch go on changing
        the grant while this one commits (a crash then must not leave the grants ahead of the
        balance written with them)."""
        key = (g.tenant_id, g.grant_id)
        self.grants[key] = grant_row(key, g)

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


def reservation_row(r: OpenReservation) -> tuple[Any, ...]:
    """The values of ``INSERT_RES_COLUMNS`` for an open reservation."""
    return (
        r.request_id, r.tenant_id, r.key_id, r.model, r.prompt_tokens, r.max_tokens, r.reserved_ucredits,
        r.reserved_tokens, r.created_at, r.expires_at, r.project_id, dumps_slices(r.slices),
    )  # fmt: skip


def grant_row(key: tuple[str, str], g: GrantRecord) -> tuple[Any, ...]:
    """The parameters of the grant update: remaining, written off, expired at, tenant, grant."""
    return (g.remaining, g.written_off, g.expires_at if g.expired else None, *key)


INSERT_RES_COLUMNS = (
    "request_id", "tenant_id", "key_id", "model", "prompt_tokens", "max_tokens", "reserved_ucredits",
    "reserved_tokens", "created_at", "expires_at", "project_id", "slices",
)  # fmt: skip
INSERT_EVENT_COLUMNS = (
    "request_id", "tenant_id", "key_id", "model", "pool", "gpu_type", "prompt_tokens", "completion_tokens",
    "prompt_ucredits", "completion_ucredits", "ucredits", "reserved_at", "settled_at", "outcome", "project_id",
    "cached_tokens",
)  # fmt: skip
"""The columns of an :data:`EventRow`, in its order."""
GRANT_EVENT_COLUMNS = ("tenant_id", "grant_id", "kind", "ucredits", "ts", "request_id", "actor")


LoadedRows = dict[str, list[Any]]
"""Table name -> rows, each indexable by column name: ``tenants`` (with ``granted_ucredits``, the sum
of the organization's grants), ``projects``, ``grants``, ``api_keys``, ``reservations``."""


class LedgerStore(Protocol):
    """Persistence of one ledger. One writer thread calls :meth:`load`, :meth:`commit`,
    :meth:`recent_settled` and :meth:`prune_events`; the read methods may run on another thread
    at the same time (a store reads on a connection of its own). Opening a store takes the
    ledger's writer lock or raises :class:`LedgerLockedError`; :meth:`close` releases it."""

    def load(self) -> LoadedRows:
        """Every organization, project, grant, key and open reservation, as rows."""
        ...

    def commit(self, batch: WriteBatch) -> None:
        """Apply one batch in one transaction; return once it is durable, or raise (nothing of it
        was recorded, or, if the connection broke during the commit itself, possibly all of it:
        the ledger reloads its state from the store either way)."""
        ...

    def recent_settled(self, limit: int) -> list[tuple[str, int]]:
        """The ``limit`` most recent settlements as ``(request_id, ucredits)``, oldest first."""
        ...

    def prune_events(self, before_ts: float, limit: int = 10_000) -> int:
        """Delete up to ``limit`` usage events settled before ``before_ts``; return how many."""
        ...

    def settled_charge(self, request_id: str) -> int | None:
        """What the settled request was charged, or None if it is not in the usage log."""
        ...

    def usage_by_day(
        self, tenant_id: str, project_id: str | None, since_ts: float | None
    ) -> list[tuple[Any, ...]]:
        """``(day, project, model, requests, prompt, completion, cached, ucredits)`` from the roll-up."""
        ...

    def export_page(
        self,
        filters: dict[str, str],
        since_ts: float | None,
        until_ts: float | None,
        after_event_id: int,
        limit: int,
    ) -> list[tuple[Any, ...]]:
        """Up to ``limit`` events (:data:`EXPORT_COLUMNS`) after ``after_event_id`` (keyset paging)."""
        ...

    def report_page(
        self,
        group_by: tuple[str, ...],
        filters: dict[str, str],
        since_day: str | None,
        until_day: str | None,
        after: tuple[str, ...] | None,
        limit: int,
    ) -> list[tuple[Any, ...]]:
        """Up to ``limit`` groups of the daily roll-up after the group ``after``."""
        ...

    def grant_events(self, tenant_id: str, limit: int = 1000) -> list[tuple[Any, ...]]:
        """``(grant_id, kind, ucredits, ts, request_id, actor)``, newest first."""
        ...

    def audit(self) -> list[str]:
        """Invariant violations (empty when consistent), see :func:`audit_problems`."""
        ...

    def schema_version(self) -> int: ...

    def close(self) -> None: ...


# -- shared queries ----------------------------------------------------------------------------------
_IDENT = re.compile(r"^[a-z_]+$")


def usage_by_day_query(
    tenant_id: str, project_id: str | None, since_ts: float | None, ph: str
) -> tuple[str, list[Any]]:
    sql = (
        "SELECT day, project_id, model, requests, prompt_tokens, completion_tokens, cached_tokens, ucredits"
        f" FROM usage_daily WHERE tenant_id = {ph} AND day >= {ph}"
    )
    params: list[Any] = [tenant_id, utc_day(since_ts if since_ts is not None else 0.0)]
    if project_id is not None:
        sql += f" AND project_id = {ph}"
        params.append(project_id)
    return sql + " ORDER BY day, project_id, model", params


def export_query(
    filters: dict[str, str],
    since_ts: float | None,
    until_ts: float | None,
    after_event_id: int,
    limit: int,
    ph: str,
) -> tuple[str, list[Any]]:
    sql = (
        f"SELECT {', '.join(EXPORT_COLUMNS)} FROM usage_events WHERE event_id > {ph}"
        f" AND settled_at >= {ph} AND settled_at < {ph}"
    )
    params: list[Any] = [
        after_event_id,
        since_ts if since_ts is not None else 0.0,
        until_ts if until_ts is not None else 1e18,
    ]
    for column, value in sorted(filters.items()):
        assert column in ("tenant_id", "project_id", "model")
        sql += f" AND {column} = {ph}"
        params.append(value)
    return sql + f" ORDER BY event_id LIMIT {ph}", [*params, limit]


def report_query(
    group_by: tuple[str, ...],
    filters: dict[str, str],
    since_day: str | None,
    until_day: str | None,
    after: tuple[str, ...] | None,
    limit: int,
    ph: str,
) -> tuple[str, list[Any]]:
    """Sums of requests, prompt, completion and cached tokens, and credits (:data:`REPORT_SUMS`) from
    the daily roll-up grouped by ``group_by`` (a subset of :data:`REPORT_DIMENSIONS`), keyset-paged
    on the group key, which leads the roll-up's primary key or its day index."""
    if (
        not group_by
        or not all(g in REPORT_DIMENSIONS for g in group_by)
        or len(set(group_by)) != len(group_by)
    ):
        raise ValueError(f"group_by must be distinct names of {REPORT_DIMENSIONS}")
    cols = ", ".join(group_by)
    sql = (
        f"SELECT {cols}, CAST(sum(requests) AS BIGINT), CAST(sum(prompt_tokens) AS BIGINT),"
        " CAST(sum(completion_tokens) AS BIGINT), CAST(sum(cached_tokens) AS BIGINT),"
        " CAST(sum(ucredits) AS BIGINT)"
        f" FROM usage_daily WHERE day >= {ph} AND day <= {ph}"
    )
    params: list[Any] = [since_day or "0000-00-00", until_day or "9999-99-99"]
    for column, value in sorted(filters.items()):
        assert column in ("tenant_id", "project_id", "model")
        sql += f" AND {column} = {ph}"
        params.append(value)
    if after is not None:
        if len(after) != len(group_by):
            raise ValueError("after must name one value per group_by column")
        sql += f" AND ({cols}) > ({', '.join([ph] * len(after))})"
        params.extend(after)
    sql += f" GROUP BY {cols} ORDER BY {cols} LIMIT {ph}"
    return sql, [*params, limit]


AUDIT_TENANTS_SQL = (
    "SELECT t.tenant_id, t.balance_ucredits,"
    " (SELECT coalesce(sum(ucredits), 0) FROM grants g WHERE g.tenant_id = t.tenant_id),"
    " (SELECT coalesce(sum(remaining_ucredits), 0) FROM grants g WHERE g.tenant_id = t.tenant_id),"
    " (SELECT coalesce(sum(written_off_ucredits), 0) FROM grants g WHERE g.tenant_id = t.tenant_id),"
    " (SELECT coalesce(sum(ucredits), 0) FROM usage_daily d WHERE d.tenant_id = t.tenant_id)"
    " FROM tenants t"
)
"""Per organization: balance, granted, remaining, written off, charged (for :func:`audit_problems`)."""
AUDIT_GRANTS_SQL = (
    "SELECT tenant_id, grant_id, ucredits, remaining_ucredits FROM grants"
    " WHERE remaining_ucredits < 0 OR remaining_ucredits > ucredits"
)
"""Grants whose remainder is outside ``[0, credits]``."""


def audit_problems(tenant_rows: list[tuple[Any, ...]], bad_grants: list[tuple[Any, ...]]) -> list[str]:
    """Invariant violations (empty when consistent): for every organization, ``balance ==
    sum(remaining of its grants) == sum(grants) - sum(charges) - sum(write-offs)`` (charges from
    the daily roll-up, which retention never prunes) and ``balance >= 0``; every grant's
    remainder in ``[0, credits]``. Takes the rows of :data:`AUDIT_TENANTS_SQL` and
    :data:`AUDIT_GRANTS_SQL`."""
    problems: list[str] = []
    for tenant_id, *figures in tenant_rows:
        balance, granted, remaining, written_off, charged = (int(f) for f in figures)
        if balance != granted - charged - written_off:
            problems.append(
                f"{tenant_id}: balance {balance} != granted {granted} - charged {charged}"
                f" - written off {written_off}"
            )
        if balance != remaining:
            problems.append(f"{tenant_id}: balance {balance} != remaining of its grants {remaining}")
        if balance < 0:
            problems.append(f"{tenant_id}: negative balance {balance}")
    for tenant_id, grant_id, ucredits, remaining in bad_grants:
        problems.append(f"{tenant_id}/{grant_id}: remaining {remaining} outside [0, {ucredits}]")
    return problems


def check_identifier(name: str) -> str:
    """A table or column name fit to splice into SQL (they come from :data:`TABLE_COLUMNS`)."""
    if not _IDENT.match(name):
        raise ValueError(f"not an identifier: {name!r}")
    return name
