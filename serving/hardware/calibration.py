"""Calibration: read measured step tables, fit one set of per-GPU factors across model shapes, check
them on held-out points and held-out shapes.

A table is the JSON that ``models/calibration/measure_gpu.py`` writes (the format of
``h100_llama8b_steps.json``): ``device``, ``shape``, ``params``, ``decode`` rows
(``batch``, ``ctx``, ``step_ms``) and ``prefill`` rows (``batch``, ``prompt``, ``ms``). Those runs
compute the LM head at every prompt position, and a measured prefill is priced that way here.
A factors file is :meth:`PerfFactors.to_dict` as JSON plus the card name.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from serving.hardware.catalog import GpuProfile, match_gpu_name
from serving.hardware.perfmodel import ModelArch, PerfFactors, PerfModel, chunk_attn_pairs

__all__ = [
    "CALIBRATION_DIR",
    "LeaveOutResult",
    "ShapeSamples",
    "StepSample",
    "arch_from_table",
    "calibrate",
    "fit_tables",
    "gpu_from_table",
    "leave_one_out",
    "leave_one_shape_out",
    "load_factors",
    "load_table",
    "predict_sample",
    "samples_from_table",
    "save_factors",
    "shape_from_table",
]

CALIBRATION_DIR = Path(__file__).resolve().parents[2] / "models" / "calibration"
"""Where the repository keeps measured tables and fitted factors."""


@dataclass(frozen=True, slots=True)
class StepSample:
    """One measured step: ``batch`` sequences each at ``tokens`` (decode context or prompt length)."""

    kind: Literal["decode", "prefill"]
    batch: int
    tokens: int
    step_s: float

    @property
    def step_tokens(self) -> int:
        """New tokens the step computes (``batch`` for decode, ``batch x tokens`` for prefill)."""
        return self.batch if self.kind == "decode" else self.batch * self.tokens


@dataclass(frozen=True, slots=True)
class ShapeSamples:
    """The measured steps of one model shape on one card."""

    arch: ModelArch
    samples: tuple[StepSample, ...]


def load_table(path: str | Path) -> dict[str, Any]:
    """Read a measurement table (JSON)."""
    with open(path, encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    for key in ("shape", "params", "decode", "prefill"):
        if key not in data:
            raise ValueError(f"{path}: measurement table lacks {key!r}")
    return data


def arch_from_table(table: Mapping[str, Any], name: str | None = None) -> ModelArch:
    """The model shape a table was measured with (bf16, untied embeddings as measure_gpu.py builds)."""
    shape = table["shape"]
    return ModelArch(
        name=name or f"{int(table['params']) / 1e9:.1f}B-h{shape['hidden']}-l{shape['layers']}",
        params=int(table["params"]),
        layers=int(shape["layers"]),
        hidden=int(shape["hidden"]),
        heads=int(shape["heads"]),
        kv_heads=int(shape["kv_heads"]),
        head_dim=int(shape["head_dim"]),
        intermediate=int(shape["inter"]),
        vocab=int(shape["vocab"]),
        dtype_bytes=2,
    )


def samples_from_table(table: Mapping[str, Any]) -> list[StepSample]:
    """Samples from a measurement table in the format of ``h100_llama8b_steps.json``."""
    out = [
        StepSample("decode", int(r["batch"]), int(r["ctx"]), float(r["step_ms"]) / 1e3)
        for r in table["decode"]
    ]
    out += [
        StepSample("prefill", int(r["batch"]), int(r["prompt"]), float(r["ms"]) / 1e3)
        for r in table["prefill"]
    ]
    return out


def shape_from_table(table: Mapping[str, Any], name: str | None = None) -> ShapeSamples:
    """A table's shape and its samples."""
    return ShapeSamples(arch_from_table(table, name), tuple(samples_from_table(table)))


def gpu_from_table(table: Mapping[str, Any]) -> GpuProfile:
    """The catalog entry of the table's ``device`` name; ValueError if it is not in the catalog."""
    profile = match_gpu_name(str(table.get("device", "")))
    if profile is None:
        raise ValueError(f"device {table.get('device')!r} is not in the GPU catalog")
    return profile


def save_factors(path: str | Path, gpu: GpuProfile, factors: PerfFactors) -> None:
    """Write fitted factors as JSON (with the card name)."""
    data = {"gpu": gpu.name, **factors.to_dict()}
    Path(path).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def load_factors(path: str | Path) -> tuple[str, PerfFactors]:
    """Read a factors file: (catalog GPU name, factors)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return str(data["gpu"]), PerfFactors.from_dict(data)


def predict_sample(model: PerfModel, sample: StepSample) -> float:
    """The model's time for a measured step (prefill with logits at every position, as measured)."""
    if sample.kind == "decode":
        return model.decode_step_time_uniform_s(sample.batch, sample.tokens)
    return model.prefill_time_s([sample.tokens] * sample.batch, logits_every_position=True)


# ---- the fit ------------------------------------------------------------------------------------


def _features(arch: ModelArch, gpu: GpuProfile, s: StepSample) -> tuple[float, ...]:
    """The model's terms at peak ceilings: (weights s, GEMM s, KV s, attention s, layers, prefill)."""
    bw, peak = gpu.memory_bw_bytes_per_s, gpu.bf16_dense_flops
    new = s.step_tokens
    ctx = s.batch * s.tokens if s.kind == "decode" else 0
    pairs = ctx if s.kind == "decode" else s.batch * chunk_attn_pairs(0, s.tokens)
    gemm_flops = 2.0 * arch.layer_params * new + 2.0 * arch.embedding_params * new
    return (
        arch.streamed_weight_bytes / bw,
        gemm_flops / peak,
        (ctx + new) * arch.kv_bytes_per_token / bw,
        arch.attn_flops_per_pair * pairs / peak,
        float(arch.layers),
        1.0 if s.kind == "prefill" else 0.0,
    )


def _smax(k: float, *xs: np.ndarray) -> np.ndarray:
    top = np.maximum.reduce(xs)
    safe = np.where(top > 0, top, 1.0)
    out: np.ndarray = top * sum((x / safe) ** k for x in xs) ** (1.0 / k)
    return out


def calibrate(
    gpu: GpuProfile,
    shapes: Sequence[ShapeSamples],
    *,
    sharpness: float = 3.0,
    source: str = "",
    max_iter: int = 200,
) -> PerfFactors:
    """Fit one set of factors for ``gpu`` to measured steps of one or more model shapes.

    Least squares on relative error, parameters in log space (so they stay positive), damped
    Gauss-Newton (Levenberg-Marquardt). Needs decode and prefill samples (short prompts pin the
    prefill floor). With a single layer count the constant part of the step overhead cannot be told
    from the per-layer part: it is held at 0 and the per-layer part carries the whole fixed cost.
    """
    rows = [(sh.arch, s) for sh in shapes for s in sh.samples]
    if len(rows) < 5:
        raise ValueError(f"calibration needs at least 5 samples, got {len(rows)}")
    if not {"decode", "prefill"} <= {s.kind for _, s in rows}:
        raise ValueError("calibration needs both decode and prefill samples")
    feats = np.array([_features(a, gpu, s) for a, s in rows], dtype=float)
    w, g, kv, att, layers, pre = feats.T
    y = np.array([s.step_s for _, s in rows], dtype=float)
    k = sharpness
    with_const = len({a.layers for a, _ in rows}) > 1

    def predict(theta: np.ndarray) -> np.ndarray:
        inv_mem, inv_comp, per_layer, floor_layer = np.exp(theta[:4])
        const = math.exp(theta[4]) if with_const else 0.0
        inner = _smax(k, inv_mem * w, inv_comp * g) + _smax(k, inv_mem * kv, inv_comp * att)
        body = np.where(pre > 0, _smax(k, floor_layer * layers, inner), inner)
        out: np.ndarray = const + per_layer * layers + body
        return out

    def residuals(theta: np.ndarray) -> np.ndarray:
        return np.asarray((predict(theta) - y) / y)

    start = [1.25, 1.6, 3e-5, 3e-4] + ([1e-4] if with_const else [])
    theta = np.log(np.array(start))
    lam, converged = 1e-3, False
    r = residuals(theta)
    cost = float(r @ r)
    for _ in range(max_iter):
        jac = np.empty((len(y), theta.size))
        for j in range(theta.size):
            step = np.zeros_like(theta)
            step[j] = 1e-6
            jac[:, j] = (residuals(theta + step) - r) / 1e-6
        jtj, jtr = jac.T @ jac, jac.T @ r
        improved = False
        while lam < 1e10:
            delta = np.linalg.solve(jtj + lam * np.diag(np.diag(jtj) + 1e-12), -jtr)
            cand = theta + delta
            r_c = residuals(cand)
            cost_c = float(r_c @ r_c)
            if cost_c < cost:
                theta, r, lam, improved = cand, r_c, max(lam / 10, 1e-9), True
                converged = cost - cost_c < 1e-14
                cost = cost_c
                break
            lam *= 10
        if not improved or converged:
            break
    vals = [float(v) for v in np.exp(theta)]
    if not all(math.isfinite(v) for v in vals):
        raise ValueError("calibration diverged; check the samples")
    return PerfFactors(
        mem_efficiency=1.0 / vals[0],
        compute_efficiency=1.0 / vals[1],
        step_overhead_s=vals[4] if with_const else 0.0,
        step_overhead_per_layer_s=vals[2],
        prefill_floor_per_layer_s=vals[3],
        sharpness=sharpness,
        source=source,
    )


# ---- held-out checks ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeaveOutResult:
    """A point of shape ``arch`` predicted by a model fitted without it."""

    arch: ModelArch
    sample: StepSample
    predicted_s: float

    @property
    def rel_error(self) -> float:
        return (self.predicted_s - self.sample.step_s) / self.sample.step_s


def leave_one_out(gpu: GpuProfile, shape: ShapeSamples) -> list[LeaveOutResult]:
    """For every sample of one shape, fit on all the others and predict it."""
    out = []
    for i, s in enumerate(shape.samples):
        rest = ShapeSamples(shape.arch, tuple(x for j, x in enumerate(shape.samples) if j != i))
        model = PerfModel(shape.arch, gpu, calibrate(gpu, [rest]))
        out.append(LeaveOutResult(shape.arch, s, predict_sample(model, s)))
    return out


def leave_one_shape_out(gpu: GpuProfile, shapes: Sequence[ShapeSamples]) -> list[LeaveOutResult]:
    """For every shape, fit on the other shapes only and predict each of its points."""
    if len(shapes) < 2:
        raise ValueError(f"leave-one-shape-out needs at least 2 shapes, got {len(shapes)}")
    out = []
    for i, held in enumerate(shapes):
        factors = calibrate(gpu, [sh for j, sh in enumerate(shapes) if j != i])
        model = PerfModel(held.arch, gpu, factors)
        out += [LeaveOutResult(held.arch, s, predict_sample(model, s)) for s in held.samples]
    return out


def fit_tables(tables: Sequence[Mapping[str, Any]]) -> tuple[GpuProfile, PerfFactors]:
    """Fit one set of factors to tables measured on the same card (read from the tables)."""
    if not tables:
        raise ValueError("fit_tables needs at least one table")
    gpus = {gpu_from_table(t).name for t in tables}
    if len(gpus) != 1:
        raise ValueError(f"tables come from different cards: {sorted(gpus)}")
    gpu = gpu_from_table(tables[0])
    source = ", ".join(f"{arch_from_table(t).name} on {t.get('device', '')}" for t in tables)
    return gpu, calibrate(gpu, [shape_from_table(t) for t in tables], source=source)
