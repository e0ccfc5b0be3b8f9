"""The simulated engine's pure scheduler: token budget, max_num_seqs, KV blocks, preemption."""

from __future__ import annotations

from serving.engines._sim_sched import SeqStatus, SimScheduler, SimSeq


def seq(prompt: int, max_tokens: int = 100, eos: int | None = None) -> SimSeq:
    return SimSeq(owner=None, index=0, prompt_len=prompt, max_tokens=max_tokens, eos_after=eos)


def test_budget_is_shared_by_decodes_and_chunked_prefill() -> None:
    s = SimScheduler(max_num_seqs=8, max_num_batched_tokens=512, kv_capacity_tokens=100_000)
    a, b = seq(300), seq(1000)
    s.add(a)
    s.add(b)
    step = s.schedule()
    assert [(x is a, start, n) for x, start, n in step.items] == [(True, 0, 300), (False, 0, 212)]
    assert step.prefill_tokens == 512 and step.decode_seqs == 0
    produced = s.postprocess(step)
    assert produced == [a] and a.num_output == 1 and b.num_output == 0
    step = s.schedule()  # a decodes (1 token), b continues its prompt with the rest of the budget
    assert [(start, n) for _, start, n in step.items] == [(300, 1), (212, 511)]
    assert step.decode_seqs == 1 and step.decode_context_tokens == 300
    assert step.prefill_context_tokens == 212
    s.postprocess(step)
    step = s.schedule()
    assert [(start, n) for _, start, n in step.items] == [(301, 1), (723, 277)]
    assert s.postprocess(step) == [a, b]


def test_max_num_seqs_caps_the_running_set() -> None:
    s = SimScheduler(max_num_seqs=2, max_num_batched_tokens=4096, kv_capacity_tokens=100_000)
    seqs = [seq(10, max_tokens=3) for _ in range(3)]
    for x in seqs:
        s.add(x)
    step = s.schedule()
    assert [x for x, _, _ in step.items] == seqs[:2]
    for _ in range(3):
        s.postprocess(step)
        step = s.schedule()
    # The first two finished on max_tokens; the third is admitted only now.
    assert [x.finish_reason for x in seqs[:2]] == ["length", "length"]
    assert [x for x, _, _ in step.items] == [seqs[2]]


def test_eos_finishes_with_stop_and_frees_blocks() -> None:
    s = SimScheduler(max_num_seqs=4, max_num_batched_tokens=64, kv_capacity_tokens=1600)
    a = seq(20, max_tokens=50, eos=2)
    s.add(a)
    s.postprocess(s.schedule())
    assert s.free_blocks == s.num_blocks - 2
    s.postprocess(s.schedule())
    assert a.status is SeqStatus.FINISHED and a.finish_reason == "stop" and a.num_output == 2
    assert s.free_blocks == s.num_blocks and not s.has_work()


def test_preemption_when_kv_is_full_recomputes_the_newest() -> None:
    # 4 blocks of 16 tokens; two sequences of 30-token prompts take 2 blocks each.
    s = SimScheduler(max_num_seqs=4, max_num_batched_tokens=256, kv_capacity_tokens=64)
    a, b = seq(30, max_tokens=10), seq(30, max_tokens=10)
    s.add(a)
    s.add(b)
    s.postprocess(s.schedule())  # both prefilled, 1 token each: 31 tokens of KV needed next step
    assert s.free_blocks == 0
    s.postprocess(s.schedule())  # decode writes token 31 (position 30): fits in block 2
    step = s.schedule()  # position 31 fits; position 32 would need a third block each
    s.postprocess(step)
    step = s.schedule()
    assert step.preempted == 1 and s.num_preemptions == 1
    assert b.status is SeqStatus.WAITING and b.num_computed == 0 and b.num_blocks == 0
    assert [x for x, _, _ in step.items] == [a]
    assert s.waiting[0] is b
    # b comes back once a finishes, re-prefilling prompt + its output so far.
    out_b = b.num_output
    while a.status is not SeqStatus.FINISHED:
        s.postprocess(s.schedule())
    step = s.schedule()
    assert step.items[0][0] is b and step.items[0][2] == 30 + out_b
    assert step.prefill_tokens == 30 + out_b


def test_finish_from_outside_frees_kv_and_skips_in_flight_work() -> None:
    s = SimScheduler(max_num_seqs=4, max_num_batched_tokens=256, kv_capacity_tokens=1024)
    a, b = seq(100), seq(100)
    s.add(a)
    s.add(b)
    step = s.schedule()
    s.finish(a, "abort")  # aborted while its step is in flight
    assert a.finish_reason == "abort" and a not in s.running
    assert s.postprocess(step) == [b]
    assert a.num_output == 0
    s.finish(b, "abort")
    s.finish(b, "abort")  # idempotent
    assert s.free_blocks == s.num_blocks and not s.has_work()
