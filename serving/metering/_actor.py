"""The ledger as a named Ray actor shared by every gateway replica, and how a client reaches it.

The actor is detached and restartable (``max_restarts=-1``): if its process dies, Ray starts it
again on the same file, and the crash rule in :mod:`._core` applies. Calls do not retry inside Ray
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
from typing import Any

import ray
from ray.exceptions import RayActorError

from serving.errors import LedgerUnavailableError
from serving.priority import run_at_normal_priority

from ._config import MeteringConfig
from ._core import LedgerCore
from ._keys import KeyDirectory
from ._ops import AdminOp, HotOp, HotResult, Op, Read
from ._socket import Endpoint, LedgerLink, LedgerSocketServer

__all__ = ["ActorTransport", "LedgerActor", "get_or_create_ledger_actor"]

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
        if self._started is None:
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
    """The ledger socket listens on the Ray node's address (loopback on a local cluster)."""
    try:
        return str(ray.util.get_node_ip_address())
    except Exception:
        return "127.0.0.1"


def get_or_create_ledger_actor(config: MeteringConfig, *, namespace: str = "tokenweir") -> Any:
    """The named, detached ledger actor (created once per cluster; every replica gets the same one)."""
    cls = ray.remote(LedgerActor)
    return cls.options(  # type: ignore[attr-defined]
        name=config.ledger_actor_name,
        namespace=namespace,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=0,
        max_concurrency=1000,
        num_cpus=0,
    ).remote(config.for_actors().model_dump_json())


def _unavailable(message: str = "The usage ledger is unavailable; retry later.") -> LedgerUnavailableError:
    return LedgerUnavailableError(message, headers={"retry-after": "1"})


class ActorTransport:
    """A :class:`~._client.LedgerTransport` to the ledger actor: hot batches on its socket (as actor
    calls with ``socket=False``, for comparison), admin operations and reads as actor calls.

    Hot batches are resent, with back-off, while Ray restarts the ledger, for up to
    ``restart_deadline_s``; then the caller sees :class:`LedgerUnavailableError`, as it does when
    one call is not answered within ``call_timeout_s``."""

    def __init__(
        self,
        handle: Any,
        *,
        socket: bool = True,
        restart_deadline_s: float = 60.0,
        call_timeout_s: float = 30.0,
    ) -> None:
        self.handle = handle
        self.restart_deadline_s = restart_deadline_s
        self.call_timeout_s = call_timeout_s
        self.keys = KeyDirectory() if socket else None
        """The usable keys, as the ledger pushes them on the socket (None: never synced)."""
        self._link = LedgerLink(self._endpoint, self.keys) if socket else None

    async def _endpoint(self) -> Endpoint:
        return await self.handle.endpoint.remote()  # type: ignore[no-any-return]

    async def hot(self, ops: list[HotOp]) -> list[HotResult]:
        deadline = time.monotonic() + self.restart_deadline_s
        delay_s = 0.05
        while True:
            try:
                call = self._link.call(ops) if self._link is not None else self.handle.apply.remote(ops)
                return await asyncio.wait_for(call, self.call_timeout_s)  # type: ignore[no-any-return]
            except TimeoutError as e:  # a hung ledger: answer the request, do not wait forever
                raise _unavailable("The usage ledger did not answer in time; retry later.") from e
            except (ConnectionError, OSError, RayActorError) as e:
                if time.monotonic() + delay_s > deadline:
                    raise _unavailable() from e
                log.info("ledger unreachable (%s); resending", e)
                await asyncio.sleep(delay_s)  # back-off timer while Ray restarts the ledger
                delay_s = min(1.0, delay_s * 2)

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
