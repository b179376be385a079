"""`auto` precision: bf16 autocast only where the hardware runs it natively."""

from __future__ import annotations

import pytest

from experiments import precision
from experiments.precision import Hardware, cpu_hardware, resolve


@pytest.mark.parametrize("flags, expected", [
    ({"avx2", "fma", "avx512f"}, "32-true"),  # AVX2 / AVX-512 without BF16: emulated, slow
    ({"avx2", "avx512f", "avx512_bf16"}, "bf16-mixed"),
    ({"avx2", "amx_tile", "amx_bf16"}, "bf16-mixed"),
    ({"fp", "asimd", "bf16"}, "bf16-mixed"),  # Arm with FEAT_BF16
    ({"fp", "asimd"}, "32-true"),
    (set(), "32-true"),  # unknown CPU: the safe choice
])
def test_auto_on_a_cpu_follows_its_bf16_flags(flags: set[str], expected: str) -> None:
    hardware = cpu_hardware(flags)
    assert resolve("auto", hardware) == expected
    assert hardware.native_bf16 == (expected == "bf16-mixed")
    assert ("no " in hardware.evidence) == (expected == "32-true")


@pytest.mark.parametrize("capability_major, expected", [(7, "32-true"), (8, "bf16-mixed"), (9, "bf16-mixed")])
def test_auto_on_a_gpu_follows_its_compute_capability(monkeypatch: pytest.MonkeyPatch, capability_major: int,
                                                      expected: str) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (capability_major, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    hardware = precision.detect()
    assert hardware.accelerator == "cuda"
    assert resolve("auto", hardware) == expected


def test_an_explicit_precision_is_kept_and_a_bad_one_is_named() -> None:
    avx2 = Hardware("cpu", "cpu", False, "no flag")
    assert resolve("bf16-mixed", avx2) == "bf16-mixed"  # asked for explicitly: the user's choice
    assert resolve("32-true", cpu_hardware({"avx512_bf16"})) == "32-true"
    with pytest.raises(ValueError, match=r"invalid precision='fp8' \(allowed: auto \| 32-true"):
        resolve("fp8", avx2)


def test_this_machine_is_detected_from_its_real_flags() -> None:
    hardware = cpu_hardware()
    assert hardware.native_bf16 == bool(precision.cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})
