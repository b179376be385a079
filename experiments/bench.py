"""`make bench`: how fast the suite's nets train and infer, and where the time goes.

    python -m experiments.bench [--profile cpu|gpu] [--quick] [--models M ...] [--only COMPARISON ...]
        [--precision auto|32-true|bf16-mixed] [--batch N] [--dataset NAME] [--data-dir DIR] [--peak-tflops X]
        [--channels-last auto|on|off] [--attention auto|flash|efficient|math] [--compile] [--gpu-resident]
        [--clock wall|process] [--img-size N] [--in-chans N] [--threads N] [--out-dir DIR]
    python -m experiments.bench --profile gpu --train-run 300 --gpu-resident --models vit_s16 resnet50

For each model of the profile, at the profile's image size, channels and
batch, in the precision its recipe resolves to on this machine
(`experiments.precision`), the comparisons (`--only` picks some):

- main: a plain training step (forward, loss, backward, AdamW) and an
  inference forward: images/s, step time, peak memory, FLOPs per image, MFU
  against `--peak-tflops`, beside the published anchors (timm's RTX 3090 figures).
- lightning: the suite's `ImageClassifier` in a `Trainer` configured as
  `experiments.train` configures it, against the plain loop, and with each
  per-step piece removed in turn (progress bar, LR monitor, gradient
  clipping, the train-accuracy metric, the loss log, the logger, the run's
  callbacks, deterministic kernels): what each costs.
- timm: our ViT against timm's `VisionTransformer` of the same configuration and the same weights.
- data: the real `ImageDataModule` train loader feeding the plain loop against
  pre-built tensors (and the loader alone; with `--gpu-resident`, the dataset
  held on the device and augmented there per batch, `ResidentBatches`).
- switches: the fast-path switches flipped one at a time: the memory layout
  (CNNs), fused attention (ViTs), bf16 (where native).
- compile (only with `--compile` or `--only compile`): `torch.compile` against
  eager, with the compilation time and the steps it takes to pay it back,
  against the run's step budget.

Timing: after warm-up steps, `windows` windows of `window_steps` steps each,
the device synchronised only at window ends; the step time is the median
over windows (the mean is recorded too). A comparison runs its arms in turn,
round after round, so that a change of load on the machine reaches every arm
alike. Peak memory: CUDA's maximum allocated per measurement; on the CPU the
process's maximum resident set so far (monotonic, imports included).

The rows go to `<out-dir>/<device>.csv` (written atomically after each
comparison, so an interrupted run keeps what it measured) and are printed
as tables. Measured numbers belong in benchmarks/RESULTS.md, with the command.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import logging
import math
import re
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.files import atomic_write
from experiments.precision import bf16_flags, cpu_flags, cpuinfo_value
from experiments.spec import RunSpec
from lightning_modules.catalog import DATASETS, MODELS
from lightning_modules.resident import ResidentBatches, resident_support

COMPARISONS = ("main", "lightning", "timm", "data", "switches", "compile")
DEFAULT_COMPARISONS = COMPARISONS[:-1]  # compilation takes tens of seconds a model: asked for with --compile
BENCH_PRECISIONS = ("auto", "32-true", "bf16-mixed")
ATTENTION_BACKENDS = ("auto", "flash", "efficient", "math")
DEFAULT_OUT_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "results"

# timm's published training throughput, RTX 3090, AMP (timm benchmark CSV; /work/shared/REFERENCES.md)
ANCHORS_3090 = {"resnet50": "timm RTX 3090 AMP: 826 img/s (1,218 channels-last)",
                "vit_s16": "timm RTX 3090 AMP: 1,053 img/s", "vit_b16": "timm RTX 3090 AMP: 391 img/s"}
# Issue 12's goals on an H100, bf16 training: (kind, threshold, text)
H100_GOALS = {"vit_b16": ("mfu", 0.40, "H100 goal: MFU >= 40 %"),
              "resnet50": ("images_per_s", 3 * 826.0, "H100 goal: >= 3 x 826 = 2,478 img/s")}
# Dense bf16 matrix-product peak measured on the device (REFERENCES.md), for MFU when --peak-tflops is not given
MEASURED_BF16_PEAK_TFLOPS = {"H100": 800.0}
RATIO_GOALS = {"lightning": 0.95, "timm": 0.95, "data": 0.95}  # arm / reference arm, images per second

CSV_COLUMNS = ("timestamp", "device", "device_kind", "torch", "threads", "profile", "comparison", "arm", "model",
               "mode", "img_size", "in_chans", "batch", "precision", "layout", "attention", "compiled", "step_ms",
               "step_ms_mean", "images_per_s", "peak_mem_gib", "peak_mem_kind", "gflops_per_image", "tflops_per_s",
               "mfu", "ratio", "goal", "meets_goal", "note")


# ------------------------------------------------------------------ settings
CLOCKS = {"wall": time.perf_counter, "process": time.process_time}


@dataclass(frozen=True)
class Timing:
    """How a measurement is timed: `warmup` steps, then `windows` windows of `window_steps` steps; a
    comparison repeats its arms `rounds` times, in turn. `clock`: "wall" (what a run waits), or "process"
    (this process's CPU time: on a CPU shared with other work, far less disturbed by it; blind to waiting)."""

    warmup: int
    windows: int
    window_steps: int
    rounds: int = 1
    clock: str = "wall"

    @property
    def total_steps(self) -> int:
        return self.warmup + self.windows * self.window_steps

    def now(self) -> float:
        return CLOCKS[self.clock]()


@dataclass(frozen=True)
class BenchProfile:
    """What `--profile` measures.

    Attributes:
        spec_profile: the `experiments.spec` profile the recipe (batch, precision, dataset, augmentation) comes from.
        models: the nets of the main table, and of every comparison that has no list of its own.
        img_size / in_chans: the nets' input.
        main / compare: timing of the main table and of the comparisons.
        lightning_models / data_models: the nets compared there (None: `models`); the timm comparison takes the ViTs.
    """

    spec_profile: str
    models: tuple[str, ...]
    img_size: int
    in_chans: int
    main: Timing
    compare: Timing
    lightning_models: tuple[str, ...] | None = None
    data_models: tuple[str, ...] | None = None


PROFILES = {
    "cpu": BenchProfile("cpu", ("resnet50", "vit_tiny_p4"), 28, 1, main=Timing(3, 5, 4), compare=Timing(2, 3, 4, 2)),
    # budgeted to finish well inside benchmarks/gpu_check.sh's share (see there)
    "gpu": BenchProfile("gpu", ("vit_s16", "vit_b16", "resnet50"), 224, 3, main=Timing(5, 5, 10),
                        compare=Timing(3, 3, 10), lightning_models=("vit_s16", "resnet50"),
                        data_models=("vit_s16", "resnet50")),
}
QUICK = Timing(1, 2, 1)  # --quick: checks that everything runs, measures nothing
QUICK_BATCH = 8


@dataclass(frozen=True)
class Options:
    """The command line, resolved."""

    profile: str
    models: tuple[str, ...]
    comparisons: tuple[str, ...]
    quick: bool = False
    batch: int | None = None
    precision: str = "auto"
    dataset: str | None = None
    data_dir: str | None = None
    peak_tflops: float | None = None
    channels_last: str = "auto"
    attention: str = "auto"
    gpu_resident: bool = False
    img_size: int | None = None
    in_chans: int | None = None
    clock: str = "wall"
    seed: int = 0
    out_dir: Path = DEFAULT_OUT_DIR

    @property
    def bench(self) -> BenchProfile:
        return PROFILES[self.profile]

    def timing(self, kind: str) -> Timing:
        """The timing of the main table ("main") or of a comparison ("compare"), on the chosen clock."""
        return replace(QUICK if self.quick else getattr(self.bench, kind), clock=self.clock)


# ------------------------------------------------------------------ the device
@dataclass(frozen=True)
class DeviceFacts:
    """Where the benchmark runs: `name` for people, `slug` for the CSV's file name, `kind` for the reader of
    a CPU figure (its bf16 support) or a GPU's compute capability."""

    device: torch.device
    name: str
    slug: str
    kind: str


def slugify(text: str) -> str:
    """'Intel(R) Xeon(R) Processor' -> 'intel-xeon-processor' (lower case, letters and digits joined by '-')."""
    text = re.sub(r"\((r|tm)\)", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def cpu_model_name() -> str:
    """The CPU's model name from /proc/cpuinfo, else the platform's processor string."""
    import platform

    return cpuinfo_value("model name") or platform.processor() or platform.machine() or "cpu"


def cpu_kind(flags: set[str]) -> str:
    """The bf16 support a CPU figure depends on: its bf16 flags, or that it has none (bf16 emulated)."""
    found = bf16_flags(flags)
    return " ".join(found) if found else "no bf16 flag (AVX2-only class: bf16 emulated)"


def device_facts() -> DeviceFacts:
    """The first CUDA GPU when there is one, else the CPU."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        major, minor = torch.cuda.get_device_capability(0)
        return DeviceFacts(torch.device("cuda", 0), name, "cuda-" + slugify(name), f"compute capability {major}.{minor}")
    name = cpu_model_name()
    kind = cpu_kind(cpu_flags())
    suffix = "bf16-" + "-".join(slugify(k) for k in kind.split()) if "emulated" not in kind else "no-bf16"
    return DeviceFacts(torch.device("cpu"), name, f"cpu-{slugify(name)}-{suffix}", kind)


def peak_tflops_for(facts: DeviceFacts, precision: str, given: float | None) -> float | None:
    """The peak MFU is measured against: `given`, else the measured bf16 peak of a known GPU in bf16, else None."""
    if given:
        return given
    if facts.device.type == "cuda" and precision == "bf16-mixed":
        return next((peak for key, peak in MEASURED_BF16_PEAK_TFLOPS.items() if key in facts.name), None)
    return None


# ------------------------------------------------------------------ arithmetic
def images_per_s(batch: int, step_s: float) -> float:
    """Images per second of steps of `batch` images taking `step_s` seconds each."""
    return batch / step_s


def achieved_tflops(flops_per_image: float, images_per_second: float, training: bool) -> float:
    """TFLOP/s done: forward FLOPs per image x images/s, x3 when training (the backward pass costs about twice
    the forward)."""
    return (3 if training else 1) * flops_per_image * images_per_second / 1e12


def mfu(flops_per_image: float, images_per_second: float, training: bool, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved TFLOP/s over the device's peak (None without a peak)."""
    if not peak_tflops:
        return None
    return achieved_tflops(flops_per_image, images_per_second, training) / peak_tflops


def break_even_steps(overhead_s: float, eager_step_s: float, fast_step_s: float) -> float:
    """Steps after which a one-off cost `overhead_s` (compilation) is paid back by a faster step (inf: never)."""
    gain = eager_step_s - fast_step_s
    return overhead_s / gain if gain > 0 else math.inf


# ------------------------------------------------------------------ timing
@dataclass
class Measured:
    """One arm's timing: seconds per step in each window, and the peak memory it used."""

    window_step_s: list[float] = field(default_factory=list)
    peak_mem_bytes: float = 0.0
    warmup_s: float = 0.0

    @property
    def step_s(self) -> float:
        """The median over windows."""
        return statistics.median(self.window_step_s)

    @property
    def mean_step_s(self) -> float:
        return statistics.fmean(self.window_step_s)

    def merge(self, other: Measured) -> None:
        """Add another round of the same arm."""
        self.window_step_s += other.window_step_s
        self.peak_mem_bytes = max(self.peak_mem_bytes, other.peak_mem_bytes)
        self.warmup_s = max(self.warmup_s, other.warmup_s)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def process_max_rss_bytes() -> float:
    """The process's maximum resident set so far (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(rss if sys.platform == "darwin" else rss * 1024)


@contextlib.contextmanager
def peak_memory(device: torch.device, measured: Measured) -> Iterator[None]:
    """Record into `measured` the peak memory of the block: CUDA's max allocated, or the process's max RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
    measured.peak_mem_bytes = float(torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                                    else process_max_rss_bytes())


def time_windows(step: Callable[[], Any], timing: Timing, device: torch.device) -> Measured:
    """Run `step` `timing.warmup` times, then `timing.windows` windows of `timing.window_steps` steps;
    the device is synchronised only at window ends."""
    measured = Measured()
    with peak_memory(device, measured):
        synchronize(device)
        start = timing.now()
        for _ in range(timing.warmup):
            step()
        synchronize(device)
        measured.warmup_s = timing.now() - start
        for _ in range(timing.windows):
            start = timing.now()
            for _ in range(timing.window_steps):
                step()
            synchronize(device)
            measured.window_step_s.append((timing.now() - start) / timing.window_steps)
    return measured


def interleave(arms: dict[str, Callable[[], Measured]], rounds: int) -> dict[str, Measured]:
    """Run every arm once per round, in turn; each arm's rounds are merged."""
    results: dict[str, Measured] = {}
    for _ in range(rounds):
        for name, arm in arms.items():
            results.setdefault(name, Measured()).merge(arm())
    return results


# ------------------------------------------------------------------ nets and steps
@dataclass(frozen=True)
class Setup:
    """One model's measurement setting: the run spec its recipe comes from, and how it is run here."""

    spec: RunSpec
    batch: int
    precision: str
    channels_last: bool
    attention: str
    device: torch.device
    fused_adamw: bool = False  # the switch the suite does not use yet: AdamW's fused kernel

    @property
    def num_classes(self) -> int:
        return DATASETS[self.spec.dataset].num_classes or 10

    @property
    def layout(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def bench_spec(options: Options, model: str) -> RunSpec:
    """The run spec of `model` under the profile's recipe, at the profile's input (and `--dataset`)."""
    bench = options.bench
    overrides: dict[str, Any] = dict(model=model, img_size=options.img_size or bench.img_size,
                                     in_chans=options.in_chans or bench.in_chans)
    if options.dataset:
        overrides["dataset"] = options.dataset
    if options.data_dir:
        overrides["data_dir"] = options.data_dir
    return RunSpec.create(bench.spec_profile, **overrides)


def make_setup(options: Options, model: str, device: torch.device) -> Setup:
    """Batch (the recipe's; --quick: a small one), precision (the recipe's resolved here, or --precision),
    memory layout (the suite's rule: CNNs channels-last; or --channels-last) and attention backend."""
    from experiments.train import precision_choice
    from lightning_modules.classifier import prefers_channels_last
    from lightning_modules.models import build_model

    spec = bench_spec(options, model)
    batch = options.batch or (min(QUICK_BATCH, spec.batch_size) if options.quick else spec.batch_size)
    precision = (precision_choice(replace(spec, batch_size=batch)).precision if options.precision == "auto"
                 else options.precision)
    if precision not in BENCH_PRECISIONS:
        raise ValueError(f"invalid precision={precision!r} for the benchmark (allowed: 32-true | bf16-mixed)")
    if options.channels_last == "auto":
        with torch.device("meta"):
            channels_last = prefers_channels_last(build_model(model, 10, spec.net_in_chans, spec.img_size))
    else:
        channels_last = options.channels_last == "on"
    return Setup(spec, batch, precision, channels_last, options.attention, device)


def build_net(setup: Setup, seed: int) -> nn.Module:
    """The model as a run builds it (its drop-path rate included), seeded, on the device, in the setup's layout."""
    from lightning_modules.models import build_model

    torch.manual_seed(seed)
    spec = setup.spec
    net = build_model(spec.model, setup.num_classes, spec.net_in_chans, spec.img_size, drop_path_rate=spec.drop_path,
                      overrides=spec.net_overrides)
    return net.to(device=setup.device, memory_format=setup.layout).train()


def fixed_batch(setup: Setup, seed: int) -> tuple[Tensor, Tensor]:
    """Pre-built random images (in the setup's layout) and labels on the device."""
    generator = torch.Generator().manual_seed(seed)
    spec = setup.spec
    images = torch.randn(setup.batch, spec.net_in_chans, spec.img_size, spec.img_size, generator=generator)
    labels = torch.randint(0, setup.num_classes, (setup.batch,), generator=generator)
    return images.to(setup.device).contiguous(memory_format=setup.layout), labels.to(setup.device)


def autocast(setup: Setup) -> contextlib.AbstractContextManager:
    """bf16 autocast for "bf16-mixed" (what Lightning's precision plugin does), else nothing."""
    return torch.autocast(setup.device.type, dtype=torch.bfloat16, enabled=setup.precision == "bf16-mixed")


def attention_backend(name: str) -> contextlib.AbstractContextManager:
    """Restrict `F.scaled_dot_product_attention` to one backend ("auto": PyTorch chooses)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH}
    return sdpa_kernel(backends[name]) if name in backends else contextlib.nullcontext()


@dataclass(frozen=True)
class Seen:
    """What a net's forward saw on an arm's first step: proof that two arms ran the same thing."""

    net_id: int
    input_shape: tuple[int, ...]
    input_stride: tuple[int, ...]  # the memory layout (channels-last: the channel stride is 1)
    input_dtype: str
    autocast_dtype: str | None
    training: bool


class Probe:
    """Records `Seen` at the first forward of the net after each `arm(name)`."""

    def __init__(self, net: nn.Module) -> None:
        self.net, self.seen, self._arm = net, {}, None
        net.register_forward_pre_hook(self._hook)

    def arm(self, name: str) -> None:
        self._arm = name

    def _hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._arm is None or self._arm in self.seen:
            return
        x, device_type = args[0], args[0].device.type
        amp = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        self.seen[self._arm] = Seen(id(module), tuple(x.shape), tuple(x.stride()), str(x.dtype),
                                    None if amp is None else str(amp), module.training)


def recipe_optimizer(net: nn.Module, setup: Setup) -> torch.optim.Optimizer:
    """The optimizer a run uses (`ImageClassifier.configure_optimizers`: AdamW, weight-decay groups; with
    `setup.fused_adamw`, the same groups with the fused kernel); the net keeps the setup's memory layout (the
    classifier makes a CNN channels-last, in place)."""
    from lightning_modules.classifier import ImageClassifier

    module = ImageClassifier(net, setup.num_classes, lr=setup.spec.lr, weight_decay=setup.spec.weight_decay)
    optimizer = module.configure_optimizers()["optimizer"]
    net.to(memory_format=setup.layout)  # in place: the optimizer keeps the same parameters
    if setup.fused_adamw:  # the groups' own settings minus the implementation flags, which the groups would keep
        groups = [{k: v for k, v in group.items() if k not in ("fused", "foreach")} for group in optimizer.param_groups]
        optimizer = type(optimizer)(groups, fused=True)
    return optimizer


def plain_train_step(net: nn.Module, setup: Setup, batch: Callable[[], tuple[Tensor, Tensor]],
                     optimizer: torch.optim.Optimizer, host_sync: bool = False) -> Callable[[], None]:
    """One step of the minimal loop: forward and loss under autocast, backward, optimizer step.

    `batch()` gives each step's (images, labels); `host_sync` reads the loss on the host every step, as a
    per-step `loss.item()` or `if not torch.isfinite(loss)` does.
    """
    smoothing = setup.spec.label_smoothing

    def step() -> None:
        images, labels = batch()
        with autocast(setup), attention_backend(setup.attention):
            loss = F.cross_entropy(net(images).float(), labels, label_smoothing=smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if host_sync:
            loss.item()

    return step


def infer_step(net: nn.Module, setup: Setup, images: Tensor) -> Callable[[], None]:
    """One inference forward (eval mode, no autograd) under the setup's precision."""

    def step() -> None:
        with torch.inference_mode(), autocast(setup), attention_backend(setup.attention):
            net(images)

    return step


def measure_train(net: nn.Module, setup: Setup, timing: Timing, images: Tensor, labels: Tensor,
                  host_sync: bool = False) -> Measured:
    """The plain loop's training step on a fixed batch (a fresh optimizer each time)."""
    net.to(setup.device).train()
    optimizer = recipe_optimizer(net, setup)
    return time_windows(plain_train_step(net, setup, lambda: (images, labels), optimizer, host_sync), timing,
                        setup.device)


def measure_infer(net: nn.Module, setup: Setup, timing: Timing, images: Tensor) -> Measured:
    net.to(setup.device).eval()
    measured = time_windows(infer_step(net, setup, images), timing, setup.device)
    net.train()
    return measured


# ------------------------------------------------------------------ rows
@dataclass
class Row:
    """One line of the CSV (CSV_COLUMNS, in order)."""

    timestamp: str
    device: str
    device_kind: str
    torch: str
    threads: int
    profile: str
    comparison: str
    arm: str
    model: str
    mode: str
    img_size: int
    in_chans: int
    batch: int
    precision: str
    layout: str
    attention: str
    compiled: bool
    step_ms: float | None
    step_ms_mean: float | None
    images_per_s: float | None
    peak_mem_gib: float | None
    peak_mem_kind: str
    gflops_per_image: float | None
    tflops_per_s: float | None
    mfu: float | None
    ratio: float | None = None
    goal: str = ""
    meets_goal: str = ""
    note: str = ""


@dataclass
class Context:
    """What every row of one benchmark run shares."""

    options: Options
    facts: DeviceFacts
    timestamp: str
    csv_name: str
    rows: list[Row] = field(default_factory=list)
    flops: dict[str, int] = field(default_factory=dict)
    datamodules: dict[RunSpec, tuple[Any, float]] = field(default_factory=dict)  # set up, with its setup seconds
    earlier: list[dict[str, str]] | None = None  # the device's CSV as this run found it

    @property
    def csv_path(self) -> Path:
        return self.options.out_dir / self.csv_name

    def failed(self, comparison: str, model: str, reason: str) -> Row:
        """A row saying that a comparison could not run, and why."""
        row = Row(self.timestamp, self.facts.name, self.facts.kind, torch.__version__, torch.get_num_threads(),
                  self.options.profile, comparison, "failed", model, "", 0, 0, 0, "", "", "", False, None, None,
                  None, None, "", None, None, None, note=reason)
        self.rows.append(row)
        return row

    def row(self, setup: Setup, comparison: str, arm: str, mode: str, measured: Measured | None, *,
            compiled: bool = False, precision: str | None = None, layout: str | None = None,
            attention: str | None = None, note: str = "") -> Row:
        """A row from one arm's timing (None: a row that only carries its note), appended to the run's rows."""
        flops = self.flops.get(setup.spec.model) if mode in ("train", "infer") else None  # "load": no model
        precision = precision or setup.precision
        peak = peak_tflops_for(self.facts, precision, self.options.peak_tflops)
        ips = images_per_s(setup.batch, measured.step_s) if measured else None
        training = mode == "train"
        row = Row(
            timestamp=self.timestamp, device=self.facts.name, device_kind=self.facts.kind, torch=torch.__version__,
            threads=torch.get_num_threads(), profile=self.options.profile, comparison=comparison, arm=arm,
            model=setup.spec.model, mode=mode, img_size=setup.spec.img_size, in_chans=setup.spec.net_in_chans,
            batch=setup.batch, precision=precision,
            layout=layout or ("channels_last" if setup.channels_last else "contiguous"),
            attention=attention or setup.attention, compiled=compiled,
            step_ms=1e3 * measured.step_s if measured else None,
            step_ms_mean=1e3 * measured.mean_step_s if measured else None, images_per_s=ips,
            peak_mem_gib=measured.peak_mem_bytes / 2**30 if measured else None,
            peak_mem_kind="cuda_max_allocated" if self.facts.device.type == "cuda" else "process_max_rss",
            gflops_per_image=flops / 1e9 if flops else None,
            tflops_per_s=achieved_tflops(flops, ips, training) if flops and ips else None,
            mfu=mfu(flops, ips, training, peak) if flops and ips else None, note=note)
        self.rows.append(row)
        return row

    def save(self) -> Path:
        """Write this run's rows to the device's CSV, keeping the rows of earlier runs that it did not measure
        again (another comparison, model or precision): `make bench --only data` does not erase the rest."""
        if self.earlier is None:
            self.earlier = read_csv(self.csv_path) if self.csv_path.exists() else []
        measured = {row_key(asdict(row)) for row in self.rows}
        kept = [old for old in self.earlier if row_key(old) not in measured]
        return write_csv(self.csv_path, self.rows, kept)


def compare(rows: Sequence[Row], reference: Row, goal: float | None = None,
            goal_arms: Sequence[str] | None = None) -> None:
    """Set each row's ratio of images/s to `reference`'s, and for the arms `goal_arms` (None: all but the
    reference) whether it meets `goal`, a minimum ratio."""
    for row in rows:
        if row.images_per_s is None or not reference.images_per_s:
            continue
        row.ratio = row.images_per_s / reference.images_per_s
        judged = row is not reference if goal_arms is None else row.arm in goal_arms
        if goal is not None and judged:
            row.goal = f"ratio >= {goal:g}"
            row.meets_goal = "yes" if row.ratio >= goal else "no"


def csv_text(rows: Sequence[Row]) -> str:
    """The rows as CSV text with the header CSV_COLUMNS (floats to 6 significant digits)."""
    names = tuple(f.name for f in fields(Row))
    if names != CSV_COLUMNS:
        raise ValueError(f"Row fields {names} differ from CSV_COLUMNS {CSV_COLUMNS}")
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(["" if v is None else f"{v:.6g}" if isinstance(v, float) else v
                         for v in (getattr(row, name) for name in CSV_COLUMNS)])
    return out.getvalue()


def row_key(row: dict[str, Any]) -> tuple[str, ...]:
    """What a row measured (a later measurement of the same replaces it): profile, comparison, model, input
    and precision."""
    return tuple(str(row[name]) for name in ("profile", "comparison", "model", "img_size", "in_chans", "batch",
                                              "precision"))


def write_csv(path: Path, rows: Sequence[Row], earlier: Sequence[dict[str, str]] = ()) -> Path:
    """Write `earlier` rows (as read back from a CSV) then `rows` to `path` atomically: a reader sees the old
    file or the new one, never half of one."""
    text = csv_text(rows)
    if earlier:
        out = io.StringIO()
        csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n").writerows(earlier)
        header, body = text.split("\n", 1)
        text = header + "\n" + out.getvalue() + body
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------ main table and switches
def run_main(ctx: Context, setup: Setup, timing: Timing) -> None:
    """Plain training and inference of one model, with its anchor and goal."""
    net = build_net(setup, ctx.options.seed)
    images, labels = fixed_batch(setup, ctx.options.seed)
    train = ctx.row(setup, "main", "plain", "train", measure_train(net, setup, timing, images, labels))
    infer = ctx.row(setup, "main", "plain", "infer", measure_infer(net, setup, timing, images))
    model = setup.spec.model
    if ctx.options.profile == "gpu":
        train.note = ANCHORS_3090.get(model, "")
        kind, threshold, text = H100_GOALS.get(model, (None, 0.0, ""))
        value = train.mfu if kind == "mfu" else train.images_per_s
        if kind and value is not None:
            train.goal, train.meets_goal = text, "yes" if value >= threshold else "no"
    infer.note = "forward only, eval mode, inference_mode"


def run_switches(ctx: Context, setup: Setup, timing: Timing) -> None:
    """Training with one fast-path switch flipped at a time, against the setup's own setting."""
    net = build_net(setup, ctx.options.seed)
    images, labels = fixed_batch(setup, ctx.options.seed)
    variants: dict[str, tuple[Setup, str]] = {}
    from lightning_modules.classifier import prefers_channels_last

    if prefers_channels_last(net):
        flipped = replace(setup, channels_last=not setup.channels_last)
        variants["layout"] = (flipped, "the other memory layout")
    if MODELS[setup.spec.model].arch == "vit" and setup.attention != "math":
        variants["attention-math"] = (replace(setup, attention="math"), "unfused attention (SDPA math backend)")
    if setup.precision == "bf16-mixed":
        variants["fp32"] = (replace(setup, precision="32-true"), "no bf16 autocast")
    variants["fused-adamw"] = (replace(setup, fused_adamw=True), "AdamW(fused=True), the same groups")

    def arm(variant: Setup) -> Callable[[], Measured]:
        def run() -> Measured:
            net.to(memory_format=variant.layout)
            return measure_train(net, variant, timing, images.contiguous(memory_format=variant.layout), labels)
        return run

    results = interleave({"suite": arm(setup), **{name: arm(v) for name, (v, _) in variants.items()}},
                         timing.rounds)
    net.to(memory_format=setup.layout)
    reference = ctx.row(setup, "switches", "suite", "train", results["suite"], note="the suite's settings")
    rows = [reference]
    for name, (variant, note) in variants.items():
        rows.append(ctx.row(variant, "switches", name, "train", results[name], note=note))
    compare(rows, reference)


def run_compile(ctx: Context, setup: Setup, timing: Timing) -> None:
    """`torch.compile` of the net (`nn.Module.compile`, in place: the state dict keeps its names) against
    eager: the steady step, the compilation time (the warm-up beyond its steady steps) and the steps it takes
    to pay that back, against the run's step budget."""
    net = build_net(setup, ctx.options.seed)
    images, labels = fixed_batch(setup, ctx.options.seed)
    eager = measure_train(net, setup, timing, images, labels)
    net.compile()
    warmup = max(2, timing.warmup)  # the first steps compile (forward and backward graphs)
    compiled = measure_train(net, setup, replace(timing, warmup=warmup), images, labels)
    overhead = compiled.warmup_s - warmup * compiled.step_s
    steps = break_even_steps(overhead, eager.step_s, compiled.step_s)
    budget = budget_steps(setup.spec)
    verdict = "pays back within the run" if steps <= budget else "does not pay back within the run"
    reference = ctx.row(setup, "compile", "eager", "train", eager)
    row = ctx.row(setup, "compile", "compiled", "train", compiled, compiled=True,
                  note=f"compile {overhead:.1f} s; break-even after {steps:.0f} steps; budget {budget} steps: "
                       f"{verdict}")
    compare([reference, row], reference)


# ------------------------------------------------------------------ Lightning vs plain
@dataclass(frozen=True)
class Toggles:
    """Which per-step pieces of a run's training loop are on (all: as `experiments.train` configures it).

    Attributes:
        progress_bar: the Trainer's default progress bar (Rich when installed), output captured as in a
            non-interactive run.
        lr_monitor: `LearningRateMonitor(logging_interval="step")`.
        grad_clip: `gradient_clip_val=spec.grad_clip`.
        train_acc: the per-step train-accuracy metric update and its `self.log`.
        loss_log: `self.log("train/loss", prog_bar=True)`.
        logger: the CSV logger (Lightning refuses the LR monitor without one).
        callbacks: the run's other callbacks: checkpointing, validation history, the training clock, early stopping.
        deterministic: `deterministic=True` (what a run sets on the CPU; off on a GPU).
    """

    progress_bar: bool = True
    lr_monitor: bool = True
    grad_clip: bool = True
    train_acc: bool = True
    loss_log: bool = True
    logger: bool = True
    callbacks: bool = True
    deterministic: bool = True


TOGGLE_NAMES = tuple(f.name for f in fields(Toggles))


def toggle_arms(on_cpu: bool) -> dict[str, Toggles]:
    """The Lightning arms: the run's loop, the loop with each piece off, and with all of them off."""
    full = Toggles(deterministic=on_cpu)
    arms = {"lightning": full}
    for name in TOGGLE_NAMES:
        if getattr(full, name):  # the LR monitor needs a logger: without one it goes too
            arms[f"lightning-{name}"] = replace(full, **{name: False}, **({"lr_monitor": False} if name == "logger"
                                                                           else {}))
    arms["lightning-bare"] = Toggles(**{name: False for name in TOGGLE_NAMES})
    return arms


class _NoMetric(nn.Module):
    """Stands in for the train-accuracy metric when it is toggled off."""

    def forward(self, *args: Any) -> None:
        return None


def toggled_classifier(net: nn.Module, setup: Setup, toggles: Toggles) -> Any:
    """The suite's `ImageClassifier` (its own `training_step`), with the toggled-off logs dropped."""
    from lightning_modules.classifier import ImageClassifier

    class Toggled(ImageClassifier):
        def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if name in skipped:
                return
            super().log(name, value, *args, **kwargs)

    skipped = set()
    if not toggles.loss_log:
        skipped.add("train/loss")
    spec = setup.spec
    module = Toggled(net, setup.num_classes, lr=spec.lr, weight_decay=spec.weight_decay,
                     total_steps=budget_steps(spec), warmup_steps=round(spec.warmup_frac * budget_steps(spec)),
                     min_lr_ratio=spec.min_lr_ratio, label_smoothing=spec.label_smoothing)
    if not toggles.train_acc:
        skipped.add("train/acc1_batch")
        module.train_acc = _NoMetric()
    return module


def budget_steps(spec: RunSpec) -> int:
    """The run's step budget (the profiles' budget does not depend on the training-set size)."""
    return spec.train_steps(DATASETS[spec.dataset].n_train or 0)


class RepeatBatch:
    """An iterable of `steps` batches, each the same pre-built one (nothing to load: the loop alone is timed)."""

    def __init__(self, batch: tuple[Tensor, Tensor], steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return (self.batch for _ in range(self.steps))


def _window_callback(timing: Timing, device: torch.device, measured: Measured) -> Any:
    """A callback that times a Trainer's steps as `time_windows` does: from the end of one window's last batch
    to the next, so each window holds whole iterations of the loop (fetch, step, hooks, logging)."""
    import lightning.pytorch as pl

    class WindowClock(pl.Callback):
        def __init__(self) -> None:
            self.count, self.last = 0, timing.now()
            self.losses: list[float] = []

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                               batch: Any, batch_idx: int) -> None:
            self.count += 1
            done = self.count - timing.warmup
            if done < 0 or done % timing.window_steps:
                return
            synchronize(device)
            now = timing.now()
            if done == 0:
                measured.warmup_s = now - self.last
            else:
                measured.window_step_s.append((now - self.last) / timing.window_steps)
            self.last = now
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, Tensor):  # the device is synchronised already
                self.losses.append(float(loss))

    return WindowClock()


@contextlib.contextmanager
def quiet_lightning() -> Iterator[io.StringIO]:
    """Lightning's info lines and warnings off, stdout (the progress bar) captured; deterministic-algorithm
    mode restored afterwards (a Trainer with deterministic=True leaves it on)."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [logger.level for logger in loggers]
    deterministic = torch.are_deterministic_algorithms_enabled()
    captured = io.StringIO()
    try:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.simplefilter("ignore")
            yield captured
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        torch.use_deterministic_algorithms(deterministic)


def lightning_fit(module: Any, setup: Setup, toggles: Toggles, train_data: Any, timing: Timing,
                  workdir: Path) -> tuple[Measured, list[float]]:
    """Fit `module` for `timing.total_steps` steps in a Trainer configured as `experiments.train.fit_and_test`
    configures it (less the pieces toggled off); no validation loop. Returns the timing and the loss read at
    the end of the warm-up and of each window."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from experiments.train import _callbacks

    spec, on_cpu = setup.spec, setup.device.type == "cpu"
    measured = Measured()
    clock = _window_callback(timing, setup.device, measured)
    callbacks: list[pl.Callback] = []
    if toggles.callbacks:
        callbacks.append(ModelCheckpoint(dirpath=workdir / "checkpoints", filename="best", monitor="val/acc1",
                                         mode="max", save_last=True, save_top_k=1, enable_version_counter=False))
        callbacks.extend(_callbacks())
        if spec.patience:
            callbacks.append(EarlyStopping(monitor="val/acc1", mode="max", patience=spec.patience,
                                           check_on_train_epoch_end=False))
    if toggles.lr_monitor:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    callbacks.append(clock)
    steps = budget_steps(spec)
    with quiet_lightning(), peak_memory(setup.device, measured), attention_backend(setup.attention):
        trainer = pl.Trainer(
            max_steps=timing.total_steps, max_epochs=-1, num_sanity_val_steps=0, precision=setup.precision,
            accelerator=setup.device.type, devices=1, deterministic=on_cpu and toggles.deterministic,
            benchmark=not on_cpu, gradient_clip_val=(spec.grad_clip or None) if toggles.grad_clip else None,
            log_every_n_steps=max(1, min(50, steps // 20)),
            logger=[CSVLogger(str(workdir / "logs"), name="", version=0)] if toggles.logger else False,
            callbacks=callbacks, enable_model_summary=False, enable_progress_bar=toggles.progress_bar,
            default_root_dir=str(workdir))
        trainer.fit(module, train_dataloaders=train_data)
    return measured, clock.losses


def run_lightning(ctx: Context, setup: Setup, timing: Timing) -> dict[str, Seen]:
    """The suite's Lightning step against the plain loop, and the cost of each per-step piece.

    Every arm trains the same net object on the same batch in the same precision (`Probe` records what each
    arm's forward saw; the returned records must be equal). Returns them, by arm.
    """
    net = build_net(setup, ctx.options.seed)
    images, labels = fixed_batch(setup, ctx.options.seed)
    probe = Probe(net)
    arms: dict[str, Callable[[], Measured]] = {}

    def plain(name: str, host_sync: bool) -> Callable[[], Measured]:
        def run() -> Measured:
            probe.arm(name)
            return measure_train(net, setup, timing, images, labels, host_sync=host_sync)
        return run

    def lightning(name: str, toggles: Toggles) -> Callable[[], Measured]:
        def run() -> Measured:
            probe.arm(name)
            module = toggled_classifier(net, setup, toggles)
            with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
                measured, _ = lightning_fit(module, setup, toggles, RepeatBatch((images, labels), timing.total_steps),
                                            timing, Path(tmp))
            net.to(setup.device)  # Lightning's teardown moves the module to the CPU
            return measured
        return run

    arms["plain"] = plain("plain", False)
    arms["plain+sync"] = plain("plain+sync", True)
    toggles = toggle_arms(setup.device.type == "cpu")
    for name, toggle in toggles.items():
        arms[name] = lightning(name, toggle)
    results = interleave(arms, timing.rounds)
    same = len(set(probe.seen.values())) == 1
    check = "every arm saw the same net, batch, layout and precision" if same else f"ARMS DIFFER: {probe.seen}"
    reference = ctx.row(setup, "lightning", "plain", "train", results["plain"], note=check)
    rows = [reference, ctx.row(setup, "lightning", "plain+sync", "train", results["plain+sync"],
                               note="plain + loss.item() each step (a host sync, as a per-step isfinite check)")]
    full = results["lightning"]
    for name, toggle in toggles.items():
        off = [n for n in TOGGLE_NAMES if not getattr(toggle, n) and getattr(toggles["lightning"], n)]
        if name == "lightning":
            note = "as experiments.train configures it (no validation loop)"
        else:
            saved = full.mean_step_s - results[name].mean_step_s
            note = (f"without {', '.join(off)}: {1e3 * saved:+.2f} ms/step saved (mean), "
                    f"{100 * saved / full.mean_step_s:+.1f} % of the run's step")
        rows.append(ctx.row(setup, "lightning", name, "train", results[name], note=note))
    compare(rows, reference, RATIO_GOALS["lightning"], goal_arms=("lightning",))
    return dict(probe.seen)


# ------------------------------------------------------------------ our ViT vs timm's
def vit_pair(setup: Setup, seed: int) -> tuple[nn.Module, nn.Module]:
    """Our ViT and timm's `VisionTransformer` of the registered configuration, with the same weights.

    timm's is built from the config (seeded) and ours is `vit_timm.from_timm` of it, which copies every
    weight; `timm_config` of timm's must read back the same architecture.

    Raises:
        ValueError: a configuration timm's ViT cannot express (e.g. pos_embed="sincos2d").
    """
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    from lightning_modules.models import vit_config
    from lightning_modules.vit_timm import from_timm, timm_config

    spec = setup.spec
    config = vit_config(spec.model, setup.num_classes, spec.net_in_chans, spec.img_size,
                        drop_path_rate=spec.drop_path, overrides=spec.net_overrides)
    if config.pos_embed not in ("learn", "none") or config.zero_head:
        raise ValueError(f"{spec.model}: timm's ViT has no pos_embed={config.pos_embed!r} / zero_head")
    torch.manual_seed(seed)
    theirs = TimmViT(img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans,
                     num_classes=config.num_classes, global_pool=config.pool, embed_dim=config.embed_dim,
                     depth=config.depth, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
                     qkv_bias=config.qkv_bias, class_token=config.class_token, pos_embed=config.pos_embed,
                     drop_rate=config.drop_rate, drop_path_rate=config.drop_path_rate)
    arch = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "mlp_ratio",
            "qkv_bias", "pos_embed", "pool", "class_token")
    read = timm_config(theirs)
    if any(getattr(read, name) != getattr(config, name) for name in arch):
        raise ValueError(f"{spec.model}: timm's ViT reads back as {read}, not {config}")
    ours = from_timm(theirs, drop_rate=config.drop_rate, attn_drop_rate=config.attn_drop_rate,
                     drop_path_rate=config.drop_path_rate)
    return ours.to(setup.device).train(), theirs.to(setup.device).train()


def run_timm(ctx: Context, setup: Setup, timing: Timing) -> None:
    """Our ViT against timm's, training and inference, same weights, batch and precision."""
    ours, theirs = vit_pair(setup, ctx.options.seed)
    images, labels = fixed_batch(setup, ctx.options.seed)
    results = interleave({
        "ours/train": lambda: measure_train(ours, setup, timing, images, labels),
        "timm/train": lambda: measure_train(theirs, setup, timing, images, labels),
        "ours/infer": lambda: measure_infer(ours, setup, timing, images),
        "timm/infer": lambda: measure_infer(theirs, setup, timing, images),
    }, timing.rounds)
    for mode in ("train", "infer"):
        reference = ctx.row(setup, "timm", "timm", mode, results[f"timm/{mode}"],
                            note="timm.models.vision_transformer.VisionTransformer")
        row = ctx.row(setup, "timm", "ours", mode, results[f"ours/{mode}"],
                      note="lightning_modules.vit.VisionTransformer, timm's weights (vit_timm.from_timm)")
        compare([reference, row], reference, RATIO_GOALS["timm"])


# ------------------------------------------------------------------ data
def resident_data(spec: RunSpec, batch: int, device: torch.device) -> tuple[ResidentBatches, ResidentBatches, str]:
    """The spec's training subset and test split as `lightning_modules.resident.ResidentBatches` on `device`
    (what a run with `resident` trains on: the loader's batches, made on the device), and a note on what differs
    from the spec's recipe.

    RandAugment has no device version: a spec with it is benchmarked with its augmentation set to "basic" (at
    224 px a random resized crop and a flip), which the note says.

    Raises:
        DataError: the data cannot be loaded.
        ValueError: the data cannot be resident (image files, or too large for the device).
    """
    from experiments.train import build_datamodule
    from lightning_modules.data import MixCollate, SeededShuffle

    augment, note = spec.augment, ""
    if augment == "randaug":
        augment, note = "basic", "randaug has no device version: basic augmentation instead"
    datamodule = build_datamodule(replace(spec, augment=augment, resident=False))
    datamodule.setup()
    why = resident_support(datamodule, device)
    if why:
        raise ValueError(f"no resident path: {why}")
    batch = min(batch, datamodule.n_train)
    train = ResidentBatches(datamodule.train_set, batch, device,
                            sampler=SeededShuffle(datamodule.n_train, spec.data_seed, batch),
                            mix=MixCollate(datamodule.num_classes, spec.mixup_alpha, spec.cutmix_alpha))
    test = ResidentBatches(datamodule.test_set, 2 * batch, device)
    return train, test, note


def cycle(iterable: Any) -> Iterator[Any]:
    """Batches of `iterable` without end, a new epoch (a new `iter`) when one ends."""
    while True:
        yield from iterable


def run_data(ctx: Context, setup: Setup, timing: Timing) -> None:
    """The real train loader feeding the plain loop against pre-built tensors (and the loader alone; with
    --gpu-resident, the resident batches)."""
    from experiments.train import build_datamodule

    spec = setup.spec
    data_spec = replace(spec, model="resnet50", batch_size=setup.batch)  # the data does not depend on the net
    if data_spec not in ctx.datamodules:  # set up once for every model (at 224 px it resizes the whole set)
        datamodule = build_datamodule(data_spec)
        start = time.perf_counter()
        datamodule.setup()
        ctx.datamodules[data_spec] = (datamodule, time.perf_counter() - start)
    datamodule, setup_s = ctx.datamodules[data_spec]
    loader = datamodule.train_dataloader()
    net = build_net(setup, ctx.options.seed)
    images, labels = fixed_batch(setup, ctx.options.seed)
    layout, device = setup.layout, setup.device

    def from_loader(batches: Iterator[tuple[Tensor, Tensor]]) -> Callable[[], tuple[Tensor, Tensor]]:
        def next_batch() -> tuple[Tensor, Tensor]:
            x, y = next(batches)
            return x.to(device, non_blocking=True).contiguous(memory_format=layout), y.to(device, non_blocking=True)
        return next_batch

    loader_batches = cycle(loader)
    # the batches the workers hold ready (filled while other arms ran) are drained in the warm-up
    drained = replace(timing, warmup=timing.warmup + loader.num_workers * (loader.prefetch_factor or 0))

    def train_on(batch: Callable[[], tuple[Tensor, Tensor]], timing: Timing) -> Callable[[], Measured]:
        def run() -> Measured:
            optimizer = recipe_optimizer(net, setup)
            return time_windows(plain_train_step(net, setup, batch, optimizer), timing, device)
        return run

    def loader_alone() -> Measured:
        return time_windows(from_loader(loader_batches), drained, device)

    arms = {"model_only": train_on(lambda: (images, labels), timing),
            "loader": train_on(from_loader(loader_batches), drained), "loader_alone": loader_alone}
    resident_note = ""
    if ctx.options.gpu_resident:
        try:
            train, _, resident_note = resident_data(replace(spec, batch_size=setup.batch), setup.batch, device)
            resident_batches = cycle(train)
            arms["resident"] = train_on(from_loader(resident_batches), timing)
            arms["resident_alone"] = lambda: time_windows(from_loader(resident_batches), timing, device)
        except ValueError as exc:
            resident_note = f"resident: {exc}"
    results = interleave(arms, timing.rounds)
    workers = f"{spec.num_workers} loader workers"
    described = (f"{spec.dataset}, augment={spec.augment}, mixup={spec.mixup_alpha:g}, cutmix={spec.cutmix_alpha:g}, "
                 f"{workers}")
    reference = ctx.row(setup, "data", "model_only", "train", results["model_only"], note="pre-built tensors")
    rows = [reference,
            ctx.row(setup, "data", "loader", "train", results["loader"],
                    note=f"ImageDataModule.train_dataloader(): {described}; setup {setup_s:.1f} s"),
            ctx.row(setup, "data", "loader_alone", "load", results["loader_alone"],
                    note="the loader alone (batches to the device, no model)")]
    if "resident" in results:
        where = "the GPU" if device.type == "cuda" else "the CPU (no CUDA device here: host tensors, batched)"
        rows.append(ctx.row(setup, "data", "resident", "train", results["resident"],
                            note=f"ResidentBatches on {where}" + (f"; {resident_note}" if resident_note else "")))
        rows.append(ctx.row(setup, "data", "resident_alone", "load", results["resident_alone"],
                            note="the resident batches alone (no model)"))
    elif resident_note:
        rows[-1].note += f"; {resident_note}"
    compare(rows, reference, RATIO_GOALS["data"], goal_arms=("loader", "resident"))


# ------------------------------------------------------------------ a short training run on resident data
def train_run(ctx: Context, setup: Setup, steps: int) -> None:
    """`steps` steps of the suite's Lightning loop (as `experiments.train`, its schedule over `steps`) on
    `ResidentBatches`, then the test split's accuracy: the end-to-end rate with nothing between data and net."""
    spec = replace(setup.spec, max_steps=steps, min_steps=min(steps, setup.spec.min_steps), num_evals=1)
    setup = replace(setup, spec=spec)
    train, test, note = resident_data(replace(spec, batch_size=setup.batch), setup.batch, setup.device)
    net = build_net(setup, ctx.options.seed)
    module = toggled_classifier(net, setup, Toggles(deterministic=setup.device.type == "cpu"))
    window = max(1, min(25, steps // 10))
    timing = Timing(warmup=window, windows=max(1, (steps - window) // window), window_steps=window,
                    clock=ctx.options.clock)
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        measured, losses = lightning_fit(module, setup, Toggles(deterministic=setup.device.type == "cpu"), train,
                                         timing, Path(tmp))
    net.to(setup.device).eval()
    correct = total = 0
    with torch.inference_mode(), autocast(setup):
        for images, labels in test:
            correct += int((net(images.contiguous(memory_format=setup.layout)).argmax(1) == labels).sum())
            total += len(labels)
    losses_text = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "loss not read"
    ctx.row(setup, "train_run", "resident", "train", measured,
            note=f"{timing.total_steps} steps of {setup.batch}; {losses_text}; test acc {correct / total:.4f} "
                 f"({total} images){'; ' + note if note else ''}")


# ------------------------------------------------------------------ output
def format_table(rows: Sequence[Row]) -> str:
    """The rows of one comparison as an aligned text table."""
    head = ("model", "arm", "mode", "batch", "prec", "ms/step", "mean", "img/s", "ratio", "mem GiB", "GFLOP/img",
            "MFU", "goal", "note")

    def num(value: float | None, spec: str) -> str:
        return "" if value is None else format(value, spec)

    body = [(r.model, r.arm, r.mode, str(r.batch), r.precision.replace("-mixed", "").replace("-true", ""),
             num(r.step_ms, ".1f"), num(r.step_ms_mean, ".1f"), num(r.images_per_s, ".1f"), num(r.ratio, ".3f"),
             num(r.peak_mem_gib, ".2f"), num(r.gflops_per_image, ".3f"),
             "" if r.mfu is None else f"{100 * r.mfu:.1f}%", f"{r.goal} {r.meets_goal}".strip(), r.note)
            for r in rows]
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1] for line in (head, *body)]
    return "\n".join(line.rstrip() for line in lines)


def header(ctx: Context) -> str:
    """What the figures depend on: device, CPU kind or compute capability, threads, versions, profile."""
    o = ctx.options
    timing = "--quick (validation only: these numbers measure nothing)" if o.quick else "full"
    timing += ", clock: process CPU time" if o.clock == "process" else ", clock: wall"
    memory = ("peak memory: CUDA max allocated per measurement" if ctx.facts.device.type == "cuda"
              else "peak memory: process max RSS so far (CPU; monotonic, imports included)")
    return (f"# {ctx.facts.name} [{ctx.facts.kind}], {torch.get_num_threads()} threads, torch {torch.__version__}\n"
            f"# profile {o.profile}, timing {timing}; {memory}\n# results -> {ctx.csv_path}")


# ------------------------------------------------------------------ CLI
RUNNERS: dict[str, Callable[[Context, Setup, Timing], Any]] = {
    "main": run_main, "lightning": run_lightning, "timm": run_timm, "data": run_data, "switches": run_switches,
    "compile": run_compile}


def models_for(options: Options, comparison: str) -> tuple[str, ...]:
    """The models a comparison runs on: the timm comparison takes the ViTs."""
    bench = options.bench
    chosen = {"lightning": bench.lightning_models, "data": bench.data_models}.get(comparison)
    models = tuple(m for m in (chosen or options.models) if m in options.models) or options.models
    if comparison == "timm":
        models = tuple(m for m in models if MODELS[m].arch == "vit")
    return models


def run(options: Options, train_run_steps: int = 0, out: Any = None) -> Context:
    """Run the benchmark (or with `train_run_steps`, the short training runs); rows in the returned context."""
    out = out or sys.stdout
    facts = device_facts()
    if facts.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as a run on a GPU sets it (Trainer(benchmark=True))
    name = f"{facts.slug}-train-run.csv" if train_run_steps else f"{facts.slug}.csv"
    ctx = Context(options, facts, datetime.now(timezone.utc).isoformat(timespec="seconds"), name)
    print(header(ctx), file=out, flush=True)
    if options.gpu_resident and facts.device.type != "cuda":
        print("# --gpu-resident: no CUDA device here; the resident dataset stays in host memory and is augmented "
              "per batch on the CPU", file=out, flush=True)
    plan = [("train_run", m) for m in options.models] if train_run_steps else [
        (c, m) for c in COMPARISONS if c in options.comparisons for m in models_for(options, c)]
    for comparison, model in plan:
        first = len(ctx.rows)
        try:
            setup = make_setup(options, model, facts.device)
            if model not in ctx.flops:
                from lightning_modules.models import flops_per_image

                net = build_net(setup, options.seed)
                ctx.flops[model] = flops_per_image(net, setup.spec.net_in_chans, setup.spec.img_size)
                del net
            if comparison == "train_run":
                train_run(ctx, setup, train_run_steps)
            else:
                RUNNERS[comparison](ctx, setup, options.timing("main" if comparison == "main" else "compare"))
        except Exception as exc:  # noqa: BLE001 - one comparison fails alone, said in one line, and the rest run
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            print(f"! {comparison} {model}: {reason}", file=out, flush=True)
            ctx.failed(comparison, model, reason)
        ctx.save()
        print(f"\n## {comparison}: {model}\n{format_table(ctx.rows[first:])}", file=out, flush=True)
        if facts.device.type == "cuda":
            torch.cuda.empty_cache()
    return ctx


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=list(PROFILES), default="cpu")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="default: the profile's")
    parser.add_argument("--only", nargs="+", choices=COMPARISONS, default=list(DEFAULT_COMPARISONS),
                        help=f"the comparisons to run (default: {' '.join(DEFAULT_COMPARISONS)})")
    parser.add_argument("--quick", action="store_true",
                        help=f"batch {QUICK_BATCH} and {QUICK.total_steps} steps per arm: checks that it runs")
    parser.add_argument("--batch", type=int, help="default: the recipe's")
    parser.add_argument("--img-size", type=int, help="default: the profile's")
    parser.add_argument("--in-chans", type=int, help="default: the profile's")
    parser.add_argument("--precision", choices=BENCH_PRECISIONS, default="auto",
                        help="default: the recipe's, resolved for this machine")
    parser.add_argument("--dataset", help="for the data comparison and --train-run (default: the recipe's)")
    parser.add_argument("--data-dir", help="where the dataset's files are")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak TFLOP/s in this precision, for MFU (default: measured H100 bf16 800)")
    parser.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto",
                        help="memory layout (auto: channels-last for CNNs, as the suite)")
    parser.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto",
                        help="SDPA backend (auto: PyTorch's choice; flash fails loudly where it cannot run)")
    parser.add_argument("--compile", action="store_true", help="add the compile comparison")
    parser.add_argument("--gpu-resident", action="store_true",
                        help="add the device-resident dataset to the data comparison")
    parser.add_argument("--train-run", type=int, default=0, metavar="STEPS",
                        help="instead: train each model STEPS steps on resident data and report rate and accuracy")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="process: this process's CPU time, for a CPU shared with other work (CPU only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where <device>.csv is written")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = Options(profile=args.profile, models=tuple(args.models or PROFILES[args.profile].models),
                      comparisons=tuple(dict.fromkeys([*args.only, *(["compile"] if args.compile else [])])),
                      quick=args.quick, batch=args.batch, precision=args.precision,
                      dataset=args.dataset, data_dir=args.data_dir, peak_tflops=args.peak_tflops,
                      channels_last=args.channels_last, attention=args.attention,
                      gpu_resident=args.gpu_resident, img_size=args.img_size, in_chans=args.in_chans,
                      clock=args.clock, seed=args.seed, out_dir=args.out_dir)
    if args.clock == "process" and torch.cuda.is_available():
        print("error: --clock process times this process's CPU work and would miss the GPU's", file=sys.stderr)
        return 2
    try:
        for model in options.models:
            bench_spec(options, model)  # a bad dataset or model fails here, in one line
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ctx = run(options, train_run_steps=args.train_run)
    return 1 if any(row.arm == "failed" for row in ctx.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
