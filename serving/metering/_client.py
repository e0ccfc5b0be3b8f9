"""The gateway side of the ledger: coalesces a replica's operations into batched calls.

Every gateway replica holds one :class:`LedgerClient`. Operations submitted in the same event-loop
tick (and those that arrive while a call is in flight) travel as one call, so the per-request cost
of talking to the single writer is a fraction of a round trip. Two transports: the ledger in this
process (:class:`LocalTransport`) or the shared Ray actor (:class:`ActorTransport`).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from serving.errors import APIError, AuthenticationError, LedgerUnavailableError
from serving.tenancy import (
    ApiKeyView,
    CreatedApiKey,
    ExportFormat,
    TenantCreate,
    TenantUpdate,
    TenantView,
    TopUp,
    UsageSummary,
    generate_api_key,
    hash_api_key,
    looks_like_api_key,
)

from ._core import LedgerCore
from ._stats import LedgerStats

__all__ = ["LedgerClient", "LedgerTransport", "LocalTransport"]


class LedgerTransport(Protocol):
    """How a client reaches the ledger."""

    async def apply(self, ops: list[tuple[Any, ...]], *, retry: bool) -> list[Any]:
        """Write path; ``retry`` allows resending after the ledger restarted (idempotent ops only)."""
        ...

    async def read(self, name: str, *args: Any) -> Any: ...


class LocalTransport:
    """The ledger runs in this process (tests, the CLI on a stopped gateway, single-process serve)."""

    def __init__(self, core: LedgerCore) -> None:
        self.core = core

    async def apply(self, ops: list[tuple[Any, ...]], *, retry: bool) -> list[Any]:
        return await self.core.apply(ops)

    async def read(self, name: str, *args: Any) -> Any:
        return await self.core.read(name, *args)


class _Coalescer:
    """Groups submitted operations into calls; at most ``max_in_flight`` calls at a time."""

    def __init__(
        self,
        send: Callable[[list[tuple[Any, ...]]], Awaitable[list[Any]]],
        max_batch: int,
        max_in_flight: int,
    ) -> None:
        self._send = send
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._ops: list[tuple[Any, ...]] = []
        self._futs: list[asyncio.Future[Any]] = []
        self._in_flight = 0
        self._scheduled = False

    def submit(self, op: tuple[Any, ...]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
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

    async def _call(self, ops: list[tuple[Any, ...]], futs: list[asyncio.Future[Any]]) -> None:
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
        self._hot = _Coalescer(self._send_hot, max_batch_ops, max_in_flight)

    async def _send_hot(self, ops: list[tuple[Any, ...]]) -> list[Any]:
        return await self.transport.apply(ops, retry=True)

    # -- hot path (idempotent, batched) -----------------------------------------------------------
    def reserve(
        self,
        request_id: str,
        key_hash: str,
        model: str,
        prompt_tokens: int,
        max_tokens: int | None,
        model_max_len: int | None,
    ) -> asyncio.Future[Any]:
        """A future of a :class:`Reservation` or a :class:`Refusal`."""
        return self._hot.submit(
            ("reserve", request_id, key_hash, model, prompt_tokens, max_tokens, model_max_len)
        )

    def settle(
        self,
        request_id: str,
        prompt_tokens: int,
        completion_tokens: int,
        outcome: str,
        pool: str,
        gpu_type: str,
    ) -> asyncio.Future[Any]:
        """A future of a :class:`Settlement`."""
        return self._hot.submit(
            ("settle", request_id, prompt_tokens, completion_tokens, outcome, pool, gpu_type)
        )

    def progress(self, request_id: str, completion_tokens: int) -> asyncio.Future[Any]:
        return self._hot.submit(("progress", request_id, completion_tokens))

    # -- admin (not retried: a top-up must not apply twice) ----------------------------------------
    async def _admin(self, *op: Any) -> Any:
        (result,) = await self.transport.apply([op], retry=False)
        return _unwrap(result)

    async def _read(self, name: str, *args: Any) -> Any:
        return _unwrap(await self.transport.read(name, *args))

    async def create_tenant(self, spec: TenantCreate) -> TenantView:
        return await self._admin("create_tenant", spec.model_dump())

    async def update_tenant(self, tenant_id: str, update: TenantUpdate) -> TenantView:
        return await self._admin("update_tenant", tenant_id, update.model_dump(exclude_unset=True))

    async def top_up(self, tenant_id: str, top_up: TopUp) -> TenantView:
        return await self._admin("top_up", tenant_id, top_up.credits, top_up.note)

    async def create_key(self, tenant_id: str, name: str = "") -> CreatedApiKey:
        """Mint a key here (the plaintext never reaches the ledger) and register its hash."""
        key = generate_api_key()
        view: ApiKeyView = await self._admin(
            "add_key", tenant_id, key.key_id, key.key_hash, key.display_prefix, name
        )
        return CreatedApiKey(**view.model_dump(), api_key=key.plaintext)

    async def revoke_key(self, key_id: str) -> ApiKeyView:
        return await self._admin("revoke_key", key_id)

    async def list_tenants(self) -> list[TenantView]:
        return await self._read("list_tenants")

    async def get_tenant(self, tenant_id: str) -> TenantView:
        return await self._read("get_tenant", tenant_id)

    async def list_keys(self, tenant_id: str) -> list[ApiKeyView]:
        return await self._read("list_keys", tenant_id)

    async def tenant_for_key(self, api_key: str) -> str:
        tenant_id = None
        if looks_like_api_key(api_key):
            tenant_id = await self._read("tenant_for_key_hash", hash_api_key(api_key))
        if tenant_id is None:
            raise AuthenticationError("Incorrect API key provided.")
        return tenant_id

    async def usage_summary(self, tenant_id: str, since_ts: float | None = None) -> UsageSummary:
        return await self._read("usage_summary", tenant_id, since_ts)

    async def export_usage(
        self, tenant_id: str | None, since_ts: float | None, until_ts: float | None, fmt: ExportFormat
    ) -> str:
        return await self._read("export_usage", tenant_id, since_ts, until_ts, fmt)

    async def stats(self) -> LedgerStats:
        return await self._read("stats")

    async def audit(self) -> list[str]:
        """Ledger invariant violations; empty when balances match grants minus charges."""
        return await self._read("audit")
