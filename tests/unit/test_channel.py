"""The token channel between a pool replica and a gateway, over real sockets on 127.0.0.1: chunks of
one engine step travel in one frame, and a gateway that reads slower than the pool sends gets each
request's chunks merged (exact text and usage) instead of a growing backlog."""

from __future__ import annotations

import asyncio

from serving.engines.base import (
    ChoiceDelta,
    EngineChunk,
    EngineRequest,
    SamplingSpec,
    TokenLogprob,
    merge_chunks,
)
from serving.pools.channel import ChannelClient, ChannelServer, RemoteFailure, Submissions


def _chunk(i: int, text: str, done: int, finished: bool = False, index: int = 0) -> EngineChunk:
    return EngineChunk([ChoiceDelta(index, text, 1, "length" if finished else None)], 7, done, finished)


def test_merge_chunks_joins_per_choice_and_keeps_the_newest_usage() -> None:
    a = EngineChunk(
        [ChoiceDelta(0, "he", 1, None, [TokenLogprob("he", -0.1)]), ChoiceDelta(1, "x", 1)],
        5,
        2,
        via_channel="r1",
    )
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
    assert (m.prompt_tokens, m.completion_tokens, m.finished, m.via_channel) == (5, 5, True, "r1")
    assert a.deltas[0].text == "he" and a.deltas[0].num_tokens == 1  # inputs untouched


async def test_chunks_of_one_pass_share_a_frame_and_a_slow_gateway_gets_them_merged() -> None:
    submitted: list[EngineRequest] = []
    server = ChannelServer(
        "127.0.0.1", Submissions(lambda gw, r: submitted.append(r), lambda *a: None, lambda gw: None)
    )
    host, port, secret = await server.start()
    client = ChannelClient("gw-1")
    client.sync([("replica-1", host, port, secret)])
    for _ in range(200):
        if client.pick(["replica-1"]):
            break
        await asyncio.sleep(0.01)
    inboxes = {rid: client.register(rid) for rid in ("a", "b")}
    for rid in inboxes:
        client.submit("replica-1", EngineRequest(rid, [1, 2], SamplingSpec(max_tokens=5000)))
    while len(submitted) < 2:
        await asyncio.sleep(0.01)
    conn = server.connection("gw-1")
    assert conn is not None

    # One pass: both streams' chunks go out in one frame.
    conn.send("a", _chunk(0, "a0 ", 1))
    conn.send("b", _chunk(0, "b0 ", 1))
    assert len(conn.outbox) == 2
    await asyncio.sleep(0.05)
    assert [inboxes[r].get_nowait().deltas[0].text for r in ("a", "b")] == ["a0 ", "b0 "]

    # The gateway stops reading (its loop busy elsewhere): the pool keeps sending 5,000 tokens each.
    reader_task = client._conns["replica-1"]
    transport = client._writers["replica-1"].transport
    transport.pause_reading()
    for i in range(1, 5000):
        for rid in ("a", "b"):
            conn.send(rid, _chunk(i, f"{rid}{i} ", i + 1, finished=i == 4999))
        await asyncio.sleep(0)  # one pass per "engine step"
    conn.send("b", RemoteFailure("engine went away"))  # a failure after chunks keeps its place
    assert conn.merged > 0  # the socket buffer filled and the outbox started merging
    transport.resume_reading()
    got: dict[str, list[object]] = {"a": [], "b": []}
    while not (got["a"] and got["a"][-1].finished and got["b"] and isinstance(got["b"][-1], RemoteFailure)):  # type: ignore[attr-defined]
        for rid, q in inboxes.items():
            while not q.empty():
                got[rid].append(q.get_nowait())
        await asyncio.sleep(0.01)
    for rid in ("a", "b"):
        chunks = [c for c in got[rid] if isinstance(c, EngineChunk)]
        assert len(chunks) < 4999  # merged: fewer, larger chunks than were sent
        assert "".join(d.text for c in chunks for d in c.deltas) == "".join(
            f"{rid}{i} " for i in range(1, 5000)
        )
        assert sum(d.num_tokens for c in chunks for d in c.deltas) == 4999
        assert chunks[-1].completion_tokens == 5000
    assert got["a"][-1].finished and not any(isinstance(c, RemoteFailure) for c in got["a"])  # type: ignore[attr-defined]
    assert isinstance(got["b"][-1], RemoteFailure)
    assert not reader_task.done()
    await client.close()
    await server.close()
