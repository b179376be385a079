"""Many runs: a W&B-format sweep file -> validated RunSpecs -> an executor.

    python -m experiments.sweep experiments/sweeps/default.yaml [--dry-run] [--max-parallel N]
        [--retry-failed] [--runs-dir runs] [-v]
    python -m experiments.sweep experiments/sweeps/data_efficiency.yaml --executor slurm \\
        [--partition P] [--account A] [--gpus-per-run G] [--cpus-per-task C] [--mem-gb M]
        [--time-min T] [--array-parallelism K] [--constraint C] [--wait]

A sweep file is W&B's own sweep format (`method: grid` or `random` with
`run_cap`; `parameters: {field: {value: x} | {values: [...]}}`; `command`
calling `experiments.train`), so `wandb sweep FILE` + `wandb agent` run it
unchanged. The `profile` parameter picks the defaults (cpu | gpu | cluster);
the `sweep` parameter names runs/SWEEP/ and the W&B group (default: the file
stem).

Every run of the grid is validated before anything starts (one line, exit
code 2, no torch import); the file is untrusted input (`common.untrusted`: at
most a MiB of UTF-8, YAML through `safe_load`, bounded once aliases are
expanded) and its grid holds at most `MAX_RUNS` runs, refused before it is
expanded. Pretraining runs are scheduled first, once each.
Completed runs are skipped, interrupted ones resume from their last
checkpoint, failed or diverged ones are reported and skipped unless
`--retry-failed`. Several runners on one sweep share the work: a run held by
another runner is left to it and waited for at the end. `--executor slurm`
submits job arrays instead (`experiments.slurm`).

Output (`experiments.console`): a line per run start and per result, and the
sweep's progress with its ETA (a live bar on a terminal, a line after each
run elsewhere); third-party noise only with `-v`.

Exit code: 0 when every run completed (or, on SLURM, was submitted), 1 when
some failed, diverged or were blocked by a failed pretraining run, 2 on bad
input.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import yaml

from common import files, untrusted
from common.untrusted import brief
from experiments import console
from experiments.console import describe, format_duration
from experiments.precision import SETTLED_FILE, Choice
from experiments.rundir import RunDir
from experiments.spec import PROFILES, RunSpec, SpecError

if TYPE_CHECKING:
    from experiments.slurm import Resources

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_BUSY = 1, 2, 3
MAX_RUNS = 10_000  # runs in one sweep's grid (the shipped data_efficiency sweep has 252)
METHODS = ("grid", "random")
# W&B's top-level sweep keys (https://docs.wandb.ai/guides/sweeps/sweep-config-keys)
TOP_LEVEL_KEYS = ("program", "command", "method", "parameters", "metric", "name", "description", "project",
                  "entity", "run_cap", "early_terminate")
PARAMETERS = tuple(f.name for f in dataclasses.fields(RunSpec) if f.name != "role")


class SweepError(ValueError):
    """A sweep file or a runner option is not allowed; str() is one line."""


# ================================================================== sweep files
@dataclass(frozen=True)
class Sweep:
    """An expanded, validated sweep.

    Attributes:
        name: runs/NAME/ and the W&B group.
        path: the sweep file.
        runs: the grid's runs, in grid order.
        upstream: the pretraining runs they fine-tune from, once each, in order of first need.
        swept: the parameters with several values.
    """

    name: str
    path: Path
    runs: tuple[RunSpec, ...]
    upstream: tuple[RunSpec, ...]
    swept: tuple[str, ...] = ()
    metric: str = "selected/val/acc1"

    @property
    def ordered(self) -> list[RunSpec]:
        """Every run in the order a runner takes them: seed by seed (a complete first seed of every cell
        before the second, so a sweep stopped early is still a comparison), each pretraining run just
        before the first run that needs it, grid order within a seed."""
        upstream = {spec.run_id: spec for spec in self.upstream}
        ordered: list[RunSpec] = []
        for spec in sorted(self.runs, key=lambda s: s.seed):  # stable: grid order within a seed
            up = spec.upstream()
            if up is not None and up.run_id in upstream:
                ordered.append(upstream.pop(up.run_id))
            ordered.append(spec)
        return ordered

    def manifest(self) -> dict[str, Any]:
        """What `runs/SWEEP/sweep.json` says: the expected runs, so a report on a partial sweep names what
        is missing."""
        def row(spec: RunSpec) -> dict[str, Any]:
            up = spec.upstream()
            return {"run_id": spec.run_id, "role": spec.role, "model": spec.model, "arch": spec.arch,
                    "dataset": spec.dataset, "train_fraction": spec.train_fraction, "pretraining": spec.pretraining,
                    "pretrain_size": spec.pretrain_size if spec.pretraining == "fractaldb" else None,
                    "seed": spec.seed, "upstream": up.run_id if up is not None else None,
                    **{name: getattr(spec, name) for name in self.swept if name not in ("sweep",)}}

        return {"name": self.name, "file": str(self.path), "swept": list(self.swept),
                "runs": [row(spec) for spec in self.ordered]}

    @property
    def profile(self) -> str:
        """The one profile of every run (cpu | gpu | cluster)."""
        return self.runs[0].profile


def load_sweep(path: Path | str) -> Sweep:
    """Read, expand and validate a sweep file (torch-free, milliseconds).

    Raises:
        SweepError: one line naming the file, the parameter and the value.
    """
    path = Path(path)
    config = _read_config(path)
    values = _parameter_values(path, config["parameters"])
    combos = _combinations(config, values)
    values.setdefault("sweep", [path.stem])
    runs = [_build_spec(path, {**combo, "sweep": values["sweep"][0]}, values) for combo in combos]
    upstream: dict[str, RunSpec] = {}
    for spec in runs:
        up = spec.upstream()
        if up is not None:
            upstream.setdefault(up.run_id, up)
    swept = tuple(name for name, v in values.items() if len(v) > 1)
    metric = (config.get("metric") or {}).get("name", Sweep.metric)
    return Sweep(name=runs[0].sweep, path=path, runs=tuple(runs), upstream=tuple(upstream.values()), swept=swept,
                 metric=metric)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = untrusted.read_bounded(path)
    except OSError as exc:
        raise SweepError(f"{path}: cannot read the sweep file ({exc.strerror})") from None
    try:
        config = untrusted.load_yaml(untrusted.decode(data))
    except untrusted.InputError as exc:
        raise SweepError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(exc, "problem", None) or type(exc).__name__).split())
        raise SweepError(f"{path}: malformed YAML: {problem}{where}") from None
    if not isinstance(config, dict):
        raise SweepError(f"{path}: not a sweep (allowed: a mapping with method and parameters)")
    for key in config:
        if key not in TOP_LEVEL_KEYS:
            raise SweepError(f"{path}: key {brief(key)} not allowed (allowed: {', '.join(TOP_LEVEL_KEYS)})")
    method = config.get("method", "grid")
    if not (isinstance(method, str) and method in METHODS):
        raise SweepError(f"{path}: method: value {brief(method)} not allowed (allowed: {' | '.join(METHODS)})")
    run_cap = config.get("run_cap")
    if (run_cap is not None or method == "random") and not (_is_int(run_cap) and run_cap > 0):
        raise SweepError(f"{path}: run_cap: value {brief(run_cap)} not allowed "
                         f"(allowed: an integer > 0; required with method random)")
    metric = config.get("metric", {"name": Sweep.metric})
    if not (isinstance(metric, dict) and isinstance(metric.get("name", Sweep.metric), str)):
        raise SweepError(f"{path}: metric: value {brief(metric)} not allowed "
                         "(allowed: a mapping with a name, e.g. {name: test/acc1})")
    if not isinstance(config.get("parameters"), dict) or not config["parameters"]:
        raise SweepError(f"{path}: parameters: missing (allowed: a mapping of RunSpec fields to "
                         "{value: x} or {values: [x, ...]})")
    return config


def _parameter_values(path: Path, parameters: dict[str, Any]) -> dict[str, list[Any]]:
    """{name: [values]} from W&B's `{value: x}` / `{values: [...]}` entries; a grid of more than MAX_RUNS runs is
    refused before anything walks it."""
    values: dict[str, list[Any]] = {}
    for name, entry in parameters.items():
        if name not in PARAMETERS:
            raise SweepError(f"{path}: parameter {brief(name)} not allowed (allowed: {', '.join(PARAMETERS)})")
        if isinstance(entry, dict) and set(entry) == {"value"}:
            values[name] = [entry["value"]]
        elif isinstance(entry, dict) and set(entry) == {"values"} and isinstance(entry["values"], list) \
                and entry["values"]:
            values[name] = entry["values"]
        else:
            raise SweepError(f"{path}: parameter {name}: {brief(entry)} not allowed "
                             "(allowed: {value: x} or {values: [x, ...]}, a non-empty list)")
    runs = math.prod(len(v) for v in values.values())
    if runs > MAX_RUNS:
        sizes = " x ".join(f"{len(v)} {name}" for name, v in values.items() if len(v) > 1)
        raise SweepError(f"{path}: parameters: a grid of {runs} runs ({sizes}) not allowed "
                         f"(allowed: at most {MAX_RUNS} runs per sweep, MAX_RUNS)")
    for name in values:
        for i, value in enumerate(values[name]):
            if value in values[name][:i]:
                raise SweepError(f"{path}: parameter {name}: value {brief(value)} not allowed "
                                 "(allowed: each value once)")
    for name in ("profile", "sweep"):
        if len(values.get(name, [None])) > 1:
            allowed = " | ".join(PROFILES) if name == "profile" else "a name"
            raise SweepError(f"{path}: parameter {name}: value {brief(values[name])} not allowed "
                             f"(allowed: one value per sweep: {allowed})")
    return values


def _combinations(config: dict[str, Any], values: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The grid in order (last parameter fastest); `random` takes a fixed shuffle of it.

    The shuffle is seeded, so rerunning a random sweep resumes the same runs,
    and raising `run_cap` only adds runs.
    """
    names = list(values)
    grid = [dict(zip(names, combo, strict=True)) for combo in itertools.product(*(values[n] for n in names))]
    if config.get("method", "grid") == "random":
        random.Random(0).shuffle(grid)
    return grid[: config.get("run_cap") or len(grid)]


def _build_spec(path: Path, combo: dict[str, Any], values: dict[str, list[Any]]) -> RunSpec:
    overrides = {k: v for k, v in combo.items() if k != "profile"}
    try:
        return RunSpec.create(combo.get("profile", "cpu"), **overrides)
    except SpecError as exc:
        hint = " (YAML reads unquoted on/off/yes/no as booleans: quote it)" if isinstance(exc.value, bool) else ""
        if exc.field_name in values:
            raise SweepError(f"{path}: parameter {exc.field_name}: value {brief(exc.value)} not allowed "
                             f"(allowed: {exc.allowed}){hint}") from None
        run = ", ".join(f"{k}={brief(v)}" for k, v in combo.items() if len(values.get(k, ())) > 1)
        raise SweepError(f"{path}: {exc.field_name}={brief(exc.value)} not allowed (allowed: {exc.allowed}) "
                         f"in the run {run or 'of the sweep'}") from None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# ================================================================== run states
def run_state(spec: RunSpec, runs_dir: Path) -> str:
    """What runs_dir holds for a spec: completed | failed | diverged | running | resumable | pending."""
    rundir = RunDir.of(runs_dir, spec)
    result = rundir.read_result()
    if result is not None and result["status"] == "completed":
        return "completed"
    if rundir.is_locked():
        return "running"
    if result is not None:
        return result["status"]
    return "resumable" if rundir.last_ckpt.is_file() else "pending"


@dataclass
class Outcome:
    """How one run ended for this runner.

    Attributes:
        status: completed | failed | diverged | blocked (its pretraining run did not complete).
        note: how this runner got there (trained here, done before, skipped, a job id...).
        result: the run's result.json, when there is one.
    """

    spec: RunSpec
    status: str
    note: str
    result: dict[str, Any] | None = None


def initial_outcomes(sweep: Sweep, runs_dir: Path, retry_failed: bool) -> dict[str, Outcome]:
    """Runs that need no work now: completed ones, and failed ones unless retried (by run_id)."""
    outcomes: dict[str, Outcome] = {}
    for spec in sweep.ordered:
        result = RunDir.of(runs_dir, spec).read_result()
        if result is None:
            continue
        if result["status"] == "completed":
            outcomes[spec.run_id] = Outcome(spec, "completed", "done before", result)
        elif not retry_failed:
            outcomes[spec.run_id] = Outcome(spec, result["status"], "skipped (--retry-failed reruns it)", result)
    return outcomes


def blocking_upstream(spec: RunSpec, outcomes: dict[str, Outcome]) -> Outcome | None:
    """The outcome of the spec's pretraining run when that run ended without completing."""
    up = spec.upstream()
    ended = outcomes.get(up.run_id) if up is not None else None
    return ended if ended is not None and ended.status != "completed" else None


def blocked(spec: RunSpec, upstream: Outcome) -> Outcome:
    """The outcome of a run that cannot start because its pretraining run ended as `upstream`."""
    return Outcome(spec, "blocked", f"pretraining run {upstream.spec.run_id} {upstream.status}")


# ================================================================== reporting
def available_cpus() -> int:
    """The CPUs this process may use, on any OS: `os.process_cpu_count()` (Python 3.13+), else the affinity
    mask where the OS has one (Linux), else `os.cpu_count()`."""
    process_cpu_count = getattr(os, "process_cpu_count", None)
    if process_cpu_count is not None:
        return process_cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def plural(n: int, word: str) -> str:
    """`1 run`, `3 runs`."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned text columns, two spaces apart, indented by two."""
    widths = [max(map(len, column)) for column in zip(header, *rows, strict=True)]
    lines = ("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows])
    return "\n".join("  " + line for line in lines)


def metric_value(result: dict[str, Any] | None, metric: str) -> float | None:
    """The sweep file's metric in a result: `selected/<name>` (the validation that chose the checkpoint) or a
    metric name (`test/acc1`)."""
    if result is None:
        return None
    if metric.startswith("selected/"):
        return (result.get("selected") or {}).get(metric.removeprefix("selected/"))
    return (result.get("metrics") or {}).get(metric)


def _acc(result: dict[str, Any] | None, metric: str) -> str:
    """The metric in percent, or '-'."""
    value = metric_value(result, metric)
    return f"{100 * value:.1f}%" if value is not None else "-"


SPEC_COLUMNS = {"run_id": "run_id", "role": "role", "model": "model", "dataset": "dataset",
                "fraction": "train_fraction", "pretraining": "pretraining", "seed": "seed"}


def spec_columns(sweep: Sweep) -> dict[str, str]:
    """Table column -> RunSpec field: the usual ones, plus any other swept parameter."""
    extra = [name for name in sweep.swept if name not in SPEC_COLUMNS.values()]
    return {**SPEC_COLUMNS, **{name: name for name in extra}}


def spec_cells(spec: RunSpec, columns: dict[str, str]) -> list[str]:
    """The spec's values for `columns`, as table cells."""
    values = [getattr(spec, name) for name in columns.values()]
    return [f"{v:g}" if isinstance(v, float) else str(v) for v in values]


def summary_table(sweep: Sweep, outcomes: list[Outcome]) -> str:
    """One row per run: what it is (run_id, model, fraction, pretraining, seed...), status, the sweep's metric
    (validation accuracy of the selected checkpoint unless the sweep file names another), wall time."""
    columns = spec_columns(sweep)
    rows = []
    for o in outcomes:
        wall = (o.result or {}).get("wall_time_s")
        rows.append([*spec_cells(o.spec, columns), o.status, _acc(o.result, sweep.metric),
                     format_duration(wall) if wall is not None else "-", o.note])
    return format_table([*columns, "status", sweep.metric, "wall", "note"], rows)


class Progress:
    """Prints a line per finished run and the sweep's progress: `[NAME] 5/16 done · 0 failed · 11 left · ETA 12m30s`.

    The ETA is the runs left's estimated durations (`estimates`: from step
    times measured before the sweep, `experiments.eta`), scaled by how long
    the runs trained here took against their estimates, divided by the runs
    in flight at once; without estimates, the mean time of the runs trained
    here times the runs left.

    On a terminal the progress is a live bar (`experiments.console.bars`)
    whose ETA counts down between runs, and the lines print above it; `close`
    ends the bar, leaving its last state as a line.
    """

    def __init__(self, sweep: Sweep, parallel: int, out: TextIO) -> None:
        self.sweep, self.parallel, self.out = sweep, parallel, out
        self.total = len(sweep.ordered)
        self.outcomes: dict[str, Outcome] = {}
        self.durations: list[float] = []
        self.estimates: dict[str, float] = {}
        self._estimated_done: list[tuple[float, float]] = []  # (estimate, actual) of runs trained here
        self.bars = console.bars(out)
        self._bar: Any = None
        self._updated = time.monotonic()  # when the ETA was last computed

    def say(self, text: str) -> None:
        line = f"[{self.sweep.name}] {text}"
        if self.bars is not None:
            self.bars.print(line)
        else:
            print(line, file=self.out, flush=True)

    def record(self, outcome: Outcome, seconds: float | None = None, quiet: bool = False) -> None:
        """Note a run's end; `seconds`: how long it trained, for the ETA (None when it did not train here)."""
        self.outcomes[outcome.spec.run_id] = outcome
        if seconds is not None:
            self.durations.append(seconds)
            if outcome.spec.run_id in self.estimates:
                self._estimated_done.append((self.estimates[outcome.spec.run_id], seconds))
        if not quiet:
            metric = self.sweep.metric
            acc = f" · {metric} {_acc(outcome.result, metric)}" if outcome.status == "completed" else ""
            error = f" · {outcome.result['error']}" if outcome.result and outcome.result.get("error") else ""
            took = f" · {format_duration(seconds)}" if seconds is not None else ""
            self.say(f"{describe(outcome.spec)}: {outcome.status}{acc}{took} · {outcome.note}{error}")
            self.show()

    def header(self, what: str) -> None:
        """The opening line: how many runs, how many need no work (and, on a terminal, the bar)."""
        done, failed, left = self.counts()
        self.say(f"{self.sweep.path}: {plural(self.total, 'run')} ({len(self.sweep.upstream)} pretraining): "
                 f"{done} done, {failed} failed or skipped, {left} {what}")
        if self.bars is not None:
            self.show()

    def show(self) -> None:
        """The progress now: the bar on a terminal, else a line."""
        self._updated = time.monotonic()
        if self.bars is None:
            self.say(self.line())
            return
        done, failed, _ = self.counts()
        if self._bar is None:
            self._bar = self.bars.add(f"[{self.sweep.name}]", self.total, done + failed, _Countdown(self))
        else:
            self.bars.update(self._bar, done + failed, _Countdown(self))

    def close(self) -> None:
        """End the live bar, if any, with its last state as a line."""
        if self._bar is not None:
            self.bars.remove(self._bar)
            self._bar = None
            self.say(self.line())

    def counts(self) -> tuple[int, int, int]:
        done = sum(o.status == "completed" for o in self.outcomes.values())
        failed = len(self.outcomes) - done
        return done, failed, self.total - done - failed

    def eta_seconds(self) -> float | None:
        """Seconds until every run left has ended, or None when nothing is known yet."""
        left = [s.run_id for s in self.sweep.ordered if s.run_id not in self.outcomes]
        if not left:
            return 0.0
        if left and all(run_id in self.estimates for run_id in left):
            scale = 1.0
            if self._estimated_done:
                scale = sum(a for _, a in self._estimated_done) / sum(e for e, _ in self._estimated_done)
            return scale * sum(self.estimates[run_id] for run_id in left) / self.parallel
        if self.durations:
            return sum(self.durations) / len(self.durations) * len(left) / self.parallel
        return None

    def line(self, elapsed: float = 0.0) -> str:
        """`5/16 done · 0 failed · 11 left · ETA 12m30s`, the ETA less `elapsed` seconds since it was computed."""
        done, failed, left = self.counts()
        eta = self.eta_seconds()
        eta_text = "?" if eta is None else format_duration(max(0.0, eta - elapsed))
        return f"{done}/{self.total} done · {failed} failed · {left} left · ETA {eta_text}"

    def summary(self) -> str:
        ordered = [self.outcomes[s.run_id] for s in self.sweep.ordered if s.run_id in self.outcomes]
        return summary_table(self.sweep, ordered)


class _Countdown:
    """A live bar's status: the sweep's progress line, its ETA counting down since it was computed (rich
    formats it each time it draws the bar)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def __str__(self) -> str:
        return self.progress.line(time.monotonic() - self.progress._updated)


# ================================================================== dry run
def dry_run(sweep: Sweep, runs_dir: Path, retry_failed: bool, out: TextIO, resources: Resources | None = None) -> int:
    """Print the runs the sweep would launch, pretraining first, which are done or failed, and
    (given `resources`) what each SLURM job would ask for."""
    rows, launch, columns = [], 0, spec_columns(sweep)
    states = {spec.run_id: run_state(spec, runs_dir) for spec in sweep.ordered}
    for i, spec in enumerate(sweep.ordered, 1):
        state = states[spec.run_id]
        up = spec.upstream()
        if state in ("failed", "diverged") and not retry_failed:
            state += " (skipped; --retry-failed reruns it)"
        elif up is not None and states[up.run_id] in ("failed", "diverged") and not retry_failed:
            state = f"blocked (pretraining {states[up.run_id]})"
        elif state != "completed":
            launch += 1
        rows.append([str(i), *spec_cells(spec, columns), up.run_id if up else "-", state])
    n_up = len(sweep.upstream)
    print(f"[{sweep.name}] {sweep.path}: {len(sweep.ordered)} runs ({n_up} pretraining, {len(sweep.runs)} "
          f"training), profile {sweep.profile}, in {Path(runs_dir) / sweep.name}/", file=out)
    print(format_table(["#", *columns, "upstream", "state"], rows), file=out)
    done = sum(s == "completed" for s in states.values())
    failed = sum(s in ("failed", "diverged") for s in states.values())
    print(f"[{sweep.name}] dry run: would launch {plural(launch, 'run')} (pretraining first); {done} done, "
          f"{failed} failed", file=out)
    if resources is not None:
        where = ", ".join(f"{k} {getattr(resources, k)}" for k in ("partition", "account", "constraint")
                          if getattr(resources, k))
        print(f"[{sweep.name}] slurm, per run: {resources.gpus_per_run} GPUs, {sweep.runs[0].devices} tasks, "
              f"{resources.cpus_per_task} cpus per task, {resources.mem_gb} GB, {resources.time_min} min"
              f"{', ' + where if where else ''}; each array at most {resources.array_parallelism} at once; "
              "each run after its own pretraining job (afterok), the others at once", file=out)
    return 0


def write_manifest(sweep: Sweep, runs_dir: Path) -> None:
    """Write `runs_dir/SWEEP/sweep.json`: the runs the sweep expects (the report marks those missing)."""
    files.write_json(Path(runs_dir) / sweep.name / "sweep.json", sweep.manifest())


# ================================================================== local executor
def _worker(spec_dict: dict[str, Any], runs_dir: str, threads: int, blocking: bool, log_path: str,
            precision: Choice, verbose: bool) -> None:
    """A worker process: one run on `threads` threads, its output appended to `log_path`.

    Exit code 0 (the run has a result), 2 (bad input, the reason on stderr) or
    3 (another process holds the run and `blocking` is False).
    """
    os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    console.configure(verbose)
    import torch

    from experiments import train

    torch.set_num_threads(threads)
    try:
        result = train.run(RunSpec.from_dict(spec_dict), runs_dir, blocking=blocking, precision=precision)
    except ValueError as exc:  # SpecError, DataError, ModelError
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    sys.exit(EXIT_BUSY if result is None else 0)


@dataclass
class _Running:
    spec: RunSpec
    process: multiprocessing.process.BaseProcess
    started: float
    log: Path


class LocalRunner:
    """Runs a sweep on this machine: in this process one run at a time, or `parallel` worker processes.

    A run starts once its pretraining run has completed; a run whose
    pretraining failed is blocked. Runs are tried without waiting for their
    lock; one held by another runner is deferred and, when nothing else is
    left, waited for (so every runner ends with everything done).
    """

    def __init__(self, sweep: Sweep, runs_dir: Path, parallel: int = 1, retry_failed: bool = False,
                 out: TextIO = sys.stdout, estimate: bool = True) -> None:
        from experiments.precision import detect

        cores = available_cpus()
        self.sweep, self.runs_dir, self.retry_failed, self.estimate = sweep, Path(runs_dir), retry_failed, estimate
        self.parallel = max(1, min(parallel, cores))
        self.threads = max(1, cores // self.parallel)
        self.progress = Progress(sweep, self.parallel, out)
        self.running: dict[int, _Running] = {}
        self.deferred: list[RunSpec] = []
        self.bad_input: str | None = None
        # resolved once for the whole sweep, so both nets of every comparison share it (`_settle_precision`)
        self.hardware = detect()
        self.precision: dict[str, Choice] = {}
        self.step_times: dict[tuple, Any] = {}  # eta.net_key -> eta.StepTimes, measured here

    def run(self) -> int:
        """Run every run that needs it; print progress and a summary. Returns the exit code."""
        write_manifest(self.sweep, self.runs_dir)
        for outcome in initial_outcomes(self.sweep, self.runs_dir, self.retry_failed).values():
            self.progress.record(outcome, quiet=True)
        queue = [s for s in self.sweep.ordered if s.run_id not in self.progress.outcomes]
        self._settle_precision(queue)
        mode = ("in this process" if self.parallel == 1
                else f"{self.parallel} at a time, {plural(self.threads, 'thread')} each")
        self.progress.header(f"to run ({mode})")
        if queue:
            precisions = sorted(set(self.precision[s.run_id].precision for s in queue))
            how = sorted(set(self.precision[s.run_id].hardware for s in queue))
            self.progress.say(f"precision {', '.join(precisions)} on {'; '.join(how)}, the same for every run")
        if queue and self.estimate:
            self._estimate(queue)
        try:
            self._drain(queue)
        finally:
            for running in self.running.values():  # interrupted: stop the workers (their runs resume later)
                running.process.terminate()
                running.process.join()
            self.progress.close()
        if self.bad_input is not None:
            print(self.bad_input, file=sys.stderr)
            return EXIT_BAD_INPUT
        self.progress.say("summary\n" + self.progress.summary())
        done, failed, left = self.progress.counts()
        return 0 if failed == left == 0 else EXIT_FAILED

    def _estimate(self, queue: list[RunSpec]) -> None:
        """Measure each net's step time here, then print the sweep's ETA."""
        from experiments import eta

        estimates: dict[str, float] = {}
        used: dict[tuple, eta.StepTimes] = {}
        for spec in queue:
            precision = self.precision[spec.run_id].precision
            key = eta.net_key(spec, precision)
            used[key] = eta.measure_all([spec], [precision], self.step_times)[key]
            estimates[spec.run_id] = eta.estimate_seconds(spec, used[key]) * self.parallel
        self.progress.estimates.update(estimates)
        if self.progress.bars is not None:  # the bar's ETA counts down from now
            self.progress.show()
        measured = "; ".join(f"{eta.net_label(key)} {t.train_step_s:.2f} s/step" for key, t in used.items())
        total = self.progress.eta_seconds() or 0.0
        self.progress.say(f"ETA {format_duration(total)} (at most: runs with patience may stop early), "
                          f"from step times measured here: {measured}")

    def _settle_precision(self, queue: list[RunSpec]) -> None:
        """Resolve every run's precision once for the sweep. `auto` on a CPU with native bf16 is settled by
        timing this sweep's nets in both precisions, and kept in `runs/SWEEP/precision.json`, so that a resumed
        sweep goes on in the precision its finished runs used."""
        from experiments import eta
        from experiments.precision import (TIMED, check_timeable, load_settled, rule_choice, settled_by_timing,
                                           timed_choice)

        timed = [spec for spec in queue if settled_by_timing(spec.precision, self.hardware)]
        settled = None
        if timed:
            path = self.runs_dir / self.sweep.name / SETTLED_FILE
            try:
                for spec in timed:
                    check_timeable(spec.precision, self.hardware, spec.devices)
                settled = load_settled(path, self.hardware)
            except ValueError as exc:
                raise SweepError(str(exc)) from None
            if settled is None:
                self.progress.say(f"timing {plural(len({eta.net_key(s, TIMED[0]) for s in timed}), 'net')} in "
                                  f"{' and '.join(TIMED)} to settle precision auto on this CPU")
                estimated, self.step_times = eta.time_precisions(timed, TIMED, self.step_times)
                settled = timed_choice(self.hardware, estimated)
                files.write_json(path, settled.to_dict())
        for spec in queue:
            self.precision[spec.run_id] = (settled if settled_by_timing(spec.precision, self.hardware) else
                                           rule_choice(spec.precision, self.hardware))

    def _drain(self, queue: list[RunSpec]) -> None:
        while self.bad_input is None and (queue or self.deferred or self.running):
            spec = self._next_ready(queue)
            if spec is not None:
                self._start(spec, blocking=False)
            elif self.running:
                self._wait_one()
            elif self.deferred:
                self._start(self.deferred.pop(0), blocking=True)
            else:
                break
        while self.running:
            self._wait_one()

    def _next_ready(self, queue: list[RunSpec]) -> RunSpec | None:
        """Pop the first run whose pretraining has completed (recording blocked ones), if a slot is free."""
        if len(self.running) >= self.parallel:
            return None
        for spec in list(queue):
            up = spec.upstream()
            ended = blocking_upstream(spec, self.progress.outcomes)
            if ended is not None:
                queue.remove(spec)
                self.progress.record(blocked(spec, ended))
            elif up is None or up.run_id in self.progress.outcomes:
                queue.remove(spec)
                return spec
        return None

    def _start(self, spec: RunSpec, blocking: bool) -> None:
        if self.parallel == 1:
            self._run_here(spec, blocking)
            return
        log = RunDir.of(self.runs_dir, spec).worker_log
        log.parent.mkdir(parents=True, exist_ok=True)
        process = multiprocessing.get_context("spawn").Process(
            target=_worker, args=(spec.to_dict(), str(self.runs_dir), self.threads, blocking, str(log),
                                  self.precision[spec.run_id], console.is_verbose()),
            name=f"run-{spec.run_id}")
        process.start()
        self.progress.say(f"{describe(spec)}: started, output in {log}")
        self.running[process.sentinel] = _Running(spec, process, time.perf_counter(), log)

    def _run_here(self, spec: RunSpec, blocking: bool) -> None:
        from experiments import train

        t0 = time.perf_counter()
        try:
            result = train.run(spec, self.runs_dir, blocking=blocking, precision=self.precision[spec.run_id])
        except ValueError as exc:  # bad input: nothing was written; stop the sweep
            self.bad_input = f"error: {spec.run_id}: {exc}"
            return
        except Exception as exc:  # noqa: BLE001 - one broken run must not end the sweep
            self.progress.record(Outcome(spec, "failed", f"{type(exc).__name__}: {exc}".splitlines()[0],
                                         RunDir.of(self.runs_dir, spec).read_result()))
            return
        self._finish(spec, result, os.getpid(), time.perf_counter() - t0)

    def _wait_one(self) -> None:
        for sentinel in multiprocessing.connection.wait(list(self.running)):
            running = self.running.pop(sentinel)
            running.process.join()
            code, spec = running.process.exitcode, running.spec
            if code == EXIT_BAD_INPUT:
                lines = running.log.read_text(errors="replace").strip().splitlines()
                self.bad_input = f"{lines[-1] if lines else 'error'} ({spec.run_id}, see {running.log})"
            elif code == EXIT_BUSY:
                self.deferred.append(spec)
            else:
                result = RunDir.of(self.runs_dir, spec).read_result()
                if code != 0 or result is None:
                    self.progress.record(Outcome(spec, "failed", f"worker exited with {code}, see {running.log}",
                                                 result))
                else:
                    self._finish(spec, result, running.process.pid, time.perf_counter() - running.started)

    def _finish(self, spec: RunSpec, result: dict[str, Any] | None, pid: int | None, seconds: float) -> None:
        if result is None:  # held by another runner: come back at the end
            self.deferred.append(spec)
            return
        mine = result.get("pid") == pid and result.get("hostname") == socket.gethostname()
        self.progress.record(Outcome(spec, result["status"], "trained here" if mine else "done by another runner",
                                     result), seconds if mine else None)


# ================================================================== CLI
def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not an integer >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    from experiments.slurm import RESOURCES

    parser = untrusted.OneLineParser(prog="python -m experiments.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path, help="a W&B-format sweep file (experiments/sweeps/*.yaml)")
    parser.add_argument("--executor", choices=("local", "slurm"), default="local")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their state; train nothing")
    parser.add_argument("--max-parallel", type=_positive_int, default=1,
                        help="local: runs at once, as worker processes sharing the cores (default 1: in this process)")
    parser.add_argument("--retry-failed", action="store_true", help="rerun failed and diverged runs")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="root of run directories")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print everything the libraries print (default: a line per run start and result, "
                             "the sweep's progress)")
    slurm = parser.add_argument_group("slurm (defaults per profile: " + "; ".join(
        f"{p}: {r.gpus_per_run} GPUs, {r.cpus_per_task} cpus, {r.mem_gb} GB, {r.time_min} min"
        for p, r in RESOURCES.items()) + ")")
    slurm.add_argument("--wait", action="store_true", help="follow the jobs to the end (default: submit and exit)")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--constraint")
    slurm.add_argument("--gpus-per-run", type=int, help="0, or the runs' devices")
    for flag in ("--cpus-per-task", "--mem-gb", "--time-min", "--array-parallelism"):
        slurm.add_argument(flag, type=_positive_int)
    return parser


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    """Validate the sweep, then dry-run, run locally or submit it; return the exit code (0, 1 or 2)."""
    from experiments.slurm import Resources, SlurmRunner, resources_for

    args = build_parser().parse_args(argv)
    console.configure(args.verbose)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Resources)}
    try:
        sweep = load_sweep(args.file)
        resources = resources_for(sweep, overrides) if args.executor == "slurm" else None
        if args.dry_run:
            return dry_run(sweep, args.runs_dir, args.retry_failed, out, resources)
        if resources is not None:
            return SlurmRunner(sweep, args.runs_dir, resources, args.retry_failed, args.wait, out=out).run()
        return LocalRunner(sweep, args.runs_dir, args.max_parallel, args.retry_failed, out).run()
    except SweepError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: the same command resumes the sweep", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # unwind: the workers stop too
    sys.exit(main())
