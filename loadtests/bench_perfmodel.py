"""Leave-out error of the calibrated performance model on the H100 reference measurements.

Two checks, every point printed: leave-one-out (each point predicted by a fit on the other 19), and
extrapolation (fit without the 8192-token decode contexts and the largest prefills, predict them).
Goal: |error| <= 15 % on every point, decode and prefill.

    .venv/bin/python loadtests/bench_perfmodel.py [models/calibration/h100_llama8b_steps.json]
"""

from __future__ import annotations

import sys

from serving.hardware.calibration import (
    CALIBRATION_DIR,
    arch_from_table,
    gpu_from_table,
    leave_one_out,
    load_table,
    predict_sample,
)
from serving.hardware.perfmodel import PerfModel, StepSample, calibrate, samples_from_table


def label(s: StepSample) -> str:
    what = "ctx" if s.kind == "decode" else "prompt"
    return f"{s.kind:<7} batch={s.batch:<3} {what}={s.tokens:<5}"


def main(path: str) -> int:
    table = load_table(path)
    arch, gpu = arch_from_table(table), gpu_from_table(table)
    samples = samples_from_table(table)
    full = calibrate(arch, gpu, samples)
    print(f"{path}: {table.get('device')}, {len(samples)} points")
    print(
        f"fit on all: mem_eff={full.mem_efficiency:.3f} compute_eff={full.compute_efficiency:.3f} "
        f"overhead={full.step_overhead_s * 1e3:.2f} ms prefill_floor={full.prefill_host_floor_s * 1e3:.2f} ms"
    )
    print("\nleave-one-out (fit on the other points):")
    print(f"  {'point':<34} {'measured ms':>11} {'predicted ms':>12} {'error':>7}")
    loo = leave_one_out(arch, gpu, samples)
    for r in loo:
        print(
            f"  {label(r.sample):<34} {r.sample.step_s * 1e3:>11.2f} {r.predicted_s * 1e3:>12.2f} {r.rel_error:>+7.1%}"
        )
    worst = max(abs(r.rel_error) for r in loo)
    for kind in ("decode", "prefill"):
        errs = [abs(r.rel_error) for r in loo if r.sample.kind == kind]
        print(f"  {kind}: max |error| {max(errs):.1%}, mean {sum(errs) / len(errs):.1%}")

    held = [s for s in samples if s.tokens == 8192 or (s.kind == "prefill" and s.batch * s.tokens >= 32768)]
    fit = calibrate(arch, gpu, [s for s in samples if s not in held])
    m = PerfModel(arch, gpu, fit)
    print(f"\nextrapolation (fit on {len(samples) - len(held)} points, predict the {len(held)} largest):")
    worst_x = 0.0
    for s in held:
        pred = predict_sample(m, s)
        err = (pred - s.step_s) / s.step_s
        worst_x = max(worst_x, abs(err))
        print(f"  {label(s):<34} {s.step_s * 1e3:>11.2f} {pred * 1e3:>12.2f} {err:>+7.1%}")
    ok = worst <= 0.15 and worst_x <= 0.15
    print(
        f"\nworst leave-one-out {worst:.1%}, worst extrapolation {worst_x:.1%}: {'PASS' if ok else 'FAIL'} (goal <= 15%)"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else str(CALIBRATION_DIR / "h100_llama8b_steps.json")))
