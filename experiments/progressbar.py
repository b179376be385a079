"""One progress bar per run, over its whole step budget (a Lightning progress-bar callback).

Lightning's own bars count the batches of an epoch ("Epoch 0/-2", restarting
every epoch when a run has a step budget) and add bars for validation and
testing. This one counts optimizer steps from `global_step` to `max_steps`,
starting where a resumed run left off, with images/s and the time left (both
over the wall time of this attempt, validations included). It prints the
run's start line; then on a terminal it is a live bar
(`experiments.console.bars`), elsewhere a line at most every
`console.LINE_EVERY_S` seconds. Under DDP only rank 0 shows it.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar

from experiments import console


class RunProgressBar(ProgressBar):
    """Steps done / the step budget, images/s, ETA.

    Args:
        description: what the run is (shown before the bar or the line).
        stream: where it goes (default: sys.stdout at the time the run starts).
    """

    def __init__(self, description: str, stream: TextIO | None = None) -> None:
        super().__init__()
        self.description, self.stream = description, stream
        self._enabled = True
        self._bars: console.Bars | None = None
        self._task: Any = None
        self._first_step, self._started, self._last_line, self._images = 0, 0.0, 0.0, 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def status(self, step: int, total: int) -> str:
        """`120/480 steps · 812 img/s · ETA 45s` (rate and ETA once a step of this attempt is done)."""
        done, elapsed = step - self._first_step, time.perf_counter() - self._started
        if done <= 0 or elapsed <= 0:
            return f"{step}/{total} steps"
        eta = (total - step) * elapsed / done
        return f"{step}/{total} steps · {self._images / elapsed:.0f} img/s · ETA {console.format_duration(eta)}"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._enabled:
            return
        self._first_step, self._images = trainer.global_step, 0
        self._started = self._last_line = time.perf_counter()
        stream = self.stream or sys.stdout
        start = f"resumed at step {trainer.global_step} of {trainer.max_steps}" if trainer.global_step else \
            f"{trainer.max_steps} steps"
        self._bars = console.bars(stream)
        if self._bars is None:
            print(f"{self.description}: {start}", file=stream, flush=True)
            return
        self._bars.print(f"{self.description}: {start}")
        self._task = self._bars.add(self.description, trainer.max_steps, trainer.global_step,
                                    self.status(trainer.global_step, trainer.max_steps))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._enabled:
            return
        self._images += len(batch[0]) * trainer.world_size
        status = self.status(trainer.global_step, trainer.max_steps)
        if self._task is not None:
            self._bars.update(self._task, trainer.global_step, status)
        elif time.perf_counter() - self._last_line >= console.LINE_EVERY_S:
            self._last_line = time.perf_counter()
            print(f"{self.description}: {status}", file=self.stream or sys.stdout, flush=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._task is not None:
            self._bars.remove(self._task)
            self._task = None
