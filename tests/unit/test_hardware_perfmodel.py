"""Performance model: hand-computed roofline cases, KV arithmetic, calibration on the H100 file."""

from __future__ import annotations

import dataclasses
import json

import pytest

from serving.hardware.calibration import (
    CALIBRATION_DIR,
    arch_from_table,
    fit_table,
    leave_one_out,
    load_factors,
    load_table,
)
from serving.hardware.catalog import GpuProfile, get_gpu
from serving.hardware.perfmodel import (
    H100_FACTORS,
    ModelArch,
    PerfFactors,
    PerfModel,
    StepSample,
    calibrate,
    factors_for,
    samples_from_table,
)

LLAMA8B = ModelArch("llama-8b", 8_030_261_248, 32, 4096, 32, 8, 128, 14336, 128256, 2)
# A toy card with round numbers: 1 TB/s, 100 TFLOP/s, 40 GB.
TOY = GpuProfile("TOY", 100e12, 40_000_000_000, 1e12, None, None, 1.0)
# Hard roofline (k large), perfect efficiency, 1 ms overhead, no prefill floor.
HARD = PerfFactors(1.0, 1.0, 0.001, 0.0, sharpness=200.0)


@pytest.fixture(scope="module")
def table() -> dict:
    return load_table(CALIBRATION_DIR / "h100_llama8b_steps.json")


def test_bytes_match_the_reference_file(table: dict) -> None:
    arch = arch_from_table(table)
    assert arch.weight_bytes == table["weight_bytes"] == LLAMA8B.weight_bytes
    assert arch.kv_bytes_per_token == table["kv_bytes_per_token"] == 131072


def test_decode_is_memory_bound_by_hand() -> None:
    m = PerfModel(LLAMA8B, TOY, HARD)
    # batch 4 at ctx 1000: bytes = weights + (4000 cached + 4 new) * 131072
    bytes_ = LLAMA8B.weight_bytes + 4004 * 131072
    expected = 0.001 + bytes_ / 1e12
    assert m.decode_step_time_uniform_s(4, 1000) == pytest.approx(expected, rel=1e-3)
    assert m.decode_step_time_s([1000] * 4) == m.decode_step_time_uniform_s(4, 1000)


def test_prefill_is_compute_bound_by_hand() -> None:
    m = PerfModel(LLAMA8B, TOY, HARD)
    p = 4096
    flops = 2 * LLAMA8B.params * p + 4 * 32 * 32 * 128 * (p * (p + 1) // 2)
    assert m.prefill_time_s([p]) == pytest.approx(0.001 + flops / 100e12, rel=1e-3)


def test_smooth_max_lies_between_max_and_sum() -> None:
    f = PerfFactors(1.0, 1.0, 0.0, 0.0, sharpness=3.0)
    m = PerfModel(LLAMA8B, TOY, f)
    t = m.decode_step_time_uniform_s(256, 512)
    mem = (LLAMA8B.weight_bytes + 256 * 513 * 131072) / 1e12
    comp = (2 * LLAMA8B.params * 256 + 4 * 32 * 32 * 128 * 256 * 512) / 100e12
    assert max(mem, comp) < t < mem + comp


def test_mixed_step_costs_more_than_either_part_and_chunks_add_up() -> None:
    m = PerfModel(LLAMA8B, get_gpu("H100"))
    decode_only = m.decode_step_time_s([1024] * 32)
    prefill_only = m.mixed_step_time_s((), ((0, 512),))
    mixed = m.mixed_step_time_s([1024] * 32, ((0, 512),))
    assert mixed > max(decode_only, prefill_only)
    # A later chunk reads the earlier chunk's KV and attends over it: it costs more.
    assert m.mixed_step_time_s((), ((1536, 512),)) > prefill_only
    assert m.chunked_prefill_time_s(2048, 512) == pytest.approx(
        sum(m.mixed_step_time_s((), ((s, 512),)) for s in (0, 512, 1024, 1536))
    )
    assert m.step_time_s() == 0.0


def test_kv_capacity_by_hand() -> None:
    m = PerfModel(LLAMA8B, get_gpu("H100"))
    free = int(80e9 * 0.9) - LLAMA8B.weight_bytes - int(1.5 * 2**30) - 8192 * (2 * 14336 + 4 * 4096) * 2
    assert m.kv_capacity_tokens(0.9) == free // 131072 // 16 * 16
    assert m.kv_capacity_tokens(0.95) > m.kv_capacity_tokens(0.9)
    # 8B bf16 does not fit a 24 GB A10 at 50 % utilisation.
    assert PerfModel(LLAMA8B, get_gpu("A10")).kv_capacity_tokens(0.5) == 0
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        m.kv_capacity_tokens(1.5)


def test_h20_decodes_faster_but_prefills_slower_than_h100() -> None:
    h20 = PerfModel(LLAMA8B, get_gpu("H20"))
    h100 = PerfModel(LLAMA8B, get_gpu("H100"))
    assert h20.decode_step_time_uniform_s(8, 1024) < h100.decode_step_time_uniform_s(8, 1024)
    assert h20.prefill_time_s([4096]) > 4 * h100.prefill_time_s([4096])


def test_calibration_recovers_known_factors_from_synthetic_samples() -> None:
    truth = PerfFactors(0.7, 0.5, 0.002, 0.006, sharpness=3.0)
    m = PerfModel(LLAMA8B, TOY, truth)
    samples = [
        StepSample("decode", b, c, m.decode_step_time_uniform_s(b, c))
        for b in (1, 16, 128)
        for c in (512, 4096)
    ]
    samples += [StepSample("prefill", 1, p, m.prefill_time_s([p])) for p in (64, 256, 1024, 4096)]
    fit = calibrate(LLAMA8B, TOY, samples)
    assert fit.mem_efficiency == pytest.approx(0.7, rel=1e-3)
    assert fit.compute_efficiency == pytest.approx(0.5, rel=1e-3)
    assert fit.step_overhead_s == pytest.approx(0.002, rel=1e-2)
    assert fit.prefill_host_floor_s == pytest.approx(0.006, rel=1e-2)


def test_checked_in_factors_are_the_fit_of_the_checked_in_table(table: dict) -> None:
    _, gpu, fitted = fit_table(table)
    name, stored = load_factors(CALIBRATION_DIR / "h100.json")
    assert name == gpu.name == "H100"
    for f in ("mem_efficiency", "compute_efficiency", "step_overhead_s", "prefill_host_floor_s"):
        assert getattr(stored, f) == pytest.approx(getattr(fitted, f), rel=1e-3)
        assert getattr(H100_FACTORS, f) == pytest.approx(getattr(fitted, f), rel=1e-3)
    # Physically plausible: below the measured copy / matmul ceilings of that run.
    assert stored.mem_efficiency < table["copy_GBps"] * 1e9 / gpu.memory_bw_bytes_per_s
    assert stored.compute_efficiency < table["bf16_matmul_TFLOPs"] * 1e12 / gpu.bf16_dense_flops


def test_leave_one_out_within_15_percent_on_every_point(table: dict) -> None:
    arch, gpu = arch_from_table(table), get_gpu("H100")
    results = leave_one_out(arch, gpu, samples_from_table(table))
    assert len(results) == len(table["decode"]) + len(table["prefill"]) == 20
    worst = max(results, key=lambda r: abs(r.rel_error))
    assert abs(worst.rel_error) <= 0.15, worst


def test_fit_without_the_long_context_points_extrapolates_to_them(table: dict) -> None:
    arch, gpu = arch_from_table(table), get_gpu("H100")
    samples = samples_from_table(table)
    held = [s for s in samples if s.tokens == 8192 or (s.kind == "prefill" and s.batch * s.tokens >= 32768)]
    assert len(held) == 5
    fit = calibrate(arch, gpu, [s for s in samples if s not in held])
    m = PerfModel(arch, gpu, fit)
    for s in held:
        pred = (
            m.decode_step_time_uniform_s(s.batch, s.tokens)
            if s.kind == "decode"
            else m.prefill_time_s([s.tokens] * s.batch)
        )
        assert abs(pred - s.step_s) / s.step_s <= 0.15, (s, pred)


def test_other_cards_reuse_h100_efficiencies_unless_calibrated() -> None:
    assert factors_for(get_gpu("L20")) is H100_FACTORS
    own = dataclasses.replace(H100_FACTORS, mem_efficiency=0.6)
    assert factors_for(get_gpu("L20"), {"L20": own}) is own


def test_factors_round_trip_json() -> None:
    d = H100_FACTORS.to_dict()
    assert PerfFactors.from_dict(json.loads(json.dumps(d))) == H100_FACTORS
    with pytest.raises(ValueError, match="kv_heads"):
        dataclasses.replace(LLAMA8B, kv_heads=0)
