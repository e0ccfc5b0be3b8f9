"""The ledger: one writer over its store (SQLite, or PostgreSQL) with group commit. Runs in-process
or inside the Ray actor.

Write path: :meth:`LedgerCore.apply` takes a list of operations (the structs of :mod:`._ops`, from
one gateway replica's batch; each dispatched by ``match`` on its type),
applies each to the in-memory :class:`LedgerState` at once and in order (this is where quota is
enforced, exactly, because there is one writer), then waits until the rows they changed are
committed. One background task commits: it takes everything written since the last commit as one
transaction and one fsync, then resolves the waiters of that batch. Operations that arrive while a
commit is running join the next batch, so durability costs one fsync per batch, not per request.
A result is never returned before its batch is durable; refusals change nothing and return at once.

One exception, a *release*: a settlement of a request that produced nothing (no tokens, no
progress record; a refusal by a pool's admission, a failure before the first token) is applied and
answered at once, and its rows ride on the next group commit, so a pool refusal costs the ledger no
commit of its own. Losing it changes no balance: the crash rule resolves the reservation the same
way (released, nothing charged). When nothing else writes, one commit takes every release pending
after at most :data:`_RELEASE_COMMIT_S`; a commit that fails takes its releases with it, and they
are applied again to the rebuilt state.

Crash rule (what happens to reservations whose settlement never comes):

* Reservations are rows in the ``reservations`` table, written in the same commit that
  acknowledges them. After ``kill -9`` and a restart they come back *held*: the gateway that owns
  the request may still be streaming and will settle it (settlement is idempotent by request id).
* Each reservation expires ``reservation_ttl_s`` after it was made; after a restart, at most
  ``restart_grace_s`` after the restart. An expired reservation is resolved so: if a progress record
  exists (:meth:`Meter.progress`), the prompt and the recorded completion tokens are charged
  (outcome ``expired_charged``); otherwise everything is released and nothing is charged (outcome
  ``expired_released``). Either way a usage event records it, and a late settlement is a no-op.
* An operation whose batch was not committed when the process died was never acknowledged: its
  caller sees an error and retries (reserve and settle are idempotent by request id).

Failed commits (full disk, I/O error, the file locked by another process): memory is ahead of the
file, so the state is rebuilt from the file, and writes wait (bounded) while that happens. The
operations *in* the failed batch fail with :class:`~serving.errors.LedgerUnavailableError` (503):
nothing of them was recorded. Operations applied after that batch was taken (they rode on state the
file never got) are not answered from it: they are applied again to the rebuilt state and answered
once that is durable. Rate-limit buckets survive the rebuild (a failure must not refill them). If
the rebuild itself fails it is retried with back-off, and writes are refused with 503 meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, assert_never

from serving.errors import APIError, LedgerUnavailableError
from serving.tenancy import (
    UCREDITS_PER_CREDIT,
    Page,
    ProjectUsage,
    RateLimitState,
    TenantLimits,
    UsageRow,
    UsageSummary,
    ucredits_to_credits,
)

from ._admin import AdminOps, grant_view, key_view, load_state, project_view, tenant_view
from ._config import MeteringConfig
from ._keys import KeyEntry
from ._ops import (
    AddKey,
    Audit,
    CreateGrant,
    CreateProject,
    CreateTenant,
    ExportUsage,
    GetProject,
    GetTenant,
    KeyPrincipal,
    ListGrants,
    ListKeys,
    ListProjects,
    ListTenants,
    Op,
    Principal,
    Progress,
    Read,
    Reservation,
    Reserve,
    RevokeKey,
    Settle,
    Stats,
    SummarizeUsage,
    TenantFigures,
    TopUp,
    UpdateProject,
    UpdateTenant,
    UsageReport,
)
from ._policy import ModelPrice
from ._state import RECENT_SETTLED as _RECENT_SETTLED
from ._state import LedgerState
from ._stats import LedgerStats, fold_tenants, low_credit, run_out
from ._storage import LedgerLockedError, LedgerStore
from ._store import SqliteStore

__all__ = ["LedgerCore", "LedgerLockedError"]


def _page(items: dict[str, Any], after: str | None, limit: int, view: Callable[[Any], Any]) -> Page[Any]:
    """Keys in order after ``after``, at most ``limit`` of them (``sorted`` of ids: 5,000
    organizations or one organization's projects sort in a millisecond)."""
    ids = sorted(i for i in items if after is None or i > after)
    data = [view(items[i]) for i in ids[:limit]]
    more = len(ids) > limit
    return Page(data=data, has_more=more, next_after=ids[limit - 1] if more and limit > 0 else None)


_RETENTION_PERIOD_S = 3600.0
"""How often usage events past their retention are deleted."""
_UNAVAILABLE_WAIT_S = 2.0
"""How long a write waits for the state to be rebuilt after a failed commit before it is refused."""
_RELEASE_COMMIT_S = 1.0
"""Longest a release waits for another write's commit before one commit of its own takes it (and
every other release pending)."""


class _RolledBack(Exception):
    """The batch was applied on top of one whose commit failed; apply its operations again."""


log = logging.getLogger("tokenweir.ledger")


_KINDS: dict[type, str] = {Reserve: "reserve", Settle: "settle", Progress: "progress"}
"""Write kinds counted in ``LedgerStats.writes_total`` (the rest are admin operations)."""


def _ignore_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()  # retrieved: a failed commit is logged (and its releases re-applied) by the committer


class LedgerCore:
    """The single writer. Create, ``await start()``, then call :meth:`apply` and :meth:`read`."""

    def __init__(
        self,
        config: MeteringConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._clock = clock
        self._wall = wall
        self._state = self._new_state()
        self._admin = AdminOps(self._state)
        self._store: LedgerStore | None = None
        self._wexec = ThreadPoolExecutor(1, thread_name_prefix="ledger-commit")
        self._rexec = ThreadPoolExecutor(1, thread_name_prefix="ledger-read")
        self._wake = asyncio.Event()
        self._next: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stats = LedgerStats()
        self._key_listeners: list[Callable[[list[KeyEntry]], None]] = []
        self._writable = asyncio.Event()
        """Clear while the state is rebuilt from the file after a failed commit."""
        self._writable.set()
        self._releases: list[Settle] = []
        """Releases applied since the batch being committed was taken (not yet durable)."""
        self._releases_committing: list[Settle] = []
        """Releases in the batch being committed."""
        self._release_timer: asyncio.TimerHandle | None = None

    def _new_state(self) -> LedgerState:
        c = self.config
        return LedgerState(
            c.price_table(),
            c.default_price.to_price(),
            c.default_max_tokens,
            c.reservation_ttl_s,
            TenantLimits(rpm=c.default_rpm, tpm=c.default_tpm),
        )

    def _open_store(self) -> LedgerStore:
        """The configured store, its writer lock taken (raises :class:`LedgerLockedError`)."""
        c = self.config
        if c.store == "postgres":
            from ._pg_store import PostgresStore  # psycopg is imported only where it is configured

            return PostgresStore(
                c.postgres_conninfo(), lock_wait_s=c.postgres_lock_wait_s, lock_timeout_ms=c.busy_timeout_ms
            )
        return SqliteStore(c.ledger_path, busy_timeout_ms=c.busy_timeout_ms)

    async def start(self) -> None:
        """Open the store, load the state from it and start committing. After a failure (the store
        locked or unreachable) nothing is left open and ``start`` may be called again."""
        loop = asyncio.get_running_loop()
        store = await loop.run_in_executor(self._wexec, self._open_store)
        self._store = store
        try:
            await self._load(self.config.restart_grace_s)
        except BaseException:
            self._store = None
            await loop.run_in_executor(self._wexec, store.close)
            raise
        self._tasks = [asyncio.create_task(self._committer()), asyncio.create_task(self._expirer())]
        if self.config.usage_event_retention_days is not None:
            self._tasks.append(asyncio.create_task(self._retention()))

    async def _load(self, grace_s: float) -> None:
        """(Re)build the state from the file. ``grace_s`` bounds the expiry of reservations found
        open (a restart: their gateways may be gone); a rebuild after a failed commit keeps them."""
        assert self._store is not None
        loop = asyncio.get_running_loop()
        rows = await loop.run_in_executor(self._wexec, self._store.load)
        settled = await loop.run_in_executor(self._wexec, self._store.recent_settled, _RECENT_SETTLED)
        old, new = self._state, self._new_state()
        load_state(new, rows, self._clock(), self._wall(), grace_s)
        new.recent_settled.update(settled)
        for tid, t in new.tenants.items():  # buckets, the duration estimate, the burn rate: memory only
            if (o := old.tenants.get(tid)) is not None:
                t.rpm, t.tpm, t.ewma_duration_s = o.rpm or t.rpm, o.tpm or t.tpm, o.ewma_duration_s
                t.burn = o.burn
                t.apply_limits(t.limits, self._clock(), new.default_limits)
        self._state, self._admin = new, AdminOps(new)
        # 100,000 projects and 150,000 keys are a million long-lived objects: keep them out of the
        # cyclic collector's full passes (each would walk them all, stalling every request).
        gc.collect()
        gc.freeze()

    async def close(self) -> None:
        """Commit what is pending, then close the file."""
        if self._release_timer is not None:
            self._release_timer.cancel()
            self._release_timer = None
        if self._state.batch and self._tasks:
            await self._durable()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._store is not None:
            await asyncio.get_running_loop().run_in_executor(self._wexec, self._store.close)
            self._store = None
        self._wexec.shutdown()
        self._rexec.shutdown()

    # -- write path --------------------------------------------------------------------------------
    def _durable(self) -> asyncio.Future[None]:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            self._wake.set()
        return self._next

    async def _committer(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._store is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            fut, self._next = self._next, None
            batch = self._state.take_batch()
            self._releases_committing, self._releases = self._releases, []
            if fut is None:
                continue
            if not batch:
                fut.set_result(None)
                continue
            t0 = time.perf_counter()
            try:
                await loop.run_in_executor(self._wexec, self._store.commit, batch)
            except Exception as e:  # disk full, I/O error, locked, fenced: memory is ahead of the store
                self._writable.clear()  # before anything else runs: no write lands on this state
                log.error("ledger commit of %d operation(s) failed: %s", batch.num_ops, e)
                fut.set_exception(
                    LedgerUnavailableError(
                        f"The usage ledger could not record this request ({type(e).__name__}); retry.",
                        headers={"retry-after": "1"},
                    )
                )
                nxt, self._next = self._next, None
                if nxt is not None:
                    nxt.set_exception(_RolledBack())
                lost, self._releases_committing, self._releases = (
                    self._releases_committing + self._releases,
                    [],
                    [],
                )
                await self._rebuild()
                self._release_again(lost)  # before any waiting write runs: no await in between
                continue
            self._stats.commit_latency.observe(time.perf_counter() - t0)
            self._stats.commits_total += 1
            fut.set_result(None)

    def _is_release(self, op: Op) -> bool:
        """A settlement that charges nothing and that the crash rule would resolve the same way:
        no tokens, and no progress record on its open reservation."""
        if not isinstance(op, Settle) or op.prompt_tokens or op.completion_tokens:
            return False
        r = self._state.open.get(op.request_id)
        return r is not None and r.progress_tokens is None

    def _defer(self, releases: list[Settle]) -> None:
        """Releases applied without waiting for a commit: the next one takes them, at the latest
        :data:`_RELEASE_COMMIT_S` from now."""
        self._releases.extend(releases)
        if self._release_timer is None:
            self._release_timer = asyncio.get_running_loop().call_later(
                _RELEASE_COMMIT_S, self._commit_releases
            )

    def _commit_releases(self) -> None:
        self._release_timer = None
        if self._state.batch and self._writable.is_set():
            self._durable().add_done_callback(_ignore_failure)  # a failure re-applies them
        elif self._releases:
            self._release_timer = asyncio.get_running_loop().call_later(
                _RELEASE_COMMIT_S, self._commit_releases
            )

    def _release_again(self, releases: list[Settle]) -> None:
        """Apply releases that a failed commit lost to the rebuilt state (no caller waits on them)."""
        now, ts = self._clock(), self._wall()
        again = [op for op in releases if self._is_release(op)]
        for op in again:
            self._apply_one(op, now, ts, None)
        if again:
            self._state.batch.num_ops += len(again)
            self._defer(again)

    async def _rebuild(self) -> None:
        """Reload the state from the store until that works, then let writes in again (a fenced
        PostgreSQL writer never does: another writer took the ledger over)."""
        delay_s = 0.05
        while True:
            try:
                await self._load(float("inf"))
                break
            except Exception as e:
                log.error("ledger state rebuild failed (%s); retrying in %.2f s", e, delay_s)
                await asyncio.sleep(delay_s)  # back-off timer between rebuild attempts
                delay_s = min(5.0, delay_s * 2)
        self._writable.set()

    async def _expirer(self) -> None:
        c = self.config
        interval_s = min(
            5.0, c.reservation_ttl_s / 4, max(0.05, c.restart_grace_s / 4), max(0.05, c.lease_grace_s / 4)
        )
        while True:
            await asyncio.sleep(interval_s)  # a periodic timer, not a wait for a condition
            if not self._writable.is_set():
                continue
            with contextlib.suppress(LedgerUnavailableError, _RolledBack):  # resolved again next time
                await self.expire_due()

    async def _retention(self) -> None:
        while True:
            with contextlib.suppress(Exception):  # a failure here is retried at the next period
                await self.prune_usage_events()
            await asyncio.sleep(_RETENTION_PERIOD_S)  # a periodic timer, not a wait for a condition

    async def prune_usage_events(self, step: int = 10_000) -> int:
        """Delete usage events past the retention, ``step`` rows per transaction between commits (on
        the writer's thread, so never inside one); returns how many."""
        days = self.config.usage_event_retention_days
        if days is None or self._store is None:
            return 0
        store, cutoff = self._store, self._wall() - days * 86_400
        loop, total = asyncio.get_running_loop(), 0
        while (n := await loop.run_in_executor(self._wexec, store.prune_events, cutoff, step)) > 0:
            total += n
            if n < step:
                break
        if total:
            log.info("ledger retention: deleted %d usage events settled before %.0f", total, cutoff)
        return total

    async def expire_due(self) -> int:
        """Resolve expired reservations by the crash rule now; return how many (runs periodically)."""
        done = self._state.expire(self._clock(), self._wall())
        if done:
            await self._durable()
        return len(done)

    async def apply(self, ops: Sequence[Op], lease: int | None = None) -> list[Any]:
        """Apply operations in order; return their results once every change is durable.

        ``lease`` names the connection they came on: reservations opened are held by it
        (:meth:`end_lease`).
        An admin operation that fails returns its :class:`serving.errors.APIError` as the result.
        Raises :class:`~serving.errors.LedgerUnavailableError` when the commit of these operations
        failed (none of them was recorded) or the state cannot be rebuilt in time after one did.
        """
        self._stats.ops_total += len(ops)
        while True:
            await self._until_writable()
            now, ts = self._clock(), self._wall()
            results, wrote, durable = [], False, False
            keys: list[KeyEntry] = []
            releases: list[Settle] = []
            for op in ops:
                release = self._is_release(op)
                try:
                    res, changed = self._apply_one(op, now, ts, lease)
                except APIError as e:
                    res, changed = e, False
                results.append(res)
                if changed:
                    wrote = True
                    kind = "release" if release else _KINDS.get(type(op), "admin")
                    self._stats.writes_total[kind] = self._stats.writes_total.get(kind, 0) + 1
                    if release:
                        releases.append(op)  # type: ignore[arg-type]  # _is_release: a Settle
                    else:
                        durable = True
                if changed and isinstance(op, AddKey | RevokeKey):
                    k = self._state.keys_by_id[op.key_id]
                    usable = k.revoked_at is None and k.role == "member"
                    keys.append((k.key_hash, k.tenant_id if usable else None))
            if not wrote:
                return results
            self._state.batch.num_ops += len(ops)
            if releases:
                self._defer(releases)
            if not durable:
                return results  # only releases: they ride on the next commit
            try:
                await self._durable()
            except _RolledBack:
                continue  # applied on state that a failed commit discarded: apply to the rebuilt one
            if keys:
                for listener in list(self._key_listeners):
                    listener(keys)
            return results

    def key_snapshot(self) -> list[KeyEntry]:
        """Every key usable for inference as ``(key_hash, tenant_id)`` (organization admin keys are
        not: the gateway refuses them before reading a body)."""
        return [
            (h, k.tenant_id)
            for h, k in self._state.keys_by_hash.items()
            if k.revoked_at is None and k.role == "member"
        ]

    def subscribe_keys(self, listener: Callable[[list[KeyEntry]], None]) -> Callable[[], None]:
        """Call ``listener`` with the keys added or revoked, once each change is durable; returns
        the unsubscribe function. Take :meth:`key_snapshot` in the same tick to miss nothing."""
        self._key_listeners.append(listener)
        return lambda: self._key_listeners.remove(listener)

    async def _until_writable(self) -> None:
        if self._writable.is_set():
            return
        deadline = self._clock() + _UNAVAILABLE_WAIT_S
        while not self._writable.is_set():  # re-checked: it may be cleared again before we run
            try:
                await asyncio.wait_for(self._writable.wait(), max(0.0, deadline - self._clock()))
            except TimeoutError:
                raise LedgerUnavailableError(
                    "The usage ledger cannot record requests right now; retry later.",
                    headers={"retry-after": "1"},
                ) from None

    def end_lease(self, lease: int) -> int:
        """The connection ``lease`` is gone: its open reservations expire ``lease_grace_s`` from now
        (its gateway may reconnect and settle them before that). Returns how many."""
        return self._state.end_lease(lease, self._wall() + self.config.lease_grace_s)

    def _apply_one(self, op: Op, now: float, ts: float, lease: int | None) -> tuple[Any, bool]:
        """One operation's result and whether it changed anything that must be committed."""
        st, a = self._state, self._admin
        match op:
            case Reserve():
                res = st.reserve(op, now, ts, lease)
                return res, isinstance(res, Reservation)
            case Settle(request_id=rid):
                charge = None
                if rid not in st.open and rid not in st.recent_settled and self._store is not None:
                    charge = self._store.settled_charge(rid)  # rare: a settlement replayed long after
                s = st.settle(op, now, ts, charge)
                return s, not (s.duplicate or s.unknown)
            case Progress(request_id, completion_tokens):
                was_open = st.progress(request_id, completion_tokens)
                return was_open, was_open
            case CreateTenant():
                return a.create_tenant(op, now, ts), True
            case UpdateTenant():
                return a.update_tenant(op, now, ts), True
            case TopUp():
                return a.top_up(op, ts), True
            case CreateProject():
                return a.create_project(op, now, ts), True
            case UpdateProject():
                return a.update_project(op, now, ts), True
            case CreateGrant():
                view, new = a.create_grant(op, ts)
                return (view, new), new
            case AddKey():
                return a.add_key(op, ts), True
            case RevokeKey():
                return a.revoke_key(op, ts), True
            case _:
                assert_never(op)

    # -- read path ---------------------------------------------------------------------------------
    async def read(self, op: Read) -> Any:
        """The answer to a read; an error (an unknown tenant) is returned, not raised."""
        st, a = self._state, self._admin
        ts = self._wall()
        try:
            match op:
                case ListTenants(after, limit):
                    return _page(st.tenants, after, limit, lambda t: tenant_view(t, ts))
                case GetTenant(tenant_id):
                    return tenant_view(a.tenant(tenant_id), ts)
                case ListProjects(tenant_id, after, limit):
                    return _page(a.tenant(tenant_id).projects, after, limit, project_view)
                case GetProject(tenant_id, project_id):
                    return project_view(a.project(tenant_id, project_id))
                case ListKeys(tenant_id, project_id, after, limit):
                    return await self._list_keys(tenant_id, project_id, after, limit)
                case ListGrants(tenant_id, active_only):
                    grants = a.tenant(tenant_id).grants
                    return [
                        grant_view(g)
                        for g in grants
                        if not active_only or (g.remaining > 0 and not g.expired)
                    ]
                case KeyPrincipal(key_hash):
                    k = st.keys_by_hash.get(key_hash)
                    if k is None or k.revoked_at is not None:
                        return None
                    return Principal(k.tenant_id, k.project_id, k.role)  # type: ignore[arg-type]
                case SummarizeUsage():
                    return await self._usage_summary(op)
                case ExportUsage(filters, since_ts, until_ts, after_event_id, limit):
                    self._check_filters(filters.tenant_id, filters.project_id)
                    assert self._store is not None
                    return await self._in_reader(
                        self._store.export_page, filters.as_dict(), since_ts, until_ts, after_event_id, limit
                    )
                case UsageReport():
                    return await self._usage_report(op)
                case TenantFigures(tenant_id):
                    return self._figures(tenant_id)
                case Stats():
                    return self._snapshot()
                case Audit():
                    assert self._store is not None
                    return await self._in_reader(self._store.audit)
                case _:
                    assert_never(op)
        except APIError as e:
            return e

    def _check_filters(self, tenant_id: str | None, project_id: str | None) -> None:
        if tenant_id is not None:
            if project_id is not None:
                self._admin.project(tenant_id, project_id)
            else:
                self._admin.tenant(tenant_id)

    async def _list_keys(
        self, tenant_id: str, project_id: str | None, after: str | None, limit: int
    ) -> Page[Any]:
        self._check_filters(tenant_id, project_id)
        keys = [
            k
            for k in self._state.keys_by_id.values()
            if k.tenant_id == tenant_id and (project_id is None or k.project_id == project_id)
            and (after is None or k.key_id > after)
        ]  # fmt: skip
        keys.sort(key=lambda k: k.key_id)
        data = [key_view(k) for k in keys[:limit]]
        more = len(keys) > limit
        return Page(data=data, has_more=more, next_after=data[-1].key_id if more and data else None)

    async def _in_reader(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._rexec, fn, *args)

    async def _usage_report(self, op: UsageReport) -> list[tuple[Any, ...]]:
        self._check_filters(op.filters.tenant_id, op.filters.project_id)
        assert self._store is not None
        store = self._store

        def page() -> list[tuple[Any, ...]]:
            return store.report_page(
                op.group_by, op.filters.as_dict(), op.since_day, op.until_day, op.after, op.limit
            )

        return await self._in_reader(page)

    def _rates(self, level: Any, now: float) -> dict[str, RateLimitState]:
        return {
            kind: RateLimitState(limit=b.capacity, remaining=int(b.level(now)), reset_s=b.reset_s(now))
            for kind, b in (("requests", level.rpm), ("tokens", level.tpm))
            if b is not None
        }

    async def _usage_summary(self, op: SummarizeUsage) -> UsageSummary:
        t = self._admin.tenant(op.tenant_id)
        p = None if op.project_id is None else self._admin.project(op.tenant_id, op.project_id)
        assert self._store is not None
        rows = await self._in_reader(self._store.usage_by_day, op.tenant_id, op.project_id, op.since_ts)
        now, ts = self._clock(), self._wall()
        v = tenant_view(t, ts)
        project = None
        if p is not None:
            p.roll_period(ts)
            left = p.cap_left()
            project = ProjectUsage(
                project_id=p.project_id,
                credit_cap=None if p.cap_ucredits is None else ucredits_to_credits(p.cap_ucredits),
                cap_period=p.cap_period,  # type: ignore[arg-type]
                spent_credits=ucredits_to_credits(p.spent_ucredits),
                reserved_credits=ucredits_to_credits(p.reserved_ucredits),
                available_credits=None if left is None else ucredits_to_credits(max(0, left)),
                in_flight=p.in_flight,
                limits=p.limits,
                rate_limits=self._rates(p, now),
            )
        return UsageSummary(
            tenant_id=t.tenant_id,
            name=t.name,
            credits=v.credits,
            reserved_credits=v.reserved_credits,
            available_credits=v.available_credits,
            in_flight=t.in_flight,
            limits=t.limits,
            rate_limits=self._rates(t, now),
            grants=[grant_view(g) for g in t.grants if g.remaining > 0 and not g.expired],
            project=project,
            usage=[
                UsageRow(
                    day=d,
                    project_id=pid,
                    model=m,
                    requests=n,
                    prompt_tokens=pt,
                    completion_tokens=c,
                    cached_tokens=ct,
                    credits=ucredits_to_credits(u),
                )
                for d, pid, m, n, pt, c, ct, u in rows
            ],
        )

    def _figures(self, tenant_id: str) -> dict[str, Any]:
        """Live figures of one organization and its projects (what the metrics budget leaves out
        for untracked organizations)."""
        t = self._admin.tenant(tenant_id)
        st, ts = self._state, self._wall()
        c = st.counters
        tokens = {f"{m}/{k}": n for (tid, m, k), n in c.tokens.items() if tid == tenant_id}
        return {
            "tenant": tenant_view(t, ts).model_dump(mode="json"),
            "charged_credits": ucredits_to_credits(c.credits.get(tenant_id, 0)),
            "written_off_credits": ucredits_to_credits(c.written_off.get(tenant_id, 0)),
            "tokens": tokens,
            "refused": {reason: n for (tid, reason), n in c.refused.items() if tid == tenant_id},
            "projects": [project_view(p).model_dump(mode="json") for p in t.projects.values()],
        }

    def _snapshot(self) -> LedgerStats:
        st, now = self._state, self._clock()
        s = self._stats
        snap = LedgerStats(
            dict(st.counters.tokens),
            dict(st.counters.refused),
            commit_latency=s.commit_latency,
            commits_total=s.commits_total,
            ops_total=s.ops_total,
            writes_total=dict(s.writes_total),
        )
        for t in st.tenants.values():
            snap.credits_remaining[t.tenant_id] = ucredits_to_credits(t.balance_ucredits)
            snap.credits_reserved[t.tenant_id] = ucredits_to_credits(t.reserved_ucredits)
            snap.credits_granted[t.tenant_id] = ucredits_to_credits(t.granted_ucredits)
            snap.in_flight[t.tenant_id] = t.in_flight
            for kind, b in (("requests", t.rpm), ("tokens", t.tpm)):
                if b is not None:
                    snap.rate_limit_utilisation[(t.tenant_id, kind)] = 1.0 - b.level(now) / b.capacity
            if t.limits.max_concurrency is not None:
                snap.rate_limit_utilisation[(t.tenant_id, "concurrency")] = (
                    t.in_flight / t.limits.max_concurrency
                )
        # Every tenant from 0, so that its first charge is an increase rate() sees.
        charged = st.counters.credits
        snap.credits_charged = {t: ucredits_to_credits(charged.get(t, 0)) for t in st.tenants}
        snap.low_credit, snap.tenants_below_ratio = low_credit(snap.credits_remaining, snap.credits_granted)
        burn = {t.tenant_id: t.burn.per_s(now) / UCREDITS_PER_CREDIT for t in st.tenants.values()}
        snap.run_out, snap.tenants_running_out = run_out(snap.credits_remaining, burn)
        c = self.config
        tracked = None if c.tracked_tenants is None else frozenset(c.tracked_tenants)
        return fold_tenants(snap, tracked, c.metrics_series_budget)

    def price(self, model: str) -> ModelPrice:
        return self._state.price(model)
