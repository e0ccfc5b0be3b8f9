"""The ledger as a named Ray actor shared by every gateway replica, and how a client reaches it.

The actor is detached and restartable (``max_restarts=-1``): if its process dies, Ray starts it
again on the same store, and the crash rule in :mod:`._core` applies. On SQLite it lives on the node
that holds the file (``metering.ledger_node_resource``, the head by default): after its node dies,
Ray keeps it pending until a node with that resource is back, instead of starting it elsewhere on an
empty file, and meanwhile its callers get :class:`LedgerUnavailableError` (503), never a request
served unmetered. On PostgreSQL (``metering.store: postgres``) it is not pinned: Ray restarts it on
any live node and it reloads its state from the database (two writers are fenced there, see
:mod:`._pg_store`). :func:`ledger_home` says where it runs, from Ray's actor table. Calls do not retry inside Ray
(``max_task_retries=0``); :class:`ActorTransport` resends hot batches itself until the ledger is
back or a deadline passes. Both ends of the ledger socket live in :mod:`._socket`, which knows
nothing of Ray; this module serves it from the actor and opens it from the address the actor gives.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError

from serving.errors import LedgerUnavailableError
from serving.priority import run_at_normal_priority
from serving.ray_env import node_address

from ._config import MeteringConfig
from ._core import LedgerCore
from ._keys import KeyDirectory
from ._ops import AdminOp, HotOp, HotResult, Op, Read
from ._socket import Endpoint, LedgerLink, LedgerSocketServer

__all__ = ["ActorTransport", "LedgerActor", "LedgerHome", "get_or_create_ledger_actor", "ledger_home"]

log = logging.getLogger("tokenweir.ledger")


class LedgerActor:
    """Ray actor body: a :class:`LedgerCore` started on first use."""

    def __init__(self, config_json: str) -> None:
        sys.setswitchinterval(0.0005)  # let the commit thread take the GIL back promptly after fsync
        # Ray starts workers at nice 15; every request of every gateway waits on this one writer, so
        # it runs at normal priority where allowed (measured: 4,171 -> 6,498 pairs/s, README "Speed").
        run_at_normal_priority()
        self._core = LedgerCore(MeteringConfig.model_validate_json(config_json))
        self._started: asyncio.Task[None] | None = None
        self._socket: LedgerSocketServer | None = None

    async def _ready(self) -> LedgerCore:
        failed = (
            self._started is not None
            and self._started.done()
            and (self._started.cancelled() or self._started.exception() is not None)
        )
        if self._started is None or failed:  # a start that failed (store locked, unreachable) is retried
            self._started = asyncio.get_running_loop().create_task(self._core.start())
        await asyncio.shield(self._started)
        return self._core

    async def apply(self, ops: Sequence[Op]) -> list[Any]:
        return await (await self._ready()).apply(ops)

    async def read(self, op: Read) -> Any:
        return await (await self._ready()).read(op)

    async def endpoint(self) -> Endpoint:
        """Start the ledger and its socket if needed; return ``(host, port, secret)`` of the socket."""
        core = await self._ready()
        if self._socket is None:
            self._socket = LedgerSocketServer(core.apply, _node_ip(), on_close=core.end_lease, keys=core)
        if self._socket.endpoint is None:
            await self._socket.start()
        assert self._socket.endpoint is not None
        return self._socket.endpoint

    async def ping(self) -> int:
        """Start the ledger if needed; return the actor's process id."""
        await self._ready()
        return os.getpid()

    async def shutdown(self) -> None:
        """Commit what is pending and close the file (call before killing the actor)."""
        if self._socket is not None:
            await self._socket.close()
        await (await self._ready()).close()


def _node_ip() -> str:
    """The ledger socket listens on the Ray node's address (loopback on a local cluster);
    :class:`~serving.ray_env.NodeAddressError` if Ray has none for it."""
    return node_address("the ledger socket listens on its node")


def get_or_create_ledger_actor(config: MeteringConfig, *, namespace: str = "tokenweir") -> Any:
    """The named, detached ledger actor (created once per cluster; every replica gets the same one)."""
    cls = ray.remote(LedgerActor)
    pin = config.ledger_pin_resource
    return cls.options(  # type: ignore[attr-defined]
        name=config.ledger_actor_name,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=0,
        max_concurrency=1000,
        num_cpus=0,
        resources={} if pin is None else {pin: 0.001},  # SQLite: its home node, the one with its file
    ).remote(config.for_actors().model_dump_json())


@dataclass(frozen=True, slots=True)
class LedgerHome:
    """Where the ledger actor runs, from Ray's actor table (the GCS's: no dashboard needed)."""

    state: str
    """Ray's actor state (``ALIVE``, ``RESTARTING``, ``PENDING_CREATION``, ``DEAD``), or ``ABSENT``
    when no ledger actor of that name exists."""
    node_resource: str | None
    """The resource that pins it (``metering.ledger_node_resource``); None on PostgreSQL (any node)."""
    node_id: str | None = None
    """Hex id of the Ray node it runs (or last ran) on."""
    node_ip: str | None = None
    """That node's address."""
    pid: int | None = None
    """Its process id on that node."""
    restarts: int = 0
    """How often Ray has restarted it."""


def ledger_home(config: MeteringConfig, *, namespace: str = "tokenweir") -> LedgerHome:
    """Where the cluster's ledger actor lives (call on a process connected to Ray)."""
    from ray._private.state import actors  # the GCS actor table; Ray's state API needs the dashboard

    try:
        handle = ray.get_actor(config.ledger_actor_name, namespace=namespace)
    except ValueError:
        return LedgerHome("ABSENT", config.ledger_pin_resource)
    row = actors(handle._actor_id.hex())
    address = row.get("Address") or {}
    running = row.get("State") == "ALIVE"
    return LedgerHome(
        state=str(row.get("State") or "ABSENT"),
        node_resource=config.ledger_pin_resource,
        node_id=address.get("NodeID") or None,
        node_ip=address.get("IPAddress") or None,
        pid=int(row["Pid"]) if running and row.get("Pid") else None,
        restarts=int(row.get("NumRestarts") or 0),
    )


def _unavailable(message: str = "The usage ledger is unavailable; retry later.") -> LedgerUnavailableError:
    return LedgerUnavailableError(message, headers={"retry-after": "1"})


class ActorTransport:
    """A :class:`~._client.LedgerTransport` to the ledger actor: hot batches on its socket (as actor
    calls with ``socket=False``, for comparison), admin operations and reads as actor calls.

    Hot batches are resent, with back-off, while Ray restarts the ledger, for up to
    ``restart_deadline_s``; then the caller sees :class:`LedgerUnavailableError`, as it does when
    one call is not answered within ``call_timeout_s``, and at once when no live node offers the
    ledger's ``node_resource`` (its home node is dead: Ray cannot restart it before that node is
    back, so waiting would only hold the request)."""

    def __init__(
        self,
        handle: Any,
        *,
        socket: bool = True,
        restart_deadline_s: float = 60.0,
        call_timeout_s: float = 30.0,
        node_resource: str | None = None,
    ) -> None:
        self.handle = handle
        self.restart_deadline_s = restart_deadline_s
        self.call_timeout_s = call_timeout_s
        self.node_resource = node_resource
        self.keys = KeyDirectory() if socket else None
        """The usable keys, as the ledger pushes them on the socket (None: never synced)."""
        self._link = LedgerLink(self._endpoint, self.keys) if socket else None

    async def _endpoint(self) -> Endpoint:
        return await self.handle.endpoint.remote()  # type: ignore[no-any-return]

    async def hot(self, ops: list[HotOp]) -> list[HotResult]:
        deadline = time.monotonic() + self.restart_deadline_s
        delay_s = 0.05
        if self.keys is not None and not self.keys.synced and not await self._home_alive():
            raise _unavailable("The usage ledger's node is down; retry later.")  # the link is down too
        while True:
            try:
                call = self._link.call(ops) if self._link is not None else self.handle.apply.remote(ops)
                return await asyncio.wait_for(call, self.call_timeout_s)  # type: ignore[no-any-return]
            except TimeoutError as e:  # a hung ledger: answer the request, do not wait forever
                raise _unavailable("The usage ledger did not answer in time; retry later.") from e
            except (ConnectionError, OSError, RayActorError) as e:
                if time.monotonic() + delay_s > deadline or not await self._home_alive():
                    raise _unavailable() from e
                log.info("ledger unreachable (%s); resending", e)
                await asyncio.sleep(delay_s)  # back-off timer while Ray restarts the ledger
                delay_s = min(1.0, delay_s * 2)

    async def _home_alive(self) -> bool:
        """Whether a live Ray node offers the ledger's resource, so that a restart can happen
        (asked of the GCS only while the ledger is unreachable)."""
        if self.node_resource is None:
            return True
        resource = self.node_resource

        def alive() -> bool:
            return any(n["Alive"] and resource in n["Resources"] for n in ray.nodes())

        try:
            return await asyncio.to_thread(alive)
        except Exception:  # the GCS itself unreachable: keep to the deadline
            log.debug("could not list Ray's nodes", exc_info=True)
            return True

    async def connect(self) -> None:
        """Open the ledger socket now (it also syncs :attr:`keys`); failures are retried by use."""
        if self._link is not None:
            await self._link.connect()

    async def admin(self, op: AdminOp) -> Any:
        try:
            (result,) = await self.handle.apply.remote([op])
        except RayActorError as e:
            raise _unavailable() from e
        return result

    async def read(self, op: Read) -> Any:
        try:
            return await self.handle.read.remote(op)
        except RayActorError as e:
            raise _unavailable() from e

    async def close(self) -> None:
        if self._link is not None:
            await self._link.close()
