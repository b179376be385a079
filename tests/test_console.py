"""What a run and a sweep print: quiet by default, everything with -v; one bar per run over its step budget,
a bar over the sweep's runs; sparse lines when the output is not a terminal."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from experiments import console
from experiments.progressbar import RunProgressBar
from experiments.sweep import Outcome, Progress, load_sweep

REPO = Path(__file__).resolve().parents[1]
TINY_SWEEP = REPO / "tests" / "sweeps" / "tiny.yaml"
RUN = ["--dataset", "synthetic", "--model", "resnet18", "--img-size", "16", "--batch-size", "32", "--val-size", "32",
       "--min-steps", "4", "--max-steps", "4", "--num-evals", "2", "--precision", "32-true", "--wandb", "offline"]
LIBRARY_NOISE = ("GPU available", "TPU available", "Tip", "litlogger", "Trainer.fit` stopped", "Restoring states",
                 "LeafSpec", "wandb: Tracking run", "wandb: Run summary", "Epoch 0/")


class Terminal(io.StringIO):
    """An interactive terminal, as far as the bars can tell."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def fresh_console(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test starts quiet, with no live bars and Lightning's log level restored afterwards."""
    levels = {name: logging.getLogger(name).level for name in console.LIBRARY_LOGGERS}
    monkeypatch.setattr(console, "_verbose", False)
    monkeypatch.setattr(console, "_bars", None)
    with warnings.catch_warnings():
        yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


# ------------------------------------------------------------------ quiet and verbose
def test_quiet_hides_the_named_library_noise_and_keeps_our_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    console.configure(verbose=False)
    assert os.environ["WANDB_SILENT"] == "true" and not console.is_verbose()
    assert logging.getLogger("lightning.pytorch").getEffectiveLevel() == logging.WARNING
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        console.configure(verbose=False)  # its filters go in front of "always"
        leaf = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
        warnings.warn_explicit(leaf, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
        warnings.warn_explicit("The number of training batches (7) is smaller than the logging interval "
                               "Trainer(log_every_n_steps=20).", UserWarning, "fit_loop.py", 1,
                               module="lightning.pytorch.loops.fit_loop")
        warnings.warn_explicit("a deprecation of our own", DeprecationWarning, "spec.py", 1, module="experiments.spec")
        warnings.warn_explicit("something else from Lightning", UserWarning, "trainer.py", 1,
                               module="lightning.pytorch.trainer.trainer")
    assert [str(w.message) for w in shown] == ["a deprecation of our own", "something else from Lightning"]


def test_verbose_hides_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        console.configure(verbose=True)
        warnings.warn_explicit("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, "_pytree.py", 21,
                               module="lightning.pytorch.utilities._pytree")
    assert len(shown) == 1 and "WANDB_SILENT" not in os.environ and console.is_verbose()
    assert logging.getLogger("lightning.pytorch").getEffectiveLevel() == logging.INFO


def train_cli(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    return subprocess.run([sys.executable, "-m", "experiments.train", *RUN, "--runs-dir", str(tmp_path), *flags],
                          cwd=REPO, env={**env, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_run_prints_its_start_and_its_result_and_no_library_noise(tmp_path: Path) -> None:
    proc = train_cli(tmp_path)
    assert proc.returncode == 0, proc.stderr
    start, result = proc.stdout.splitlines()
    match = re.fullmatch(r"train resnet18 synthetic f=1 none s0 \((\w{12})\): 4 steps", start)
    assert match and result.startswith(f"run {match.group(1)} completed in ") and "test/acc1=" in result, start
    assert not [noise for noise in LIBRARY_NOISE if noise in proc.stderr], proc.stderr
    # what is left comes from W&B's settings, before it reads WANDB_SILENT (experiments.tracking's to settle)
    assert set(proc.stderr.splitlines()) <= {"wandb: WARNING The anonymous setting has no effect and will be "
                                             "removed in a future version."}, proc.stderr


@pytest.mark.slow
def test_verbose_shows_the_libraries_output(tmp_path: Path) -> None:
    proc = train_cli(tmp_path, "-v")
    assert proc.returncode == 0, proc.stderr
    for noise in ("GPU available", "Trainer.fit` stopped", "wandb: Tracking run", "wandb: Run summary"):
        assert noise in proc.stderr, noise


# ------------------------------------------------------------------ one bar per run
class Steps(pl.LightningModule):
    """The least that trains: 3 batches an epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layer(batch[0]).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(12, 2)), batch_size=4)


class BarState(pl.Callback):
    """Records (completed, total) of the live run bar after each step."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, float | None]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        (task,) = console._bars.progress.tasks
        self.seen.append((task.completed, task.total))


def fit(*callbacks: pl.Callback, steps: int = 7) -> None:
    trainer = pl.Trainer(max_steps=steps, max_epochs=-1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(Steps())


def test_a_run_is_one_bar_over_its_whole_step_budget() -> None:
    terminal, state = Terminal(), BarState()
    fit(RunProgressBar("train tiny", terminal), state)
    assert state.seen == [(float(step), 7.0) for step in range(1, 8)]  # across 3 epochs, never restarting
    assert console._bars.progress.tasks == []  # gone when the fit ends
    assert "train tiny: 7 steps" in terminal.getvalue()  # the start line stays above


def test_off_a_terminal_a_run_prints_sparse_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    fit(RunProgressBar("train tiny", out))
    assert out.getvalue() == "train tiny: 7 steps\n"  # a short run: the start line only
    monkeypatch.setattr(console, "LINE_EVERY_S", 0.0)
    out = io.StringIO()
    fit(RunProgressBar("train tiny", out))
    start, *lines = out.getvalue().splitlines()
    assert start == "train tiny: 7 steps" and console._bars is None
    assert [int(re.search(r": (\d+)/7 steps · \d+ img/s · ETA \d+s$", line).group(1)) for line in lines] == \
        list(range(1, 8))


def test_a_resumed_run_starts_its_bar_where_it_left_off() -> None:
    out = io.StringIO()
    bar = RunProgressBar("train tiny", out)
    bar.on_train_start(SimpleNamespace(global_step=3, max_steps=7), None)
    assert out.getvalue() == "train tiny: resumed at step 3 of 7\n"
    assert bar.status(3, 7) == "3/7 steps"  # no rate before a step of this attempt


# ------------------------------------------------------------------ the sweep's bar
def test_a_sweep_on_a_terminal_is_a_bar_over_its_runs_with_a_counting_down_eta(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = load_sweep(TINY_SWEEP)
    terminal, now = Terminal(), [1000.0]
    monkeypatch.setattr("time.monotonic", lambda: now[0])
    progress = Progress(sweep, 1, terminal)
    progress.estimates = {spec.run_id: 60.0 for spec in sweep.ordered}
    progress.header("to run")
    (task,) = console._bars.progress.tasks
    assert (task.completed, task.total, task.description) == (0, 5, "[tiny]")
    assert str(task.fields["status"]) == "0/5 done · 0 failed · 5 left · ETA 5m00s"
    progress.record(Outcome(sweep.ordered[0], "completed", "trained here"), seconds=60.0)
    assert task.completed == 1 and str(task.fields["status"]) == "1/5 done · 0 failed · 4 left · ETA 4m00s"
    now[0] += 90
    assert str(task.fields["status"]).endswith("ETA 2m30s")  # counts down while the next run trains
    progress.close()
    assert console._bars.progress.tasks == []
    text = terminal.getvalue()
    assert "[tiny] resnet18 synthetic f=0.25 none s0" in text and "[tiny] 1/5 done · 0 failed · 4 left" in text


def test_off_a_terminal_the_sweep_prints_its_progress_line_after_each_run() -> None:
    sweep = load_sweep(TINY_SWEEP)
    out = io.StringIO()
    progress = Progress(sweep, 1, out)
    progress.header("to run")
    progress.record(Outcome(sweep.ordered[0], "completed", "trained here"), seconds=60.0)
    progress.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and lines[2] == "[tiny] 1/5 done · 0 failed · 4 left · ETA 4m00s"
