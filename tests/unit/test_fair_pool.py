"""Hierarchical fair queueing through one pool replica, without Ray: the gateway's transport, the
token channel (real sockets on 127.0.0.1, the project fields in its frames), the replica host with
the admission shell and core, and the simulated engine serving one sequence at a time."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable

import pytest

from models.catalog import ModelEntry
from serving.admission import AdmissionCore, AdmissionSettings, AsyncAdmission
from serving.engines.base import EngineRequest, SamplingSpec
from serving.engines.sim import SimEngine
from serving.gateway.request import Prepared
from serving.gateway.transport import ChannelTransport, TokenStream
from serving.hardware import EngineSettings, ModelArch, get_gpu
from serving.metering import Reservation, TokenBudget
from serving.pools.host import ReplicaHost

pytestmark = pytest.mark.timeout(120)

LLAMA8B = ModelArch("llama-8b", 8_030_261_248, 32, 4096, 32, 8, 128, 14336, 128256, 2)


async def until(cond: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Poll a condition the other end's tasks make true (no fixed sleeps)."""
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.005)


def request(
    rid: str, org: str, org_weight: float, project: str | None, project_weight: float, n: int
) -> EngineRequest:
    first = zlib.crc32(rid.encode()) * 8192  # prompts share no prefix: no cache hits between them
    return EngineRequest(
        rid,
        list(range(first, first + 64)),
        SamplingSpec(max_tokens=n, ignore_eos=True),
        tenant_id=org,
        tenant_weight=org_weight,
        project_id=project,
        project_weight=project_weight,
    )


async def drain(stream: TokenStream, finished: list[str], rid: str) -> None:
    while not stream.done:
        await stream.next_batch()
    stream.close()
    finished.append(rid)


async def test_orgs_share_the_replica_equally_and_projects_split_their_part_by_weight() -> None:
    engine = SimEngine(
        LLAMA8B, get_gpu("H100"), EngineSettings(1, 2048, 0.9), speedup=20.0, eos_mean_tokens=None
    )
    await engine.start()
    settings = AdmissionSettings(queue_deadline_ms=600_000.0)  # nothing here waits long enough to expire
    admission = AsyncAdmission(AdmissionCore(settings.for_engine(1, engine.kv_capacity_tokens, 1e6, 100.0)))
    host = ReplicaHost(engine, admission, "127.0.0.1", "replica-1")
    transport = ChannelTransport("gw-1")
    transport.sync([("replica-1", *await host.start())])
    await until(lambda: transport.usable("replica-1"))
    tasks: list[asyncio.Future[None]] = []
    try:
        # A long request holds the one sequence while everything else queues.
        blocker = transport.submit("replica-1", request("x", "X", 1.0, None, 1.0, 100_000))
        await until(lambda: admission.stats().in_flight_seqs == 1)
        senders = [("A", "a1", 3.0), ("A", "a2", 1.0), ("B", "b", 1.0)]
        finished: list[str] = []
        for i in range(40):
            for org, project, weight in senders:
                rid = f"{org}.{project}-{i}"
                stream = transport.submit("replica-1", request(rid, org, 1.0, project, weight, 8))
                tasks.append(asyncio.ensure_future(drain(stream, finished, rid)))
        await until(lambda: admission.stats().queue_depth == 120)
        blocker.close()  # the client goes away: the engine aborts it and the queue starts to drain
        await until(lambda: len(finished) >= 48)
        first = [rid.rsplit("-", 1)[0] for rid in finished[:48]]
        # One sequence at a time, equal sizes: service is counted in requests.
        assert abs(first.count("A.a1") + first.count("A.a2") - first.count("B.b")) <= 1, first
        assert first.count("A.a1") in (17, 18, 19) and first.count("A.a2") in (5, 6, 7), first
        assert set(admission.stats().tenants) == {"X", "A", "B"}  # organizations, not projects
        await until(lambda: len(finished) == 120)
        await asyncio.gather(*tasks)
        assert admission.stats().in_flight_seqs == 0 and admission.stats().queue_depth == 0
    finally:
        for task in tasks:
            task.cancel()
        await transport.close()
        await host.close()
        await engine.shutdown()


def test_the_gateway_sends_the_reservations_organization_and_project() -> None:
    """What the pool queues by comes from the ledger's reservation, never from the request."""
    res = Reservation(
        "r-1", "acme", "key_1", "m", 5, 8, 13, tenant_weight=2.0, project_id="lab", project_weight=3.0
    )
    p = Prepared(
        "r-1",
        "chat",
        ModelEntry.model_construct(name="m"),
        [1, 2, 3, 4, 5],
        SamplingSpec(8),
        False,
        False,
        None,
        TokenBudget(5, 8),
        reservation=res,
        traceparent="00-ab-cd-01",
    )
    req = p.engine_request()
    assert (req.tenant_id, req.tenant_weight, req.project_id, req.project_weight) == ("acme", 2.0, "lab", 3.0)
    assert (req.request_id, req.prompt_token_ids, req.traceparent) == ("r-1", [1, 2, 3, 4, 5], "00-ab-cd-01")
    p.reservation = None  # metering off: everyone in one organization, flat
    assert (p.engine_request().tenant_id, p.engine_request().project_id) == ("default", None)
