"""The run directory: paths, the run's lock, checked and atomic results, merged metrics."""

from __future__ import annotations

import csv
import json
import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from common import schema
from common.files import Busy, file_lock, write_json
from experiments.rundir import RunDir
from experiments.spec import RunSpec
from lightning_modules.vit_config import ARCH_FIELDS


def minimal_result(run_id: str, status: str = "completed") -> dict:
    """The smallest record the contract accepts."""
    return {"schema_version": schema.SCHEMA_VERSION, "run_id": run_id, "sweep": "adhoc", "status": status,
            "model": "resnet18", "arch": "cnn", "dataset": "synthetic", "train_fraction": 1.0, "seed": 0,
            "pretraining": "none", "metrics": {"test/acc1": 0.5}}


def test_paths_follow_the_spec(tmp_path: Path) -> None:
    spec = RunSpec.create("cpu", sweep="demo")
    rundir = RunDir.of(tmp_path, spec)
    assert rundir.path == tmp_path / "demo" / spec.run_id and rundir.run_id == spec.run_id
    assert rundir.lock_path == tmp_path / "demo" / f".{spec.run_id}.lock"  # beside the run, as before
    assert rundir.last_ckpt == rundir.path / "checkpoints" / "last.ckpt"
    assert not tmp_path.joinpath("demo").exists()  # naming paths creates nothing


def test_result_is_checked_before_it_is_written(tmp_path: Path) -> None:
    rundir = RunDir(tmp_path / "adhoc" / "abc")
    assert rundir.read_result() is None and rundir.completed_result() is None
    with pytest.raises(schema.ResultError, match="arch"):
        rundir.write_result({**minimal_result("abc"), "arch": "mlp"})
    assert not rundir.result_json.exists()
    rundir.write_result(minimal_result("abc"))
    assert rundir.completed_result() == minimal_result("abc")
    assert [p.name for p in rundir.path.iterdir()] == ["result.json"]  # no temp file left
    rundir.write_result(minimal_result("abc", status="failed"))
    assert rundir.read_result()["status"] == "failed" and rundir.completed_result() is None


def _hold(lock_path: str, held: Any, release: Any) -> None:
    """Another process: hold the lock until `release` is set."""
    with file_lock(lock_path):
        held.set()
        release.wait(30)


def test_lock_is_exclusive_across_processes_and_seen_by_is_locked(tmp_path: Path) -> None:
    rundir = RunDir(tmp_path / "adhoc" / "abc")
    assert not rundir.is_locked() and not rundir.lock_path.exists()  # asking creates nothing
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(rundir.lock_path), held, release))
    holder.start()
    try:
        assert held.wait(60)
        assert rundir.is_locked()
        with pytest.raises(Busy), rundir.lock(blocking=False):
            pass
    finally:
        release.set()
        holder.join(60)
    assert not rundir.is_locked()
    with rundir.lock(blocking=False):
        pass


def test_ddp_ranks_after_the_first_take_no_lock_and_record_no_attempt(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    rundir = RunDir(tmp_path / "adhoc" / "abc")
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    with file_lock(rundir.lock_path):  # rank 0 (or another runner) holds it
        with pytest.raises(Busy), rundir.lock(blocking=False):
            pass
        assert rundir.start_attempt(0) == "attempt0"
        monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP rank that Lightning or srun started
        with rundir.lock(blocking=False):
            pass
        rundir.start_attempt(0)
        assert len(rundir.attempts()) == 1  # rank 0's only


def test_resumed_attempts_merge_into_one_metrics_csv(tmp_path: Path) -> None:
    """A killed attempt logged steps 0-9 but checkpointed at 6; the resumed attempt redoes 6-11."""
    rundir = RunDir(tmp_path)
    for start, steps, column in ((0, range(10), "train/loss"), (6, range(6, 12), "val/acc1")):
        attempt = rundir.start_attempt(start)
        (rundir.logs / attempt).mkdir()
        with open(rundir.logs / attempt / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["step", column])
            writer.writeheader()
            writer.writerows({"step": s, column: s / 100} for s in steps)
    assert [p.name for p in rundir.attempts()] == ["attempt0.json", "attempt1.json"]
    assert json.loads((rundir.logs / "attempt1.json").read_text()) == {"step": 6}
    rundir.merge_metrics()
    rows = list(csv.DictReader(open(rundir.metrics_csv)))
    assert [int(r["step"]) for r in rows] == list(range(12))
    assert rows[0]["train/loss"] == "0.0" and rows[0]["val/acc1"] == "" and rows[-1]["val/acc1"] == "0.11"


def test_attempts_are_ordered_by_number_not_by_name(tmp_path: Path) -> None:
    rundir = RunDir(tmp_path)
    for n in (0, 2, 10, 1):
        write_json(rundir.logs / f"attempt{n}.json", {"step": n})
    assert [p.stem for p in rundir.attempts()] == ["attempt0", "attempt1", "attempt2", "attempt10"]
    assert rundir.start_attempt(12) == "attempt4"


def test_a_result_written_before_schema_2_still_counts_as_completed(tmp_path: Path) -> None:
    from experiments.train import run

    spec = RunSpec.create("cpu", model="resnet50", train_fraction=0.1)
    old = {**minimal_result(spec.run_id), "schema_version": 1, "model": "resnet50", "dataset": "fashion_mnist",
           "train_fraction": 0.1, "spec": {k: v for k, v in spec.to_dict().items() if k not in (*ARCH_FIELDS, "model_kwargs")}}
    write_json(RunDir.of(tmp_path, spec).result_json, old)  # as the version-1 writer left it
    schema.check(old)
    assert run(spec, tmp_path) == old  # found, not trained again
