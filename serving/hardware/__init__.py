"""Hardware awareness: the GPU catalog, a calibrated performance model, and per-pool engine plans."""

from serving.hardware.calibration import (
    CALIBRATION_DIR,
    LeaveOutResult,
    arch_from_table,
    fit_table,
    leave_one_out,
    load_factors,
    load_table,
    save_factors,
)
from serving.hardware.catalog import (
    CATALOG,
    GpuProfile,
    detect_local_gpu,
    get_gpu,
    match_gpu_name,
    with_prices,
)
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
from serving.hardware.plan import (
    EnginePlan,
    EngineSettings,
    PlanError,
    PoolSlo,
    plan_engine,
)

__all__ = [
    "CALIBRATION_DIR",
    "CATALOG",
    "H100_FACTORS",
    "EnginePlan",
    "EngineSettings",
    "GpuProfile",
    "LeaveOutResult",
    "ModelArch",
    "PerfFactors",
    "PerfModel",
    "PlanError",
    "PoolSlo",
    "StepSample",
    "arch_from_table",
    "calibrate",
    "detect_local_gpu",
    "factors_for",
    "fit_table",
    "get_gpu",
    "leave_one_out",
    "load_factors",
    "load_table",
    "match_gpu_name",
    "plan_engine",
    "samples_from_table",
    "save_factors",
    "with_prices",
]
