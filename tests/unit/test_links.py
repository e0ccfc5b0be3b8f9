"""The ledger socket refuses peers that cannot prove the secret before decoding anything, carries only typed
hot batches (a frame that is not one ends that link, never the ledger), and the gateway's transport
opens one connection for concurrent first calls (the token channel's peers: ``test_channel.py``).

Real sockets on 127.0.0.1; the ledger socket's ``apply`` is a recording stand-in for the ledger
core (the boundary under test is the link, not the ledger)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serving.errors import LedgerUnavailableError
from serving.metering._actor import ActorTransport
from serving.metering._ops import HotOp, HotResult, Progress, Reserve, Settle, Settlement, TopUp
from serving.metering._socket import Batch, LedgerSocketServer, Reply
from serving.wire import SECRET_BYTES, AuthError, Codec, client_handshake

REPLIES: Codec[Reply] = Codec(Reply)


async def _ledger(fail: bool = False) -> tuple[LedgerSocketServer, list[list[HotOp]]]:
    seen: list[list[HotOp]] = []

    async def apply(ops: list[HotOp], lease: int) -> list[HotResult]:
        if fail:
            raise RuntimeError("ledger commit failed: disk full")
        seen.append(ops)
        return [Settlement(op.request_id, len(seen), 0) for op in ops]

    server = LedgerSocketServer(apply, "127.0.0.1")
    await server.start()
    return server, seen


async def _open(server: LedgerSocketServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    assert server.endpoint is not None
    host, port, secret = server.endpoint
    reader, writer = await asyncio.open_connection(host, port)
    await client_handshake(reader, writer, secret)
    return reader, writer


async def test_ledger_socket_answers_typed_batches_by_sequence() -> None:
    server, seen = await _ledger()
    reader, writer = await _open(server)
    writer.write(Codec.frame(Batch(7, [Reserve("a", "h", "m", 1), Settle("b", 1, 2)])))
    writer.write(Codec.frame(Batch(8, [Progress("c", 3)])))
    replies = {r.seq: r for r in [await REPLIES.read(reader), await REPLIES.read(reader)]}
    assert {seq: [s.request_id for s in r.results] for seq, r in replies.items()} == {7: ["a", "b"], 8: ["c"]}
    assert all(
        r.error is None and all(isinstance(s, Settlement) for s in r.results) for r in replies.values()
    )
    assert [type(op) for ops in seen for op in ops] == [Reserve, Settle, Progress]
    writer.close()
    await server.close()


@pytest.mark.parametrize(
    "body",
    [
        Codec.frame(Batch(9, [TopUp("t", 1e9)])),  # admin operations never travel here
        Codec.frame((9, [("reserve", "a")])),  # the old positional tuples do not decode either
        b"\x00\x00\x00\x03abc",  # not msgpack at all
    ],
)
async def test_a_frame_that_is_not_a_hot_batch_ends_that_link_only(body: bytes) -> None:
    server, seen = await _ledger()
    reader, writer = await _open(server)
    writer.write(body)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
    assert seen == []
    reader, writer = await _open(server)  # the ledger still serves every other link
    writer.write(Codec.frame(Batch(1, [Progress("c", 3)])))
    assert (await REPLIES.read(reader)).results == [Settlement("c", 1, 0)]
    writer.close()
    await server.close()


async def test_ledger_socket_drops_a_peer_without_the_secret_before_decoding() -> None:
    server, seen = await _ledger()
    assert server.endpoint is not None
    host, port, _secret = server.endpoint
    reader, writer = await asyncio.open_connection(host, port)
    with pytest.raises(AuthError):  # and the client learns the listener is not the ledger
        await client_handshake(reader, writer, b"x" * SECRET_BYTES)
    writer.close()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"x" * SECRET_BYTES + Codec.frame(Batch(1, [Progress("a", 1)])))
    # Only the server's half of the handshake comes back (its nonce and proof), then the close.
    assert len(await asyncio.wait_for(reader.read(), 5)) == 48
    assert seen == []
    await server.close()


@pytest.mark.parametrize("n", [SECRET_BYTES - 1])
async def test_short_secret_is_refused(n: int) -> None:
    server, seen = await _ledger()
    assert server.endpoint is not None
    host, port, _ = server.endpoint
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"y" * n)
    writer.write_eof()
    assert len(await asyncio.wait_for(reader.read(), 5)) == 48  # the server's half, then the close
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
    transport = ActorTransport(handle)
    results = await asyncio.gather(*(transport.hot([Progress(f"r{i}", 1)]) for i in range(8)))
    assert [[s.request_id for s in r] for r in results] == [[f"r{i}"] for i in range(8)]  # type: ignore[union-attr]
    assert handle.calls == 1
    await transport.close()
    await server.close()


async def test_a_failed_batch_reaches_the_caller_as_ledger_unavailable() -> None:
    server, _seen = await _ledger(fail=True)
    assert server.endpoint is not None
    transport = ActorTransport(_FakeActorHandle(server.endpoint))
    with pytest.raises(LedgerUnavailableError, match="disk full") as e:
        await transport.hot([Progress("a", 1)])
    assert e.value.headers["retry-after"] == "1"
    await transport.close()
    await server.close()
