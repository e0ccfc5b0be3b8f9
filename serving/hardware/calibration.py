"""Calibration files: read a measured step table, fit factors, check them on held-out points.

A table is the JSON that ``models/calibration/measure_gpu.py`` writes (the format of
``h100_llama8b_steps.json``): ``device``, ``shape``, ``params``, ``decode`` rows
(``batch``, ``ctx``, ``step_ms``) and ``prefill`` rows (``batch``, ``prompt``, ``ms``).
A factors file is :meth:`PerfFactors.to_dict` as JSON plus the card name.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.hardware.catalog import GpuProfile, match_gpu_name
from serving.hardware.perfmodel import (
    ModelArch,
    PerfFactors,
    PerfModel,
    StepSample,
    calibrate,
    chunk_attn_pairs,
    samples_from_table,
)

__all__ = [
    "CALIBRATION_DIR",
    "LeaveOutResult",
    "arch_from_table",
    "fit_table",
    "gpu_from_table",
    "leave_one_out",
    "load_factors",
    "load_table",
    "predict_sample",
    "save_factors",
]

CALIBRATION_DIR = Path(__file__).resolve().parents[2] / "models" / "calibration"
"""Where the repository keeps measured tables and fitted factors."""


def load_table(path: str | Path) -> dict[str, Any]:
    """Read a measurement table (JSON)."""
    with open(path, encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    for key in ("shape", "params", "decode", "prefill"):
        if key not in data:
            raise ValueError(f"{path}: measurement table lacks {key!r}")
    return data


def arch_from_table(table: Mapping[str, Any], name: str = "measured") -> ModelArch:
    """The model shape a table was measured with (bf16)."""
    shape = table["shape"]
    return ModelArch(
        name=name,
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
    """The model's time for a measured step."""
    if sample.kind == "decode":
        return model.decode_step_time_uniform_s(sample.batch, sample.tokens)
    return model.step_time_s(
        prefill_tokens=sample.batch * sample.tokens,
        prefill_attn_pairs=sample.batch * chunk_attn_pairs(0, sample.tokens),
    )


@dataclass(frozen=True, slots=True)
class LeaveOutResult:
    """A point predicted by a model fitted without it."""

    sample: StepSample
    predicted_s: float

    @property
    def rel_error(self) -> float:
        return (self.predicted_s - self.sample.step_s) / self.sample.step_s


def leave_one_out(arch: ModelArch, gpu: GpuProfile, samples: Sequence[StepSample]) -> list[LeaveOutResult]:
    """For every sample, fit on all the others and predict it."""
    out = []
    for i, s in enumerate(samples):
        rest = [x for j, x in enumerate(samples) if j != i]
        factors = calibrate(arch, gpu, rest)
        out.append(LeaveOutResult(s, predict_sample(PerfModel(arch, gpu, factors), s)))
    return out


def fit_table(table: Mapping[str, Any]) -> tuple[ModelArch, GpuProfile, PerfFactors]:
    """Fit factors to a whole table (the model shape and card read from the table)."""
    arch, gpu = arch_from_table(table), gpu_from_table(table)
    return arch, gpu, calibrate(arch, gpu, samples_from_table(table), source=str(table.get("device", "")))
