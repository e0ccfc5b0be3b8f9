"""The ledger on each real store (a SQLite file; a PostgreSQL database, marker ``postgres``): exact
enforcement under concurrency, idempotency, restart rule."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest
from _ledger_stores import LedgerTarget

from serving.errors import (
    AuthenticationError,
    InsufficientQuotaError,
    InvalidInputError,
    InvalidMaxTokensError,
    ModelNotAllowedError,
    NotFoundError,
    RateLimitExceededError,
)
from serving.metering import LedgerClient, LedgerLockedError, Meter, PriceConfig, Reservation
from serving.metering._client import LocalTransport
from serving.metering._core import LedgerCore
from serving.metering._ops import Audit, GetTenant
from serving.metering._store import SCHEMA_VERSION
from serving.tenancy import TenantCreate, TenantLimits, TenantUpdate, TopUp

U = 1_000_000  # micro-credits per credit


class Clock:
    """Hand-moved monotonic and wall clocks."""

    def __init__(self) -> None:
        self.mono = 100.0
        self.wall = 1_700_000_000.0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def make_core(target: LedgerTarget, clock: Clock, **kw: object) -> LedgerCore:
    return LedgerCore(target.config(**kw), clock=lambda: clock.mono, wall=lambda: clock.wall)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def core(ledger_target: LedgerTarget, clock: Clock) -> AsyncIterator[LedgerCore]:
    c = make_core(ledger_target, clock, prices={"priced": PriceConfig(completion_credits_per_1k_tokens=2000)})
    await c.start()
    yield c
    await c.close()


async def tenant_with_key(client: LedgerClient, tenant_id: str, credits: float, **limits: int) -> str:
    await client.create_tenant(
        TenantCreate(tenant_id=tenant_id, name=tenant_id, credits=credits, limits=TenantLimits(**limits))
    )
    return (await client.create_key(tenant_id)).api_key


async def test_zero_overspend_300_concurrent_across_two_replicas(
    core: LedgerCore, ledger_target: LedgerTarget
) -> None:
    replicas = [Meter(LedgerClient(LocalTransport(core))) for _ in range(2)]  # two gateway replicas' clients
    key = await tenant_with_key(replicas[0].client, "acme", credits=10_000)  # type: ignore[arg-type]
    rng = random.Random(7)
    usage: dict[str, tuple[int, int]] = {}
    charged: dict[str, int] = {}
    refused = 0

    async def one(i: int) -> None:
        nonlocal refused
        meter = replicas[i % 2]
        try:
            res = await meter.authorize(key, "m", 20, 80, f"req-{i}")  # reserves 100 credits
        except InsufficientQuotaError:
            refused += 1
            return
        completion = rng.randint(0, 80)
        outcome = rng.choice(["completed", "error", "aborted"])
        await asyncio.sleep(0)  # let others reserve while this one "streams"
        usage[res.request_id] = (20, completion)
        s = await meter.settle(res, 20, completion, outcome)
        charged[res.request_id] = s.charged_ucredits

    await asyncio.gather(*(one(i) for i in range(300)))
    tenant = await replicas[0].client.get_tenant("acme")  # type: ignore[union-attr]
    total = sum(charged.values())
    assert refused > 0 and len(charged) >= 100  # the balance covered only a fraction
    assert total <= 10_000 * U
    assert round(tenant.credits * U) == 10_000 * U - total
    assert tenant.reserved_credits == 0 and tenant.in_flight == 0
    for rid, (p, c) in usage.items():
        assert charged[rid] == (p + c) * U  # exactly its usage at 1 credit per token
    assert ledger_target.rows("SELECT count(*), sum(ucredits) FROM usage_events") == [(len(charged), total)]
    assert ledger_target.rows("SELECT count(*) FROM reservations") == [(0,)]
    assert await replicas[1].client.audit() == []  # type: ignore[union-attr]


async def test_refusals_carry_openai_shapes_and_bucket_retry(core: LedgerCore, clock: Clock) -> None:
    client = LedgerClient(LocalTransport(core))
    meter = Meter(client)
    key = await tenant_with_key(
        client, "t", credits=1000, rpm=2, max_tokens_per_request=50, max_concurrency=5
    )
    await client.update_tenant("t", TenantUpdate(allowed_models=["m"]))
    with pytest.raises(AuthenticationError) as e:
        await meter.authorize("tw-" + "x" * 43, "m", 1, 1, "a")
    assert e.value.status_code == 401 and e.value.body()["error"]["code"] == "invalid_api_key"
    with pytest.raises(ModelNotAllowedError) as e2:
        await meter.authorize(key, "other", 1, 1, "b")
    assert e2.value.status_code == 403
    with pytest.raises(InvalidMaxTokensError):
        await meter.authorize(key, "m", 1, 51, "c")
    r1 = await meter.authorize(key, "m", 1, 10, "d")
    assert r1.headers["x-ratelimit-remaining-requests"] == "1"
    await meter.authorize(key, "m", 1, 10, "e")
    with pytest.raises(RateLimitExceededError) as e3:
        await meter.authorize(key, "m", 1, 10, "f")
    assert e3.value.limit == "requests" and e3.value.error_type == "requests"
    assert e3.value.retry_after_s == pytest.approx(30.0)  # one request refills in 60/2 s
    assert (
        e3.value.headers["retry-after"] == "30" and e3.value.headers["x-ratelimit-remaining-requests"] == "0"
    )
    clock.advance(30.0)
    r4 = await meter.authorize(key, "m", 1, None, "g")
    assert r4.max_tokens == 50  # absent max_tokens: the tenant's cap
    for r in (r1, r4):
        await meter.settle(r, 1, 3)


async def test_tpm_and_concurrency_and_balance_clamp(core: LedgerCore, clock: Clock) -> None:
    client = LedgerClient(LocalTransport(core))
    meter = Meter(client)
    key = await tenant_with_key(client, "t", credits=100, tpm=600, max_concurrency=2)
    with pytest.raises(RateLimitExceededError) as e:
        await meter.authorize(key, "m", 10, 700, "big")
    assert e.value.limit == "tokens" and e.value.retry_after_s is None  # never fits: not a guess
    r1 = await meter.authorize(key, "m", 10, None, "a")
    assert r1.max_tokens == 90  # absent max_tokens: clamped to what 100 credits pay for
    with pytest.raises(InsufficientQuotaError):
        await meter.authorize(key, "m", 10, 1, "b")
    s = await meter.settle(r1, 10, 20)
    assert (s.charged_ucredits, s.released_ucredits) == (30 * U, 70 * U)
    r2 = await meter.authorize(key, "m", 5, 5, "c")
    r3 = await meter.authorize(key, "m", 5, 5, "d")
    with pytest.raises(RateLimitExceededError) as e2:
        await meter.authorize(key, "m", 5, 5, "e")
    assert e2.value.limit == "concurrency" and e2.value.retry_after_s is not None
    await meter.settle(r2, 5, 5)
    await meter.settle(r3, 5, 5)
    # TPM bucket (600, refills 10/s, clock not moved): 600 - 100 + 70 refunded - 10 - 10 = 550 left
    await client.top_up("t", TopUp(credits=1000))
    with pytest.raises(RateLimitExceededError) as e3:
        await meter.authorize(key, "m", 10, 580, "f")
    assert e3.value.limit == "tokens" and e3.value.retry_after_s == pytest.approx(4.0)  # 40 missing at 10/s
    assert e3.value.headers["x-ratelimit-remaining-tokens"] == "550"


async def test_prices_per_model_and_settle_idempotent_across_restart(
    ledger_target: LedgerTarget, clock: Clock
) -> None:
    core = make_core(
        ledger_target, clock, prices={"priced": PriceConfig(completion_credits_per_1k_tokens=2000)}
    )
    await core.start()
    client = LedgerClient(LocalTransport(core))
    meter = Meter(client)
    key = await tenant_with_key(client, "t", credits=1000)
    r = await meter.authorize(key, "priced", 10, 10, "x")
    assert r.reserved_ucredits == 30 * U  # completion tokens cost 2 credits
    s1 = await meter.settle(r, 10, 4)
    s2 = await meter.settle(r, 10, 4)
    assert s1.charged_ucredits == 18 * U and s2.duplicate and s2.charged_ucredits == s1.charged_ucredits
    await core.close()
    core2 = make_core(ledger_target, clock)
    await core2.start()
    s3 = await Meter(LedgerClient(LocalTransport(core2))).settle(r, 10, 4)
    assert s3.duplicate and s3.charged_ucredits == 18 * U  # found in the durable log
    assert (await core2.read(GetTenant("t"))).credits == 982
    await core2.close()


async def test_restart_keeps_reservations_then_expiry_rule(ledger_target: LedgerTarget, clock: Clock) -> None:
    core = make_core(ledger_target, clock, restart_grace_s=30)
    await core.start()
    client = LedgerClient(LocalTransport(core))
    meter = Meter(client)
    key = await tenant_with_key(client, "t", credits=1000)
    held = [await meter.authorize(key, "m", 10, 50, f"r{i}") for i in range(3)]
    await meter.progress(held[1], 7)
    await core.close()  # the gateway's requests are still "in flight"

    core2 = make_core(ledger_target, clock, restart_grace_s=30)
    await core2.start()
    meter2 = Meter(LedgerClient(LocalTransport(core2)))
    t = await core2.read(GetTenant("t"))
    assert t.in_flight == 3 and t.reserved_credits == 180
    await meter2.settle(held[0], 10, 20)  # a live gateway settles after the restart
    assert await core2.expire_due() == 0
    clock.advance(31)
    assert await core2.expire_due() == 2
    t = await core2.read(GetTenant("t"))
    assert t.in_flight == 0 and t.reserved_credits == 0
    assert t.credits == 1000 - 30 - 17  # r1 charged prompt + 7 progressed tokens; r2 released
    late = await meter2.settle(held[2], 10, 50)
    assert late.duplicate and late.charged_ucredits == 0
    outcomes = dict(ledger_target.rows("SELECT request_id, outcome FROM usage_events"))
    assert outcomes == {"r0": "completed", "r1": "expired_charged", "r2": "expired_released"}
    assert await core2.read(Audit()) == []
    await core2.close()


async def test_admin_bad_input_changes_nothing(core: LedgerCore, ledger_target: LedgerTarget) -> None:
    client = LedgerClient(LocalTransport(core))
    await tenant_with_key(client, "t", credits=5)
    before = ledger_target.rows("SELECT * FROM tenants")
    with pytest.raises(NotFoundError):
        await client.top_up("nope", TopUp(credits=5))
    with pytest.raises(InvalidInputError):
        await client.update_tenant("t", TenantUpdate(allowed_models=["m"], allow_all_models=True, weight=3))
    with pytest.raises(NotFoundError):
        await client.create_key("nope")
    assert ledger_target.rows("SELECT * FROM tenants") == before
    assert (await client.get_tenant("t")).weight == 1.0
    assert ledger_target.rows("SELECT count(*) FROM api_keys") == [(1,)]


async def test_revoked_key_refused_and_second_writer_locked_out(
    core: LedgerCore, ledger_target: LedgerTarget, clock: Clock
) -> None:
    client = LedgerClient(LocalTransport(core))
    await tenant_with_key(client, "t", credits=5)
    k2 = await client.create_key("t", "second")
    meter = Meter(client)
    r = await meter.authorize(k2.api_key, "m", 1, 1, "a")
    assert isinstance(r, Reservation) and r.key_id == k2.key_id
    await client.revoke_key(k2.key_id)
    with pytest.raises(AuthenticationError):
        await meter.authorize(k2.api_key, "m", 1, 1, "b")
    assert ledger_target.schema_version() == SCHEMA_VERSION
    with pytest.raises(LedgerLockedError):
        await make_core(ledger_target, clock, postgres_lock_wait_s=0).start()


async def test_metering_disabled_checks_nothing() -> None:
    meter = Meter(None, enabled=False)
    r = await meter.authorize("anything", "m", 10, None, "x", model_max_len=100)
    assert r.max_tokens == 90 and r.reserved_ucredits == 0
    assert (await meter.settle(r, 10, 5)).charged_ucredits == 0
