"""Numeric precision that fits the machine: `auto` uses bf16 autocast only where the hardware runs it natively.

bf16 autocast on a CPU without native bf16 (AVX2 only: no AVX-512 BF16, no
AMX) is emulated and many times slower than fp32 (benchmarks/RESULTS.md), so
`auto` resolves to "bf16-mixed" on a CUDA GPU with bf16 (Ampere and newer)
and on a CPU with AVX-512 BF16 or AMX (x86) or the BF16 extension (Arm), and
to "32-true" everywhere else. A sweep resolves it once, so that both nets
of a comparison always share it; every result records what was requested
and what it resolved to.
"""

from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

AUTO = "auto"
PRECISIONS = (AUTO, "32-true", "bf16-mixed", "16-mixed")
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Hardware:
    """What `auto` is resolved against.

    Attributes:
        accelerator: "cuda" or "cpu".
        name: the device, for logs and result.json.
        native_bf16: whether bf16 matrix math runs natively (not emulated).
        evidence: why `native_bf16` is what it is (the CPU flags or the GPU's compute capability).
    """

    accelerator: str
    name: str
    native_bf16: bool
    evidence: str


def cpuinfo_value(*keys: str) -> str | None:
    """The first `/proc/cpuinfo` line's value for any of `keys` ("flags", "model name", ...); None where that file
    does not exist, "" where it has none of them."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    for line in cpuinfo.read_text(errors="ignore").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return ""


def bf16_flags(flags: set[str]) -> list[str]:
    """The flags among `flags` that say the CPU runs bf16 natively (x86 AVX-512 BF16 / AMX, Arm BF16), sorted."""
    return sorted(f for f in (*X86_BF16_FLAGS, "bf16") if f in flags)


def cpu_flags() -> set[str]:
    """The CPU's feature flags: /proc/cpuinfo on Linux, sysctl on macOS; empty when unknown."""
    listed = cpuinfo_value("flags", "Features")  # x86 | Arm
    if listed is not None:
        return set(listed.split())
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return set()
        return {"bf16"} if out == "1" else set()
    return set()


def cpu_hardware(flags: set[str] | None = None) -> Hardware:
    """The CPU as `auto` sees it (`flags`: for tests; read from the machine when None)."""
    flags = cpu_flags() if flags is None else flags
    found = bf16_flags(flags)
    name = platform.processor() or platform.machine() or "cpu"
    evidence = f"cpu flags {', '.join(found)}" if found else "no avx512_bf16 / amx_bf16 / bf16 cpu flag"
    return Hardware("cpu", name, bool(found), evidence)


def detect() -> Hardware:
    """The device a run would train on: the first CUDA GPU when there is one, else the CPU."""
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        native = major >= 8  # bf16 tensor cores from Ampere (sm_80) on
        return Hardware("cuda", torch.cuda.get_device_name(0), native, f"compute capability {major}.{minor}")
    return cpu_hardware()


def resolve(requested: str, hardware: Hardware) -> str:
    """The precision a run uses: `requested`, or for "auto" bf16-mixed where native, else 32-true.

    Raises:
        ValueError: `requested` is not one of PRECISIONS.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"invalid precision={requested!r} (allowed: {' | '.join(PRECISIONS)})")
    if requested != AUTO:
        return requested
    return "bf16-mixed" if hardware.native_bf16 else "32-true"
