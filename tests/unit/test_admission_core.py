"""The admission core under a fake clock with synthetic completions (no Ray, no engine)."""

from __future__ import annotations

from itertools import pairwise

import pytest
from pydantic import ValidationError

from serving.admission import (
    AdmissionConfig,
    AdmissionCore,
    Admitted,
    Queued,
    RefusalReason,
    Refused,
)


def make_core(**kw: object) -> AdmissionCore:
    base: dict[str, object] = {
        "max_num_seqs": 64,
        "kv_capacity_tokens": 1_000_000,
        "ttft_slo_ms": 2000.0,
        "tpot_slo_ms": 50.0,
        "prior_drain_tokens_per_s": 1e9,
    }
    base.update(kw)
    return AdmissionCore(AdmissionConfig.model_validate(base))


def serve_one_at_a_time(core: AdmissionCore, n: int, now: float, prompt: int, completion: int) -> list[str]:
    """Release and finish ``n`` requests one by one; return the tenants served, in order."""
    order: list[str] = []
    for _ in range(n):
        ids = core.release(now)
        assert len(ids) == 1, ids
        rid = ids[0]
        order.append(rid.split("-")[0])
        core.on_tokens(rid, completion, now)
        core.on_finish(rid, prompt, completion, now)
    return order


# ---- fairness ---------------------------------------------------------------------------------------


def test_backlogged_equal_weights_alternate_despite_10x_sender() -> None:
    core = make_core(max_num_seqs=1, initial_num_seqs=1)
    now = 0.0
    # An in-flight blocker so everything else queues.
    assert isinstance(core.submit("x-0", "x", 1.0, 10, 10, now), Admitted)
    for i in range(100):
        assert isinstance(core.submit(f"a-{i}", "a", 1.0, 100, 50, now), Queued)
    for i in range(10):
        assert isinstance(core.submit(f"b-{i}", "b", 1.0, 100, 50, now), Queued)
    core.on_finish("x-0", 10, 10, now)
    order = serve_one_at_a_time(core, 20, now, 100, 50)
    assert order.count("a") == 10 and order.count("b") == 10
    stats = core.stats().tenants
    served_a = stats["a"].served_prompt_tokens + stats["a"].served_completion_tokens
    served_b = stats["b"].served_prompt_tokens + stats["b"].served_completion_tokens
    assert abs(served_a - served_b) <= 150  # at most one request apart
    # b has nothing left: a gets the rest.
    assert serve_one_at_a_time(core, 5, now, 100, 50) == ["a"] * 5


def test_weights_three_to_one() -> None:
    core = make_core(max_num_seqs=1, initial_num_seqs=1)
    core.submit("x-0", "x", 1.0, 1, 1, 0.0)
    for i in range(60):
        core.submit(f"a-{i}", "a", 3.0, 100, 50, 0.0)
        core.submit(f"b-{i}", "b", 1.0, 100, 50, 0.0)
    core.on_finish("x-0", 1, 1, 0.0)
    order = serve_one_at_a_time(core, 40, 0.0, 100, 50)
    assert order.count("a") == 30 and order.count("b") == 10


def test_prompt_and_completion_priced_separately() -> None:
    core = make_core(prompt_token_price=1.0, completion_token_price=2.0)
    core.submit("a-0", "a", 2.0, 100, 50, 0.0)
    assert core.stats().tenants["a"].virtual_counter == pytest.approx(100 / 2.0)  # prompt at dispatch
    core.on_tokens("a-0", 30, 0.1)
    core.on_finish("a-0", 100, 40, 0.2)  # settles to the engine's exact count
    t = core.stats().tenants["a"]
    assert t.virtual_counter == pytest.approx((100 + 2 * 40) / 2.0)
    assert (t.served_prompt_tokens, t.served_completion_tokens) == (100, 40)


def test_arriving_tenant_is_lifted_to_smallest_active_counter() -> None:
    core = make_core(max_num_seqs=1, initial_num_seqs=1)
    core.submit("x-0", "x", 1.0, 1, 1, 0.0)
    for i in range(30):
        core.submit(f"a-{i}", "a", 1.0, 100, 50, 0.0)
    core.on_finish("x-0", 1, 1, 0.0)
    serve_one_at_a_time(core, 20, 0.0, 100, 50)  # a builds up a counter of 20 * 200
    a_counter = core.stats().tenants["a"].virtual_counter
    assert a_counter == pytest.approx(1 + 20 * 200)  # lifted to x (1) on arrival, then served
    for i in range(10):
        core.submit(f"b-{i}", "b", 1.0, 100, 50, 1.0)
    assert core.stats().tenants["b"].virtual_counter == pytest.approx(a_counter)
    # No banked credit: b does not get ten in a row, the two alternate.
    order = serve_one_at_a_time(core, 6, 1.0, 100, 50)
    assert order.count("a") == 3 and order.count("b") == 3


def test_returning_tenant_does_not_bank_idle_time() -> None:
    core = make_core(max_num_seqs=1, initial_num_seqs=1)
    core.submit("x-0", "x", 1.0, 1, 1, 0.0)
    core.submit("b-0", "b", 1.0, 100, 50, 0.0)
    for i in range(40):
        core.submit(f"a-{i}", "a", 1.0, 100, 50, 0.0)
    core.on_finish("x-0", 1, 1, 0.0)
    order = serve_one_at_a_time(core, 30, 0.0, 100, 50)  # b served once, then idle
    assert order.count("b") == 1
    for i in range(1, 10):
        core.submit(f"b-{i}", "b", 1.0, 100, 50, 1.0)
    a = core.stats().tenants["a"].virtual_counter
    assert core.stats().tenants["b"].virtual_counter == pytest.approx(a)
    order = serve_one_at_a_time(core, 8, 1.0, 100, 50)
    assert order.count("b") == 4


# ---- the adaptive limit -----------------------------------------------------------------------------


class SyntheticEngine:
    """Fake engine boundary: every running request gains one token per step; step time grows with batch."""

    def __init__(self, core: AdmissionCore, base_s: float, per_seq_s: float, out_tokens: int) -> None:
        self.core = core
        self.base_s = base_s
        self.per_seq_s = per_seq_s
        self.out_tokens = out_tokens
        self.running: dict[str, int] = {}
        self.now = 0.0
        self.tpots: list[float] = []
        self.first: dict[str, float] = {}

    def start(self, ids: list[str]) -> None:
        for rid in ids:
            self.running[rid] = 0

    def step(self) -> None:
        self.now += self.base_s + self.per_seq_s * len(self.running)
        for rid in list(self.running):
            self.running[rid] += 1
            if self.running[rid] == 1:
                self.first[rid] = self.now
            self.core.on_tokens(rid, 1, self.now)
            if self.running[rid] >= self.out_tokens:
                del self.running[rid]
                self.tpots.append((self.now - self.first.pop(rid)) / (self.out_tokens - 1))
                self.core.on_finish(rid, 10, self.out_tokens, self.now)
        self.start(self.core.release(self.now))


def run_backlogged(core: AdmissionCore, eng: SyntheticEngine, steps: int) -> list[int]:
    limits = []
    n = 0
    for _ in range(steps):
        while core.queued_requests < 20:  # keep a backlog so the limit binds
            d = core.submit(f"r-{n}", "t", 1.0, 10, eng.out_tokens, eng.now)
            if isinstance(d, Admitted):
                eng.start([d.req_id])
            n += 1
        eng.step()
        limits.append(core.seq_limit)
    return limits


def test_limit_decreases_on_tpot_miss_and_settles_within_slo() -> None:
    # TPOT = 10 ms + 2 ms x batch: 64 in flight gives 138 ms, far over a 50 ms SLO; <= 18 meets it.
    core = make_core(max_num_seqs=64, tpot_slo_ms=50.0, queue_deadline_ms=1e6)
    eng = SyntheticEngine(core, 0.010, 0.002, out_tokens=40)
    limits = run_backlogged(core, eng, 3000)
    assert limits[0] == 64
    assert core.stats().limit_decreases_total >= 1
    settled = limits[len(limits) // 2 :]
    assert min(settled) >= 10 and max(settled) <= 20, (min(settled), max(settled))
    late = eng.tpots[len(eng.tpots) // 2 :]
    assert sum(t <= 0.050 for t in late) / len(late) >= 0.95


def test_limit_increases_with_headroom_up_to_the_plan_bound() -> None:
    # TPOT = 10 ms + 0.2 ms x batch: even 32 in flight (16.4 ms) has headroom under 50 ms.
    core = make_core(max_num_seqs=32, initial_num_seqs=4, tpot_slo_ms=50.0, queue_deadline_ms=1e6)
    eng = SyntheticEngine(core, 0.010, 0.0002, out_tokens=20)
    limits = run_backlogged(core, eng, 2000)
    assert limits[0] == 4
    assert max(limits) == 32 and limits[-1] == 32  # reached, never beyond the plan's max_num_seqs
    assert core.stats().limit_decreases_total == 0
    assert core.token_limit <= core.config.kv_admit_tokens


def test_no_single_signal_moves_the_limit_by_a_step() -> None:
    core = make_core(max_num_seqs=16, tpot_slo_ms=50.0)
    for i in range(16):
        core.submit(f"r-{i}", "t", 1.0, 10, 100, 0.0)
        core.on_tokens(f"r-{i}", 1, 0.1)
    # One report of 20 tokens at 200 ms each (4x the SLO): the limit moves by a few percent at most.
    core.on_tokens("r-0", 20, 0.1 + 20 * 0.2)
    assert 15 <= core.seq_limit <= 16
    # The same slowness reported by every running request keeps bringing it down, gradually.
    limits = []
    for k in range(1, 40):
        for i in range(16):
            core.on_tokens(f"r-{i}", 8, 4.1 + k * 8 * 0.2)
        limits.append(core.seq_limit)
    assert limits[-1] <= 8
    assert all(b >= a - 1 for a, b in pairwise(limits))  # never a jump down


def test_token_limit_holds_back_large_prompts() -> None:
    core = make_core(kv_capacity_tokens=1000, kv_admit_fraction=1.0)
    assert isinstance(core.submit("a-0", "a", 1.0, 600, 10, 0.0), Admitted)
    assert isinstance(core.submit("a-1", "a", 1.0, 600, 10, 0.0), Queued)
    assert core.release(0.0) == []
    core.on_finish("a-0", 600, 10, 0.5)
    assert core.release(0.5) == ["a-1"]
    assert core.in_flight_tokens == 600


# ---- back-pressure ---------------------------------------------------------------------------------


def blocked_core(**kw: object) -> AdmissionCore:
    core = make_core(max_num_seqs=1, initial_num_seqs=1, **kw)
    assert isinstance(core.submit("blocker", "z", 1.0, 1, 1, 0.0), Admitted)
    return core


def test_queue_token_bound_refuses_the_flooding_tenant_with_429() -> None:
    core = blocked_core(max_queued_tokens=1000)
    for i in range(10):
        assert isinstance(core.submit(f"a-{i}", "a", 1.0, 50, 50, 0.0), Queued)
    d = core.submit("a-10", "a", 1.0, 50, 50, 0.0)
    assert isinstance(d, Refused)
    assert d.reason is RefusalReason.TENANT_QUEUE_FULL and d.status_code == 429
    assert d.retry_after_s > 0 and d.queued_tokens == 1000 and d.max_queued_tokens == 1000
    assert core.queued_tokens == 1000


def test_tenant_within_share_displaces_the_flooder() -> None:
    core = blocked_core(max_queued_tokens=1000)
    for i in range(10):
        core.submit(f"a-{i}", "a", 1.0, 50, 50, 0.0)
    # b's share is 500 tokens: it pushes out a's newest requests.
    for i in range(5):
        assert isinstance(core.submit(f"b-{i}", "b", 1.0, 50, 50, 0.0), Queued)
    displaced = core.expire(0.0)
    assert [rid for rid, _ in displaced] == [f"a-{i}" for i in range(9, 4, -1)]
    assert all(r.reason is RefusalReason.DISPLACED and r.status_code == 429 for _, r in displaced)
    assert core.stats().tenants["a"].queued_tokens == 500
    # Both at their shares: b's next is over its share (429); a third tenant displaces the most over.
    assert isinstance(d := core.submit("b-5", "b", 1.0, 50, 50, 0.0), Refused) and d.status_code == 429
    d = core.submit("c-0", "c", 1.0, 50, 50, 0.0)
    assert isinstance(d, Queued)  # c's share (333) > 0: it displaces the most-over tenant
    assert len(core.expire(0.0)) == 1


def test_a_request_that_may_outwait_the_deadline_is_refused_at_once() -> None:
    # Requests of 100 queue tokens, drained at 1000 tokens/s: 10 releases expected per 1 s deadline.
    # Poisson(10) falls short of 3 with probability 0.3%, of 4 with 1.0%: 3 may queue at 1% risk.
    core = make_core(
        max_num_seqs=1,
        initial_num_seqs=1,
        prior_drain_tokens_per_s=1000.0,
        queue_deadline_ms=1000.0,
        deadline_miss_probability=0.01,
    )
    assert isinstance(core.submit("z-0", "z", 1.0, 50, 50, 0.0), Admitted)  # 100 tokens: the mean cost
    for i in range(3):
        assert isinstance(core.submit(f"a-{i}", "a", 1.0, 50, 50, 0.0), Queued)
    d = core.submit("a-3", "a", 1.0, 50, 50, 0.0)
    assert isinstance(d, Refused) and d.reason is RefusalReason.PREDICTED_WAIT
    assert d.retry_after_s == pytest.approx(0.1)  # one release's worth at 10 releases/s
    assert d.status_code == 503  # a is the only tenant queued: the pool itself is saturated
    assert core.expire(0.0) == [] and core.queued_requests == 3


def test_predicted_wait_counts_the_load_above_a_limit_that_came_down() -> None:
    core = make_core(max_num_seqs=8, prior_drain_tokens_per_s=1000.0, queue_deadline_ms=1000.0)
    for i in range(8):
        assert isinstance(core.submit(f"r-{i}", "t", 1.0, 50, 50, 0.0), Admitted)
    assert isinstance(core.submit("q-0", "t", 1.0, 50, 50, 0.0), Queued)
    core.cancel("q-0", 0.0)
    # TPOT far over target for a while: the limit comes down below the running load.
    for k in range(1, 60):
        for i in range(8):
            core.on_tokens(f"r-{i}", 1, k * 0.2)
    assert core.seq_limit <= 5
    # Three finishes must come before anything is released: with 10 expected, that is too many.
    d = core.submit("q-1", "t", 1.0, 50, 50, 12.0)
    assert isinstance(d, Refused) and d.reason is RefusalReason.PREDICTED_WAIT


def test_queue_deadline_expires_waiting_requests() -> None:
    core = blocked_core(queue_deadline_ms=500.0)
    q = core.submit("a-0", "a", 1.0, 10, 10, 1.0)
    assert isinstance(q, Queued) and q.deadline_s == pytest.approx(1.5)
    core.submit("b-0", "b", 1.0, 10, 10, 1.2)
    assert core.next_deadline() == pytest.approx(1.5)
    assert core.expire(1.49) == []
    out = core.expire(1.5)
    assert [rid for rid, _ in out] == ["a-0"]
    assert out[0][1].reason is RefusalReason.QUEUE_DEADLINE and out[0][1].status_code == 503
    assert core.next_deadline() == pytest.approx(1.7)
    assert core.cancel("b-0", 1.3)
    assert core.next_deadline() is None and core.queued_tokens == 0
    assert core.stats().refused_total == {"queue_deadline": 1}


def test_snapshot_reports_load() -> None:
    core = make_core(max_num_seqs=2, initial_num_seqs=2, ttft_slo_ms=1000.0)
    core.submit("a-0", "a", 1.0, 100, 10, 0.0)
    core.submit("a-1", "a", 1.0, 100, 10, 0.0)
    core.submit("a-2", "a", 1.0, 100, 10, 0.0)
    core.on_tokens("a-0", 1, 0.2)
    core.on_tokens("a-0", 9, 0.2 + 9 * 0.02)
    core.on_finish("a-0", 100, 10, 0.2 + 9 * 0.02)
    assert core.release(0.4) == ["a-2"]
    s = core.snapshot(0.5)
    assert (s.queued_requests, s.in_flight_seqs, s.in_flight_tokens) == (0, 2, 200)
    assert s.recent_ttft_s == pytest.approx(0.2) and s.recent_tpot_s == pytest.approx(0.02)
    st = core.stats()
    assert st.finished_total == 1 and st.slo_met_total == 1 and st.recent_slo_attainment == 1.0


def test_config_rejects_inconsistent_bounds() -> None:
    with pytest.raises(ValidationError, match="initial_num_seqs"):
        AdmissionConfig(
            max_num_seqs=8, kv_capacity_tokens=100, ttft_slo_ms=1, tpot_slo_ms=1, initial_num_seqs=9
        )
    with pytest.raises(ValidationError):
        AdmissionConfig(max_num_seqs=8, kv_capacity_tokens=100, ttft_slo_ms=1, tpot_slo_ms=1, bogus=1)  # type: ignore[call-arg]


def test_only_the_binding_limit_is_cut() -> None:
    core = make_core(max_num_seqs=16, tpot_slo_ms=50.0)
    kv_tokens = core.token_limit
    for i in range(16):
        core.submit(f"r-{i}", "t", 1.0, 10, 100, 0.0)
        core.on_tokens(f"r-{i}", 1, 0.1)
    for k in range(1, 20):
        for i in range(16):
            core.on_tokens(f"r-{i}", 8, 0.1 + k * 8 * 0.1)  # 100 ms per token: twice the SLO
    assert core.seq_limit < 16 and core.token_limit == kv_tokens  # sequences bind, KV does not


def test_ttfts_measured_above_a_cut_limit_do_not_keep_cutting_it() -> None:
    core = make_core(max_num_seqs=40, ttft_slo_ms=1000.0, tpot_slo_ms=50.0, latency_signals=16)
    for i in range(40):
        core.submit(f"r-{i}", "t", 1.0, 10, 100, 0.0)
    for i in range(40):
        core.on_tokens(f"r-{i}", 1, 2.0)  # 2 s to the first token, at 40 in flight: far over
    t = 2.0
    for _ in range(40):  # fast decode steps: only the TTFTs are over target
        t += 0.08
        for i in range(40):
            core.on_tokens(f"r-{i}", 8, t)
    cut = core.seq_limit
    assert cut < 40
    # Nothing new was released, so there is no evidence against the cut limit: it stops falling
    # (and TPOT, under target, lets it climb back).
    for _ in range(40):
        t += 0.08
        for i in range(40):
            core.on_tokens(f"r-{i}", 8, t)
    assert core.seq_limit >= cut


def test_a_tenant_owed_service_may_queue_on_the_expected_releases() -> None:
    # 100-token requests drained at 1000 tokens/s, deadline 1 s: 10 releases expected, 3 sure.
    core = make_core(
        max_num_seqs=2, initial_num_seqs=2, prior_drain_tokens_per_s=1000.0, queue_deadline_ms=1000.0
    )
    assert isinstance(core.submit("b-0", "b", 1.0, 50, 50, 0.0), Admitted)
    assert isinstance(core.submit("a-0", "a", 1.0, 50, 50, 0.0), Admitted)
    core.on_tokens("a-0", 400, 0.5)  # a is served 800 (priced) tokens more than b: b is behind
    # a may queue the 3 sure releases' worth, no more...
    kinds = [type(core.submit(f"a-{i}", "a", 1.0, 50, 50, 0.5)).__name__ for i in range(1, 6)]
    assert kinds == ["Queued"] * 3 + ["Refused"] * 2
    # ...while b, owed service (first in fair order whatever a has queued) may queue on the releases
    # expected, not the sure ones, as long as fair order still puts it first: 9 requests of 100
    # make up its 850-token lag. Keeping it backlogged is what lets fair order serve it its share.
    kinds = [type(core.submit(f"b-{i}", "b", 1.0, 50, 50, 0.5)).__name__ for i in range(1, 13)]
    assert kinds == ["Queued"] * 9 + ["Refused"] * 3
    core.on_finish("a-0", 50, 400, 0.6)
    assert core.release(0.6) == ["b-1"]


# ---- batch sharing ----------------------------------------------------------------------------------


def closed_loops(
    core: AdmissionCore, clients: dict[str, int], steps: int, out_tokens: int = 32, think_steps: int = 0
) -> dict[str, int]:
    """Closed loops of ``clients[org]`` requests each against a batch engine far below its limit
    (every running request gains one token a step, a client sends its next request
    ``think_steps`` steps after its last one ended, all of them at once if they ended together);
    returns the completion tokens served per org after the first quarter of the steps."""
    now = 0.0
    running: dict[str, int] = {}
    owner: dict[str, str] = {}
    served = dict.fromkeys(clients, 0)
    thinking: list[tuple[int, str]] = []
    n = 0

    def send(org: str) -> None:
        nonlocal n
        rid = f"{org}-{n}"
        n += 1
        owner[rid] = org
        d = core.submit(rid, org, 1.0, 16, out_tokens, now)
        assert not isinstance(d, Refused), d
        if isinstance(d, Admitted):
            running[rid] = 0

    for org, k in clients.items():
        for i in range(k):
            send(org)
            if not think_steps:  # staggered: the clients do not end together
                running[f"{org}-{n - 1}"] = i % out_tokens
    for step in range(steps):
        now += 0.010 + 0.001 * len(running)
        for due, org in [x for x in thinking if x[0] <= step]:
            thinking.remove((due, org))
            send(org)
        for rid in list(running):
            running[rid] += 1
            core.on_tokens(rid, 1, now)
            if running[rid] >= out_tokens:
                del running[rid]
                core.on_finish(rid, 16, out_tokens, now)
                if step >= steps // 4:
                    served[owner[rid]] += out_tokens
                if think_steps:
                    thinking.append((step + think_steps, owner[rid]))
                else:
                    send(owner[rid])
            for started in core.release(now):  # the tokens may have let held requests go
                running[started] = 0
    return served


def test_without_batch_sharing_a_batch_serves_organizations_by_their_requests() -> None:
    # Far below the limit nothing queues: VTC (work-conserving) has nothing to order, and every
    # sequence in the batch gets a token a step.
    core = make_core(max_num_seqs=256, tpot_slo_ms=1e6, queue_deadline_ms=1e9)
    served = closed_loops(core, {"heavy": 40, "light": 8}, 2000)
    assert 4.5 <= served["heavy"] / served["light"] <= 5.5, served
    assert core.queued_requests == 0


def test_batch_sharing_holds_a_flood_to_the_pace_of_the_others() -> None:
    core = make_core(max_num_seqs=256, tpot_slo_ms=1e6, queue_deadline_ms=1e9, batch_share=True)
    served = closed_loops(core, {"heavy": 40, "light": 8}, 2000)
    assert 0.9 <= served["heavy"] / served["light"] <= 1.1, served
    # The flood waits in the queue (so the batch runs below the limit), the light tenant never does.
    assert core.queued_requests > 0
    assert core.stats().tenants["light"].queued_requests == 0
    assert core.seq_limit == 256  # holding back is not the limit binding: it neither grew nor shrank


def test_batch_sharing_alone_or_within_the_lead_holds_nothing() -> None:
    core = make_core(max_num_seqs=256, tpot_slo_ms=1e6, batch_share=True, batch_share_lead_tokens=10_000)
    for i in range(100):  # one organization: nobody to share with, the batch takes what it sends
        assert isinstance(core.submit(f"a-{i}", "a", 1.0, 16, 32, 0.0), Admitted)
    for i in range(100):
        core.on_tokens(f"a-{i}", 32, 1.0)  # a: 100 x (16 + 2 x 32) = 8,000 weighted tokens
    assert isinstance(core.submit("b-0", "b", 1.0, 16, 32, 1.0), Admitted)
    # b arrived at a's counter (lifted to the smallest active); a is within 10,000 of it and may go on.
    assert isinstance(core.submit("a-100", "a", 1.0, 16, 32, 1.0), Admitted)


def test_batch_sharing_starts_a_lagging_organization_past_the_held_ones() -> None:
    core = make_core(max_num_seqs=256, tpot_slo_ms=1e6, batch_share=True, batch_share_lead_tokens=50)
    assert isinstance(core.submit("b-0", "b", 1.0, 16, 32, 0.0), Admitted)  # b: 16
    assert isinstance(core.submit("a-0", "a", 1.0, 16, 32, 0.0), Admitted)  # a: lifted to 16, 32
    core.on_tokens("a-0", 32, 0.5)  # a: 32 + 2 x 32 = 96, 80 ahead of b
    assert isinstance(core.submit("a-1", "a", 1.0, 16, 32, 0.5), Queued)  # held, the limit has room
    assert core.releases_on_tokens
    assert isinstance(core.submit("b-1", "b", 1.0, 16, 32, 0.5), Admitted)  # behind a: starts at once
    assert core.release(0.5) == []  # a is still 64 ahead of b's 32
    core.on_tokens("b-0", 32, 1.0)  # b catches up: 96
    assert core.release(1.0) == ["a-1"]
    assert not core.releases_on_tokens  # nothing queued any more


def test_batch_sharing_keeps_the_place_of_an_organization_between_its_requests() -> None:
    # The light clients end together and think for three steps (about 0.1 s): all that time the light
    # organization has nothing in flight. Counted as gone, it would come back lifted to the heavy
    # one's counter and the heavy one would have run ahead again; it still counts as active for
    # batch_share_idle_s.
    kw: dict[str, object] = {"max_num_seqs": 256, "tpot_slo_ms": 1e6, "queue_deadline_ms": 1e9}
    clients = {"heavy": 40, "light": 8}
    lingering = closed_loops(make_core(**kw, batch_share=True), clients, 3000, think_steps=3)
    assert 0.9 <= lingering["heavy"] / lingering["light"] <= 1.1, lingering
    forgetting = closed_loops(
        make_core(**kw, batch_share=True, batch_share_idle_s=0), clients, 3000, think_steps=3
    )
    assert forgetting["heavy"] / forgetting["light"] > 1.3, forgetting


def test_an_idle_organization_stops_holding_the_others_back_after_batch_share_idle_s() -> None:
    core = make_core(max_num_seqs=256, tpot_slo_ms=1e6, batch_share=True, batch_share_lead_tokens=50)
    assert isinstance(core.submit("b-0", "b", 1.0, 16, 32, 0.0), Admitted)
    assert isinstance(core.submit("a-0", "a", 1.0, 16, 32, 0.0), Admitted)
    core.on_tokens("a-0", 32, 0.5)
    core.on_finish("a-0", 16, 32, 0.5)  # a: 96, lingering (idle, still active)
    core.on_tokens("b-0", 4, 0.5)
    core.on_finish("b-0", 16, 4, 0.5)  # b: 24 and idle too, 72 behind a
    assert isinstance(core.submit("a-1", "a", 1.0, 16, 32, 0.6), Queued)  # held by idle b's counter
    assert core.next_deadline() == pytest.approx(1.5)  # when b stops counting as active
    assert core.release(1.4) == []
    assert core.release(1.5) == ["a-1"]
    # b comes back after its idle time: lifted to a's counter (VTC: idle time banks no credit).
    assert isinstance(core.submit("b-1", "b", 1.0, 16, 32, 1.6), Admitted)
    assert core.stats().tenants["b"].virtual_counter == pytest.approx(112 + 16)
