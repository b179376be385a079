"""Faults at chosen points of a run, for `test_faults` (used only by tests): SIGKILL, SLURM's pre-timeout
signal in a submitit job (`PreemptedJob`), and workers that die holding a lock or write concurrently.
Torch-free until a fault is armed, so that spawned workers start fast.

    python tests/fault_injection.py POINT STEP ARGS...

runs `python -m experiments.train ARGS...` in this process with one fault armed:

    train       SIGKILL in the training step at global step STEP, before its forward pass
    checkpoint  SIGKILL halfway through writing `last.ckpt` at global step STEP: the checkpoint is serialised,
                its first half handed to the file it is being written to (flushed to disk), then the kill
    result      SIGKILL halfway through writing `result.json` (STEP is ignored)

Nothing is cleaned up, as after a real SIGKILL (the OOM killer, SLURM after its grace period, a power cut
of the process): the test then reruns the same command without a fault.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments.slurm import TrainJob  # noqa: E402 - torch-free; needs the repository on the path


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def half_then_die(data: bytes, target: Any) -> None:
    """Write the first half of `data` to `target` (a path or a binary file), make it reach the disk, then die."""
    fh: IO[bytes] = open(target, "wb") if isinstance(target, (str, os.PathLike)) else target  # noqa: SIM115
    fh.write(data[: len(data) // 2])
    fh.flush()
    if hasattr(fh, "fileno"):
        try:
            os.fsync(fh.fileno())
        except (OSError, io.UnsupportedOperation):  # an in-memory buffer
            pass
    die()


def arm_train(step: int) -> None:
    from lightning_modules.classifier import ImageClassifier

    original = ImageClassifier.training_step

    def training_step(self: ImageClassifier, batch: Any, batch_idx: int) -> Any:
        if self.global_step == step:
            die()
        return original(self, batch, batch_idx)

    ImageClassifier.training_step = training_step


def arm_checkpoint(step: int) -> None:
    import lightning.pytorch as pl
    import torch

    original_save, original_checkpoint = torch.save, pl.Trainer.save_checkpoint

    def save_halfway(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        original_save(obj, buffer, *args, **kwargs)
        half_then_die(buffer.getvalue(), f)

    def save_checkpoint(self: pl.Trainer, filepath: Any, *args: Any, **kwargs: Any) -> None:
        if Path(filepath).name == "last.ckpt" and self.global_step == step:
            torch.save = save_halfway
        try:
            original_checkpoint(self, filepath, *args, **kwargs)
        finally:
            torch.save = original_save

    pl.Trainer.save_checkpoint = save_checkpoint


def arm_result() -> None:
    from common import files

    original: Callable[..., Path] = files.atomic_write

    def atomic_write(path: Path | str, write: Callable[[IO[bytes]], None]) -> Path:
        if Path(path).name != "result.json":
            return original(path, write)
        buffer = io.BytesIO()
        write(buffer)
        return original(path, lambda fh: half_then_die(buffer.getvalue(), fh))

    files.atomic_write = atomic_write


def main(argv: list[str]) -> int:
    point, step, args = argv[0], int(argv[1]), argv[2:]
    {"train": lambda: arm_train(step), "checkpoint": lambda: arm_checkpoint(step), "result": arm_result}[point]()
    from experiments import train

    return train.main(args)



class PreemptedJob(TrainJob):
    """A submitit job whose first attempt gets SLURM's pre-timeout signal (USR2) from inside its own process, as
    SLURM would send it: in the training step at global step `step`, or (`step` None) at the first test batch,
    after the fit. submitit's handler then calls `checkpoint`, which requeues a plain TrainJob."""

    def __init__(self, step: int | None) -> None:
        super().__init__(threads=1)
        self.step = step

    def __call__(self, spec_dict: dict[str, Any], runs_dir: str) -> dict[str, Any]:
        from lightning_modules.classifier import ImageClassifier

        name = "training_step" if self.step is not None else "test_step"
        original = getattr(ImageClassifier, name)

        def signalled(module: ImageClassifier, *args: Any, **kwargs: Any) -> Any:
            if self.step is None or module.global_step == self.step:
                setattr(ImageClassifier, name, original)  # once
                signal.raise_signal(signal.SIGUSR2)  # mid-step: before the forward pass
            return original(module, *args, **kwargs)

        setattr(ImageClassifier, name, signalled)
        return super().__call__(spec_dict, runs_dir)



# ------------------------------------------------------------------ workers for multiprocessing (torch-free)
def hold_lock_until_killed(lock_path: str, held: Any) -> None:
    """A worker that takes a run's lock, says so, and never lets go: it dies holding it."""
    from common import files

    with files.file_lock(lock_path):
        held.set()
        time.sleep(600)


def write_many(path: str, writer: int, times: int) -> None:
    """A writer that rewrites one JSON file `times` times with a large payload of its own."""
    from common import files

    for k in range(times):
        files.write_json(path, {"writer": writer, "k": k, "payload": str(writer) * 100_000})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
