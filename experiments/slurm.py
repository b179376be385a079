"""A sweep on SLURM through submitit (DeiT's launcher pattern): job arrays, per-run dependencies, requeue.

    python -m experiments.sweep experiments/sweeps/data_efficiency.yaml --executor slurm \\
        [--partition P] [--account A] [--gpus-per-run G] [--cpus-per-task C] [--mem-gb M]
        [--time-min T] [--array-parallelism K] [--constraint C] [--wait]

The pretraining runs go first, as one array. Every other run depends on the
one pretraining job it fine-tunes from (`afterok:ARRAYID_TASK`), so runs that
need no pretraining (or whose pretraining completed before) start at once,
and a failed pretraining job cancels only the runs that need it
(`kill-on-invalid-dep`). Runs that wait for the same job share an array; each
array runs at most `--array-parallelism` jobs at once.

A run is one node with one task per GPU (Lightning DDP under srun). SLURM
sends USR2 `SIGNAL_DELAY_S` before the time limit; the job saves its
checkpoint at the current step (`experiments.preemption`) and submitit
requeues it (`TrainJob.checkpoint`); the requeued job resumes from that step.

Torch-free until a job runs; submitit is imported when submitting.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from experiments import console
from experiments.rundir import RunDir
from experiments.spec import RunSpec
from experiments.sweep import (
    EXIT_FAILED,
    Outcome,
    Progress,
    Sweep,
    SweepError,
    available_cpus,
    blocked,
    blocking_upstream,
    initial_outcomes,
    plural,
    write_manifest,
)

SIGNAL_DELAY_S = 120  # SLURM sends USR2 this long before the time limit: the job saves, submitit requeues it


@dataclass(frozen=True)
class Resources:
    """What one run asks SLURM for (per profile; every field can be overridden on the command line).

    `gpus_per_run` is 0 or the spec's `devices`: a run is one node with
    `tasks_per_node == devices` processes, as Lightning's DDP expects.
    """

    gpus_per_run: int
    cpus_per_task: int
    mem_gb: int
    time_min: int
    array_parallelism: int
    partition: str | None = None
    account: str | None = None
    constraint: str | None = None


RESOURCES: dict[str, Resources] = {
    "cpu": Resources(gpus_per_run=0, cpus_per_task=2, mem_gb=8, time_min=120, array_parallelism=8),
    "gpu": Resources(gpus_per_run=1, cpus_per_task=8, mem_gb=64, time_min=12 * 60, array_parallelism=32),
    "cluster": Resources(gpus_per_run=4, cpus_per_task=10, mem_gb=256, time_min=24 * 60, array_parallelism=16),
}


class TrainJob:
    """One run as a submitit job (DeiT's `run_with_submitit` pattern).

    On the pre-timeout signal the running fit saves `last.ckpt` at its current
    step (`experiments.preemption`), then submitit calls `checkpoint`, which
    requeues the same call; `train.run` resumes from that checkpoint.

    Args:
        threads: torch threads (None: torch's default).
        verbose: print everything the libraries print (`experiments.console`).
    """

    def __init__(self, threads: int | None = None, verbose: bool = False) -> None:
        self.threads, self.verbose = threads, verbose

    def __call__(self, spec_dict: dict[str, Any], runs_dir: str) -> dict[str, Any]:
        """Train the run (or return its result); raise when it did not complete, so SLURM marks the job FAILED."""
        console.configure(self.verbose)
        if self.threads:
            os.environ.update(OMP_NUM_THREADS=str(self.threads), MKL_NUM_THREADS=str(self.threads))
            import torch

            torch.set_num_threads(self.threads)
        from experiments import train

        result = train.run(RunSpec.from_dict(spec_dict), runs_dir)
        if result["status"] != "completed":
            raise RuntimeError(f"run {result['run_id']} {result['status']}: {result['error']}")
        return result

    def checkpoint(self, spec_dict: dict[str, Any], runs_dir: str) -> Any:
        """submitit's hook on preemption/timeout: the same call, requeued."""
        import submitit

        return submitit.helpers.DelayedSubmission(TrainJob(self.threads, self.verbose), spec_dict, runs_dir)


def resources_for(sweep: Sweep, overrides: dict[str, Any]) -> Resources:
    """The profile's resources with the command line's overrides, checked against the specs' `devices`."""
    res = dataclasses.replace(RESOURCES[sweep.profile], **{k: v for k, v in overrides.items() if v is not None})
    devices = sorted({s.devices for s in sweep.ordered})
    if len(devices) > 1:
        raise SweepError(f"{sweep.path}: parameter devices: value {devices} not allowed "
                         "(allowed: one value per SLURM sweep)")
    if res.gpus_per_run not in (0, devices[0]):
        raise SweepError(f"--gpus-per-run: value {res.gpus_per_run} not allowed (allowed: 0 or the runs' devices, "
                         f"{devices[0]}: one DDP process per GPU; set devices in the sweep file)")
    return res


def executor_parameters(res: Resources, devices: int, name: str, after: str | None) -> dict[str, Any]:
    """submitit AutoExecutor parameters for one job array (`after`: the job id it waits for, afterok)."""
    extra: dict[str, Any] = {"requeue": True}
    if after:  # a failed pretraining job cancels the array instead of leaving it pending forever
        extra.update({"dependency": f"afterok:{after}", "kill-on-invalid-dep": "yes"})
    params: dict[str, Any] = dict(
        name=name, nodes=1, tasks_per_node=devices, cpus_per_task=res.cpus_per_task, mem_gb=res.mem_gb,
        timeout_min=res.time_min, slurm_array_parallelism=res.array_parallelism,
        slurm_signal_delay_s=SIGNAL_DELAY_S, slurm_additional_parameters=extra)
    if res.gpus_per_run:
        params["gpus_per_node"] = res.gpus_per_run
    for key in ("partition", "account", "constraint"):
        if getattr(res, key):
            params[f"slurm_{key}"] = getattr(res, key)
    return params


class SlurmRunner:
    """Submits a sweep through submitit: the pretraining array, then the other runs, each after its own
    pretraining job (see the module docstring).

    `cluster` is submitit's: "slurm" (detected when None), or "local" to run
    the arrays as local processes (all at once, one thread each when the
    cores are few; with no scheduler to hold dependencies, the other runs are
    submitted once the pretraining array has ended).
    """

    def __init__(self, sweep: Sweep, runs_dir: Path, resources: Resources, retry_failed: bool = False,
                 wait: bool = False, cluster: str | None = None, out: TextIO = sys.stdout) -> None:
        import submitit

        self.cluster = cluster or submitit.AutoExecutor.which()
        if self.cluster != "slurm" and cluster is None:
            raise SweepError("--executor slurm: no SLURM here (srun not found) (allowed: --executor local)")
        self.sweep, self.res, self.retry_failed = sweep, resources, retry_failed
        self.runs_dir = Path(runs_dir).resolve()  # the jobs may start elsewhere
        self.wait = wait or self.cluster != "slurm"
        self.progress = Progress(sweep, resources.array_parallelism, out)
        self.jobs: list[tuple[Any, RunSpec]] = []

    def run(self) -> int:
        """Submit (and, with `wait`, follow) the arrays. Returns the exit code."""
        write_manifest(self.sweep, self.runs_dir)
        for outcome in initial_outcomes(self.sweep, self.runs_dir, self.retry_failed).values():
            self.progress.record(outcome, quiet=True)
        self.progress.header(f"to submit ({self.cluster})")
        try:
            self._submit_all()
            if self.wait:
                self._follow()
        finally:
            self.progress.close()
        if not self.wait:
            self.progress.say(f"submitted; follow with squeue, or `python -m experiments.sweep {self.sweep.path} "
                              f"--dry-run --runs-dir {self.runs_dir}`")
            return 0
        self.progress.say("summary\n" + self.progress.summary())
        done, failed, left = self.progress.counts()
        return 0 if failed == left == 0 else EXIT_FAILED

    def _submit_all(self) -> None:
        """The pretraining array, then one array per pretraining job that runs wait for (and one for the runs
        that wait for none)."""
        outcomes = self.progress.outcomes
        upstream = [s for s in self.sweep.upstream if s.run_id not in outcomes]
        upstream_jobs = self._submit(upstream, f"{self.sweep.name}-pretrain", None)
        if upstream_jobs and self.cluster != "slurm":  # no scheduler dependencies: wait here
            self._follow()
            upstream_jobs = {}
        waiting: dict[str | None, list[RunSpec]] = {None: []}  # by the job id they wait for
        for spec in self.sweep.runs:
            ended = blocking_upstream(spec, outcomes)
            if ended is not None:
                self.progress.record(blocked(spec, ended))
            elif spec.run_id not in outcomes:
                up = spec.upstream()
                waiting.setdefault(upstream_jobs.get(up.run_id) if up is not None else None, []).append(spec)
        for after, specs in waiting.items():
            self._submit(specs, self.sweep.name, after)

    def _submit(self, specs: list[RunSpec], name: str, after: str | None) -> dict[str, str]:
        """Submit `specs` as one array (one job when alone); return each run's job id ({} when none)."""
        if not specs:
            return {}
        import submitit

        executor = submitit.AutoExecutor(folder=self.runs_dir / self.sweep.name / ".submitit" / "%j",
                                         cluster=self.cluster)
        executor.update_parameters(**executor_parameters(self.res, specs[0].devices, name, after))
        threads = self.res.cpus_per_task if self.cluster == "slurm" else max(1, available_cpus() // len(specs))
        job = TrainJob(threads, console.is_verbose())
        with executor.batch():
            jobs = [executor.submit(job, spec.to_dict(), str(self.runs_dir)) for spec in specs]
        self.jobs += list(zip(jobs, specs, strict=True))
        array_id = jobs[0].job_id.split("_")[0]
        waits = f", afterok:{after}" if after else ""
        self.progress.say(f"submitted {plural(len(specs), 'run')} as {name} (job {array_id}{waits})")
        return {spec.run_id: job.job_id for job, spec in zip(jobs, specs, strict=True)}

    def _follow(self) -> None:
        """Wait for the submitted jobs, recording each as it ends."""
        poll_s = 30.0 if self.cluster == "slurm" else 0.5
        while self.jobs:
            for job, spec in [(j, s) for j, s in self.jobs if j.done()]:
                self.jobs.remove((job, spec))
                try:
                    result, note = job.result(), f"job {job.job_id}"
                except Exception as exc:  # the job raised, died or was cancelled: its result.json says how
                    result = RunDir.of(self.runs_dir, spec).read_result()
                    note = f"job {job.job_id}: {str(exc).strip().splitlines()[-1][:200] if str(exc) else exc!r}"
                ended = blocking_upstream(spec, self.progress.outcomes)
                if result is None and ended is not None:
                    self.progress.record(blocked(spec, ended))
                    continue
                status = result["status"] if result else "failed"
                self.progress.record(Outcome(spec, status, note, result), (result or {}).get("wall_time_s"))
            if self.jobs:
                time.sleep(poll_s)
