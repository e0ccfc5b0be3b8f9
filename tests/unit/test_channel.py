"""The token channel, both ends over real sockets on 127.0.0.1: the gateway's transport and the pool
replica's host (admission core included). The engine is a scripted stand-in (the boundary: the test
decides when each chunk is produced); everything between it and the gateway's stream is real.

Covers the one data path (submit, batches, abort), a slow gateway getting merged chunks, drain on
shutdown, pacing, and hostile peers (no secret, another protocol version, frames of the wrong type).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
import pytest

from serving import wire
from serving.admission import AdmissionCore, AdmissionSettings, AsyncAdmission
from serving.engines.base import (
    Abort,
    ChoiceDelta,
    ChunkSink,
    Engine,
    EngineCapacity,
    EngineChunk,
    EngineError,
    EngineRequest,
    SamplingSpec,
    TokenLogprob,
    merge_chunks,
)
from serving.gateway.transport import ChannelLost, ChannelTransport, PoolFailure
from serving.pools.frames import PROTOCOL_VERSION, Batch, Failure, Hello, Welcome, from_gateway, from_pool
from serving.pools.host import ReplicaHost
from serving.pools.pacing import PacedSink
from serving.wire import SECRET_BYTES, AuthError, client_handshake, server_handshake

pytestmark = pytest.mark.timeout(60)


def _chunk(text: str, done: int, finished: bool = False, index: int = 0) -> EngineChunk:
    return EngineChunk([ChoiceDelta(index, text, 1, "length" if finished else None)], 7, done, finished)


async def until(cond: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll a condition the other end's tasks make true (no fixed sleeps)."""
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.005)


class Scripted(Engine):
    """An engine whose output the test pushes by hand through each request's sink."""

    def __init__(self, max_num_seqs: int = 8) -> None:
        self.sinks: dict[str, ChunkSink] = {}
        self.aborted: set[str] = set()
        self.max_num_seqs = max_num_seqs

    async def start(self) -> None:
        pass

    def generate(self, request: EngineRequest):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    async def submit(self, request: EngineRequest, sink: ChunkSink) -> Abort:
        self.sinks[request.request_id] = sink
        return lambda: self.aborted.add(request.request_id)

    def capacity(self) -> EngineCapacity:
        return EngineCapacity(self.max_num_seqs, 1_000_000)

    def num_unfinished(self) -> int:
        return len(self.sinks)

    async def check_health(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass


def request(rid: str, max_tokens: int = 50) -> EngineRequest:
    return EngineRequest(rid, [1, 2, 3], SamplingSpec(max_tokens=max_tokens))


async def pair(
    max_num_seqs: int = 8, interval_ms: float = 0.0
) -> tuple[Scripted, ReplicaHost, ChannelTransport]:
    engine = Scripted(max_num_seqs)
    admission = AsyncAdmission(
        AdmissionCore(AdmissionSettings().for_engine(max_num_seqs, 1_000_000, 2000, 100))
    )
    host = ReplicaHost(engine, admission, "127.0.0.1", "replica-1", interval_ms)
    addr = await host.start()
    transport = ChannelTransport("gw-1")
    transport.sync([("replica-1", *addr)])
    await until(lambda: transport.usable("replica-1"))
    return engine, host, transport


def test_merge_chunks_joins_per_choice_and_keeps_the_newest_usage() -> None:
    a = EngineChunk([ChoiceDelta(0, "he", 1, None, [TokenLogprob("he", -0.1)]), ChoiceDelta(1, "x", 1)], 5, 2)
    b = EngineChunk(
        [ChoiceDelta(0, "llo", 2, "stop", [TokenLogprob("llo", -0.2)]), ChoiceDelta(2, "y", 1)], 5, 5, True
    )
    m = merge_chunks(a, b)
    assert {d.index: (d.text, d.num_tokens, d.finish_reason) for d in m.deltas} == {
        0: ("hello", 3, "stop"),
        1: ("x", 1, None),
        2: ("y", 1, None),
    }
    assert [lp.token for lp in m.deltas[0].logprobs or []] == ["he", "llo"]
    assert (m.prompt_tokens, m.completion_tokens, m.finished) == (5, 5, True)
    assert a.deltas[0].text == "he" and a.deltas[0].num_tokens == 1  # inputs untouched


async def test_a_request_runs_on_the_channel_and_an_abort_reaches_the_engine() -> None:
    engine, host, transport = await pair()
    stream = transport.submit("replica-1", request("a"))
    await until(lambda: "a" in engine.sinks)
    sink = engine.sinks["a"]
    sink.chunk(_chunk("x", 1))
    sink.chunk(_chunk("y", 2, finished=True))  # same pass: one frame, the request's chunks merged
    batch = await stream.next_batch()
    assert [(c.deltas[0].text, c.completion_tokens) for c in batch] == [("xy", 2)] and stream.done
    stream.close()
    assert transport.load["replica-1"] == 0 and host.unfinished == 0
    assert host.admission.core.stats().in_flight_seqs == 0

    other = transport.submit("replica-1", request("b"))
    await until(lambda: "b" in engine.sinks)
    engine.sinks["b"].chunk(_chunk("z", 1))
    assert [c.completion_tokens for c in await other.next_batch()] == [1]
    other.close()  # the client went away mid-stream
    await until(lambda: "b" in engine.aborted)
    assert host.requests_aborted == 1 and host.unfinished == 0
    await transport.close()
    await host.close()


async def test_a_slow_gateway_gets_each_requests_chunks_merged_exactly() -> None:
    engine, host, transport = await pair()
    streams = {rid: transport.submit("replica-1", request(rid, 5000)) for rid in ("a", "b")}
    await until(lambda: {"a", "b"} <= engine.sinks.keys())
    link = transport._links["replica-1"]
    assert link.writer is not None
    link.writer.transport.pause_reading()  # the gateway's loop is busy elsewhere
    for i in range(1, 5000):
        for rid in ("a", "b"):
            engine.sinks[rid].chunk(_chunk(f"{rid}{i} ", i, finished=i == 4999 and rid == "a"))
        await asyncio.sleep(0)  # one pass per "engine step"
    engine.sinks["b"].fail(EngineError("engine went away"))  # a failure after chunks keeps its place
    conn = next(iter(host.channel._conns.values()))
    assert conn.merged > 0  # the socket buffer filled and the outbox started merging
    link.writer.transport.resume_reading()
    for rid, stream in streams.items():
        chunks: list[EngineChunk] = []
        with pytest.raises(PoolFailure) if rid == "b" else _nothing():
            while not stream.done:
                chunks += await stream.next_batch()
        assert len(chunks) < 4999  # merged: fewer, larger chunks than were sent
        assert "".join(d.text for c in chunks for d in c.deltas) == "".join(
            f"{rid}{i} " for i in range(1, 5000)
        )
        assert chunks[-1].completion_tokens == 4999
        stream.close()
    await transport.close()
    await host.close()


class _nothing:
    def __enter__(self) -> None:
        pass

    def __exit__(self, *a: object) -> None:
        pass


async def test_drain_hands_back_queued_requests_and_lets_running_ones_finish() -> None:
    engine, host, transport = await pair(max_num_seqs=1)
    running = transport.submit("replica-1", request("run"))
    await until(lambda: "run" in engine.sinks)
    queued = transport.submit("replica-1", request("queued"))
    await until(lambda: host.admission.core.stats().queue_depth == 1)
    drained = asyncio.ensure_future(host.drain(timeout_s=30))
    await until(lambda: not transport.usable("replica-1"))
    with pytest.raises(PoolFailure) as e:
        await queued.next_batch()
    assert e.value.retryable  # nothing was produced: the gateway retries it elsewhere
    with pytest.raises(ChannelLost):
        transport.submit("replica-1", request("late"))
    engine.sinks["run"].chunk(_chunk("last", 3, finished=True))
    assert (await running.next_batch())[-1].finished
    assert await drained == 0
    await transport.close()
    await host.close()


async def test_drain_past_its_deadline_ends_streams_with_their_usage_so_far() -> None:
    engine, host, transport = await pair()
    stream = transport.submit("replica-1", request("long", 1000))
    await until(lambda: "long" in engine.sinks)
    for i in range(1, 4):
        engine.sinks["long"].chunk(_chunk("t", i))
    assert await host.drain(timeout_s=0.05) == 1
    chunks = await stream.next_batch()
    assert chunks[-1].completion_tokens == 3  # what the gateway charges
    with pytest.raises(PoolFailure) as e:
        await stream.next_batch()
    assert not e.value.retryable
    assert "long" in engine.aborted and host.unfinished == 0
    await transport.close()
    await host.close()


async def test_pacing_sends_the_first_chunk_at_once_then_merged_chunks_per_interval() -> None:
    got: list[EngineChunk] = []

    class Inner:
        def chunk(self, chunk: EngineChunk) -> None:
            got.append(chunk)

        def fail(self, error: EngineError) -> None:
            raise AssertionError(error)

    sink = PacedSink(Inner(), 0.05)
    sink.chunk(_chunk("a", 1))
    sink.chunk(_chunk("b", 2))
    sink.chunk(_chunk("c", 3))
    assert [c.deltas[0].text for c in got] == ["a"]
    await until(lambda: len(got) == 2)
    assert got[1].deltas[0].text == "bc" and got[1].completion_tokens == 3
    sink.chunk(_chunk("d", 4))
    sink.chunk(_chunk("e", 5, finished=True))  # the finished chunk goes at once, with what was held
    assert got[-1].finished and got[-1].deltas[0].text == "de" and got[-1].completion_tokens == 5


async def test_pacing_wraps_the_one_path() -> None:
    engine, host, transport = await pair(interval_ms=30)
    stream = transport.submit("replica-1", request("p"))
    await until(lambda: "p" in engine.sinks)
    engine.sinks["p"].chunk(_chunk("1", 1))
    chunks = await stream.next_batch()  # the first at once
    for i in range(2, 6):  # the rest within one interval: held, then sent as one
        engine.sinks["p"].chunk(_chunk(str(i), i, finished=i == 5))
        await asyncio.sleep(0.001)
    while not stream.done:
        chunks += await stream.next_batch()
    assert [c.deltas[0].text for c in chunks] == ["1", "2345"]
    stream.close()
    await transport.close()
    await host.close()


async def _handshaken(h: str, port: int, secret: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(h, port)
    await client_handshake(reader, writer, secret)
    return reader, writer


async def test_hostile_peers_are_dropped_and_the_channel_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    engine, host, transport = await pair()
    (h, port, secret) = (host.channel.host, host.channel.port, host.channel.secret)
    # Without the secret: the handshake fails at both ends, before any frame is decoded.
    reader, writer = await asyncio.open_connection(h, port)
    with pytest.raises(AuthError):
        await client_handshake(reader, writer, b"x" * SECRET_BYTES)  # the server's proof is wrong
    writer.close()
    reader, writer = await asyncio.open_connection(h, port)
    writer.write(b"\0" * 48)  # a nonce and a made-up proof
    assert len(await asyncio.wait_for(reader.read(), 5)) == 48  # the server's nonce and proof; no welcome
    # A peer that connects and says nothing is dropped at the handshake's deadline.
    monkeypatch.setattr(wire, "HANDSHAKE_TIMEOUT_S", 0.2)
    reader, writer = await asyncio.open_connection(h, port)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    # Another protocol version: told ours, then closed.
    reader, writer = await _handshaken(h, port, secret)
    writer.write(from_gateway.frame(Hello(PROTOCOL_VERSION + 1, "old-gw")))
    welcome = await from_pool.read(reader)
    assert isinstance(welcome, Welcome) and welcome.protocol == PROTOCOL_VERSION
    assert await asyncio.wait_for(reader.read(), 5) == b""
    # A second connection under a connected gateway's id is refused (it would take its streams).
    reader, writer = await _handshaken(h, port, secret)
    writer.write(from_gateway.frame(Hello(PROTOCOL_VERSION, "gw-1")))
    await from_pool.read(reader)
    assert await asyncio.wait_for(reader.read(), 5) == b""
    # A frame that is not a message of the link's type, and one announcing 4 GiB: closed.
    for junk in (b"\x00\x00\x00\x03\x93\x01\x02", b"\xff\xff\xff\xff"):
        reader, writer = await _handshaken(h, port, secret)
        writer.write(from_gateway.frame(Hello(PROTOCOL_VERSION, "junk")) + junk)
        await from_pool.read(reader)
        assert await asyncio.wait_for(reader.read(), 5) == b""
    # The real gateway was never disturbed.
    assert transport.usable("replica-1")
    stream = transport.submit("replica-1", request("ok"))
    await until(lambda: "ok" in engine.sinks)
    engine.sinks["ok"].chunk(_chunk("fine", 1, finished=True))
    assert (await stream.next_batch())[0].deltas[0].text == "fine"
    stream.close()
    await transport.close()
    await host.close()


async def test_a_gateway_never_talks_to_a_listener_without_the_secret() -> None:
    """Whatever answers at a replica's advertised address must prove the secret first."""

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server_handshake(reader, writer, b"y" * SECRET_BYTES)

    server = await asyncio.start_server(impostor, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    transport = ChannelTransport("gw-1")
    transport.sync([("replica-x", "127.0.0.1", port, b"z" * SECRET_BYTES)])
    link = transport._links["replica-x"]
    assert link.task is not None
    await asyncio.wait_for(link.task, 10)  # the link gave up: the proof did not match
    assert not transport.usable("replica-x")
    server.close()
    await transport.close()


class _OlderBatch(msgspec.Struct, frozen=True, tag="batch"):
    """The batch frame before ``admitted``."""

    chunks: list[tuple[str, EngineChunk]]
    failures: list[Failure] = []


def test_a_batchs_admissions_are_readable_by_older_and_newer_peers() -> None:
    """``Batch.admitted`` came without a protocol bump: a peer that does not know it skips it, and a
    batch without it (from an older replica) reads as having admitted nobody."""
    new = Batch([("r", _chunk("a", 1))], [], [("r", 0.125)])
    body = from_pool.frame(new)[4:]
    assert from_pool.decode(body) == new
    old = msgspec.msgpack.decode(body, type=_OlderBatch)
    assert old.chunks == new.chunks and old.failures == []
    assert from_pool.decode(msgspec.msgpack.encode(old)) == Batch(new.chunks, [], [])
