"""Numeric precision that fits the machine: `auto` uses bf16 autocast only where it is native and faster.

bf16 autocast on a CPU without native bf16 (AVX2 only: no AVX-512 BF16, no
AMX) is emulated and many times slower than fp32 (benchmarks/RESULTS.md), so
`auto` resolves to "32-true" there and to "bf16-mixed" on a CUDA GPU with
bf16 (Ampere and newer). A CPU with native bf16 (AVX-512 BF16 or AMX on x86,
the BF16 extension on Arm) can still run a sweep slower in bf16 than in fp32
(measured on a 2-core Xeon with AMX: benchmarks/RESULTS.md), so there `auto`
is settled by timing: a few training steps and evaluation batches of the
runs' own nets in both precisions (`experiments.eta.time_precisions`), and
bf16 is chosen only when its estimate is at least `BF16_MARGIN` faster than
fp32's (below that, the timing's own noise on a busy 2-core machine could
flip the choice from one sweep to the next, and fp32 is the plainer
arithmetic). A sweep settles it once and keeps it in `runs/SWEEP/precision.json`,
so both nets of a comparison, and a resumed sweep, always share it; every
result records what was requested, what it resolved to and why.
"""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

AUTO = "auto"
PRECISIONS = (AUTO, "32-true", "bf16-mixed", "16-mixed")
TIMED = ("bf16-mixed", "32-true")  # what `auto` chooses between, by timing, on a CPU with native bf16
BF16_MARGIN = 0.10  # bf16 must time at least 10 % faster than fp32 to be chosen
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
SETTLED_FILE = "precision.json"  # runs/SWEEP/precision.json: a sweep's settled `auto`


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

    def describe(self) -> str:
        """One line for logs and result.json, e.g. `cpu: x86_64 (cpu flags amx_bf16, avx512_bf16)`."""
        return f"{self.accelerator}: {self.name} ({self.evidence})"


@dataclass(frozen=True)
class Choice:
    """A resolved precision and the one line that says on what hardware, and why, it was chosen.

    Attributes:
        precision: "32-true", "bf16-mixed" or "16-mixed".
        hardware: `Hardware.describe()`, plus the timing that settled `auto` where one did.
        estimated_s: the timed estimate of the runs in each precision (empty where nothing was timed).
    """

    precision: str
    hardware: str
    estimated_s: dict[str, float] = field(default_factory=dict, hash=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def settled_by_timing(requested: str, hardware: Hardware) -> bool:
    """Whether `requested` is `auto` on a CPU with native bf16, where only timing says which precision is faster."""
    return requested == AUTO and hardware.accelerator == "cpu" and hardware.native_bf16


def check_timeable(requested: str, hardware: Hardware, devices: int) -> None:
    """Refuse `auto` that timing would settle for a run of several processes, each of which could time it
    differently.

    Raises:
        ValueError: one line naming the precision and the devices.
    """
    if devices > 1 and settled_by_timing(requested, hardware):
        raise ValueError(f"invalid precision={requested!r} for devices={devices} on a CPU with native bf16 "
                         "(allowed: 32-true | bf16-mixed: each process would time auto on its own)")


def resolve(requested: str, hardware: Hardware, estimated_s: Mapping[str, float] | None = None) -> str:
    """The precision a run uses: `requested`, or for "auto" bf16-mixed where native (on a CPU with native bf16:
    only where `estimated_s` times it at least BF16_MARGIN faster than 32-true), else 32-true.

    Raises:
        ValueError: `requested` is not one of PRECISIONS, or `auto` needs timing and `estimated_s` lacks it.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"invalid precision={requested!r} (allowed: {' | '.join(PRECISIONS)})")
    if requested != AUTO:
        return requested
    if not settled_by_timing(requested, hardware):
        return "bf16-mixed" if hardware.native_bf16 else "32-true"
    if estimated_s is None or any(p not in estimated_s for p in TIMED):
        raise ValueError(f"invalid estimated_s={dict(estimated_s or {})!r} (allowed: seconds for each of "
                         f"{' and '.join(TIMED)}: `auto` on a CPU with native bf16 is settled by timing)")
    return "bf16-mixed" if estimated_s["bf16-mixed"] <= (1 - BF16_MARGIN) * estimated_s["32-true"] else "32-true"


def rule_choice(requested: str, hardware: Hardware) -> Choice:
    """`requested` resolved where no timing is needed (anything but `auto` on a CPU with native bf16)."""
    return Choice(resolve(requested, hardware), hardware.describe())


def timed_choice(hardware: Hardware, estimated_s: Mapping[str, float]) -> Choice:
    """`auto` on a CPU with native bf16, settled by `estimated_s` (seconds of the runs in each of TIMED)."""
    chosen = resolve(AUTO, hardware, estimated_s)
    timing = ", ".join(f"{p} ~{estimated_s[p] / 60:.1f} min" for p in TIMED)
    return Choice(chosen, f"{hardware.describe()}; auto timed here: {timing} for these runs, so {chosen}",
                  dict(estimated_s))


def load_settled(path: Path, hardware: Hardware) -> Choice | None:
    """A sweep's settled `auto` (`precision.json`) when it was settled on this hardware; None otherwise.

    Raises:
        ValueError: the file exists but is not a settled choice (one line naming it).
    """
    import json

    from common.untrusted import decode, read_bounded

    if not path.is_file():
        return None
    try:
        data = json.loads(decode(read_bounded(path)))
        choice = Choice(str(data["precision"]), str(data["hardware"]),
                        {str(k): float(v) for k, v in dict(data.get("estimated_s") or {}).items()})
    except (OSError, KeyError, TypeError, ValueError) as exc:  # InputError, JSONDecodeError: ValueErrors
        raise ValueError(f"invalid precision file={str(path)!r} ({exc}; delete it to time again)") from None
    if choice.precision not in TIMED:
        raise ValueError(f"invalid precision={choice.precision!r} in {str(path)!r} (allowed: {' | '.join(TIMED)})")
    return choice if choice.hardware.startswith(hardware.describe() + ";") else None
