"""Preemption: on the pre-timeout signal, save the run at the current step, then let submitit requeue it.

On SLURM, submitit asks for USR2 `signal_delay_s` before the time limit
(`--signal=USR2@120`) and installs a handler that calls `TrainJob.checkpoint`
and requeues the job; the requeued job resumes from `checkpoints/last.ckpt`.
On its own that checkpoint is only as recent as the last validation, so a
requeued job would lose up to one evaluation interval.

`SaveOnPreemption` stands in front of submitit's handler while a fit runs.
A signal handler runs between any two bytecodes, possibly in the middle of an
optimizer step, so the handler only notes the signal; at the end of the
training step under way (a consistent state) every DDP rank saves `last.ckpt`
at that step (rank 0 writes it; the ranks first agree that a signal came),
and then submitit's handler runs as it would have: checkpoint, requeue, exit.
A signal that comes outside a training step (during the last validation, or
outside the fit) is handed to submitit's handler when the fit ends, or at
once; the run then resumes from the last saved `last.ckpt`.

Checkpoints are written by `AtomicCheckpointIO`: a temporary file beside the checkpoint, renamed over it, so
that a process killed while saving (the grace period after the signal ran out) leaves the previous
checkpoint whole.

One mechanism acts: submitit's, because it also requeues a job that is not
in a fit (preflight, the pretraining it waits for, the test). Lightning's own
SLURM requeue (`SLURMEnvironment(auto_requeue=True)`, its default when it
detects SLURM) is turned off by `cluster_plugins`.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from common.files import atomic_write

# submitit's preemption signal (its default; SUBMITIT_PREEMPT_SIGNAL changes it); Windows has no USR2
PREEMPT_SIGNAL: int | None = getattr(signal, "SIGUSR2", None)


class SaveOnPreemption(pl.Callback):
    """Defers the preemption signal to the end of the current training step and saves `path` there.

    Use it as a callback of the trainer and as a context manager around
    `trainer.fit`: entering puts its handler in front of the one installed
    (only when a Python handler is installed, as submitit's is); leaving puts
    the old one back and hands it a signal still pending.
    """

    def __init__(self, path: Path | str, signum: int | None = PREEMPT_SIGNAL) -> None:
        self.path, self.signum = Path(path), signum
        self._previous: Callable[[int, FrameType | None], Any] | None = None
        self._pending = False

    def __enter__(self) -> SaveOnPreemption:
        installed = signal.getsignal(self.signum) if self.signum is not None else None
        if callable(installed) and threading.current_thread() is threading.main_thread():
            self._previous = installed
            signal.signal(self.signum, self._note)
        return self

    def __exit__(self, kind: type[BaseException] | None = None, error: BaseException | None = None,
                 tb: TracebackType | None = None) -> None:
        previous, self._previous = self._previous, None
        if previous is None:
            return
        signal.signal(self.signum, previous)
        if self._pending:
            self._pending = False
            previous(self.signum, None)  # submitit's: checkpoint() and requeue (exits on rank 0)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self._pending = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._previous is None:
            return
        requested = self._pending
        if trainer.world_size > 1:  # any rank's signal counts, so that every rank saves at the same step
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested:
            trainer.save_checkpoint(self.path)  # a collective under DDP; rank 0 writes
            self._pending = True
            self.__exit__()


def cluster_plugins() -> list[Any]:
    """Under SLURM, Lightning's SLURM environment (ranks, addresses) without its own requeue handler."""
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic wherever the checkpoint lives: the checkpoint streams into a
    temporary file in its own folder, is fsynced and renamed over the name (`common.files.atomic_write`).

    Lightning's own writer serialises the checkpoint into memory, writes it to a temporary file in $TMPDIR and
    moves it over the name; when $TMPDIR is another filesystem (a node-local /tmp while the runs are on a shared
    disk) the move is a copy into the name, which a killed process leaves half-written (the run could then
    never resume), and the temporary file stays in /tmp.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"storage_options is not supported by {type(self).__name__}")
        atomic_write(path, lambda fh: torch.save(checkpoint, fh))


class BestAndLastCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` (the best checkpoint on the monitored metric), with `last.ckpt` written at
    every validation, whether or not the best one changed, and the best checkpoint holding the weights only.

    `last.ckpt` is the whole training state a run resumes from; the best one is only ever read for its weights
    (the test, `experiments.evaluate`, the W&B artifact), so it leaves out the optimizer's state: AdamW's two
    moments would triple its size.

    Since Lightning 2.6, `save_last=True` writes `last.ckpt` only at a step where a top-k checkpoint was saved: a
    run whose validation accuracy did not improve kept an old `last.ckpt`, so that a killed or preempted run
    redid every step since its last improvement (and a run killed after its fit, training it all again from
    there). Here it is written after the top-k one, so that it holds this validation's best-checkpoint state.
    """

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        resume_state = Path(filepath).name == self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION
        self.save_weights_only = not resume_state  # what Lightning's _save_checkpoint passes on
        super()._save_checkpoint(trainer, filepath)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        skip = self._should_skip_saving_checkpoint(trainer)  # before: saving sets the step it checks
        super().on_validation_end(trainer, pl_module)
        if self.save_last and not skip and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
