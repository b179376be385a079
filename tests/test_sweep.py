"""Behaviour of the sweep runner: validation, scheduling, resuming, sharing, portability (SLURM: test_slurm.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from experiments.spec import RunSpec
from experiments.sweep import LocalRunner, SweepError, load_sweep, main, write_manifest
from experiments.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "sweeps" / "tiny.yaml"
SHIPPED = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
       "OMP_NUM_THREADS": "1"}  # the tests share 2 busy cores: one thread per training process
TRAINED_HERE = re.compile(r"\((\w{12})\): completed .*· trained here")
PROGRESS = re.compile(r"\[tiny\] (\d+)/(\d+) done · (\d+) failed · (\d+) left · ETA \S+")


def sweep_cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m experiments.sweep ARGS` to the end."""
    return subprocess.run([sys.executable, "-m", "experiments.sweep", *map(str, args)], cwd=REPO, env=env or ENV,
                          capture_output=True, text=True, timeout=60)


def start_cli(*args: str | Path, log: Path) -> subprocess.Popen:
    """Start `python -m experiments.sweep ARGS` with its output in `log`."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "experiments.sweep", *map(str, args)], cwd=REPO, env=ENV,
                                stdout=out, stderr=subprocess.STDOUT)


def tiny_config(**parameters: Any) -> dict[str, Any]:
    """tests/sweeps/tiny.yaml as a dict, with some parameters replaced (None removes one)."""
    config = yaml.safe_load(TINY.read_text())
    for name, entry in parameters.items():
        if entry is None:
            config["parameters"].pop(name)
        else:
            config["parameters"][name] = entry
    return config


def write_sweep(path: Path, config: dict[str, Any] | str) -> Path:
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def fake_result(spec: RunSpec, runs_dir: Path, status: str) -> None:
    """A result.json as a finished run leaves it (no training)."""
    metrics = {"test/acc1": 0.5} if status == "completed" else {}
    RunDir.of(runs_dir, spec).write_result(
        {"schema_version": 2, "run_id": spec.run_id, "sweep": spec.sweep, "status": status,
         "error": None if status == "completed" else "boom", "model": spec.model, "arch": spec.arch,
         "dataset": spec.dataset, "train_fraction": spec.train_fraction, "seed": spec.seed,
         "pretraining": spec.pretraining, "metrics": metrics, "wall_time_s": 1.0})


def run_dirs(runs_dir: Path, sweep: str) -> set[str]:
    return {d.name for d in (runs_dir / sweep).iterdir() if d.is_dir() and not d.name.startswith(".")}


def completed(runs_dir: Path, sweep: str) -> set[str]:
    return {name for name in run_dirs(runs_dir, sweep)
            if RunDir(runs_dir / sweep / name).completed_result() is not None}


# ------------------------------------------------------------------ sweep files
@pytest.mark.parametrize("path", [pytest.param(p, marks=pytest.mark.slow) if p.stem == "data_efficiency" else p
                                  for p in SHIPPED], ids=lambda p: p.stem)
def test_shipped_sweeps_expand_validate_and_dry_run(path: Path, tmp_path: Path) -> None:
    sweep = load_sweep(path)
    assert sweep.name == path.stem
    assert len({s.run_id for s in sweep.ordered}) == len(sweep.ordered)  # no run twice
    assert {s.upstream().run_id for s in sweep.runs if s.upstream()} == {u.run_id for u in sweep.upstream}
    out = io.StringIO()
    assert main([str(path), "--dry-run", "--runs-dir", str(tmp_path)], out=out) == 0
    listed = re.findall(r"^\s+\d+\s+(\w{12})\s", out.getvalue(), flags=re.M)
    assert listed == [s.run_id for s in sweep.ordered]
    assert not (tmp_path / sweep.name).exists()  # a dry run writes nothing


def test_shipped_sweeps_hold_the_planned_grids() -> None:
    default, data, scale = (load_sweep(REPO / "experiments" / "sweeps" / f"{n}.yaml")
                            for n in ("default", "data_efficiency", "pretraining_scale"))
    assert default.profile == "cpu" and {s.dataset for s in default.runs} == {"fashion_mnist"}
    # the minimum: both nets, >= 3 sizes spanning >= 1.2 decades, >= 2 seeds, from scratch
    fractions = sorted({s.train_fraction for s in default.runs})
    assert {s.arch for s in default.runs} == {"vit", "cnn"} and len(fractions) >= 3
    assert fractions[-1] / fractions[0] >= 10 ** 1.2 and len({s.seed for s in default.runs}) >= 2
    assert {s.pretraining for s in default.runs} == {"none"} and not default.upstream
    assert {s.data_seed for s in default.runs} == {s.seed for s in default.runs}  # seeds vary the data too
    assert data.profile == "cluster" and len(data.runs) == 2 * 2 * 7 * 3 * 3
    assert {s.pretraining for s in data.runs} == {"none", "imagenet", "fractaldb"}
    assert {s.img_size for s in data.runs} == {224}
    sizes = sorted({s.pretrain_size for s in scale.runs})
    assert sizes[-1] / sizes[0] >= 1000 and {s.pretrain_classes for s in scale.runs} == {1000}
    assert {(s.dataset, s.train_fraction) for s in scale.runs} == {("cifar10", 0.1)}
    assert len(scale.upstream) == 2 * 4 * 3  # one pretraining run per model, size and seed
    # what pretraining is worth on this machine: both nets, scratch and FractalDB paired by seed, one upstream
    # run per net and seed with the same budget for both: 20 passes over its 12,800 images (2,000 steps)
    pretraining = load_sweep(REPO / "experiments" / "sweeps" / "pretraining.yaml")
    assert {(s.arch, s.pretraining, s.seed) for s in pretraining.runs} == {
        (arch, p, seed) for arch in ("vit", "cnn") for p in ("none", "fractaldb") for seed in (0, 1)}
    assert len(pretraining.upstream) == 2 * 2
    assert {(u.dataset, u.max_steps, u.patience) for u in pretraining.upstream} == {("fractaldb", 2000, 4)}
    # the six steps' ablations, one factor at a time against the same default variant (learned position
    # embedding, class token, patch 4) in one setting, so Table A1 compares them with the same recipe and size
    positions, pools, patches = (load_sweep(REPO / "experiments" / "sweeps" / f"{n}.yaml")
                                 for n in ("ablations", "ablations_pool", "ablations_patch"))
    setting = {(s.profile, s.dataset, s.model, s.train_fraction) for s in positions.runs}
    assert len(setting) == 1
    for sweep in (pools, patches):
        assert {(s.profile, s.dataset, s.model, s.train_fraction) for s in sweep.runs} == setting
    assert {(s.pos_embed, s.pool) for s in positions.runs} == {("learn", None), ("sincos2d", None), ("none", None)}
    assert {(s.pos_embed, s.pool) for s in pools.runs} == {(None, "token"), (None, "avg")}
    defaults = [{s.run_id for s in sweep.runs if s.pos_embed in (None, "learn") and s.pool in (None, "token")
                 and s.patch_size in (None, 4)} for sweep in (positions, pools, patches)]
    assert len(defaults[0]) == 2 and defaults[0] == defaults[1] == defaults[2]  # one default run per seed
    assert {s.patch_size for s in patches.runs} == {4, 7, 14} and all(28 % s.patch_size == 0 for s in patches.runs)
    assert {(s.pos_embed, s.pool) for s in patches.runs} == {(None, None)}  # the model's own: learned, class token
    # steps 3 and 6 at paper scale: ViT-S/16 from scratch on all of CIFAR-10 at 224 px, 3 seeds, robustness on
    # a fixed test subset
    cluster = load_sweep(REPO / "experiments" / "sweeps" / "ablations_cluster.yaml")
    assert {(s.profile, s.dataset, s.model, s.img_size, s.train_fraction, s.pretraining) for s in cluster.runs} == {
        ("cluster", "cifar10", "vit_s16", 224, 1.0, "none")}
    assert sorted((s.pos_embed, s.pool, s.seed) for s in cluster.runs) == sorted(
        (p, q, seed) for p in ("learn", "sincos2d", "none") for q in ("token", "avg") for seed in (0, 1, 2))
    assert all(s.robust_subset > 0 for s in cluster.runs)


def test_shipped_sweeps_run_unchanged_under_wandb_agent() -> None:
    for path in SHIPPED:
        config = yaml.safe_load(path.read_text())
        assert config["command"] == ["${env}", "${interpreter}", "-m", "experiments.train", "${args}"]
    # wandb agent passes --name=value; experiments.train takes every parameter that way
    from experiments.train import build_parser

    args = build_parser().parse_args(["--sweep=default", "--profile=cpu", "--train_fraction=0.1",
                                      "--pretraining=fractaldb", "--pretrain_size=1000"])
    assert (args.sweep, args.profile, args.train_fraction, args.pretrain_size) == ("default", "cpu", 0.1, 1000)


def test_a_sweep_varies_the_architecture(tmp_path: Path) -> None:
    config = tiny_config(model={"value": "vit_tiny_p4"}, pretraining={"value": "none"}, train_fraction={"value": 0.5},
                         pos_embed={"values": ["learn", "sincos2d", "none"]}, pool={"values": ["token", "avg"]},
                         patch_size={"values": [4, 8]}, depth={"values": [2, 4]}, embed_dim={"values": [64, 128]})
    sweep = load_sweep(write_sweep(tmp_path / "arch.yaml", config))
    assert len(sweep.runs) == 3 * 2 * 2 * 2 * 2 == len({s.run_id for s in sweep.runs})
    assert {(s.pos_embed, s.pool, s.patch_size, s.depth, s.embed_dim) for s in sweep.runs} == {
        (p, q, r, d, e) for p in ("learn", "sincos2d", "none") for q in ("token", "avg") for r in (4, 8)
        for d in (2, 4) for e in (64, 128)}
    out = io.StringIO()
    assert main([str(sweep.path), "--dry-run", "--runs-dir", str(tmp_path)], out=out) == 0
    header = out.getvalue().splitlines()[1].split()
    assert {"pos_embed", "pool", "patch_size", "depth", "embed_dim"} <= set(header)  # swept: shown
    cnn = load_sweep(write_sweep(tmp_path / "cnn.yaml", tiny_config(
        pretraining={"value": "none"}, model_kwargs={"values": [{}, {"drop_rate": 0.2}]})))
    assert len({s.run_id for s in cnn.runs}) == 4 and {s.model_kwargs.get("drop_rate") for s in cnn.runs} == {None, 0.2}


def test_wandb_agent_flags_set_the_architecture() -> None:
    from experiments.train import build_parser, spec_from_args

    vit = spec_from_args(build_parser().parse_args(["--model=vit_tiny_p4", "--pos_embed=none", "--pool=avg",
                                                    "--class_token=False", "--patch_size=4", "--mlp_ratio=3"]))
    assert vit.net_overrides == {"patch_size": 4, "mlp_ratio": 3.0, "pos_embed": "none", "pool": "avg",
                                 "class_token": False}
    cnn = spec_from_args(build_parser().parse_args(["--model=resnet18", "--model_kwargs={'drop_rate': 0.1}"]))
    assert cnn.model_kwargs == {"drop_rate": 0.1}


def test_random_method_takes_a_fixed_growing_sample(tmp_path: Path) -> None:
    config = tiny_config(seed={"values": [0, 1, 2]})

    def runs(cap: int) -> list[str]:
        sampled = {**config, "method": "random", "run_cap": cap}
        return [s.run_id for s in load_sweep(write_sweep(tmp_path / "r.yaml", sampled)).runs]

    grid = {s.run_id for s in load_sweep(write_sweep(tmp_path / "g.yaml", config)).runs}
    three, five = runs(3), runs(5)
    assert len(set(three)) == 3 and set(three) <= grid
    assert runs(3) == three and set(three) <= set(five)


BAD = {
    "unknown model": (tiny_config(model={"values": ["resnet18", "vit_huge"]}),
                      ["parameter model: value vit_huge not allowed (allowed: ", "resnet50"]),
    "fraction 1.5": (tiny_config(train_fraction={"values": [0.25, 1.5]}),
                     ["parameter train_fraction: value 1.5 not allowed (allowed: a number in (0, 1])"]),
    "unknown parameter": (tiny_config(learning_rate={"value": 0.1}),
                          ["parameter learning_rate not allowed (allowed: "]),
    "source is target": (tiny_config(pretraining={"values": ["none", "synthetic"]}),
                         ["parameter pretraining: value synthetic not allowed"]),
    "too few fractal images": (tiny_config(pretrain_classes={"value": 64}),
                               ["parameter pretrain_size: value 32 not allowed (allowed: an integer >= "]),
    "no value": (tiny_config(model={"min": 1}), ["parameter model: {'min': 1} not allowed"]),
    "unknown method": ({**tiny_config(), "method": "bayes"},
                       ["method: value bayes not allowed (allowed: grid | random)"]),
    "random without run_cap": ({**tiny_config(), "method": "random"}, ["run_cap: value None not allowed"]),
    "no parameters": ({"method": "grid"}, ["parameters: missing"]),
    "unknown key": ({**tiny_config(), "paramaters": {}}, ["key paramaters not allowed"]),
    "malformed YAML": ("method: grid\nparameters: {model: [resnet18\n", ["malformed YAML: "]),
    "not a mapping": ("- grid\n- resnet18\n", ["not a sweep"]),
    "unquoted off": (TINY.read_text().replace('"off"', "off"),
                     ["parameter wandb: value False not allowed", "quote it"]),
    "ViT field on a CNN": (tiny_config(pool={"values": ["avg"]}),
                           ["parameter pool: value avg not allowed (allowed: null for resnet18"]),
    "patch not dividing the image": (tiny_config(model={"value": "vit_tiny_p4"}, patch_size={"values": [4, 3]}),
                                     ["parameter patch_size: value 3 not allowed (allowed: a divisor of img_size=16)"]),
    "image not divided by the patch": (tiny_config(model={"value": "vit_tiny_p4"}, img_size={"values": [16, 18]}),
                                       ["patch_size=4 not allowed (allowed: a divisor of img_size=18) in the run "
                                        "img_size=18"]),
    "kwargs the spec sets": (tiny_config(model_kwargs={"value": {"num_classes": 3}}),
                             ["parameter model_kwargs: value {'num_classes': 3} not allowed"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_sweep_fails_fast_with_one_line(case: str, tmp_path: Path) -> None:
    config, needles = BAD[case]
    path = write_sweep(tmp_path / "bad.yaml", config)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main([str(path), "--runs-dir", str(tmp_path / "runs")], out=out) == 2
    assert out.getvalue() == "" and len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
    line = err.getvalue().strip()
    assert line.startswith(f"{path}: ") and all(n in line for n in needles), line
    assert not (tmp_path / "runs").exists()


def test_validation_and_dry_run_never_import_torch(tmp_path: Path) -> None:
    bad = write_sweep(tmp_path / "bad.yaml", tiny_config(train_fraction={"value": 1.5}))
    code = ("import sys; from experiments.sweep import main; "
            f"assert main([{str(bad)!r}]) == 2; "
            f"assert main([{str(TINY)!r}, '--dry-run', '--runs-dir', {str(tmp_path)!r}]) == 0; "
            "heavy = sorted(m for m in ('torch', 'lightning', 'timm', 'submitit') if m in sys.modules); "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------ states, dry run, failures
def test_dry_run_lists_pretraining_first_and_marks_done_and_failed(tmp_path: Path) -> None:
    sweep = load_sweep(TINY)
    up = sweep.upstream[0]
    scratch = [s for s in sweep.runs if s.pretraining == "none"]
    fake_result(scratch[0], tmp_path, "completed")
    fake_result(up, tmp_path, "failed")
    proc = sweep_cli(TINY, "--dry-run", "--runs-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {m[1]: (int(m[0]), m[2]) for m in re.findall(r"^\s+(\d+)\s+(\w{12})\s(.*)$", proc.stdout, flags=re.M)}
    assert list(rows) == [s.run_id for s in sweep.ordered]
    for spec in sweep.runs:
        if spec.upstream() is not None:
            assert rows[up.run_id][0] < rows[spec.run_id][0]
            assert rows[spec.run_id][1].endswith("blocked (pretraining failed)")
    assert rows[up.run_id][1].endswith("failed (skipped; --retry-failed reruns it)")
    assert rows[scratch[0].run_id][1].endswith("completed")
    assert rows[scratch[1].run_id][1].endswith("pending")
    assert "would launch 1 run (pretraining first); 1 done, 1 failed" in proc.stdout
    retry = sweep_cli(TINY, "--dry-run", "--retry-failed", "--runs-dir", tmp_path)
    assert "would launch 4 runs" in retry.stdout


@pytest.mark.slow
def test_failed_pretraining_blocks_its_runs_without_training(tmp_path: Path) -> None:
    sweep = load_sweep(TINY)
    fake_result(sweep.upstream[0], tmp_path, "diverged")
    for spec in sweep.runs:
        if spec.pretraining == "none":
            fake_result(spec, tmp_path, "completed")
    out = io.StringIO()
    assert LocalRunner(sweep, tmp_path, out=out).run() == 1
    text = out.getvalue()
    assert text.count(": blocked · pretraining run ") == 2
    assert "[tiny] 2/5 done · 3 failed · 0 left" in text
    assert re.search(rf"{sweep.upstream[0].run_id} .* diverged .* skipped \(--retry-failed reruns it\)", text)


@pytest.mark.slow
def test_failed_runs_are_skipped_unless_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = load_sweep(write_sweep(tmp_path / "one.yaml", tiny_config(pretraining={"value": "none"})))
    failed, done = sweep.runs
    fake_result(failed, tmp_path, "failed")
    fake_result(done, tmp_path, "completed")
    trained: list[str] = []

    def fake_train(spec: RunSpec, runs_dir: Path, blocking: bool = True, precision: str | None = None) -> dict[str, Any]:
        trained.append(spec.run_id)
        fake_result(spec, runs_dir, "completed")
        return {**RunDir.of(runs_dir, spec).read_result(), "pid": os.getpid(), "hostname": socket.gethostname()}

    monkeypatch.setattr("experiments.train.run", fake_train)
    out = io.StringIO()
    assert LocalRunner(sweep, tmp_path, out=out).run() == 1 and trained == []
    assert re.search(rf"{failed.run_id} .* failed .* skipped \(--retry-failed reruns it\)", out.getvalue())
    assert LocalRunner(sweep, tmp_path, retry_failed=True, out=out).run() == 0
    assert trained == [failed.run_id]  # the completed run is left alone
    assert TRAINED_HERE.search(out.getvalue()).group(1) == failed.run_id


# ------------------------------------------------------------------ interruption and sharing
@pytest.mark.slow
def test_killed_sweep_resumes_to_exactly_the_expanded_runs(tmp_path: Path) -> None:
    expected = {s.run_id for s in load_sweep(TINY).ordered}
    interrupted: set[str] = set()
    for attempt in range(3):  # the kill may land just after a run finished: then try again afresh
        runs = tmp_path / f"runs{attempt}"
        proc = start_cli(TINY, "--runs-dir", runs, log=tmp_path / f"killed{attempt}.log")
        deadline = time.monotonic() + 150
        while proc.poll() is None and time.monotonic() < deadline:
            busy = [d for d in (runs / "tiny").glob("*/checkpoints/last.ckpt")
                    if not (d.parents[1] / "result.json").exists()] if (runs / "tiny").exists() else []
            if busy:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        else:
            proc.kill()  # deadline passed, or the runner ended on its own (then it must have succeeded)
        assert proc.wait() in (0, -signal.SIGKILL), (tmp_path / f"killed{attempt}.log").read_text()[-2000:]
        interrupted = run_dirs(runs, "tiny") - completed(runs, "tiny")
        if interrupted:
            break
    assert interrupted and not run_dirs(runs, "tiny") - expected

    completed_before = completed(runs, "tiny")
    proc = start_cli(TINY, "--runs-dir", runs, log=tmp_path / "resumed.log")
    assert proc.wait(timeout=240) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    out = (tmp_path / "resumed.log").read_text()
    assert run_dirs(runs, "tiny") == completed(runs, "tiny") == expected
    for run_id in interrupted:
        assert RunDir(runs / "tiny" / run_id).read_result()["resumed_at_step"] > 0
    trained = set(TRAINED_HERE.findall(out))
    assert trained == expected - completed_before and interrupted <= trained
    done, total, failed, left = map(int, PROGRESS.findall(out)[-1])
    assert (done, total, failed, left) == (5, 5, 0, 0)
    summary = out[out.index("[tiny] summary"):]
    assert all(run_id in summary for run_id in expected) and "selected/val/acc1" in summary


@pytest.mark.slow
def test_two_runners_on_one_sweep_train_each_run_once(tmp_path: Path) -> None:
    sweep = load_sweep(write_sweep(tmp_path / "tiny.yaml", tiny_config(train_fraction={"value": 0.5})))
    runs, expected = tmp_path / "runs", {s.run_id for s in sweep.ordered}
    assert len(expected) == 3  # a pretraining run, a run that needs it, one that does not
    a = start_cli(sweep.path, "--runs-dir", runs, "--max-parallel", "2", log=tmp_path / "a.log")
    b = start_cli(sweep.path, "--runs-dir", runs, log=tmp_path / "b.log")  # 3 one-thread trainings at most
    assert a.wait(timeout=300) == 0, (tmp_path / "a.log").read_text()[-3000:]
    assert b.wait(timeout=300) == 0, (tmp_path / "b.log").read_text()[-3000:]
    by_a = set(TRAINED_HERE.findall((tmp_path / "a.log").read_text()))
    by_b = set(TRAINED_HERE.findall((tmp_path / "b.log").read_text()))
    assert by_a | by_b == expected and not by_a & by_b
    assert run_dirs(runs, "tiny") == completed(runs, "tiny") == expected
    for run_id in by_b:
        assert RunDir(runs / "tiny" / run_id).read_result()["pid"] == b.pid
    for run_id in expected:
        steps = [int(float(r["step"])) for r in csv_rows(runs / "tiny" / run_id / "metrics.csv") if r.get("val/acc1")]
        assert len(steps) == len(set(steps)) > 0  # every validation logged once: trained once
    for log in ("a.log", "b.log"):
        assert PROGRESS.findall((tmp_path / log).read_text())[-1][3] == "0"


def csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ the protocol (issue 9)
def test_runs_go_seed_by_seed_each_pretraining_run_just_before_its_first_use(tmp_path: Path) -> None:
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", tiny_config(seed={"values": [0, 1]})))
    ordered = sweep.ordered
    seeds = [spec.seed for spec in ordered]
    assert seeds == sorted(seeds)  # a complete first seed of every cell before the second
    assert len(ordered) == len(sweep.runs) + len(sweep.upstream) == 10
    position = {spec.run_id: i for i, spec in enumerate(ordered)}
    for up in sweep.upstream:
        users = [position[s.run_id] for s in sweep.runs if s.upstream() and s.upstream().run_id == up.run_id]
        assert position[up.run_id] == min(users) - 1  # right before its first use, never after


def test_the_manifest_lists_every_expected_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", tiny_config(seed={"values": [0, 1]})))
    monkeypatch.setattr("experiments.train.run", lambda spec, runs_dir, blocking=True, precision=None: None)
    runner = LocalRunner(sweep, tmp_path, out=io.StringIO(), estimate=False)
    write_manifest(sweep, tmp_path)
    manifest = json.loads((tmp_path / sweep.name / "sweep.json").read_text())
    assert [r["run_id"] for r in manifest["runs"]] == [s.run_id for s in sweep.ordered]
    assert {r["role"] for r in manifest["runs"]} == {"train", "pretrain"} and "seed" in manifest["swept"]
    assert all(r["upstream"] is None for r in manifest["runs"] if r["pretraining"] == "none")
    # one precision for the whole sweep, resolved once against this machine
    runner._settle_precision(list(sweep.ordered))
    assert {c.precision for c in runner.precision.values()} == {"32-true"}  # tiny.yaml asks for it explicitly


def test_the_eta_comes_from_step_times_measured_before_the_sweep(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments import eta

    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", tiny_config(pretraining={"value": "none"})))
    calls: list[str] = []

    def fake_measure(spec: RunSpec, precision: str) -> eta.StepTimes:
        calls.append(spec.model)
        return eta.StepTimes(train_step_s=0.5, eval_image_s=0.001)

    monkeypatch.setattr(eta, "measure", fake_measure)
    runner = LocalRunner(sweep, tmp_path, out=io.StringIO())
    runner._settle_precision(list(sweep.ordered))
    runner._estimate(list(sweep.ordered))
    assert calls == ["resnet18", "resnet18"]  # a discarded warm-up, then one measurement per distinct net
    per_run = [runner.progress.estimates[s.run_id] for s in sweep.ordered]
    assert per_run[0] == pytest.approx(8 * 0.5 + eta.evaluated_images(sweep.runs[0]) * 0.001)
    assert runner.progress.eta_seconds() == pytest.approx(sum(per_run))


def test_auto_on_a_native_bf16_cpu_is_timed_once_per_sweep_and_kept_when_it_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments import eta, precision

    # a CPU that reports AMX, on which fp32 trains faster (as on a 2-core Xeon: benchmarks/RESULTS.md)
    monkeypatch.setattr(precision, "detect", lambda: precision.cpu_hardware({"amx_bf16", "avx512_bf16"}))
    step_s = {"bf16-mixed": 1.5, "32-true": 1.0}
    timed: list[tuple[str, str]] = []

    def fake_measure(spec: RunSpec, chosen: str) -> eta.StepTimes:
        timed.append((spec.model, chosen))
        return eta.StepTimes(train_step_s=step_s[chosen], eval_image_s=0.001)

    monkeypatch.setattr(eta, "measure", fake_measure)
    config = tiny_config(model={"values": ["resnet18", "vit_tiny_p4"]}, pretraining={"value": "none"},
                         precision={"value": "auto"})
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", config))
    runner = LocalRunner(sweep, tmp_path, out=io.StringIO(), estimate=False)
    runner._settle_precision(list(sweep.ordered))
    # each net once in each precision (after one discarded warm-up), whatever the number of runs
    assert sorted(timed[1:]) == sorted({(m, p) for m in ("resnet18", "vit_tiny_p4") for p in precision.TIMED})
    choices = set(runner.precision.values())
    assert len(choices) == 1 and len(runner.precision) == len(sweep.ordered)  # both nets, every run: one choice
    choice = choices.pop()
    assert choice.precision == "32-true" and choice.estimated_s["bf16-mixed"] > choice.estimated_s["32-true"]
    assert "auto timed here: bf16-mixed ~" in choice.hardware and "amx_bf16" in choice.hardware
    saved = json.loads((tmp_path / sweep.name / precision.SETTLED_FILE).read_text())
    assert saved["precision"] == "32-true"

    # resumed, even where bf16 would now time faster: the finished runs' precision is kept, nothing is timed
    step_s.update({"bf16-mixed": 0.1})
    timed.clear()
    again = LocalRunner(sweep, tmp_path, out=io.StringIO(), estimate=False)
    again._settle_precision(list(sweep.ordered))
    assert timed == [] and set(again.precision.values()) == {choice}


def test_a_broken_settled_precision_file_stops_the_sweep_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments import precision

    monkeypatch.setattr(precision, "detect", lambda: precision.cpu_hardware({"amx_bf16"}))
    sweep = load_sweep(write_sweep(tmp_path / "s.yaml", tiny_config(precision={"value": "auto"})))
    (tmp_path / sweep.name).mkdir()
    (tmp_path / sweep.name / precision.SETTLED_FILE).write_text('{"precision": "fp8", "hardware": "x"}')
    runner = LocalRunner(sweep, tmp_path, out=io.StringIO(), estimate=False)
    with pytest.raises(SweepError, match=r"^invalid precision='fp8' in .*precision.json"):
        runner.run()
    assert not list((tmp_path / sweep.name).glob("*/result.json"))  # nothing trained


def test_the_eta_counts_the_robustness_evaluation() -> None:
    from experiments import eta

    plain, robust = RunSpec.create("cpu", model="resnet50"), RunSpec.create("cpu", model="resnet50", robust_subset=200)
    # 200 subset images x (15 corruptions x 5 severities + 9 occlusion fractions, 0 % included, + patch shuffle)
    assert eta.evaluated_images(robust) - eta.evaluated_images(plain) == 200 * 85


def test_variants_of_one_compute_are_timed_once_and_others_each_and_named() -> None:
    from experiments import eta

    variants = [RunSpec.create("cpu", model="vit_tiny_p4", **kw)
                for kw in ({}, {"pool": "avg"}, {"pos_embed": "none", "pool": "avg", "class_token": False},
                           {"pos_embed": "sincos2d"}, {"patch_size": 7})]
    labels = {eta.net_label(eta.net_key(spec, "32-true")) for spec in variants}
    assert labels == {"vit_tiny_p4", "vit_tiny_p4(patch_size=7)"}
    # what shares a timing shares its compute: FLOPs per image within one token's share
    from lightning_modules.models import build_model, flops_per_image

    flops = [flops_per_image(build_model(s.model, 10, 1, s.img_size, overrides=s.net_overrides), 1, s.img_size)
             for s in variants[:4]]
    assert max(flops) / min(flops) < 1 + 1.5 / 49


# ------------------------------------------------------------------ portability
def test_the_cpu_count_needs_no_linux_only_call(monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments.sweep import available_cpus

    monkeypatch.delattr(os, "process_cpu_count", raising=False)
    if hasattr(os, "sched_getaffinity"):
        assert available_cpus() == len(os.sched_getaffinity(0))
        monkeypatch.delattr(os, "sched_getaffinity")  # as on macOS and Windows
    assert available_cpus() == os.cpu_count()
    monkeypatch.setattr(os, "process_cpu_count", lambda: 3, raising=False)  # Python 3.13+
    assert available_cpus() == 3


NO_FCNTL_SWEEP = """
import os, socket, sys
sys.modules["fcntl"] = None  # as on Windows: `import fcntl` fails
del os.sched_getaffinity  # as on macOS and Windows
import filelock
assert filelock.FileLock is filelock.SoftFileLock
from experiments import sweep, train
from experiments.rundir import RunDir

def fake_run(spec, runs_dir, blocking=True, precision=None):
    rundir = RunDir.of(runs_dir, spec)
    with rundir.lock(blocking=blocking):
        record = {"schema_version": 2, "run_id": spec.run_id, "sweep": spec.sweep, "status": "completed",
                  "error": None, "model": spec.model, "arch": spec.arch, "dataset": spec.dataset,
                  "train_fraction": spec.train_fraction, "seed": spec.seed, "pretraining": spec.pretraining,
                  "metrics": {"test/acc1": 0.5}, "wall_time_s": 1.0}
        rundir.write_result(record)
    return {**record, "pid": os.getpid(), "hostname": socket.gethostname()}

train.run = fake_run
runner = sweep.LocalRunner(sweep.load_sweep(sys.argv[1]), sys.argv[2], estimate=False)
sys.exit(runner.run())
"""


@pytest.mark.slow
def test_the_sweep_runs_without_sched_getaffinity_and_fcntl(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", NO_FCNTL_SWEEP, str(TINY), str(tmp_path)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert PROGRESS.findall(proc.stdout)[-1][:4] == ("5", "5", "0", "0")
    assert completed(tmp_path, "tiny") == {s.run_id for s in load_sweep(TINY).ordered}
    assert not list((tmp_path / "tiny").glob(".*.lock"))  # filelock's soft locks are removed when released


def test_make_help_lists_the_variables_with_their_defaults() -> None:
    proc = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    variables = dict(re.findall(r"^  ([A-Z_]+) +\[([^\]]*)\] ", proc.stdout, flags=re.M))
    assert {"SWEEP": "default", "EXECUTOR": "local", "MAX_PARALLEL": "1", "SWEEP_ARGS": "", "RUNS": "runs",
            "RESULTS": "results"}.items() <= variables.items(), proc.stdout
    assert "  make sweep " in proc.stdout
