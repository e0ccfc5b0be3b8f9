"""GPU catalog: datasheet ratios, Ray names, price overrides, device-name matching."""

from __future__ import annotations

import pytest

from serving.hardware import catalog
from serving.hardware.catalog import CATALOG, detect_local_gpu, get_gpu, match_gpu_name, with_prices


def test_catalog_has_every_card_with_sane_figures() -> None:
    assert set(CATALOG) == {"H20", "H100", "H200", "L20", "L40S", "A10", "A100-80GB", "CPU"}
    for p in CATALOG.values():
        assert p.bf16_dense_flops > 1e12
        assert p.memory_bytes >= 24e9
        assert p.memory_bw_bytes_per_s >= 500e9
        assert p.price_per_hour_relative > 0


def test_h20_is_bandwidth_rich_and_compute_poor_against_h100() -> None:
    h20, h100 = get_gpu("h20"), get_gpu("H100")
    assert h20.memory_bw_bytes_per_s > h100.memory_bw_bytes_per_s
    assert h20.bf16_dense_flops < h100.bf16_dense_flops / 6
    assert h20.ridge_flops_per_byte < 40 < h100.ridge_flops_per_byte


def test_ray_names_match_ray_constants() -> None:
    accel = pytest.importorskip("ray.util.accelerators.accelerators")
    assert get_gpu("H20").ray_accelerator_type == accel.NVIDIA_H20
    assert get_gpu("H100").ray_accelerator_type == accel.NVIDIA_H100
    assert get_gpu("H200").ray_accelerator_type == accel.NVIDIA_H200
    assert get_gpu("L40S").ray_accelerator_type == accel.NVIDIA_L40S
    assert get_gpu("A100-80GB").ray_accelerator_type == accel.NVIDIA_A100_80G
    for name in ("L20", "A10"):
        p = get_gpu(name)
        assert p.ray_accelerator_type is None
        assert p.ray_resource == f"accelerator_type:{name}"
    assert get_gpu("H100").ray_resource == "accelerator_type:H100"


def test_price_overrides_copy_and_validate() -> None:
    prices = with_prices({"h100": 2.5, "A10": 0.4})
    assert prices["H100"].price_per_hour_relative == 2.5
    assert prices["A10"].price_per_hour_relative == 0.4
    assert CATALOG["H100"].price_per_hour_relative == 1.0  # the shared catalog is untouched
    with pytest.raises(ValueError, match="unknown GPU type"):
        with_prices({"B300": 3.0})
    with pytest.raises(ValueError, match="> 0"):
        with_prices({"H20": 0})


@pytest.mark.parametrize(
    ("smi_name", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA H20", "H20"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA L20", "L20"),
        ("NVIDIA L40S", "L40S"),
        ("Tesla T4", None),
    ],
)
def test_match_gpu_name(smi_name: str, expected: str | None) -> None:
    got = match_gpu_name(smi_name)
    assert (got.name if got else None) == expected


def test_unknown_name_lists_known() -> None:
    with pytest.raises(KeyError, match="H100"):
        get_gpu("TPU")


def test_detect_local_gpu_on_this_machine_and_with_faked_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # This machine has no NVIDIA GPU: the real probe finds nothing.
    if not catalog._query_device_names():
        assert detect_local_gpu() is None
    # Fake only the process boundary (NVML / nvidia-smi output).
    monkeypatch.setattr(catalog, "_query_device_names", lambda: ["NVIDIA H20"])
    detected = detect_local_gpu()
    assert detected is not None and detected.name == "H20"
