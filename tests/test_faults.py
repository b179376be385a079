"""What survives what: SIGKILL anywhere, preemption, concurrent workers, dead lock holders, failing and diverging
runs, determinism across runs and machines, and untrusted files (malicious pickles, YAML tags, W&B credentials).

Faults are injected in child processes (`fault_injection.py`); each test reruns what a user would rerun and
checks the end state: one valid result per run, resumed from the last checkpoint, with the final metrics of
an uninterrupted run of the same seed. Faults covered elsewhere: a sweep killed mid-training resumes to its
runs (`test_sweep.test_killed_sweep_resumes_to_exactly_the_expanded_runs`), two runners share a sweep
(`test_sweep.test_two_runners_on_one_sweep_train_each_run_once`), a preemption signal saves at the current
step and the resumed run ends as an uninterrupted one (`test_slurm`).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common import files, schema
from experiments import sweep as sweep_module
from experiments import train
from experiments.rundir import RunDir
from experiments.spec import RunSpec
from experiments.sweep import LocalRunner, load_sweep
from lightning_modules.data import ImageDataModule, SeededShuffle, split_indices, subset_hash
from fault_injection import PreemptedJob, hold_lock_until_killed, write_many
from test_sweep import ENV, REPO, tiny_config, write_sweep

torch.set_num_threads(1)
FAULTS = REPO / "tests" / "fault_injection.py"
# 12 steps of 32 images, 7 batches an epoch, a validation (and last.ckpt) at steps 4, 8 and 12: step 8 is
# mid-epoch, so a resume there goes through the resumable loader
KILL_ARGS = ["--model", "resnet18", "--dataset", "synthetic", "--img-size", "16", "--train-fraction", "0.5",
             "--batch-size", "32", "--val-size", "32", "--min-steps", "12", "--max-steps", "12", "--num-evals", "3",
             "--precision", "32-true", "--wandb", "off", "--sweep", "faults"]
SAME = ("status", "metrics", "selected", "train_steps", "train_images_seen", "n_evals", "subset_hash", "n_train",
        "params", "improving_at_end", "stopped_early")  # what a resumed run must share with an uninterrupted one


def kill_spec() -> RunSpec:
    return train.spec_from_args(train.build_parser().parse_args(KILL_ARGS))


def train_cli(runs: Path, *fault: str) -> subprocess.CompletedProcess:
    """`python -m experiments.train KILL_ARGS`, or with `fault` (POINT STEP) armed by fault_injection.py."""
    command = [str(FAULTS), *fault] if fault else ["-m", "experiments.train"]
    return subprocess.run([sys.executable, *command, *KILL_ARGS, "--runs-dir", str(runs)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=900)


def validations(rundir: RunDir) -> list[tuple[int, str]]:
    """(step, val/acc1) of every validation in the run's merged metrics.csv."""
    with open(rundir.metrics_csv, newline="") as f:
        return [(int(r["step"]), r["val/acc1"]) for r in csv.DictReader(f) if r.get("val/acc1")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], RunDir]:
    """The kill tests' run, from start to end without a fault (the same command, another runs folder)."""
    runs = tmp_path_factory.mktemp("uninterrupted")
    proc = train_cli(runs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rundir = RunDir.of(runs, kill_spec())
    return rundir.read_result(), rundir


def assert_resumed_as_uninterrupted(rundir: RunDir, resumed_at: int, reference: tuple[dict[str, Any], RunDir],
                                    attempts: int = 2) -> None:
    """One valid completed result in the run's sweep, resumed at `resumed_at`, ending as the uninterrupted run."""
    result = rundir.read_result()
    schema.check(result)
    assert sorted(rundir.path.parent.glob("*/result.json")) == [rundir.result_json]
    assert result["resumed_at_step"] == resumed_at and len(rundir.attempts()) == attempts
    expected, expected_dir = reference
    for key in SAME:
        assert result[key] == expected[key], key
    assert validations(rundir) == validations(expected_dir)  # each validation once, with the same accuracy
    assert not [p.name for p in rundir.path.rglob(".*.tmp")]  # nothing half-written left behind


# ------------------------------------------------------------------ kill anywhere
@pytest.mark.slow
@pytest.mark.parametrize("point, step, resumes_at", [
    ("train", 10, 8),  # in a training step: resumes from the validation at 8, mid-epoch
    ("checkpoint", 8, 4),  # halfway through writing last.ckpt at 8: the one from 4 is intact
    ("result", 0, 12),  # halfway through writing result.json: training is over, only the test is redone
], ids=["training", "checkpoint", "result"])
def test_a_run_killed_anywhere_reruns_to_the_uninterrupted_result(
        point: str, step: int, resumes_at: int, uninterrupted: tuple[dict[str, Any], RunDir], tmp_path: Path) -> None:
    killed = train_cli(tmp_path, point, str(step))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]  # the fault was reached
    rundir = RunDir.of(tmp_path, kill_spec())
    if point != "train":  # the kill landed mid-write: half a file beside the name, the name itself untouched
        name = "last.ckpt" if point == "checkpoint" else "result.json"
        assert [p.stat().st_size > 0 for p in rundir.path.rglob(f".{name}.*.tmp")] == [True]
    assert rundir.read_result() is None  # a result is whole or absent, never half
    assert torch.load(rundir.last_ckpt, map_location="cpu", weights_only=True)["global_step"] == resumes_at
    assert not rundir.is_locked()  # the dead process's lock went with it
    rerun = train_cli(tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert_resumed_as_uninterrupted(rundir, resumes_at, uninterrupted)


WRITES: list[Path] | None = None  # while a list: the files opened for writing, by the audit hook below


def _record_writes(event: str, args: tuple) -> None:
    if WRITES is not None and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)) \
            and isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR):
        WRITES.append(Path(os.fsdecode(args[0])))


sys.addaudithook(_record_writes)  # an audit hook cannot be removed: it records only while WRITES is a list


def test_a_checkpoint_is_written_beside_its_name_and_renamed_over_it(tmp_path: Path) -> None:
    """Readers (a resume, a requeued job) see the old checkpoint or the new one: its bytes go to a temporary file in
    the same folder, renamed over the name. Lightning's own writer puts the temporary file in $TMPDIR, and when
    that is another filesystem (a node-local /tmp, runs on a shared disk) the rename becomes a copy into the name,
    which a kill leaves half-written, and the run then fails on every retry."""
    global WRITES
    from experiments.preemption import AtomicCheckpointIO

    target = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint_io = AtomicCheckpointIO()
    WRITES = []
    try:
        checkpoint_io.save_checkpoint({"global_step": 1, "state_dict": {"w": torch.zeros(2)}}, target)
        checkpoint_io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.ones(2)}}, target)  # over it
    finally:
        written, WRITES = WRITES, None
    assert written and all(path.parent == target.parent and path != target for path in written), written
    assert torch.load(target, weights_only=True)["global_step"] == 2
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]


# ------------------------------------------------------------------ preemption (submitit's local executor)
@pytest.mark.slow
@pytest.mark.parametrize("step, resumes_at", [(6, 7), (None, 12)], ids=["in a training step", "while testing"])
def test_a_preempted_submitit_job_requeues_and_ends_as_an_uninterrupted_run(
        step: int | None, resumes_at: int, uninterrupted: tuple[dict[str, Any], RunDir], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import submitit


    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO / "tests"), str(REPO)]))  # the job imports the class
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=30)
    job = executor.submit(PreemptedJob(step), kill_spec().to_dict(), str(tmp_path / "runs"))
    result = job.result()  # the requeued job's
    rundir = RunDir.of(tmp_path / "runs", kill_spec())
    assert result == rundir.read_result()
    assert_resumed_as_uninterrupted(rundir, resumes_at, uninterrupted)


# ------------------------------------------------------------------ concurrency
def test_a_lock_left_by_a_killed_worker_does_not_block(tmp_path: Path) -> None:
    rundir = RunDir(tmp_path / "sweep" / "abc")
    context = multiprocessing.get_context("spawn")
    held = context.Event()
    holder = context.Process(target=hold_lock_until_killed, args=(str(rundir.lock_path), held))
    holder.start()
    assert held.wait(120)
    assert rundir.is_locked()
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(60)
    assert holder.exitcode == -signal.SIGKILL
    assert rundir.lock_path.exists() and not rundir.is_locked()  # the file stays; the OS lock went with the holder
    taken = threading.Event()

    def take() -> None:
        with rundir.lock(blocking=True):
            taken.set()

    waiter = threading.Thread(target=take, daemon=True)
    waiter.start()
    assert taken.wait(60), "a blocking lock on a dead worker's run never came"


def test_concurrent_writers_never_interleave(tmp_path: Path) -> None:
    """Four processes rewrite one result-sized file while this one reads it: every read is one writer's whole file."""
    path = tmp_path / "result.json"
    files.write_json(path, {"writer": 0, "k": -1, "payload": "0" * 100_000})
    context = multiprocessing.get_context("spawn")
    writers = [context.Process(target=write_many, args=(str(path), w, 20)) for w in range(1, 5)]
    for process in writers:
        process.start()
    reads, seen = 0, set()
    while any(p.is_alive() for p in writers):
        data = files.read_json(path)  # a torn or interleaved file would not parse, or mix two payloads
        assert data["payload"] == str(data["writer"]) * 100_000
        reads, seen = reads + 1, seen | {data["writer"]}
    for process in writers:
        process.join(60)
        assert process.exitcode == 0
    assert files.read_json(path)["k"] == 19 and not list(tmp_path.glob(".*.tmp")), (reads, seen)


SHARED_UPSTREAM = ["--model", "resnet18", "--dataset", "synthetic", "--img-size", "16", "--batch-size", "32",
                   "--val-size", "32", "--min-steps", "4", "--max-steps", "4", "--num-evals", "2", "--precision",
                   "32-true", "--wandb", "off", "--sweep", "shared", "--pretraining", "fractaldb", "--pretrain-size",
                   "32", "--pretrain-classes", "2", "--pretrain-steps", "4"]


@pytest.mark.slow
def test_workers_fine_tuning_from_one_pretraining_run_train_it_once(tmp_path: Path) -> None:
    fractions = ("0.25", "0.5", "0.75")
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(len(fractions))]  # noqa: SIM115
    workers = [subprocess.Popen([sys.executable, "-m", "experiments.train", *SHARED_UPSTREAM, "--train-fraction",
                                 fraction, "--runs-dir", str(tmp_path / "runs")], cwd=REPO, env=ENV, stdout=log,
                                stderr=subprocess.STDOUT) for fraction, log in zip(fractions, logs)]
    codes = [worker.wait(timeout=900) for worker in workers]
    for log in logs:
        log.close()
    assert codes == [0] * len(fractions), [(tmp_path / f"worker{i}.log").read_text()[-2000:] for i in range(3)]
    specs = [train.spec_from_args(train.build_parser().parse_args([*SHARED_UPSTREAM, "--train-fraction", f]))
             for f in fractions]
    (upstream,) = {spec.upstream().run_id: spec.upstream() for spec in specs}.values()
    up = RunDir.of(tmp_path / "runs", upstream)
    assert len(up.attempts()) == 1 and up.read_result()["status"] == "completed"  # trained once, by one worker
    steps = [step for step, _ in validations(up)]
    assert len(steps) == len(set(steps)) == 2  # its two validations, each once
    pids = {json.loads(p.read_text())["pid"] for p in (tmp_path / "runs" / "shared").glob("*/result.json")}
    assert len(pids) == len(fractions) and up.read_result()["pid"] in {w.pid for w in workers}
    for spec in specs:
        result = RunDir.of(tmp_path / "runs", spec).read_result()
        assert result["status"] == "completed" and result["pretrained_from"] == upstream.run_id
    for path in (tmp_path / "runs").rglob("*.json"):
        json.loads(path.read_text())  # every file whole: none interleaved


FAKE_RUNNER = """
import os, sys, time
from experiments import sweep, train
from experiments.rundir import RunDir

def fake_run(spec, runs_dir, blocking=True, precision=None):
    rundir = RunDir.of(runs_dir, spec)
    try:
        lock = rundir.lock(blocking=blocking)
        lock.__enter__()
    except sweep.files.Busy:
        return None
    try:
        done = rundir.completed_result()
        if done is None:
            with open(sys.argv[3], "a") as log:
                log.write(f"{spec.run_id} {os.getpid()}\\n")
            time.sleep(0.2)
            rundir.write_result({"schema_version": 2, "run_id": spec.run_id, "sweep": spec.sweep,
                "status": "completed", "error": None, "model": spec.model, "arch": spec.arch,
                "dataset": spec.dataset, "train_fraction": spec.train_fraction, "seed": spec.seed,
                "pretraining": spec.pretraining, "metrics": {"test/acc1": 0.5}, "wall_time_s": 1.0,
                "pid": os.getpid(), "hostname": os.uname().nodename})
            done = rundir.read_result()
        return done
    finally:
        lock.__exit__(None, None, None)

train.run = fake_run
runner = sweep.LocalRunner(sweep.load_sweep(sys.argv[1]), sys.argv[2], estimate=False)
sys.exit(runner.run())
"""


@pytest.mark.slow
def test_many_runners_on_one_sweep_run_each_run_once(tmp_path: Path) -> None:
    """Six runners start together on a 12-run sweep (each run takes its lock for a while): every run is trained by
    exactly one of them, and every runner ends with the whole sweep done."""
    sweep = load_sweep(write_sweep(tmp_path / "tiny.yaml", tiny_config(seed={"values": [0, 1, 2]})))
    log = tmp_path / "trained.log"
    runners = [subprocess.Popen([sys.executable, "-c", FAKE_RUNNER, str(sweep.path), str(tmp_path / "runs"), str(log)],
                                cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(6)]
    outputs = [runner.communicate(timeout=600)[0] for runner in runners]
    assert [r.returncode for r in runners] == [0] * 6, outputs
    trained = [line.split()[0] for line in log.read_text().splitlines()]
    assert sorted(trained) == sorted(s.run_id for s in sweep.ordered)  # each run once
    assert all(re.search(r"\[tiny\] 15/15 done · 0 failed · 0 left", out) for out in outputs)


# ------------------------------------------------------------------ failure and divergence
TINY = dict(dataset="synthetic", model="resnet18", img_size=16, min_steps=8, max_steps=8, num_evals=4, val_size=32,
            batch_size=32, precision="32-true", wandb="off")


@contextlib.contextmanager
def broken(run_faults: dict[int, str]) -> Any:
    """Runs whose seed is a key break in their training step: "raise" (an exception) or "nan" (the loss becomes
    NaN from step 3 on, and stays so, as a run that diverged)."""
    from lightning_modules.classifier import ImageClassifier

    original_forward, original_fit = ImageClassifier.forward, train.fit_and_test
    current: list[RunSpec] = []

    def fit_and_test(spec: RunSpec, *args: Any, **kwargs: Any) -> Any:
        current[:] = [spec]
        return original_fit(spec, *args, **kwargs)

    def forward(self: ImageClassifier, images: torch.Tensor) -> torch.Tensor:
        logits = original_forward(self, images)
        fault = run_faults.get(current[0].seed) if current and self.training else None
        if fault == "raise":
            raise RuntimeError("disk on fire")
        return logits * math.nan if fault == "nan" and self.global_step >= 3 else logits

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ImageClassifier, "forward", forward)
        patch.setattr(train, "fit_and_test", fit_and_test)
        yield


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_diverging_run_stops_as_diverged_naming_the_step(tmp_path: Path) -> None:
    # patience makes Lightning train on to min_steps whatever should_stop says: a run whose loss stays NaN must
    # still end, at the step where it diverged
    spec = RunSpec.create("cpu", **TINY, patience=2)
    with broken({0: "nan"}):
        result = train.run(spec, tmp_path)
    assert result["status"] == "diverged" and re.search(r"non-finite at step 3\b", result["error"]), result["error"]
    assert RunDir.of(tmp_path, spec).read_result() == json.loads(json.dumps(result))


@pytest.mark.slow
def test_a_sweep_goes_on_past_failed_and_diverged_runs_lists_them_and_retries_them(tmp_path: Path) -> None:
    sweep = load_sweep(write_sweep(tmp_path / "tiny.yaml", tiny_config(
        pretraining={"value": "none"}, train_fraction={"value": 0.5}, seed={"values": [0, 1, 2]},
        min_steps={"value": 4}, max_steps={"value": 4}, num_evals={"value": 2})))
    failed, diverged, fine = sweep.runs
    out = io.StringIO()
    with broken({0: "raise", 1: "nan"}):
        assert LocalRunner(sweep, tmp_path, out=out, estimate=False).run() == 1
    text = out.getvalue()
    assert "[tiny] summary" in text, text
    summary = text[text.index("[tiny] summary"):]
    assert re.search(rf"{failed.run_id} .* failed .*trained here", summary)
    assert re.search(rf"{diverged.run_id} .* diverged .*trained here", summary)
    assert re.search(rf"{fine.run_id} .* completed ", summary)
    assert "· RuntimeError: disk on fire" in text and re.search(r"· FloatingPointError: .*non-finite at step 3", text)
    assert "[tiny] 1/3 done · 2 failed · 0 left" in text
    done_at = RunDir.of(tmp_path, fine).result_json.stat().st_mtime_ns
    out = io.StringIO()
    assert LocalRunner(sweep, tmp_path, out=out, estimate=False).run() == 1  # without the flag: skipped
    assert out.getvalue().count("skipped (--retry-failed reruns it)") == 2
    out = io.StringIO()
    assert LocalRunner(sweep, tmp_path, retry_failed=True, out=out, estimate=False).run() == 0
    trained = set(re.findall(r"\((\w{12})\): completed .*· trained here", out.getvalue()))
    assert trained == {failed.run_id, diverged.run_id}
    assert RunDir.of(tmp_path, fine).result_json.stat().st_mtime_ns == done_at  # the completed run left alone


# ------------------------------------------------------------------ determinism
@pytest.mark.slow
def test_the_same_spec_twice_gives_identical_metrics(tmp_path: Path) -> None:
    """The ViT here (fast); ResNet18, in other processes, in the kill tests, whose resumed runs must equal an
    uninterrupted one."""
    spec = RunSpec.create("cpu", **{**TINY, "model": "vit_tiny_p4", "max_steps": 4, "min_steps": 4, "num_evals": 2})
    first, second = train.run(spec, tmp_path / "a"), train.run(spec, tmp_path / "b")
    assert first["status"] == second["status"] == "completed"
    for key in SAME:
        assert first[key] == second[key], key
    assert validations(RunDir.of(tmp_path / "a", spec)) == validations(RunDir.of(tmp_path / "b", spec))


def test_the_subset_hash_is_pinned_for_a_data_seed() -> None:
    """The hash depends only on the indices, and the indices only on numpy's documented `default_rng` streams
    (PCG64 seeded through SeedSequence, `permutation` and `integers`): any machine gets these values. A change here
    changes every run's subset: it must be deliberate."""
    targets = np.arange(1000) % 10
    train_idx, val_idx, _ = split_indices(targets, data_seed=0, train_fraction=0.1, val_size=100)
    assert (len(train_idx), len(val_idx)) == (90, 100)
    assert subset_hash(train_idx) == "d2e13c29ac83dc4e"
    assert subset_hash(val_idx) == "df432ab1f38cbdbc"
    # the definition: SHA-256 of the sorted indices as little-endian 64-bit integers, whatever the machine's order
    portable = b"".join(int(i).to_bytes(8, "little", signed=True) for i in sorted(train_idx.tolist()))
    assert subset_hash(train_idx) == hashlib.sha256(portable).hexdigest()[:16]
    assert subset_hash(train_idx.astype(">i8")) == subset_hash(train_idx.astype("<i4"))
    data = ImageDataModule("synthetic", img_size=16, in_chans=1, batch_size=32, train_fraction=0.5, val_size=32,
                           data_seed=3)
    data.setup()
    assert (data.n_train, data.subset_hash) == (240, "1858c38712f374c8")
    # the order and augmentation seeds of an epoch too (both nets, every machine)
    shuffle = SeededShuffle(8, data_seed=3, batch_size=4)
    assert list(shuffle)[:2] == [(4, 1602354516765361856), (3, 620477143719920643)]
    shuffle.set_epoch(1)
    assert list(shuffle)[:2] == [(7, 2458540983987671756), (6, 3468765964742311197)]


# ------------------------------------------------------------------ safety
class Exploit:
    """Unpickling it runs `touch MARKER`: what a malicious checkpoint, weights file or data file holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.marker}",)


def source_files() -> list[Path]:
    """The suite's Python source (tests excluded)."""
    return [path for folder in ("common", "experiments", "lightning_modules", "analysis")
            for path in sorted((REPO / folder).rglob("*.py"))]


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A file that torch.load(weights_only=False) would open by running code: tensors and one Exploit."""
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "global_step": 4, "x": Exploit(marker)}, path)
    return path


def test_a_malicious_weights_file_is_refused_in_one_line_before_any_work(tmp_path: Path,
                                                                          capfd: pytest.CaptureFixture) -> None:
    marker = tmp_path / "PWNED"
    evil = malicious_checkpoint(tmp_path / "resnet18.pth", marker)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        code = train.main(["--model", "resnet18", "--dataset", "synthetic", "--pretraining", "imagenet",
                           "--weights-file", str(evil), "--wandb", "off", "--runs-dir", str(tmp_path / "runs")])
    out, err = capfd.readouterr()
    assert code == 2 and not out, out
    assert re.fullmatch(r"error: invalid --weights-file='.*resnet18\.pth' \(allowed: .*; it said it holds pickled "
                        r"code, not only tensors \((posix|nt)\.system\): refused, as loading it would run it\)\n",
                        err), err
    assert not marker.exists() and not (tmp_path / "runs").exists()


def test_every_checkpoint_of_a_run_loads_weights_only(tmp_path: Path) -> None:
    """The suite's one loader (resume, the pretraining run's backbone, evaluate) refuses the same file in one line;
    and no other torch.load is left in the source."""
    from lightning_modules.models import ModelError, load_weights

    marker = tmp_path / "PWNED"
    evil = malicious_checkpoint(tmp_path / "last.ckpt", marker)
    with pytest.raises(ModelError) as refused:
        load_weights(evil)
    assert re.fullmatch(r".*last\.ckpt does not load with weights_only \(it holds pickled code, not only tensors "
                        r"\((posix|nt)\.system\): refused, as loading it would run it\)", str(refused.value))
    assert "\n" not in str(refused.value) and not marker.exists()
    truncated = tmp_path / "half.ckpt"
    torch.save({"global_step": 4, "w": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    with pytest.raises(ModelError, match=r"half\.ckpt does not load with weights_only \(\w+: [^\n]+\)$"):
        load_weights(truncated)
    calls = [(str(path.relative_to(REPO)), line.strip()) for path in source_files()  # code, not `quoted` in text
             for line in path.read_text().splitlines() if re.search(r"(?<!`)\b(torch|pickle)\.loads?\(", line)]
    assert [(path, "weights_only=True" in line) for path, line in calls] == [("lightning_modules/models.py", True)]


def test_a_malicious_cifar_batch_is_refused(tmp_path: Path) -> None:
    import pickle

    from lightning_modules.datasets import DataError, DataRequest, load_cifar

    marker = tmp_path / "PWNED"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = {"data": np.zeros((2, 3072), dtype=np.uint8), "labels": [0, 1]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": Exploit(marker)}))
    with pytest.raises(DataError, match=r"^dataset=cifar10: .*batches\.meta is not a CIFAR batch \(it holds pickled "
                                        r"code \((posix|nt)\.system\): refused"):
        load_cifar(DataRequest("cifar10", tmp_path))
    assert not marker.exists()


PYTHON_TAG = '!!python/object/apply:os.system ["touch {marker}"]'


def test_yaml_is_read_safely_a_python_tag_is_refused_and_never_run(tmp_path: Path,
                                                                   capfd: pytest.CaptureFixture) -> None:
    from experiments import sweep as sweep_cli

    marker = tmp_path / "PWNED"
    config = tiny_config()
    config["parameters"]["seed"] = "__TAG__"
    path = write_sweep(tmp_path / "tiny.yaml", config)
    path.write_text(path.read_text().replace("__TAG__", PYTHON_TAG.format(marker=marker)))
    assert sweep_cli.main([str(path), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "python/object" in err, err
    # a train flag is read as YAML too (booleans and mappings): the tag stays text and is refused as a value
    code = train.main(["--dataset", "synthetic", "--model-kwargs", PYTHON_TAG.format(marker=marker), "--wandb", "off",
                       "--runs-dir", str(tmp_path / "runs")])
    err = capfd.readouterr().err
    assert code == 2 and err.startswith("error: invalid model_kwargs=") and err.count("\n") == 1, err
    assert not marker.exists() and not (tmp_path / "runs").exists()
    # and the source has no other way in: no yaml.load, unsafe_load, full_load or a Loader of Python objects
    unsafe = re.compile(r"yaml\.(load|unsafe_load|full_load|load_all|unsafe_load_all|full_load_all)\(|"
                        r"yaml\.(Unsafe|Full)?Loader\b|Loader=")
    found = [f"{path.relative_to(REPO)}: {line.strip()}" for path in source_files()
             for line in path.read_text().splitlines() if unsafe.search(line)]
    assert not found, found


FAKE_WANDB_KEY = "fake1wandb1key1" + "9" * 25  # a W&B key's 40 characters


@pytest.mark.slow
def test_a_wandb_key_in_the_environment_never_reaches_a_run_folder_or_its_output(tmp_path: Path) -> None:
    """An offline W&B run (the mode with credentials and no network) writes its spec, result, logs, checkpoints and
    W&B's own files; none holds the key, nor does the output. Run from tmp_path, so files written relative to the
    working directory are searched too."""
    runs = tmp_path / "runs"
    env = {**ENV, "WANDB_API_KEY": FAKE_WANDB_KEY, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO),
           "WANDB_DIR": str(tmp_path), "WANDB_CACHE_DIR": str(tmp_path / "cache"),
           "WANDB_CONFIG_DIR": str(tmp_path / "config")}
    args = [a for a in KILL_ARGS if a not in ("--wandb", "off")]
    for flag, value in (("--min-steps", "4"), ("--max-steps", "4"), ("--num-evals", "2")):
        args[args.index(flag) + 1] = value
    proc = subprocess.run([sys.executable, "-m", "experiments.train", *args, "--wandb", "offline", "--runs-dir",
                           str(runs)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rundir,) = [p.parent for p in runs.rglob("result.json")]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in rundir.rglob("*")), "no offline W&B run was written"  # it was on
    assert {"spec.json", "result.json", "metrics.csv"} <= {p.name for p in rundir.iterdir()}
    leaks = [str(p.relative_to(tmp_path)) for p in written if FAKE_WANDB_KEY.encode() in p.read_bytes()]
    assert not leaks and FAKE_WANDB_KEY not in proc.stdout + proc.stderr, leaks
