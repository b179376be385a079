"""SLURM through submitit: per-run dependencies, preemption (save at the current step, requeue, resume exactly),
data prepared once per node, mid-epoch resumable training loader."""

from __future__ import annotations

import io
import multiprocessing
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset

from common import files
from experiments import ddp
from experiments.rundir import RunDir
from experiments.slurm import RESOURCES, SlurmRunner, TrainJob, resources_for
from experiments.spec import RunSpec
from experiments.sweep import SweepError, load_sweep, main
from lightning_modules.data import SeededShuffle
from lightning_modules.resumable import ResumableDataLoader
from ddp_fixtures import srun_rank
from test_sweep import ENV, TINY, completed, fake_result, run_dirs, sweep_cli, tiny_config, write_sweep

FAKE_SBATCH = """#!/bin/sh
n=$(( $(cat "$FAKE_SLURM/counter" 2>/dev/null || echo 41) + 1 ))
echo $n > "$FAKE_SLURM/counter"
cp "$1" "$FAKE_SLURM/sbatch_$n.sh"
echo "Submitted batch job $n"
"""


# ------------------------------------------------------------------ submission
def fake_slurm(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A PATH with a fake `sbatch` (records each script, answers job 42, 43, ...) and `srun`."""
    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "srun").write_text("#!/bin/sh\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    return {**ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM": str(record)}, record


def submitted_runs(runs_dir: Path) -> dict[str, str]:
    """run_id -> the SLURM job id (ARRAYID_TASK, or JOBID alone) submitit pickled it under."""
    from submitit.core.utils import DelayedSubmission

    jobs = {}
    for pickle in runs_dir.glob("*/.submitit/*/*_submitted.pkl"):
        spec = RunSpec.from_dict(DelayedSubmission.load(pickle).args[0])
        jobs[spec.run_id] = pickle.name.removesuffix("_submitted.pkl")
    return jobs


def test_each_run_waits_for_its_own_pretraining_job_only(tmp_path: Path) -> None:
    env, record = fake_slurm(tmp_path)
    config = tiny_config(profile={"value": "cluster"}, seed={"values": [0, 1, 2]}, precision=None, batch_size=None)
    sweep = load_sweep(write_sweep(tmp_path / "cl.yaml", config))
    assert (len(sweep.upstream), len(sweep.runs)) == (3, 12)
    runs = tmp_path / "runs"
    fake_result(sweep.runs[0], runs, "completed")  # done runs are not submitted again
    fake_result(sweep.upstream[1], runs, "completed")  # its runs need not wait
    proc = sweep_cli(tmp_path / "cl.yaml", "--executor", "slurm", "--runs-dir", runs, "--partition", "gpu",
                     "--account", "vision", "--constraint", "a100", "--array-parallelism", "3", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if " submitted " in line]
    assert lines == ["[cl] submitted 2 runs as cl-pretrain (job 42)", "[cl] submitted 7 runs as cl (job 43)",
                     "[cl] submitted 2 runs as cl (job 44, afterok:42_0)",
                     "[cl] submitted 2 runs as cl (job 45, afterok:42_1)"], proc.stdout
    scripts = {n: (record / f"sbatch_{n}.sh").read_text() for n in (42, 43, 44, 45)}
    for script in scripts.values():
        for flag in ("--gpus-per-node=4", "--ntasks-per-node=4", "--cpus-per-task=10", "--mem=256GB",
                     "--time=1440", "--partition=gpu", "--account=vision", "--constraint=a100", "--nodes=1",
                     "--signal=USR2@120", "--requeue"):
            assert f"#SBATCH {flag}\n" in script, (flag, script)
        assert "submitit.core._submit" in script
    assert "#SBATCH --array=0-1%2\n" in scripts[42] and "--dependency" not in scripts[42]
    assert "#SBATCH --array=0-6%3\n" in scripts[43] and "--dependency" not in scripts[43]
    for n, task in ((44, "42_0"), (45, "42_1")):
        assert f"#SBATCH --dependency=afterok:{task}\n" in scripts[n]
        assert "#SBATCH --kill-on-invalid-dep=yes\n" in scripts[n] and "#SBATCH --array=0-1%2\n" in scripts[n]
    # what each job runs: every run waits for exactly the job that trains its own pretraining run
    jobs = submitted_runs(runs)
    dependency = {str(n): (re.findall(r"--dependency=afterok:(\S+)", s) or [None])[0] for n, s in scripts.items()}
    done = {sweep.runs[0].run_id, sweep.upstream[1].run_id}
    assert set(jobs) == {s.run_id for s in sweep.ordered} - done
    for spec in sweep.runs:
        if spec.run_id in done:
            continue
        up = spec.upstream()
        waits_for = dependency[jobs[spec.run_id].split("_")[0]]
        assert waits_for == (jobs[up.run_id] if up is not None and up.run_id not in done else None), spec


def test_slurm_resources_follow_the_profile_and_the_runs_devices(tmp_path: Path) -> None:
    cluster = load_sweep(write_sweep(tmp_path / "cl.yaml", tiny_config(profile={"value": "cluster"})))
    assert resources_for(cluster, {}) == RESOURCES["cluster"]
    assert resources_for(cluster, {"time_min": 60, "partition": "p"}).time_min == 60
    with pytest.raises(SweepError, match="--gpus-per-run: value 2 not allowed"):
        resources_for(cluster, {"gpus_per_run": 2})
    cpu = load_sweep(TINY)
    assert resources_for(cpu, {}).gpus_per_run == 0 and resources_for(cpu, {"gpus_per_run": 1}).gpus_per_run == 1
    out = io.StringIO()
    assert main([str(cluster.path), "--dry-run", "--executor", "slurm", "--mem-gb", "300", "--runs-dir",
                 str(tmp_path)], out=out) == 0
    assert "slurm, per run: 4 GPUs, 4 tasks, 10 cpus per task, 300 GB, 1440 min" in out.getvalue()
    assert "each run after its own pretraining job (afterok)" in out.getvalue()
    assert main([str(cluster.path), "--dry-run", "--executor", "slurm", "--gpus-per-run", "8"]) == 2


def test_slurm_executor_without_slurm_is_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun
    assert main([str(TINY), "--executor", "slurm", "--runs-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no SLURM here" in err


@pytest.mark.slow
def test_submitit_local_array_runs_to_completion(tmp_path: Path) -> None:
    config = tiny_config(pretraining={"value": "none"}, min_steps={"value": 4}, max_steps={"value": 4},
                         num_evals={"value": 2})
    sweep = load_sweep(write_sweep(tmp_path / "two.yaml", config))
    out = io.StringIO()
    assert SlurmRunner(sweep, tmp_path, RESOURCES["cpu"], cluster="local", out=out).run() == 0, out.getvalue()
    assert run_dirs(tmp_path, "two") == completed(tmp_path, "two") == {s.run_id for s in sweep.runs}
    assert "[two] 2/2 done · 0 failed · 0 left" in out.getvalue()


# ------------------------------------------------------------------ preemption
PREEMPT = dict(dataset="synthetic", model="resnet18", wandb="off", img_size=16, train_fraction=0.5, batch_size=32,
               val_size=32, min_steps=20, max_steps=20, num_evals=4, precision="32-true")  # 7 batches an epoch


def test_preempted_job_requeues_the_same_run() -> None:
    spec = load_sweep(TINY).runs[0].to_dict()
    submission = TrainJob(threads=4, verbose=True).checkpoint(spec, "runs")
    assert isinstance(submission.function, TrainJob) and submission.function.threads == 4
    assert submission.function.verbose and submission.args == (spec, "runs") and not submission.kwargs


class Requeued(SystemExit):
    """What submitit's handler does after `checkpoint()`: requeue, then exit."""


def preempted_run(spec: RunSpec, runs_dir: Path, at_step: int, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Run `spec` with SIGUSR2 raised inside the training step at `at_step` and a submitit-like handler
    installed; return the steps at which that handler was called (it exits)."""
    from experiments import train
    from lightning_modules.classifier import ImageClassifier

    handled: list[int] = []
    step = ImageClassifier.training_step

    def signalling_step(self: ImageClassifier, batch: Any, batch_idx: int) -> Any:
        if self.global_step == at_step and not handled:
            signal.raise_signal(signal.SIGUSR2)  # mid-step: before the forward pass and the optimizer step
        return step(self, batch, batch_idx)

    def submitit_handler(signum: int, frame: Any) -> None:
        handled.append(torch.load(RunDir.of(runs_dir, spec).last_ckpt, weights_only=True)["global_step"])
        raise Requeued(-1)

    monkeypatch.setattr(ImageClassifier, "training_step", signalling_step)
    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        with pytest.raises(Requeued):
            train.run(spec, runs_dir)
    finally:
        signal.signal(signal.SIGUSR2, previous)
        monkeypatch.undo()
    return handled


@pytest.mark.slow
def test_a_preemption_signal_saves_a_checkpoint_at_the_current_step(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    spec = RunSpec.create("cpu", **{**PREEMPT, "min_steps": 8, "max_steps": 8, "num_evals": 2})
    handled = preempted_run(spec, tmp_path, at_step=5, monkeypatch=monkeypatch)
    rundir = RunDir.of(tmp_path, spec)
    # the signal came during step 6 (global_step 5 before it): last.ckpt holds step 6, not the validation at 4
    assert handled == [6] and torch.load(rundir.last_ckpt, weights_only=True)["global_step"] == 6
    assert rundir.read_result() is None and not rundir.is_locked()  # not a result: the requeued job finishes it
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL  # the handler before the run is back


@pytest.mark.slow
def test_a_run_resumed_after_preemption_ends_as_an_uninterrupted_one(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments import train

    spec = RunSpec.create("cpu", **PREEMPT)
    assert preempted_run(spec, tmp_path / "a", at_step=11, monkeypatch=monkeypatch) == [12]  # epoch 1, batch 5
    resumed = train.run(spec, tmp_path / "a")
    uninterrupted = train.run(spec, tmp_path / "b")
    assert resumed["status"] == uninterrupted["status"] == "completed" and resumed["resumed_at_step"] == 12
    assert resumed["metrics"] == uninterrupted["metrics"]
    assert resumed["selected"] == uninterrupted["selected"] and resumed["train_steps"] == 20
    assert resumed["train_images_seen"] == uninterrupted["train_images_seen"]


@pytest.mark.slow
def test_submitit_requeues_a_preempted_job_which_resumes_at_the_saved_step(tmp_path: Path) -> None:
    import submitit

    spec = RunSpec.create("cpu", **{**PREEMPT, "min_steps": 240, "max_steps": 240, "num_evals": 2})
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=30)
    job = executor.submit(TrainJob(threads=1), spec.to_dict(), str(tmp_path / "runs"))
    attempts = RunDir.of(tmp_path / "runs", spec).logs
    deadline = time.monotonic() + 240
    while not (attempts / "attempt0.json").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # some steps in, before the first validation (step 120)
    # USR2 to the job's process, as SLURM sends it before the time limit (the local controller forwards only
    # its own timeout's signal)
    controller = job._process.pid
    (task,) = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
    os.kill(int(task), signal.SIGUSR2)
    result = job.result()  # of the requeued job: a second attempt of the run, from the step saved at the signal
    resumed_at = files.read_json(attempts / "attempt1.json")["step"]
    assert result["status"] == "completed" and 0 < result["resumed_at_step"] == resumed_at < 120


def test_lightning_does_not_requeue_on_its_own_under_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from experiments.preemption import cluster_plugins

    for key in ("SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_JOB_NAME"):
        monkeypatch.delenv(key, raising=False)
    assert cluster_plugins() == []
    for key, value in {"SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NAME": "cl"}.items():
        monkeypatch.setenv(key, value)
    (plugin,) = cluster_plugins()
    assert isinstance(plugin, SLURMEnvironment) and plugin.auto_requeue is False


# ------------------------------------------------------------------ mid-epoch resume
class Positions(Dataset):
    """Item `(i, seed)` is `i`: which samples a batch holds."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, item: tuple[int, int]) -> int:
        return item[0]


@pytest.mark.parametrize("workers", [0, 1])
def test_the_training_loader_resumes_mid_epoch_at_the_next_batch(workers: int) -> None:
    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(Positions(), batch_size=4, sampler=SeededShuffle(40, data_seed=3, batch_size=4),
                                   num_workers=workers, collate_fn=list, persistent_workers=workers > 0)

    def epoch(dl: ResumableDataLoader, number: int, stop: int | None = None) -> list[list[int]]:
        dl.sampler.set_epoch(number)
        batches = []
        for batch in dl:
            batches.append(list(map(int, batch)))
            if len(batches) == stop:
                break
        return batches

    full = loader()
    first, second = epoch(full, 2), epoch(full, 3)
    interrupted = loader()
    assert epoch(interrupted, 2, stop=4) == first[:4]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batches": 4}
    resumed = loader()
    resumed.load_state_dict(state)
    assert [list(map(int, b)) for b in resumed] == first[4:]  # the epoch's other batches, nothing twice
    assert epoch(resumed, 3) == second  # then whole epochs again
    at_end = loader()
    at_end.load_state_dict({"epoch": 2, "batches": len(at_end)})  # saved after an epoch's last batch
    assert [list(map(int, b)) for b in at_end] == second


# ------------------------------------------------------------------ data prepared once per node
@pytest.mark.slow
def test_local_rank_zero_downloads_and_the_other_ranks_wait(tmp_path: Path) -> None:
    launch = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_RESTART_COUNT": "0"}
    context = multiprocessing.get_context("spawn")
    ranks = [context.Process(target=srun_rank, args=(rank, str(tmp_path), launch, 1.0 if rank == 0 else 0.0))
             for rank in (1, 2, 0)]  # ranks 1 and 2 arrive first
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(60)
    assert [p.exitcode for p in ranks] == [0, 0, 0]
    assert (tmp_path / "downloads").read_text() == "0\n"  # one download, by local rank 0
    loaded = (tmp_path / "loaded").read_text().splitlines()
    assert loaded[0] == "0 images" and sorted(loaded[1:]) == ["1 images", "2 images"]


def test_the_other_ranks_fail_with_local_rank_zeros_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    for key, value in {"SLURM_JOB_ID": "78", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("LOCAL_RANK", raising=False)

    def offline() -> None:
        raise ValueError("dataset=cifar10: files not found in /data and download failed (URLError)")

    with pytest.raises(ValueError, match="download failed"):
        ddp.prepare_once_per_node(offline, "cifar10")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(ValueError, match="local rank 0 failed to prepare it: dataset=cifar10: files not found"):
        ddp.prepare_once_per_node(lambda: None, "cifar10", poll_s=0.01, wait_s=1)
    monkeypatch.setenv("SLURM_JOB_ID", "79")  # a launch whose rank 0 never gets there
    with pytest.raises(ValueError, match="did not prepare it within 0 s"):
        ddp.prepare_once_per_node(lambda: None, "cifar10", poll_s=0.01, wait_s=0.1)


def test_outside_srun_each_process_prepares_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("SLURM_JOB_ID", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")  # Lightning's launcher starts rank 1 after rank 0 has prepared
    calls: list[int] = []
    ddp.prepare_once_per_node(lambda: calls.append(1), "synthetic", wait_s=0)
    assert calls == [1] and ddp.launch_id() is None and ddp.local_rank() == 1
