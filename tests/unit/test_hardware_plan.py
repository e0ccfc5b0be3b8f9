"""Hardware plan: derived settings meet the SLO, are monotone in it, and refusals carry numbers."""

from __future__ import annotations

import pytest

from serving.hardware.catalog import get_gpu
from serving.hardware.perfmodel import ModelArch, PerfModel
from serving.hardware.plan import PlanError, PoolSlo, plan_engine

LLAMA8B = ModelArch("llama-8b", 8_030_261_248, 32, 4096, 32, 8, 128, 14336, 128256, 2)
LLAMA70B = ModelArch("llama-70b", 70_553_706_496, 80, 8192, 64, 8, 128, 28672, 128256, 2)


@pytest.mark.parametrize("gpu", ["H20", "H100", "H200", "L40S", "A100-80GB"])
def test_plan_meets_its_own_slo_and_is_maximal(gpu: str) -> None:
    slo = PoolSlo(ttft_slo_ms=2000, tpot_slo_ms=50, typical_prompt_tokens=1024, typical_context_tokens=2048)
    plan = plan_engine(LLAMA8B, get_gpu(gpu), slo)
    m = PerfModel(LLAMA8B, get_gpu(gpu))
    s = plan.settings
    assert plan.predicted_tpot_ms <= 50
    assert m.decode_step_time_uniform_s(s.max_num_seqs, 2048) * 1e3 == pytest.approx(plan.predicted_tpot_ms)
    assert s.max_num_seqs * 2048 <= plan.kv_capacity_tokens
    assert s.max_num_batched_tokens >= s.max_num_seqs
    assert m.mixed_step_time_s((), ((1024, s.max_num_batched_tokens),)) <= 0.050
    # One more sequence breaks the TPOT SLO, the KV cache, or the chunk budget.
    more = s.max_num_seqs + 1
    assert (
        m.decode_step_time_uniform_s(more, 2048) > 0.050
        or more * 2048 > plan.kv_capacity_tokens
        or more > s.max_num_batched_tokens
    )
    assert plan.predicted_ttft_ms <= 2000
    assert plan.tokens_per_s == pytest.approx(s.max_num_seqs / plan.predicted_tpot_ms * 1e3)


def test_plan_is_monotone_in_the_tpot_slo() -> None:
    prev = None
    for tpot in (12, 15, 20, 30, 40, 60, 100):
        plan = plan_engine(LLAMA8B, get_gpu("H200"), PoolSlo(5000, tpot, 512, 1024))
        if prev is not None:
            assert plan.settings.max_num_seqs >= prev.settings.max_num_seqs
            assert plan.settings.max_num_batched_tokens >= prev.settings.max_num_batched_tokens
            assert plan.tokens_per_s >= prev.tokens_per_s
        prev = plan
    assert prev is not None and prev.settings.max_num_seqs > 200


def test_refuses_a_model_that_does_not_fit() -> None:
    with pytest.raises(PlanError, match=r"llama-70b on H100: weights need 141\.1 GB") as e:
        plan_engine(LLAMA70B, get_gpu("H100"), PoolSlo(1000, 50))
    assert e.value.gpu == "H100" and e.value.model == "llama-70b"
    with pytest.raises(PlanError, match="A10"):
        plan_engine(LLAMA8B, get_gpu("A10"), PoolSlo(1000, 50), gpu_memory_utilization=0.6)


def test_refuses_an_slo_the_card_cannot_meet() -> None:
    # An 8B decode step on an A10 streams 16 GB at 600 GB/s: well over 20 ms even at batch 1.
    with pytest.raises(PlanError, match=r"ms > TPOT SLO 20 ms"):
        plan_engine(LLAMA8B, get_gpu("A10"), PoolSlo(5000, 20, 256, 512))
    with pytest.raises(PlanError, match=r"> TTFT SLO 50 ms"):
        plan_engine(LLAMA8B, get_gpu("H20"), PoolSlo(50, 40, 4096, 4096))
    with pytest.raises(PlanError, match="less than one 300000-token context"):
        plan_engine(LLAMA8B, get_gpu("L40S"), PoolSlo(100000, 5000, 1024, 300000))


def test_explicit_settings_override_the_plan() -> None:
    plan = plan_engine(
        LLAMA8B,
        get_gpu("H100"),
        PoolSlo(2000, 50),
        max_num_seqs=64,
        max_num_batched_tokens=4096,
        gpu_memory_utilization=0.8,
    )
    assert (plan.settings.max_num_seqs, plan.settings.max_num_batched_tokens) == (64, 4096)
    assert plan.settings.gpu_memory_utilization == 0.8
    assert plan.kv_capacity_tokens == PerfModel(LLAMA8B, get_gpu("H100")).kv_capacity_tokens(0.8, 8192)
