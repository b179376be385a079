"""`auto` precision: bf16 autocast only where the hardware runs it natively, and on a CPU only where it times faster."""

from __future__ import annotations

import pytest

from pathlib import Path

from experiments import precision
from experiments.precision import Hardware, cpu_hardware, resolve

FASTER_BF16 = {"bf16-mixed": 60.0, "32-true": 90.0}
FASTER_FP32 = {"bf16-mixed": 90.0, "32-true": 60.0}


@pytest.mark.parametrize("flags, native", [
    ({"avx2", "fma", "avx512f"}, False),  # AVX2 / AVX-512 without BF16: emulated, slow
    ({"avx2", "avx512f", "avx512_bf16"}, True),
    ({"avx2", "amx_tile", "amx_bf16"}, True),
    ({"fp", "asimd", "bf16"}, True),  # Arm with FEAT_BF16
    ({"fp", "asimd"}, False),
    (set(), False),  # unknown CPU: the safe choice
])
def test_auto_on_a_cpu_is_fp32_without_native_bf16_and_timed_with_it(flags: set[str], native: bool) -> None:
    hardware = cpu_hardware(flags)
    assert hardware.native_bf16 == native and ("no " in hardware.evidence) == (not native)
    assert precision.settled_by_timing("auto", hardware) == native
    if not native:  # emulated bf16 is never the faster: no timing needed
        assert resolve("auto", hardware) == "32-true"
        return
    assert resolve("auto", hardware, FASTER_BF16) == "bf16-mixed"
    assert resolve("auto", hardware, FASTER_FP32) == "32-true"
    assert resolve("auto", hardware, {"bf16-mixed": 60.0, "32-true": 60.0}) == "32-true"  # a tie: fp32
    # bf16 must be at least 10 % faster: within the timing's noise the plainer arithmetic stays
    assert resolve("auto", hardware, {"bf16-mixed": 57.0, "32-true": 60.0}) == "32-true"
    assert resolve("auto", hardware, {"bf16-mixed": 54.0, "32-true": 60.0}) == "bf16-mixed"
    with pytest.raises(ValueError, match=r"^invalid estimated_s=\{\} \(allowed: seconds for each of bf16-mixed"):
        resolve("auto", hardware)


def test_a_timed_choice_says_what_was_timed_and_why() -> None:
    hardware = cpu_hardware({"amx_bf16"})
    choice = precision.timed_choice(hardware, {"bf16-mixed": 2940.0, "32-true": 1980.0})
    assert choice.precision == "32-true"
    assert choice.hardware == (f"{hardware.describe()}; auto timed here: bf16-mixed ~49.0 min, 32-true ~33.0 min "
                               "for these runs, so 32-true")


def test_a_settled_choice_is_reused_only_on_the_hardware_that_settled_it(tmp_path: Path) -> None:
    from common.files import write_json

    amx, other = cpu_hardware({"amx_bf16"}), Hardware("cpu", "another cpu", True, "cpu flags avx512_bf16")
    path = tmp_path / precision.SETTLED_FILE
    assert precision.load_settled(path, amx) is None  # nothing settled yet
    choice = precision.timed_choice(amx, FASTER_BF16)
    write_json(path, choice.to_dict())
    assert precision.load_settled(path, amx) == choice
    assert precision.load_settled(path, other) is None  # another machine times again
    for broken in ("[1, 2]", "{", '{"precision": "32-true"}', '{"precision": "auto", "hardware": "x"}'):
        path.write_text(broken)
        with pytest.raises(ValueError, match=r"^invalid precision"):
            precision.load_settled(path, amx)


def test_timing_is_refused_for_a_run_of_several_processes() -> None:
    amx = cpu_hardware({"amx_bf16"})
    precision.check_timeable("auto", amx, 1)
    precision.check_timeable("32-true", amx, 4)
    precision.check_timeable("auto", cpu_hardware({"avx2"}), 4)  # no timing: fp32 by rule
    with pytest.raises(ValueError, match=r"^invalid precision='auto' for devices=2 on a CPU with native bf16"):
        precision.check_timeable("auto", amx, 2)


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
