"""A run's directory, `runs/SWEEP/RUN_ID/`: its paths, its lock and its files, in one place.

    runs/SWEEP/.RUN_ID.lock        held while a process works on the run (rank 0 under DDP)
    runs/SWEEP/RUN_ID/spec.json    the RunSpec (enough to rerun it)
                      result.json  written last, atomically, checked against common.schema
                      metrics.csv  the attempts' CSV logs merged, one row per logged event
                      checkpoints/best.ckpt   the selected checkpoint's weights
                      checkpoints/last.ckpt   the state to resume from (deleted when the run completes)
                      logs/attemptN.json, logs/attemptN/metrics.csv   one per start of the run
                      error.log    the traceback of a failed run
                      model.pt     the net's weights (pretraining runs: what fine-tuning loads)
                      predictions.npz  the selected checkpoint's test and validation logits and targets
                      robustness.npz   per-image correctness under corruption, occlusion and patch shuffle
                      explain.npz      attention rollout, attention distance, ERF, Grad-CAM (experiments.explain)
                      shift.npz        per-image correctness on CIFAR-10 and its shifted test sets
                      train.log    a sweep worker's output

Torch-free: the sweep runner reads states with it in milliseconds.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager

from common import files, schema

if TYPE_CHECKING:
    from experiments.spec import RunSpec


def ddp_rank() -> int:
    """This process's rank among the DDP processes of one run (0 when it is the only one).

    Read from the variables the launchers set (Lightning's subprocess launcher,
    torchrun, SLURM's srun), as Lightning's own `rank_zero_only` does.
    """
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(key, "0") != "0":
            return int(os.environ[key])
    return 0


@dataclass(frozen=True)
class RunDir:
    """The folder of one run and the files in it.

    Attributes:
        path: `runs_dir/SWEEP/RUN_ID`.
    """

    path: Path

    @classmethod
    def of(cls, runs_dir: Path | str, spec: "RunSpec") -> "RunDir":
        """The directory of `spec`'s run under `runs_dir`: `runs_dir/SWEEP/RUN_ID`."""
        return cls(Path(runs_dir) / spec.sweep / spec.run_id)

    # ------------------------------------------------------------ paths
    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def lock_path(self) -> Path:
        """Beside the run directory, so that taking the lock creates nothing inside it."""
        return self.path.parent / f".{self.path.name}.lock"

    @property
    def spec_json(self) -> Path:
        return self.path / "spec.json"

    @property
    def result_json(self) -> Path:
        return self.path / "result.json"

    @property
    def metrics_csv(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def best_ckpt(self) -> Path:
        return self.checkpoints / "best.ckpt"

    @property
    def last_ckpt(self) -> Path:
        return self.checkpoints / "last.ckpt"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def error_log(self) -> Path:
        return self.path / "error.log"

    @property
    def model_pt(self) -> Path:
        return self.path / "model.pt"

    @property
    def predictions(self) -> Path:
        return self.path / "predictions.npz"

    @property
    def robustness(self) -> Path:
        return self.path / "robustness.npz"

    @property
    def explain(self) -> Path:
        return self.path / "explain.npz"

    @property
    def shift(self) -> Path:
        return self.path / "shift.npz"

    @property
    def worker_log(self) -> Path:
        return self.path / "train.log"

    # ------------------------------------------------------------ lock
    def lock(self, blocking: bool = True) -> ContextManager[None]:
        """The lock that makes the run happen once across processes and runners.

        Rank 0 of a multi-GPU run holds it for all ranks: the others (which
        would otherwise wait for it while rank 0 waits for them) take no lock.

        Raises:
            common.files.Busy: on entering, when `blocking=False` and another process holds it.
        """
        if ddp_rank() > 0:
            return contextlib.nullcontext()
        return files.file_lock(self.lock_path, blocking=blocking)

    def is_locked(self) -> bool:
        """Whether a process works on the run now (creates nothing)."""
        return files.is_locked(self.lock_path)

    # ------------------------------------------------------------ spec and result
    def write_spec(self, spec: dict[str, Any]) -> None:
        files.write_json(self.spec_json, spec)

    def write_result(self, record: dict[str, Any]) -> None:
        """Write result.json atomically, after checking it against the contract.

        Raises:
            schema.ResultError: the record breaks the contract (a bug in the writer).
        """
        schema.check(record)
        files.write_json(self.result_json, record)

    def read_result(self) -> dict[str, Any] | None:
        """The run's result.json, or None when the run has not finished."""
        return files.read_json(self.result_json)

    def completed_result(self) -> dict[str, Any] | None:
        """The run's result when it completed; None when unfinished, failed or diverged."""
        result = self.read_result()
        return result if result is not None and result.get("status") == "completed" else None

    def write_error(self, traceback_text: str) -> None:
        files.write_text(self.error_log, traceback_text)

    def remove_partial_writes(self) -> list[Path]:
        """Delete the temporary files of writes that never finished (`common.files.atomic_write`'s `.NAME.*.tmp`:
        a process killed mid-write leaves one beside the name it was writing); return them.

        Call it only while holding the run's lock: then no other process is writing here.
        """
        partial = [p for folder in (self.path, self.logs, self.checkpoints) for p in folder.glob(".*.tmp")]
        for path in partial:
            path.unlink(missing_ok=True)
        return partial

    # ------------------------------------------------------------ attempts and metrics
    def attempts(self) -> list[Path]:
        """`logs/attemptN.json` of every start of the run, in order."""
        return sorted(self.logs.glob("attempt*.json"), key=lambda p: int(p.stem.removeprefix("attempt")))

    def start_attempt(self, resumed_at_step: int) -> str:
        """Record a start of the run at `resumed_at_step`; return its name (`attemptN`, the CSV logger's version).

        Only rank 0 records it: under DDP the other ranks start too, and must not count as attempts.
        """
        name = f"attempt{len(self.attempts())}"
        if ddp_rank() == 0:
            files.write_json(self.logs / f"{name}.json", {"step": resumed_at_step})
        return name

    def merge_metrics(self) -> None:
        """Join the attempts' CSV logs into metrics.csv, one row per logged event.

        A killed attempt may have logged steps past the checkpoint the next one
        resumed from; those rows are dropped, so no step appears twice.
        """
        attempts = self.attempts()
        starts = [files.read_json(path)["step"] for path in attempts]
        rows: list[dict[str, str]] = []
        for path, next_start in zip(attempts, starts[1:] + [None], strict=True):
            table = path.with_suffix("") / "metrics.csv"
            if table.is_file():
                with open(table, newline="") as f:
                    rows += [r for r in csv.DictReader(f) if next_start is None or int(r.get("step") or 0) < next_start]
        if not rows:
            return
        header = sorted(set().union(*rows), key=lambda k: (k not in ("epoch", "step"), k))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        files.write_text(self.metrics_csv, text.getvalue())
