"""The gateway side of the ledger: how a process gets a client, and the client's batching.

:func:`connect` is the one way a gateway replica (or a CLI command beside a running gateway) reaches
the shared ledger actor; :func:`local_ledger` opens the ledger file in this process instead (the CLI
on a stopped gateway, tests). Either gives a :class:`LedgerClient`, which coalesces the replica's
hot operations: those submitted in the same event-loop tick (and those that arrive while a call is
in flight) travel as one call, so the per-request cost of talking to the single writer is a
fraction of a round trip. The client builds the typed operations of :mod:`._ops`; a transport
(:class:`LedgerTransport`) only carries them.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, Protocol

from serving.errors import APIError, AuthenticationError, LedgerUnavailableError
from serving.tenancy import (
    DEFAULT_PROJECT,
    ApiKeyView,
    CreatedApiKey,
    ExportFormat,
    GrantCreate,
    GrantView,
    KeyOwner,
    KeyRole,
    Page,
    ProjectCreate,
    ProjectUpdate,
    ProjectView,
    TenantCreate,
    TenantUpdate,
    TenantView,
    UsageQuery,
    UsageSummary,
    generate_api_key,
    hash_api_key,
    looks_like_api_key,
    render_rows,
)
from serving.tenancy import TopUp as TopUpRequest

from ._actor import ActorTransport, get_or_create_ledger_actor
from ._config import MeteringConfig
from ._core import LedgerCore
from ._keys import KeyDirectory, Keys, snapshot_frames
from ._ops import (
    AddKey,
    AdminOp,
    Audit,
    CreateGrant,
    CreateProject,
    CreateTenant,
    ExportUsage,
    GetProject,
    GetTenant,
    HotOp,
    HotResult,
    KeyPrincipal,
    ListGrants,
    ListKeys,
    ListProjects,
    ListTenants,
    Read,
    RevokeKey,
    Stats,
    SummarizeUsage,
    TenantFigures,
    TopUp,
    UpdateProject,
    UpdateTenant,
    UsageFilters,
    UsageReport,
)
from ._policy import utc_day
from ._stats import LedgerStats
from ._storage import EXPORT_COLUMNS, REPORT_SUMS

__all__ = ["LedgerClient", "LedgerTransport", "LocalTransport", "connect", "local_ledger"]


class LedgerTransport(Protocol):
    """How a client reaches the ledger."""

    async def hot(self, ops: list[HotOp]) -> list[HotResult]:
        """A batch of hot operations; may be resent after the ledger restarted (they are idempotent)."""
        ...

    async def admin(self, op: AdminOp) -> Any:
        """One admin operation, applied at most once (never resent)."""
        ...

    async def read(self, op: Read) -> Any: ...

    async def connect(self) -> None:
        """Open the link to the ledger now, if it has one (and sync :attr:`keys`)."""
        ...

    @property
    def keys(self) -> KeyDirectory | None:
        """The usable keys as the ledger last pushed them; None where the transport has none."""
        ...


class LocalTransport:
    """The ledger runs in this process (tests, the CLI on a stopped gateway)."""

    def __init__(self, core: LedgerCore) -> None:
        self.core = core
        self.keys: KeyDirectory | None = None

    def _sync_keys(self) -> KeyDirectory:
        """In-process, the directory follows the core directly (same snapshot-then-changes feed)."""
        if self.keys is None:
            self.keys = KeyDirectory()
            for frame in snapshot_frames(self.core.key_snapshot()):
                self.keys.apply(frame)
            keys = self.keys
            self.core.subscribe_keys(lambda entries: keys.apply(Keys(entries)))
        return self.keys

    async def connect(self) -> None:
        self._sync_keys()

    async def hot(self, ops: list[HotOp]) -> list[HotResult]:
        return await self.core.apply(ops)

    async def admin(self, op: AdminOp) -> Any:
        (result,) = await self.core.apply([op])
        return result

    async def read(self, op: Read) -> Any:
        return await self.core.read(op)


def connect(config: MeteringConfig, *, namespace: str) -> LedgerClient:
    """The client of the cluster's ledger actor (created on first use; every replica shares it):
    hot operations on the ledger's socket, admin operations and reads as Ray actor calls."""
    actor = get_or_create_ledger_actor(config, namespace=namespace)
    transport = ActorTransport(
        actor, call_timeout_s=config.call_timeout_s, node_resource=config.ledger_pin_resource
    )
    return LedgerClient(transport, max_batch_ops=config.max_batch_ops)


@asynccontextmanager
async def local_ledger(config: MeteringConfig) -> AsyncIterator[LedgerClient]:
    """A :class:`LedgerClient` over a ledger started here on the configured store (the file at
    ``config.ledger_path``, or the PostgreSQL database).

    Raises :class:`LedgerLockedError` while another process (a running gateway's ledger actor) holds
    the store: use the admin HTTP API then.
    """
    core = LedgerCore(config)
    await core.start()
    try:
        yield LedgerClient(LocalTransport(core), max_batch_ops=config.max_batch_ops)
    finally:
        await core.close()


class _Coalescer:
    """Groups submitted operations into calls; at most ``max_in_flight`` calls at a time."""

    def __init__(
        self,
        send: Callable[[list[HotOp]], Awaitable[list[HotResult]]],
        max_batch: int,
        max_in_flight: int,
    ) -> None:
        self._send = send
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._ops: list[HotOp] = []
        self._futs: list[asyncio.Future[HotResult]] = []
        self._in_flight = 0
        self._scheduled = False

    def submit(self, op: HotOp) -> asyncio.Future[HotResult]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[HotResult] = loop.create_future()
        self._ops.append(op)
        self._futs.append(fut)
        if not self._scheduled and self._in_flight < self._max_in_flight:
            self._scheduled = True
            loop.call_soon(self._launch, context=contextvars.Context())  # the rest of this tick joins
        return fut

    def _launch(self) -> None:
        self._scheduled = False
        while self._ops and self._in_flight < self._max_in_flight:
            ops, futs = self._ops[: self._max_batch], self._futs[: self._max_batch]
            del self._ops[: self._max_batch], self._futs[: self._max_batch]
            self._in_flight += 1
            # A fresh context: the call must not count as a child of whichever request's tick
            # launched it, or Ray cancels it (and every other request's ops in the batch) when
            # that request ends or is cancelled.
            asyncio.get_running_loop().create_task(self._call(ops, futs), context=contextvars.Context())

    async def _call(self, ops: list[HotOp], futs: list[asyncio.Future[HotResult]]) -> None:
        try:
            results = await self._send(ops)
        except BaseException as e:
            for f in futs:
                if not f.done():
                    f.set_exception(
                        e if isinstance(e, Exception) else LedgerUnavailableError("ledger call cancelled")
                    )
            if not isinstance(e, Exception):
                raise
        else:
            for f, r in zip(futs, results, strict=True):
                if not f.done():
                    f.set_result(r)
        finally:
            self._in_flight -= 1
            if self._ops:
                self._launch()


def _unwrap(result: Any) -> Any:
    if isinstance(result, APIError):
        raise result
    return result


class LedgerClient:
    """Batched access to the ledger; implements :class:`serving.tenancy.TenancyBackend`."""

    def __init__(
        self, transport: LedgerTransport, *, max_batch_ops: int = 4096, max_in_flight: int = 2
    ) -> None:
        self.transport = transport
        self._hot = _Coalescer(transport.hot, max_batch_ops, max_in_flight)

    def submit(self, op: HotOp) -> asyncio.Future[HotResult]:
        """Send a hot operation with the others of this tick; a future of its result (for
        :class:`Reserve` a :class:`Reservation` or a :class:`Refusal`, for :class:`Settle` a
        :class:`Settlement`, for :class:`Progress` whether the request was open)."""
        return self._hot.submit(op)

    # -- admin (not retried: a top-up must not apply twice) ----------------------------------------
    async def _admin(self, op: AdminOp) -> Any:
        return _unwrap(await self.transport.admin(op))

    async def _read(self, op: Read) -> Any:
        return _unwrap(await self.transport.read(op))

    async def create_tenant(self, spec: TenantCreate) -> TenantView:
        return await self._admin(CreateTenant(spec))

    async def update_tenant(self, tenant_id: str, update: TenantUpdate) -> TenantView:
        return await self._admin(UpdateTenant(tenant_id, update))

    async def top_up(self, tenant_id: str, top_up: TopUpRequest) -> TenantView:
        return await self._admin(TopUp(tenant_id, top_up.credits, top_up.note))

    async def create_project(self, tenant_id: str, spec: ProjectCreate) -> ProjectView:
        return await self._admin(CreateProject(tenant_id, spec))

    async def update_project(self, tenant_id: str, project_id: str, update: ProjectUpdate) -> ProjectView:
        return await self._admin(UpdateProject(tenant_id, project_id, update))

    async def create_grant(self, tenant_id: str, spec: GrantCreate) -> tuple[GrantView, bool]:
        view, new = await self._admin(CreateGrant(tenant_id, spec))
        return view, new

    async def create_key(
        self, tenant_id: str, name: str = "", project_id: str = DEFAULT_PROJECT, role: KeyRole = "member"
    ) -> CreatedApiKey:
        """Mint a key here (the plaintext never reaches the ledger) and register its hash."""
        key = generate_api_key()
        view: ApiKeyView = await self._admin(
            AddKey(tenant_id, key.key_id, key.key_hash, key.display_prefix, name, project_id, role)
        )
        return CreatedApiKey(**view.model_dump(), api_key=key.plaintext)

    async def revoke_key(self, key_id: str, tenant_id: str | None = None) -> ApiKeyView:
        return await self._admin(RevokeKey(key_id, tenant_id))

    async def list_tenants(self, after: str | None = None, limit: int = 100) -> Page[TenantView]:
        return await self._read(ListTenants(after, limit))

    async def get_tenant(self, tenant_id: str) -> TenantView:
        return await self._read(GetTenant(tenant_id))

    async def list_projects(
        self, tenant_id: str, after: str | None = None, limit: int = 100
    ) -> Page[ProjectView]:
        return await self._read(ListProjects(tenant_id, after, limit))

    async def get_project(self, tenant_id: str, project_id: str) -> ProjectView:
        return await self._read(GetProject(tenant_id, project_id))

    async def list_grants(self, tenant_id: str) -> list[GrantView]:
        return await self._read(ListGrants(tenant_id))

    async def list_keys(
        self, tenant_id: str, project_id: str | None = None, after: str | None = None, limit: int = 100
    ) -> Page[ApiKeyView]:
        return await self._read(ListKeys(tenant_id, project_id, after, limit))

    async def key_owner(self, api_key: str) -> KeyOwner:
        p = None
        if looks_like_api_key(api_key):
            p = await self._read(KeyPrincipal(hash_api_key(api_key)))
        if p is None:
            raise AuthenticationError("Incorrect API key provided.")
        return KeyOwner(tenant_id=p.tenant_id, project_id=p.project_id, role=p.role)

    async def tenant_for_key(self, api_key: str) -> str:
        return (await self.key_owner(api_key)).tenant_id

    async def usage_summary(
        self, tenant_id: str, project_id: str | None = None, since_ts: float | None = None
    ) -> UsageSummary:
        return await self._read(SummarizeUsage(tenant_id, project_id, since_ts))

    async def _event_pages(self, query: UsageQuery, page_rows: int) -> AsyncIterator[list[tuple[Any, ...]]]:
        filters = UsageFilters(query.tenant_id, query.project_id, query.model)
        after = 0
        while True:
            rows = await self._read(ExportUsage(filters, query.since, query.until, after, page_rows))
            if not rows:
                return
            yield rows
            if len(rows) < page_rows:
                return
            after = rows[-1][0]

    def export_usage(self, query: UsageQuery, fmt: ExportFormat, page_rows: int = 5000) -> AsyncIterator[str]:
        """Usage events page by page (one ledger read per ``page_rows``), rendered as they come."""
        return render_rows(EXPORT_COLUMNS, self._event_pages(query, page_rows), fmt)

    async def _report_pages(self, query: UsageQuery, page_rows: int) -> AsyncIterator[list[tuple[Any, ...]]]:
        filters = UsageFilters(query.tenant_id, query.project_id, query.model)
        since = None if query.since is None else utc_day(query.since)
        until = None if query.until is None else utc_day(query.until)
        after: tuple[str, ...] | None = None
        n = len(query.group_by)
        while True:
            rows = await self._read(UsageReport(query.group_by, filters, since, until, after, page_rows))
            if not rows:
                return
            yield rows
            if len(rows) < page_rows:
                return
            after = tuple(rows[-1][:n])

    def usage_report(self, query: UsageQuery, fmt: ExportFormat, page_rows: int = 5000) -> AsyncIterator[str]:
        columns = (*query.group_by, *REPORT_SUMS)
        return render_rows(columns, self._report_pages(query, page_rows), fmt)

    async def tenant_figures(self, tenant_id: str) -> dict[str, Any]:
        return await self._read(TenantFigures(tenant_id))

    async def stats(self) -> LedgerStats:
        return await self._read(Stats())

    async def audit(self) -> list[str]:
        """Ledger invariant violations; empty when balances match grants minus charges and
        write-offs."""
        return await self._read(Audit())
