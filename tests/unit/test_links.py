"""The ledger socket refuses peers without the secret before decoding anything, and carries only
the hot operations (the token channel's peers: ``test_channel.py``).

Real sockets on 127.0.0.1; the ledger socket's ``apply`` is a recording stand-in for the ledger
core (the boundary under test is the link, not the ledger)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serving.metering import ActorTransport, LedgerSocketServer, SocketTransport
from serving.wire import SECRET_BYTES, frame, read_frame


class _Bomb:
    """Unpickling this runs code: a peer without the secret must never get that far."""

    unpickled = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (_Bomb._boom, ())

    @staticmethod
    def _boom() -> None:
        _Bomb.unpickled = True


async def _ledger() -> tuple[LedgerSocketServer, list[list[tuple[Any, ...]]]]:
    seen: list[list[tuple[Any, ...]]] = []

    async def apply(ops: list[tuple[Any, ...]]) -> list[Any]:
        seen.append(ops)
        return [f"ok-{op[1]}" for op in ops]

    server = LedgerSocketServer(apply, "127.0.0.1")
    await server.start()
    return server, seen


async def test_ledger_socket_answers_hot_batches_by_sequence() -> None:
    server, seen = await _ledger()
    assert server.endpoint is not None
    host, port, secret = server.endpoint
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(secret + frame((7, [("reserve", "a"), ("settle", "b")])) + frame((8, [("progress", "c")])))
    answers = {
        seq: (ok, payload) for seq, ok, payload in [await read_frame(reader), await read_frame(reader)]
    }
    assert answers == {7: (True, ["ok-a", "ok-b"]), 8: (True, ["ok-c"])}
    writer.write(frame((9, [("top_up", "t", 1e9, "")])))  # admin operations never travel here
    seq, ok, message = await read_frame(reader)
    assert (seq, ok) == (9, False) and "only reserve/settle/progress" in message
    assert all(op[0] != "top_up" for ops in seen for op in ops)
    writer.close()
    await server.close()


async def test_ledger_socket_drops_a_peer_without_the_secret_before_unpickling() -> None:
    server, seen = await _ledger()
    assert server.endpoint is not None
    host, port, _secret = server.endpoint
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"x" * SECRET_BYTES + frame((1, [_Bomb()])))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
    assert not _Bomb.unpickled and seen == []
    await server.close()


@pytest.mark.parametrize("n", [SECRET_BYTES - 1])
async def test_short_secret_is_refused(n: int) -> None:
    server, seen = await _ledger()
    assert server.endpoint is not None
    host, port, _ = server.endpoint
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"y" * n)
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b""
    assert seen == []
    await server.close()


class _Remote:
    def __init__(self, fn: Any) -> None:
        self.remote = fn


class _FakeActorHandle:
    """Stands in for the ledger actor's Ray handle (only ``endpoint`` is used on the hot path)."""

    def __init__(self, endpoint: tuple[str, int, bytes]) -> None:
        self.calls = 0

        async def endpoint_call() -> tuple[str, int, bytes]:
            self.calls += 1
            await asyncio.sleep(0.01)  # let every concurrent caller find the link down
            return endpoint

        self.endpoint = _Remote(endpoint_call)


async def test_socket_transport_connects_once_for_concurrent_first_calls() -> None:
    server, _seen = await _ledger()
    assert server.endpoint is not None
    handle = _FakeActorHandle(server.endpoint)
    transport = SocketTransport(ActorTransport(handle))
    results = await asyncio.gather(*(transport.apply([("reserve", f"r{i}")], retry=True) for i in range(8)))
    assert results == [[f"ok-r{i}"] for i in range(8)] and handle.calls == 1
    await transport.close()
    await server.close()
