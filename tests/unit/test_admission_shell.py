"""The asyncio shell around the admission core: futures, deadline timers, cancellation."""

from __future__ import annotations

import asyncio

import pytest

from serving.admission import AdmissionConfig, AdmissionCore, AdmissionRefused, AsyncAdmission, RefusalReason


def make(**kw: object) -> AsyncAdmission:
    base: dict[str, object] = {
        "max_num_seqs": 1,
        "kv_capacity_tokens": 10_000,
        "ttft_slo_ms": 2000.0,
        "tpot_slo_ms": 50.0,
        "prior_drain_tokens_per_s": 1e9,
    }
    base.update(kw)
    return AsyncAdmission(AdmissionCore(AdmissionConfig.model_validate(base)))


async def test_queued_request_starts_when_the_running_one_is_done() -> None:
    adm = make()
    await adm.acquire("a-0", "a", 1.0, 10, 10)  # admitted at once
    waiter = asyncio.create_task(adm.acquire("a-1", "a", 1.0, 10, 10))
    await asyncio.sleep(0)  # let it enter the queue
    assert not waiter.done() and adm.core.snapshot(adm.now()).queued_requests == 1
    adm.on_tokens("a-0", 10)
    adm.done("a-0", 10, 10)
    await asyncio.wait_for(waiter, timeout=5)
    s = adm.snapshot()
    assert (s.in_flight_seqs, s.queued_requests) == (1, 0)


async def test_deadline_timer_refuses_a_waiting_request() -> None:
    adm = make(queue_deadline_ms=30.0)
    await adm.acquire("a-0", "a", 1.0, 10, 10)
    t0 = adm.now()
    with pytest.raises(AdmissionRefused) as ei:
        await asyncio.wait_for(adm.acquire("b-0", "b", 1.0, 10, 10), timeout=5)
    assert adm.now() - t0 >= 0.03
    err = ei.value
    assert err.refusal.reason is RefusalReason.QUEUE_DEADLINE and err.status_code == 503
    body = err.body()["error"]
    assert body["type"] == "server_error" and body["code"] == "queue_deadline"
    assert err.headers == {"Retry-After": "1"}
    assert adm.stats().refused_total == {"queue_deadline": 1}


async def test_refusal_is_immediate_when_the_queue_is_full() -> None:
    adm = make(max_queued_requests=1)
    await adm.acquire("a-0", "a", 1.0, 10, 10)
    waiter = asyncio.create_task(adm.acquire("a-1", "a", 1.0, 10, 10))
    await asyncio.sleep(0)
    with pytest.raises(AdmissionRefused) as ei:
        await adm.acquire("a-2", "a", 1.0, 10, 10)
    assert ei.value.status_code == 429 and ei.value.retry_after_s > 0
    assert ei.value.body()["error"]["type"] == "rate_limit_exceeded"
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_cancelled_waiter_leaves_the_queue_and_the_next_one_starts() -> None:
    adm = make()
    await adm.acquire("a-0", "a", 1.0, 10, 10)
    w1 = asyncio.create_task(adm.acquire("a-1", "a", 1.0, 10, 10))
    w2 = asyncio.create_task(adm.acquire("a-2", "a", 1.0, 10, 10))
    await asyncio.sleep(0)
    w1.cancel()
    with pytest.raises(asyncio.CancelledError):
        await w1
    assert adm.snapshot().queued_requests == 1
    adm.done("a-0", 10, 10)
    await asyncio.wait_for(w2, timeout=5)
    assert adm.snapshot().in_flight_seqs == 1
