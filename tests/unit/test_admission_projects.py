"""Hierarchical fair queueing in the admission core: organizations by weight, then their projects by
weight (fake clock, synthetic completions; no engine)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from serving.admission import AdmissionConfig, AdmissionCore, Admitted, Queued, RefusalReason, Refused
from serving.admission._fair_queue import FairQueue, QueuedRequest


def make_core(**kw: object) -> AdmissionCore:
    base: dict[str, object] = {
        "max_num_seqs": 1,
        "initial_num_seqs": 1,
        "kv_capacity_tokens": 1_000_000,
        "ttft_slo_ms": 2000.0,
        "tpot_slo_ms": 50.0,
        "prior_drain_tokens_per_s": 1e9,
    }
    base.update(kw)
    return AdmissionCore(AdmissionConfig.model_validate(base))


@dataclass(frozen=True)
class Sender:
    org: str
    org_weight: float
    project: str | None
    project_weight: float = 1.0

    def submit(self, core: AdmissionCore, i: int, prompt: int, max_tokens: int, now: float = 0.0) -> object:
        rid = f"{self.org}.{self.project}-{i}"
        return core.submit(
            rid, self.org, self.org_weight, prompt, max_tokens, now, self.project, self.project_weight
        )


def serve(core: AdmissionCore, n: int, sizes: dict[str, tuple[int, int]], now: float = 0.0) -> dict[str, int]:
    """Release and finish ``n`` requests one at a time; tokens served per ``org.project``."""
    served: dict[str, int] = {}
    for _ in range(n):
        ids = core.release(now)
        assert len(ids) == 1, ids
        rid = ids[0]
        prompt, completion = sizes[rid]
        core.on_tokens(rid, completion, now)
        core.on_finish(rid, prompt, completion, now)
        key = rid.rsplit("-", 1)[0]
        served[key] = served.get(key, 0) + prompt + 2 * completion  # the counters' prices (1, 2)
    return served


def blocked(core: AdmissionCore) -> None:
    """A request in flight, so that everything submitted next queues."""
    assert isinstance(core.submit("x.None-0", "x", 1.0, 1, 1, 0.0), Admitted)


# ---- service shares ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_equal_orgs_get_equal_service_and_projects_share_theirs_by_weight(seed: int) -> None:
    """Org A (weight 1) has projects a1 (weight 3) and a2 (weight 1); org B (weight 1) has one
    project. All backlogged with requests of random sizes: A and B get the same service, and A's
    part goes 3:1 to a1 and a2, however many requests each sends."""
    rng = random.Random(seed)
    core = make_core()
    blocked(core)
    senders = [Sender("A", 1.0, "a1", 3.0), Sender("A", 1.0, "a2", 1.0), Sender("B", 1.0, "b")]
    counts = {"a1": 200, "a2": 120, "b": 400}  # B sends as much as A's two projects together
    sizes: dict[str, tuple[int, int]] = {}
    for s in senders:
        for i in range(counts[str(s.project)]):
            prompt, completion = rng.randint(20, 200), rng.randint(10, 100)
            assert isinstance(s.submit(core, i, prompt, completion), Queued)
            sizes[f"{s.org}.{s.project}-{i}"] = (prompt, completion)
    core.on_finish("x.None-0", 1, 1, 0.0)
    served = serve(core, 300, sizes)
    org_a = served["A.a1"] + served["A.a2"]
    assert org_a == pytest.approx(served["B.b"], rel=0.03)
    assert served["A.a1"] / served["A.a2"] == pytest.approx(3.0, rel=0.05)
    # The counters say the same: each level's counters stay within about one request of each other.
    st = core.stats().tenants
    assert st["A"].virtual_counter == pytest.approx(st["B"].virtual_counter, abs=400)


def test_org_weights_apply_to_the_org_however_many_projects_it_has() -> None:
    """Org A (weight 1) with four projects against org B (weight 3) with one: B gets three times A,
    not three quarters of the pool split five ways."""
    core = make_core()
    blocked(core)
    sizes: dict[str, tuple[int, int]] = {}
    senders = [Sender("A", 1.0, f"a{k}") for k in range(4)] + [Sender("B", 3.0, "b")]
    for s in senders:
        for i in range(60):
            assert isinstance(s.submit(core, i, 100, 50), Queued)
            sizes[f"{s.org}.{s.project}-{i}"] = (100, 50)
    core.on_finish("x.None-0", 1, 1, 0.0)
    served = serve(core, 80, sizes)
    assert served["B.b"] == 3 * sum(served[f"A.a{k}"] for k in range(4))
    assert {served[f"A.a{k}"] for k in range(4)} == {1000}  # A's 20 requests: 5 to each project


def test_a_newly_arriving_project_gets_no_burst_of_credit() -> None:
    core = make_core()
    blocked(core)
    a1, a2, b = Sender("A", 1.0, "a1"), Sender("A", 1.0, "a2"), Sender("B", 1.0, "b")
    sizes: dict[str, tuple[int, int]] = {}
    for i in range(60):
        for s in (a1, b):
            s.submit(core, i, 100, 50)
            sizes[f"{s.org}.{s.project}-{i}"] = (100, 50)
    core.on_finish("x.None-0", 1, 1, 0.0)
    served = serve(core, 40, sizes)  # a1 has had all of A's part: 20 requests
    assert served == {"A.a1": 20 * 200, "B.b": 20 * 200}
    for i in range(20):
        a2.submit(core, i, 100, 50, now=1.0)
        sizes[f"A.a2-{i}"] = (100, 50)
    # a2 starts level with a1 (it banks nothing for having been away): A's part alternates between
    # them, and B keeps its half.
    served = serve(core, 20, sizes, now=1.0)
    assert served == {"A.a1": 5 * 200, "A.a2": 5 * 200, "B.b": 10 * 200}


def test_a_project_back_from_idle_banks_nothing() -> None:
    core = make_core()
    blocked(core)
    a1, a2 = Sender("A", 1.0, "a1"), Sender("A", 1.0, "a2")
    sizes: dict[str, tuple[int, int]] = {}
    a2.submit(core, 0, 100, 50)
    sizes["A.a2-0"] = (100, 50)
    for i in range(40):
        a1.submit(core, i, 100, 50)
        sizes[f"A.a1-{i}"] = (100, 50)
    core.on_finish("x.None-0", 1, 1, 0.0)
    served = serve(core, 21, sizes)  # a2 served once, then idle while a1 is served 20 times
    assert served == {"A.a1": 20 * 200, "A.a2": 200}
    for i in range(1, 10):
        a2.submit(core, i, 100, 50, now=1.0)
        sizes[f"A.a2-{i}"] = (100, 50)
    served = serve(core, 8, sizes, now=1.0)
    assert served == {"A.a1": 4 * 200, "A.a2": 4 * 200}


# ---- flat equivalence ----------------------------------------------------------------------------


def _trace(seed: int, project: str | None, project_weight: float) -> list[object]:
    """A random workload (arrivals, partial outputs, finishes, cancels, expiry, bounds) in which
    every organization's requests belong to one project; every decision the core makes."""
    rng = random.Random(seed)
    core = make_core(
        max_num_seqs=rng.choice([1, 2, 4]),
        initial_num_seqs=None,
        kv_capacity_tokens=rng.choice([2000, 1_000_000]),
        prior_drain_tokens_per_s=rng.choice([2000.0, 1e5]),
        max_queued_requests=rng.choice([4, 16]),
        max_queued_tokens=rng.choice([1500, 6000]),
        queue_deadline_ms=rng.choice([300.0, 3000.0]),
    )
    orgs = [(f"t{i}", rng.choice([0.5, 1.0, 3.0])) for i in range(rng.randint(1, 5))]
    out: list[object] = []
    running: dict[str, int] = {}
    queued: list[str] = []
    now = 0.0
    for n in range(500):
        now += rng.expovariate(40.0)
        ev = rng.random()
        if ev < 0.4:
            org, w = rng.choice(orgs)
            rid = f"{org}-{n}"
            d = core.submit(
                rid, org, w, rng.randint(1, 300), rng.randint(1, 200), now, project, project_weight
            )
            out.append(d)
            if isinstance(d, Admitted):
                running[rid] = 0
            elif isinstance(d, Queued):
                queued.append(rid)
        elif ev < 0.92 and running:
            rid = rng.choice(sorted(running))
            k = rng.randint(1, 20)
            running[rid] += k
            core.on_tokens(rid, k, now)
            if rng.random() < 0.4:
                core.on_finish(rid, rng.randint(1, 300), running.pop(rid), now)
        elif ev >= 0.92 and queued:
            out.append(("cancel", core.cancel(queued.pop(rng.randrange(len(queued))), now)))
        out.extend(core.expire(now))
        for rid in core.release(now):
            running[rid] = 0
            out.append(("release", rid))
    out.append(core.snapshot(now))
    out.append(core.stats())
    return out


@pytest.mark.parametrize("seed", range(12))
def test_one_project_per_org_is_flat_vtc(seed: int) -> None:
    """No project, or every organization in one project of any weight: the same decisions, refusal
    texts and counters, event for event (the flat VTC the other admission tests pin down)."""
    flat = _trace(seed, None, 1.0)
    assert _trace(seed, "default", 1.0) == flat
    assert _trace(seed, "default", 7.5) == flat


def test_the_flat_traces_exercise_every_rule() -> None:
    seen: set[str] = set()
    for seed in range(12):
        for d in _trace(seed, None, 1.0):
            if isinstance(d, Refused):
                seen.add(d.reason.value)
            elif isinstance(d, tuple) and isinstance(d[1], Refused):
                seen.add(f"expired:{d[1].reason.value}")
            elif isinstance(d, tuple):
                seen.add(str(d[0]))
            else:
                seen.add(type(d).__name__)
    assert seen >= {
        "Admitted",
        "Queued",
        "release",
        "cancel",
        "predicted_wait",
        "tenant_queue_full",
        "expired:displaced",
        "expired:queue_deadline",
    }


# ---- bounded state ------------------------------------------------------------------------------


def test_idle_projects_are_dropped() -> None:
    q = FairQueue(1.0, 2.0)
    t = q.tenant("A", 1.0)
    for k in range(1000):
        q.push(QueuedRequest(f"r{k}", "A", 10, 10, 0.0, 1.0, project_id=f"p{k}"), 1.0, 1.0)
    assert len(t.projects) == 1000
    for _ in range(1000):
        item = q.peek()
        assert item is not None
        q.release(item.req_id)
        q.charge("A", 10, 10, item.project_id)
        q.finish("A", item.project_id)
    assert t.projects == {} and q.peek() is None and len(q) == 0
    assert t.served_prompt_tokens == 10_000  # the organization's totals are kept
    q.push(QueuedRequest("s", "A", 10, 10, 0.0, 1.0, project_id="p1"), 1.0, 1.0)
    q.remove("s")
    assert t.projects == {}


# ---- back-pressure, one level down -------------------------------------------------------------


def test_wait_prediction_counts_only_what_the_project_waits_for() -> None:
    """The pool can promise 3 releases within the deadline. Project a1 has queued 3; a fourth is
    refused, but a request of a2 in the same organization is served right after a1's next one, so it
    may queue (flat, it would have waited behind all of a1's)."""
    core = make_core(prior_drain_tokens_per_s=1000.0, queue_deadline_ms=1000.0)
    a1, a2 = Sender("A", 1.0, "a1"), Sender("A", 1.0, "a2")
    assert isinstance(core.submit("z-0", "z", 1.0, 50, 50, 0.0), Admitted)
    for i in range(3):
        assert isinstance(a1.submit(core, i, 50, 50), Queued)
    d = a1.submit(core, 3, 50, 50)
    assert isinstance(d, Refused) and d.reason is RefusalReason.PREDICTED_WAIT
    assert isinstance(a2.submit(core, 0, 50, 50), Queued)
    flat = make_core(prior_drain_tokens_per_s=1000.0, queue_deadline_ms=1000.0)
    flat.submit("z-0", "z", 1.0, 50, 50, 0.0)
    for i in range(3):
        flat.submit(f"a-{i}", "A", 1.0, 50, 50, 0.0)
    assert isinstance(flat.submit("a-3", "A", 1.0, 50, 50, 0.0), Refused)
    core.on_finish("z-0", 50, 50, 0.0)
    assert core.release(0.0) == ["A.a1-0"]
    core.on_finish("A.a1-0", 50, 50, 0.0)
    assert core.release(0.0) == ["A.a2-0"]


def test_a_project_within_its_share_displaces_its_flooding_sibling() -> None:
    """The organization holds the whole queue, all of it a1's: a request of a2 (within its half of
    the organization's part) pushes out a1's newest instead of being refused; a1 itself is refused."""
    core = make_core(max_queued_tokens=1000)
    blocked(core)
    a1, a2 = Sender("A", 1.0, "a1"), Sender("A", 1.0, "a2")
    for i in range(10):
        assert isinstance(a1.submit(core, i, 50, 50), Queued)
    d = a1.submit(core, 10, 50, 50)
    assert isinstance(d, Refused) and d.reason is RefusalReason.TENANT_QUEUE_FULL
    for i in range(5):
        assert isinstance(a2.submit(core, i, 50, 50), Queued)
    displaced = core.expire(0.0)
    assert [rid for rid, _ in displaced] == [f"A.a1-{i}" for i in range(9, 4, -1)]
    assert all(r.reason is RefusalReason.DISPLACED and "a1" in r.message for _, r in displaced)
    # Both at their halves: either one's next is refused, and nothing more is pushed out.
    for s in (a1, a2):
        d = s.submit(core, 20, 50, 50)
        assert isinstance(d, Refused) and d.reason is RefusalReason.TENANT_QUEUE_FULL
    assert core.expire(0.0) == [] and core.queued_tokens == 1000


def test_displacement_between_orgs_takes_the_most_over_project_first() -> None:
    core = make_core(max_queued_tokens=1200)
    blocked(core)
    a1, a2 = Sender("A", 1.0, "a1"), Sender("A", 1.0, "a2")
    for i in range(2):
        a2.submit(core, i, 50, 50)  # a2 arrives first, a1 floods
    for i in range(10):
        a1.submit(core, i, 50, 50)
    # B's half is 600 tokens: it pushes out A's newest, from a1 (the project most over its share).
    for i in range(6):
        assert isinstance(Sender("B", 1.0, None).submit(core, i, 50, 50), Queued)
    displaced = [rid for rid, _ in core.expire(0.0)]
    assert displaced == [f"A.a1-{i}" for i in range(9, 3, -1)]


def test_project_weight_must_be_positive() -> None:
    core = make_core()
    with pytest.raises(ValueError, match="weight must be > 0"):
        core.submit("r", "A", 1.0, 10, 10, 0.0, "a1", 0.0)
    assert core.queued_requests == 0 and core.in_flight_seqs == 0
