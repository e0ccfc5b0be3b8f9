"""The GPU catalog: datasheet ceilings, Ray placement names and relative prices of the chips a fleet mixes.

Figures are dense (no 2:4 sparsity) bf16 tensor-core FLOP/s, memory capacity and peak memory bandwidth
from each vendor datasheet, SXM variant where a card comes in several. Memory capacity is the
datasheet figure in decimal bytes, which is a little below what ``nvidia-smi`` reports usable; the
performance model is therefore slightly conservative about KV capacity.

Ray names: ``ray_accelerator_type`` is the value Ray's GPU auto-detection puts in the node resource
``accelerator_type:<name>`` (constants in ``ray.util.accelerators`` of Ray 2.60: H20, H100, H200,
L40S, A100-80G); for cards Ray does not know,
``ray_custom_resource`` names a custom resource the operator starts the node with
(``ray start --resources='{"accelerator_type:L20": 1}'``).

Prices are relative per GPU-hour (H100 SXM = 1.0), rough 2025 cloud list-price ratios; operators
override them with :func:`with_prices`.
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "CATALOG",
    "GpuProfile",
    "detect_local_gpu",
    "get_gpu",
    "match_gpu_name",
    "with_prices",
]

_T = 1e12
_GB = 1e9


@dataclass(frozen=True, slots=True)
class GpuProfile:
    """One accelerator type as the performance model and the router see it."""

    name: str
    """Catalog key, e.g. ``"H100"``; what pool configs name."""
    bf16_dense_flops: float
    """Peak dense bf16 tensor FLOP/s (datasheet, without sparsity)."""
    memory_bytes: int
    """Device memory capacity in bytes (datasheet)."""
    memory_bw_bytes_per_s: float
    """Peak memory bandwidth in bytes/s (datasheet)."""
    ray_accelerator_type: str | None
    """Ray's built-in accelerator type (``ray.util.accelerators``), or None when Ray lacks one."""
    ray_custom_resource: str | None
    """Custom node resource to pin a replica to this card when Ray has no built-in type."""
    price_per_hour_relative: float
    """Relative price per GPU-hour (H100 SXM = 1.0)."""
    nvidia_smi_names: tuple[str, ...] = ()
    """Substrings of ``nvidia-smi --query-gpu=name`` that identify this card (upper case)."""

    @property
    def ray_resource(self) -> str | None:
        """The resource name a replica asks for: ``accelerator_type:<X>`` (built-in or custom)."""
        if self.ray_accelerator_type is not None:
            return f"accelerator_type:{self.ray_accelerator_type}"
        return self.ray_custom_resource

    @property
    def ridge_flops_per_byte(self) -> float:
        """Arithmetic intensity where the roofline turns from memory- to compute-bound."""
        return self.bf16_dense_flops / self.memory_bw_bytes_per_s


CATALOG: dict[str, GpuProfile] = {
    p.name: p
    for p in (
        # NVIDIA H20 (Hopper, China SKU). Source: NVIDIA H20 product brief (2024) as reproduced by
        # vendors, e.g. https://www.nvidia.cn/data-center/h20/ : FP16/BF16 148 TFLOPS dense,
        # 96 GB HBM3, 4.0 TB/s.
        GpuProfile("H20", 148 * _T, int(96 * _GB), 4.0e12, "H20", None, 0.45, ("H20",)),
        # NVIDIA H100 SXM5 80GB. Source: NVIDIA H100 Tensor Core GPU datasheet (2023),
        # https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet :
        # BF16 1,979 TFLOPS with sparsity -> 989 dense, 80 GB HBM3, 3.35 TB/s.
        GpuProfile("H100", 989 * _T, int(80 * _GB), 3.35e12, "H100", None, 1.0, ("H100",)),
        # NVIDIA H200 SXM 141GB. Source: NVIDIA H200 datasheet (2024),
        # https://www.nvidia.com/en-us/data-center/h200/ : BF16 1,979 TFLOPS sparse -> 989 dense,
        # 141 GB HBM3e, 4.8 TB/s.
        GpuProfile("H200", 989 * _T, int(141 * _GB), 4.8e12, "H200", None, 1.35, ("H200",)),
        # NVIDIA L20 48GB (Ada, China SKU). Source: NVIDIA L20 datasheet (2023): FP16/BF16 tensor
        # 119.5 TFLOPS dense (239 sparse), 48 GB GDDR6, 864 GB/s.
        GpuProfile("L20", 119.5 * _T, int(48 * _GB), 864 * _GB, None, "accelerator_type:L20", 0.3, ("L20",)),
        # NVIDIA L40S 48GB (Ada). Source: NVIDIA L40S datasheet (2023),
        # https://www.nvidia.com/en-us/data-center/l40s/ : BF16 733 TFLOPS sparse -> 362.05 dense,
        # 48 GB GDDR6, 864 GB/s.
        GpuProfile("L40S", 362.05 * _T, int(48 * _GB), 864 * _GB, "L40S", None, 0.4, ("L40S",)),
        # NVIDIA A10 24GB (Ampere). Source: NVIDIA A10 datasheet (2021),
        # https://www.nvidia.com/en-us/data-center/products/a10-gpu/ : BF16 250 TFLOPS sparse ->
        # 125 dense, 24 GB GDDR6, 600 GB/s. (Ray knows the AWS variant "A10G", not the A10.)
        GpuProfile("A10", 125 * _T, int(24 * _GB), 600 * _GB, None, "accelerator_type:A10", 0.2, ("A10",)),
        # NVIDIA A100 80GB SXM. Source: NVIDIA A100 datasheet (2021),
        # https://www.nvidia.com/en-us/data-center/a100/ : BF16 312 TFLOPS dense, 80 GB HBM2e,
        # 2,039 GB/s (SXM; the PCIe card has 1,935 GB/s). Ray auto-labels A100 nodes only with
        # "A100"; "A100-80G" (ray.util.accelerators.NVIDIA_A100_80G) must be added to the node by hand.
        GpuProfile("A100-80GB", 312 * _T, int(80 * _GB), 2039 * _GB, "A100-80G", None, 0.6, ("A100",)),
        # CPU: not a datasheet part; a nominal two-socket x86 server (AMX/AVX-512 bf16 ~2 TFLOP/s
        # dense in practice, 2 x 8 channels DDR5-4800 = 614 GB/s peak, 256 GB). Used for planning
        # the CPU build of vLLM and for simulated CPU pools; expect the real figure to vary 5x.
        # On a cluster, CPU pools are pinned to the nodes that advertise `accelerator_type:CPU`.
        GpuProfile("CPU", 2 * _T, int(256 * _GB), 614 * _GB, None, "accelerator_type:CPU", 0.05, ()),
    )
}


def get_gpu(name: str) -> GpuProfile:
    """Look up a catalog entry by name (case-insensitive); KeyError lists the known names."""
    for key, profile in CATALOG.items():
        if key.lower() == name.lower():
            return profile
    raise KeyError(f"unknown GPU type {name!r}; known: {', '.join(CATALOG)}")


def with_prices(overrides: Mapping[str, float]) -> dict[str, GpuProfile]:
    """A copy of the catalog with ``price_per_hour_relative`` replaced for the named cards.

    ``overrides`` maps catalog names (case-insensitive) to prices in any consistent unit (relative,
    dollars per hour...). Unknown names and non-positive prices raise ValueError.
    """
    out = dict(CATALOG)
    for name, price in overrides.items():
        try:
            profile = get_gpu(name)
        except KeyError as e:
            raise ValueError(str(e)) from e
        if not price > 0:
            raise ValueError(f"price for {profile.name} must be > 0, got {price}")
        out[profile.name] = dataclasses.replace(profile, price_per_hour_relative=float(price))
    return out


def match_gpu_name(device_name: str) -> GpuProfile | None:
    """Map a device name as NVML / ``nvidia-smi`` prints it to a catalog entry, or None."""
    upper = device_name.upper()
    # Longest marker first so "H200" is not taken for "H20" and "A100" not for "A10".
    candidates = sorted(
        ((marker, p) for p in CATALOG.values() for marker in p.nvidia_smi_names),
        key=lambda mp: -len(mp[0]),
    )
    for marker, profile in candidates:
        idx = upper.find(marker)
        while idx >= 0:
            end = idx + len(marker)
            # The marker must not run on into more digits ("H20" inside "H200").
            if end >= len(upper) or not upper[end].isdigit():
                return profile
            idx = upper.find(marker, idx + 1)
    return None


def _query_device_names() -> list[str]:
    """Names of the local NVIDIA devices, via NVML if importable, else ``nvidia-smi``; [] if none."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        try:
            names = []
            for i in range(pynvml.nvmlDeviceGetCount()):
                raw = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                names.append(raw.decode() if isinstance(raw, bytes) else str(raw))
            return names
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no pynvml, no driver, or no device: fall back to nvidia-smi
        pass
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def detect_local_gpu() -> GpuProfile | None:
    """The catalog entry of this machine's first NVIDIA GPU, or None (no GPU, or not in the catalog)."""
    for name in _query_device_names():
        profile = match_gpu_name(name)
        if profile is not None:
            return profile
    return None
