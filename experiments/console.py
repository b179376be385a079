"""What the suite prints: its own lines and progress, quiet by default, everything with `-v`.

Quiet (the default) shows the suite's own lines (a run's start and result, a
sweep's progress and summary), one progress bar per run, and every warning
that the suite's own code raises. It hides what the libraries print around a
run: Lightning's info lines (the hardware, a tip, "`Trainer.fit` stopped",
checkpoint restores), W&B's banner and run summary (`WANDB_SILENT`, unless
the environment sets it), and the third-party warnings named one by one in
`THIRD_PARTY_WARNINGS`. Verbose hides nothing.

On a terminal, progress is live bars (rich): one per run over its whole step
budget and, in a sweep, one over its runs; the suite's lines print above
them. Anywhere else (a pipe, a log file, a SLURM job's output) a run's bar is
a line at most every `LINE_EVERY_S` seconds, and a sweep's bar is its
progress line after each run.

Torch-free: the sweep runner imports it.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from experiments.spec import RunSpec

LINE_EVERY_S = 60.0  # off a terminal: at most one progress line a minute per run
LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric")
# (message, module) regular expressions of warnings that Lightning raises in every run, about nothing a user of
# the suite can act on
THIRD_PARTY_WARNINGS: tuple[tuple[str, str], ...] = (
    # a deprecation inside Lightning's own use of torch.utils._pytree
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\."),
    # logging goes by steps on purpose (a step budget, small subsets): epochs shorter than the interval are fine
    (r"The number of training batches \(\d+\) is smaller than the logging interval", r"lightning\.pytorch\."),
    # a run resumed from its last.ckpt writes into its own checkpoint folder
    (r"Checkpoint directory .* exists and is not empty", r"lightning\.pytorch\."),
)

_verbose = False


def configure(verbose: bool) -> None:
    """Set this process's output policy; the CLIs call it first, and so do sweep workers and SLURM jobs."""
    global _verbose
    _verbose = verbose
    if not verbose:
        os.environ.setdefault("WANDB_SILENT", "true")
        for message, module in THIRD_PARTY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, module=module)
    quiet_libraries()


def is_verbose() -> bool:
    """Whether this process prints everything (`-v`)."""
    return _verbose


def quiet_libraries() -> None:
    """Lightning's info lines shown only when verbose.

    Lightning sets its logger to INFO when it is imported, so the trainer's
    set-up calls this again once Lightning is in.
    """
    level = logging.INFO if _verbose else logging.WARNING
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level)


# ------------------------------------------------------------------ formatting
def format_duration(seconds: float) -> str:
    """12m30s, 1h05m, 45s."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def describe(spec: RunSpec) -> str:
    """`resnet50 fashion_mnist f=0.1 fractaldb s0 (3f9c0a1b2d4e)`."""
    return f"{spec.model} {spec.dataset} f={spec.train_fraction:g} {spec.pretraining} s{spec.seed} ({spec.run_id})"


# ------------------------------------------------------------------ live bars
def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is an interactive terminal (bars) rather than a pipe or a file (lines)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Bars:
    """Live progress bars on one terminal (rich), shared by everything in this process that shows progress.

    Each bar is a description, the bar, and a status text its owner writes
    (steps, images/s and ETA for a run; runs done and ETA for a sweep). The
    display starts with the first bar and ends with the last; lines printed
    through `print` appear above it.
    """

    def __init__(self, stream: TextIO) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        self.stream = stream
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[status]}"),
                                 console=Console(file=stream), transient=True)

    def add(self, description: str, total: float, completed: float, status: str) -> Any:
        """Show a bar; returns its id."""
        if not self.progress.tasks:
            self.progress.start()
        return self.progress.add_task(description, total=total, completed=completed, status=status)

    def update(self, task: Any, completed: float, status: str) -> None:
        self.progress.update(task, completed=completed, status=status)

    def remove(self, task: Any) -> None:
        """Take a bar away; the display ends with the last one."""
        self.progress.remove_task(task)
        if not self.progress.tasks:
            self.progress.stop()

    def print(self, text: str) -> None:
        """A line above the bars."""
        self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)


_bars: Bars | None = None


def bars(stream: TextIO) -> Bars | None:
    """This process's live bars on `stream` when it is a terminal, else None (print lines instead)."""
    global _bars
    if not is_terminal(stream):
        return None
    if _bars is None or (_bars.stream is not stream and not _bars.progress.tasks):
        _bars = Bars(stream)
    return _bars
