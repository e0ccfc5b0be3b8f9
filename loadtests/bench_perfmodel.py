"""Held-out error of the performance model across model shapes, on the H100 reference measurements.

Three checks, every point printed:

1. leave-one-shape-out: fit the per-GPU factors on one shape's table only, predict every point of
   the other shape (the bar: |error| <= 15% on every decode point and every prefill of >= 2,048
   tokens in the step, batch x prompt);
2. the joint fit (both tables, one set of factors): its error on each point;
3. leave-one-out within each table (each point predicted by a fit on the other 19).

    .venv/bin/python loadtests/bench_perfmodel.py [TABLE.json ...]   # default: both H100 tables

Exit status 0 when the leave-one-shape-out bar holds. No GPU is needed: the tables were measured
on an H100 (see models/calibration/ and ../shared/reference/README.md).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from serving.hardware.calibration import (
    CALIBRATION_DIR,
    LeaveOutResult,
    calibrate,
    fit_tables,
    gpu_from_table,
    leave_one_out,
    leave_one_shape_out,
    load_table,
    predict_sample,
    shape_from_table,
)
from serving.hardware.perfmodel import PerfFactors, PerfModel

BAR = 0.15
PREFILL_BAR_TOKENS = 2048
DEFAULT_TABLES = [CALIBRATION_DIR / "h100_llama8b_steps.json", CALIBRATION_DIR / "h100_llama1b_steps.json"]


def in_bar(r: LeaveOutResult) -> bool:
    return r.sample.kind == "decode" or r.sample.step_tokens >= PREFILL_BAR_TOKENS


def label(r: LeaveOutResult) -> str:
    s = r.sample
    what = "ctx" if s.kind == "decode" else "prompt"
    return f"{r.arch.name:<16} {s.kind:<7} batch={s.batch:<3} {what}={s.tokens:<5}"


def show(results: Sequence[LeaveOutResult]) -> None:
    print(f"  {'point':<52} {'measured ms':>11} {'predicted ms':>12} {'error':>7}")
    for r in results:
        mark = "" if in_bar(r) else "   (short eager prefill, outside the bar)"
        print(
            f"  {label(r):<52} {r.sample.step_s * 1e3:>11.3f} {r.predicted_s * 1e3:>12.3f} "
            f"{r.rel_error:>+7.1%}{mark}"
        )


def summary(results: Sequence[LeaveOutResult]) -> float:
    """Print the worst errors per shape and kind; return the worst error inside the bar."""
    for arch in dict.fromkeys(r.arch for r in results):
        mine = [r for r in results if r.arch == arch]
        dec = [abs(r.rel_error) for r in mine if r.sample.kind == "decode"]
        pre = [abs(r.rel_error) for r in mine if r.sample.kind == "prefill" and in_bar(r)]
        print(
            f"  {arch.name}: decode max {max(dec):.1%} (mean {sum(dec) / len(dec):.1%}), "
            f"prefill >= {PREFILL_BAR_TOKENS} tokens max {max(pre):.1%}"
        )
    return max(abs(r.rel_error) for r in results if in_bar(r))


def describe(f: PerfFactors) -> str:
    return (
        f"mem_eff={f.mem_efficiency:.3f} compute_eff={f.compute_efficiency:.3f} "
        f"overhead={f.step_overhead_s * 1e3:.3f} ms + {f.step_overhead_per_layer_s * 1e6:.1f} us/layer, "
        f"eager prefill floor {f.prefill_floor_per_layer_s * 1e3:.3f} ms/layer"
    )


def main(paths: Sequence[str]) -> int:
    tables = [load_table(p) for p in paths]
    gpu = gpu_from_table(tables[0])
    shapes = [shape_from_table(t) for t in tables]
    for p, sh, t in zip(paths, shapes, tables, strict=True):
        print(f"{p}: {sh.arch.name} on {t.get('device')}, {len(sh.samples)} points")

    worst_loso = 0.0
    if len(shapes) > 1:
        print("\n1. leave-one-shape-out (fit on the other shape only):")
        for sh in shapes:
            others = [x for x in shapes if x is not sh]
            print(f"  fit on {', '.join(x.arch.name for x in others)}: {describe(calibrate(gpu, others))}")
        loso = leave_one_shape_out(gpu, shapes)
        show(loso)
        worst_loso = summary(loso)

    _, joint = fit_tables(tables)
    print(f"\n2. joint fit on all tables: {describe(joint)}")
    fitted = [
        LeaveOutResult(sh.arch, s, predict_sample(PerfModel(sh.arch, gpu, joint), s))
        for sh in shapes
        for s in sh.samples
    ]
    show(fitted)
    summary(fitted)

    print("\n3. leave-one-out within each table:")
    loo = [r for sh in shapes for r in leave_one_out(gpu, sh)]
    summary(loo)
    print(f"  worst on any point, short eager prefills included: {max(abs(r.rel_error) for r in loo):.1%}")

    if len(shapes) > 1:
        ok = worst_loso <= BAR
        print(
            f"\nworst leave-one-shape-out error on decode and prefill >= {PREFILL_BAR_TOKENS} tokens: "
            f"{worst_loso:.1%}: {'PASS' if ok else 'FAIL'} (goal <= {BAR:.0%})"
        )
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or [str(p) for p in DEFAULT_TABLES]))
