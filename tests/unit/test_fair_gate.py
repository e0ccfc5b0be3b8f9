"""The gateway's fair gate: the pure core (limit steering, fair order, deadlines) with the clock
moved by hand, and its asyncio shell (waiters, cancellation, no place leaked)."""

from __future__ import annotations

import asyncio
from collections import Counter, deque

import pytest

from serving.admission import GateCore, GateSettings
from serving.errors import GatewayBusyError
from serving.gateway.gate import FairGate, loop_busy_ns


def core(**kw: object) -> GateCore:
    return GateCore(GateSettings(**{"min_requests": 2, "max_requests": 64, **kw}))  # type: ignore[arg-type]


def test_a_tenant_alone_keeps_its_places_and_gets_them_back() -> None:
    g = core()
    for i in range(40):
        assert g.enter(f"a{i}", "A", 1.0, 0.0) is True
    for _ in range(60):
        g.on_demand(1.0)  # saturated, but nobody competes: the limit does not shrink
    assert g.limit == 64 and g.past == 40
    assert g.enter("b0", "B", 1.0, 0.0) is True  # under the limit: in at once
    for _ in range(30):
        g.on_demand(1.0)  # two compete: the limit shrinks toward its floor
    assert g.limit == 2
    g.leave("B")
    assert g.enter("a40", "A", 1.0, 0.0) is False  # alone again, it is still held by the limit
    for _ in range(40):
        g.leave("A")
    assert g.release() == ["a40"]
    assert g.enter("a41", "A", 1.0, 0.0) is True and g.enter("a42", "A", 1.0, 0.0) is False
    grown = []
    for _ in range(40):
        g.on_demand(1.0)  # saturated and waiting, alone: its places come back
        grown.append(g.limit)
    assert grown[-1] == 64 and grown == sorted(grown)
    assert g.release() == ["a42"]


def test_a_tenant_whose_requests_end_together_is_not_flooded_out() -> None:
    """Both tenants' requests end in batches (a pool's step ends them together): L's four, then
    H's. The moment L has nobody inside, H alone must not take every place: when L's clients send
    again, they would wait until all of H's had drained (before, served tokens H/L were 2.5)."""
    g = core(min_requests=4, max_requests=4)
    past: list[tuple[str, str]] = []
    n = 0

    def send(tenant: str) -> None:
        nonlocal n
        n += 1
        if g.enter(f"{tenant}{n}", tenant, 1.0, 0.0):
            past.append((f"{tenant}{n}", tenant))

    for tenant, k in (("L", 4), ("H", 20)):
        for _ in range(k):
            send(tenant)
    served: Counter[str] = Counter()
    for _ in range(100):
        batch, past[:] = list(past), []  # everything inside ends in the same step
        for _, tenant in batch:
            g.leave(tenant, 0, 32)
            served[tenant] += 32
            past.extend((t, t[0]) for t in g.release())
        for _, tenant in batch:  # the clients send again
            send(tenant)
        past.extend((t, t[0]) for t in g.release())
        assert g.past == len(past) <= 4
    assert served["H"] == pytest.approx(served["L"], rel=0.1), served


def test_the_limit_shrinks_when_the_loop_is_saturated_and_grows_when_it_has_room() -> None:
    g = core(min_requests=4)
    for i in range(30):
        assert g.enter(f"a{i}", "A", 1.0, 0.0)
    assert g.enter("b0", "B", 1.0, 0.0) is True  # under the limit (64): in at once
    g.on_demand(1.0)
    assert g.limit == int(0.9 * 31)  # from the requests past the gate, not the old limit
    for _ in range(30):
        g.on_demand(1.0)
    assert g.limit == 4
    assert g.enter("b1", "B", 1.0, 0.0) is False  # two tenants active: the limit binds
    for _ in range(5):
        g.on_demand(0.0)  # room (the smoothed demand falls below `idle`) while a request waits
    assert g.limit > 4
    for _ in range(20):
        g.on_demand(0.8)  # the smoothed demand settles between the thresholds: the limit holds
    held = g.limit
    g.on_demand(0.8)
    assert g.limit == held


def test_waiting_tenants_share_a_bound_gateway_by_served_tokens() -> None:
    """Closed loops: A keeps 10 requests at the gateway, B 2; each request is served 32 tokens.
    With 4 places, both are backlogged at the gate and served alike."""
    g = core(min_requests=4, max_requests=4)
    clients = {"A": 10, "B": 2}
    past: deque[tuple[str, str]] = deque()
    n = 0
    for tenant, k in sorted(clients.items(), key=lambda c: c[1]):  # B first: A is never alone
        for _ in range(k):
            n += 1
            if g.enter(str(n), tenant, 1.0, 0.0):
                past.append((str(n), tenant))
    tenant_of = {str(i + 1): t for i, t in enumerate(["B"] * 2 + ["A"] * 10)}
    served: Counter[str] = Counter()
    for _ in range(400):
        _, tenant = past.popleft()  # the oldest finishes, and its client sends the next at once
        g.leave(tenant, 0, 32)
        served[tenant] += 32
        n += 1
        tenant_of[str(n)] = tenant
        if g.enter(str(n), tenant, 1.0, 0.0):
            past.append((str(n), tenant))
        past.extend((t, tenant_of[t]) for t in g.release())
        assert g.past == len(past) <= 4
    assert served["A"] == pytest.approx(served["B"], rel=0.05), served


def test_a_tenant_behind_is_next_and_weights_count() -> None:
    g = core(min_requests=1, max_requests=1)
    assert g.enter("x", "X", 1.0, 0.0)
    for i in range(3):
        assert g.enter(f"a{i}", "A", 1.0, 0.0) is False
        assert g.enter(f"b{i}", "B", 3.0, 0.0) is False
    order: list[str] = []
    tenant = "X"
    while len(order) < 6:
        g.leave(tenant, 0, 30)
        released = g.release()
        order += released
        tenant = "A" if released[0].startswith("a") else "B"
    # B (weight 3) gains a third of A's counter per request: it is picked until it is ahead.
    assert order.index("a1") > order.index("b2"), order


def test_a_wait_is_bounded_and_the_queue_is_bounded() -> None:
    g = core(min_requests=1, max_requests=1, timeout_s=5.0, max_queued=2)
    assert g.enter("x", "X", 1.0, 0.0)
    assert g.enter("a", "A", 1.0, 1.0) is False
    assert g.enter("b", "A", 1.0, 2.0) is False
    assert g.enter("c", "A", 1.0, 2.0) is None  # two wait already
    assert g.next_deadline() == 6.0
    assert g.expire(5.9) == []
    assert g.expire(6.0) == ["a"]
    assert g.cancel("b") and not g.cancel("b")
    assert g.next_deadline() is None and g.waiting == 0
    assert g.stats().refused_total == 2


async def test_the_shell_hands_places_out_and_loses_none_to_cancellation() -> None:
    gate = FairGate(GateSettings(min_requests=1, max_requests=1, timeout_s=0.2))
    first = await gate.acquire("A")
    waiting = asyncio.ensure_future(gate.acquire("B"))
    gone = asyncio.ensure_future(gate.acquire("B"))
    await asyncio.sleep(0)
    assert gate.stats().waiting == 2
    gone.cancel()  # a client that went away while it waited
    await asyncio.sleep(0)
    first.release(10, 20)
    second = await waiting
    assert gate.stats().past == 1 and gate.stats().waiting == 0
    # A waiter cancelled in the same tick as its place came: the place is given back, not leaked.
    racing = asyncio.ensure_future(gate.acquire("A"))
    await asyncio.sleep(0)
    second.release()
    racing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await racing
    assert gate.stats().past == 0
    # Past its wait: 503 gateway_busy with Retry-After.
    held = await gate.acquire("A")
    with pytest.raises(GatewayBusyError) as busy:
        await gate.acquire("B")
    assert busy.value.status_code == 503 and busy.value.code == "gateway_busy"
    assert busy.value.headers["Retry-After"] == "1"
    held.release()
    held.release()  # once only
    assert gate.stats().past == 0


async def test_a_place_says_how_long_its_request_waited_for_it() -> None:
    """The gate's part of the access log's ``queue_s``."""
    gate = FairGate(GateSettings(min_requests=1, max_requests=1, timeout_s=30.0))
    loop = asyncio.get_running_loop()
    first = await gate.acquire("A")
    assert first.waited_s == 0.0  # passed at once
    asked = loop.time()
    loop.call_later(0.05, first.release)
    second = await gate.acquire("B")
    assert 0.04 < second.waited_s <= loop.time() - asked
    second.release()


def test_loop_demand_counts_a_busy_thread() -> None:
    t0 = loop_busy_ns()
    x = 0
    for i in range(200_000):
        x += i
    assert loop_busy_ns() > t0


def test_service_alone_owes_no_debt_when_others_arrive() -> None:
    """B was served alone (its counter far ahead), went idle, and came back after A had arrived:
    it starts level with A, not behind everything it got alone (it used to wait until A caught up)."""
    g = core(min_requests=1, max_requests=1)
    for i in range(50):  # B alone: 50 requests of 32 tokens
        assert g.enter(f"b{i}", "B", 1.0, 0.0)
        g.leave("B", 0, 32)
    assert g.enter("x", "A", 1.0, 0.0)  # A arrives, nobody else active: its counter stays 0
    assert g.enter("bb", "B", 1.0, 0.0) is False  # B comes back while A is active
    assert g.enter("a0", "A", 1.0, 0.0) is False
    g.leave("A", 0, 32)
    assert g.release() == ["bb"]  # level with A, then behind it by A's request: served next
