"""W&B as its users expect (experiments.tracking, common.wandb_mode, the analysis side): WANDB_MODE wins over
auto, failed runs end as failed, artifacts and lineage, separate runs under `wandb agent`, offline sync, the
report run left out of --from-wandb. No account and no network: offline runs and fake W&B objects."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import yaml

from analysis import collect, report
from common import wandb_mode
from experiments import tracking
from experiments.rundir import RunDir
from experiments.spec import RunSpec

REPO = Path(__file__).resolve().parents[1]
TINY = dict(dataset="synthetic", min_steps=4, max_steps=4, num_evals=2, val_size=32, batch_size=32,
            precision="32-true")
FAKE_KEY = "fake0api0key0" + "7" * 27  # the length of a real W&B key; must never reach a file


# ------------------------------------------------------------------ reading offline runs
def wandb_records(path: Path) -> Iterator[Any]:
    """Records of an offline `.wandb` file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunk = path.read_bytes(), 7, b""
    assert struct.unpack("<4sHB", data[:7])[:2] == (b":W&B", 0xBEE1)
    while pos + 7 <= len(data):
        space = 32768 - pos % 32768  # records never straddle a 32 KiB block header
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if space >= 7 else (0, 0, 0)
        if space < 7 or (length == 0 and kind == 0):
            pos += space
            continue
        chunk, pos = chunk + data[pos + 7: pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def offline_run(run_dir: Path) -> SimpleNamespace:
    """The one offline W&B run under `run_dir/wandb/`: its run record, summary, artifacts and exit code."""
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    seen = SimpleNamespace(run=None, summary={}, artifacts={}, used=[], exit_code=None)
    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            seen.run = record.run
        elif kind == "summary":
            seen.summary.update({i.key: json.loads(i.value_json) for i in record.summary.update if i.key})
        elif kind == "artifact":
            seen.artifacts[record.artifact.name] = record.artifact
        elif kind == "use_artifact":
            seen.used.append(record.use_artifact.name)
        elif kind == "exit":
            seen.exit_code = record.exit.exit_code
    return seen


# ------------------------------------------------------------------ the mode
@pytest.mark.parametrize("env, requested, expected", [
    ("disabled", "auto", "off"), ("offline", "auto", "offline"), ("online", "auto", "online"),
    ("dryrun", "auto", "offline"), ("run", "auto", "online"),
    ("disabled", "offline", "offline"), ("online", "off", "off"),  # an explicit flag is taken as asked
])
def test_wandb_mode_in_the_environment_wins_over_auto(monkeypatch: pytest.MonkeyPatch, env: str, requested: str,
                                                      expected: str) -> None:
    monkeypatch.setenv("WANDB_MODE", env)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert wandb_mode.resolve(requested) == expected


def test_auto_without_wandb_mode_follows_the_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode.resolve("auto") == "offline"
    (tmp_path / "netrc").write_text("machine wandb.example.org\n  login user\n  password secret\n")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_mode.resolve("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "shared-ish")
    with pytest.raises(wandb_mode.ModeError, match=r"^invalid WANDB_MODE='shared-ish' \(allowed: online \| offline"):
        wandb_mode.resolve("auto")


def test_a_bad_wandb_mode_fails_before_anything_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    from experiments.train import main

    monkeypatch.setenv("WANDB_MODE", "sometimes")
    assert main(["--dataset", "synthetic", "--runs-dir", str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err == "error: invalid WANDB_MODE='sometimes' (allowed: online | offline | disabled)\n"
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_wandb_mode_disabled_writes_no_wandb_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments.train import run

    monkeypatch.setenv("WANDB_MODE", "disabled")
    spec = RunSpec.create("cpu", model="resnet18", wandb="auto", **TINY)
    assert run(spec, tmp_path)["status"] == "completed"
    assert not [p for p in tmp_path.rglob("*") if "wandb" in p.name], "W&B wrote files"


# ------------------------------------------------------------------ how a run ends
@pytest.mark.slow
def test_a_failed_run_ends_its_wandb_run_as_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments.train import run

    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("lightning_modules.classifier.ImageClassifier.training_step", boom)
    spec = RunSpec.create("cpu", model="resnet18", wandb="offline", **TINY)
    assert run(spec, tmp_path)["status"] == "failed"
    seen = offline_run(RunDir.of(tmp_path, spec).path)
    assert seen.exit_code == 1  # W&B shows the run as failed, not finished
    assert seen.summary["status"] == "failed" and seen.summary["error"] == "RuntimeError: disk on fire"
    assert not seen.artifacts  # no selected checkpoint to log


class FakeRun:
    """Stands in for a wandb Run: records what would be sent."""

    def __init__(self, offline: bool = False, fail_on: str = "") -> None:
        self.offline, self.fail_on = offline, fail_on
        self.logged: list[tuple[Any, list[str] | None]] = []
        self.used: list[Any] = []
        self.summary: dict[str, Any] = {}
        self.exit_code: int | None = None

    def log_artifact(self, artifact: Any, aliases: list[str] | None = None) -> None:
        if self.fail_on == "log_artifact":
            raise ConnectionError("W&B unreachable")
        self.logged.append((artifact, aliases))

    def use_artifact(self, artifact: Any) -> None:
        self.used.append(artifact)

    def finish(self, exit_code: int | None = None) -> None:
        self.exit_code = exit_code


def finished_dir(root: Path, run_id: str, *names: str) -> RunDir:
    rundir = RunDir(root / "s" / run_id)
    rundir.checkpoints.mkdir(parents=True)
    for name in names:
        (rundir.path / name).write_bytes(name.encode() * 100)
    return rundir


def result_of(run_id: str, status: str = "completed", **fields: Any) -> dict[str, Any]:
    return {"run_id": run_id, "sweep": "s", "status": status, "model": "vit_tiny_p4", "dataset": "synthetic",
            "role": "train", "n_train": 240, "error": None if status == "completed" else "boom",
            "metrics": {"test/acc1": 0.5} if status == "completed" else {},
            "selected": {"step": 4, "val/acc1": 0.4}, **fields}


def test_artifacts_carry_the_lineage_from_pretraining_to_fine_tuning(tmp_path: Path) -> None:
    up = finished_dir(tmp_path, "up0", "model.pt", "checkpoints/best.ckpt")
    up_run = FakeRun()
    tracking.finish(SimpleNamespace(experiment=up_run), result_of("up0", role="pretrain"), up)
    (ckpt, aliases), (weights, _) = up_run.logged
    assert (ckpt.name, ckpt.type, aliases, list(ckpt.manifest.entries)) == ("checkpoint-s-up0", "model", ["selected"],
                                                                            ["best.ckpt"])
    assert (weights.name, list(weights.manifest.entries)) == ("pretrained-s-up0", ["model.pt"])
    assert up_run.exit_code == 0 and up_run.summary["role"] == "pretrain" and up_run.summary["test/acc1"] == 0.5

    ft = finished_dir(tmp_path, "ft0", "checkpoints/best.ckpt")
    ft_run = FakeRun()
    tracking.finish(SimpleNamespace(experiment=ft_run), result_of("ft0", pretrained_from="up0"), ft)
    assert [a.name for a, _ in ft_run.logged] == ["checkpoint-s-ft0"]
    (used,) = ft_run.used  # the fine-tuning run declares the weights it loaded: the same artifact version
    assert used.name == "pretrained-s-up0" and used.digest == weights.digest
    assert ft_run.summary["pretrained_from"] == "up0" and ft_run.summary["selected/val/acc1"] == 0.4

    offline = FakeRun(offline=True)  # W&B refuses use_artifact offline: `sync` declares it after the upload
    tracking.finish(SimpleNamespace(experiment=offline), result_of("ft0", pretrained_from="up0"), ft)
    assert not offline.used and offline.exit_code == 0


@pytest.mark.parametrize("status", ["failed", "diverged"])
def test_failed_and_diverged_runs_end_as_failed_without_artifacts(tmp_path: Path, status: str) -> None:
    rundir = finished_dir(tmp_path, "r0", "checkpoints/best.ckpt")
    fake = FakeRun()
    tracking.finish(SimpleNamespace(experiment=fake), result_of("r0", status), rundir)
    assert fake.exit_code == 1 and not fake.logged and fake.summary["status"] == status


def test_a_wandb_error_is_a_warning_and_the_run_still_ends(tmp_path: Path) -> None:
    rundir = finished_dir(tmp_path, "r0", "checkpoints/best.ckpt")
    fake = FakeRun(fail_on="log_artifact")
    with pytest.warns(RuntimeWarning, match="W&B: ConnectionError: W&B unreachable"):
        tracking.finish(SimpleNamespace(experiment=fake), result_of("r0"), rundir)
    assert fake.exit_code == 0 and fake.summary["status"] == "completed"


# ------------------------------------------------------------------ wandb agent
def agent_command(sweep_file: Path, run_id: str, sweep_dir: Path) -> tuple[list[str], Path]:
    """The command `wandb agent` runs for the first run of a grid sweep (its own code builds the arguments) and
    the parameter file it writes; `${interpreter}` is this Python (the agent's bare `python`, resolved)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils
    from wandb.sdk.lib import config_util

    config = yaml.safe_load(sweep_file.read_text())
    args = {name: {"value": entry["value"] if "value" in entry else entry["values"][0]}
            for name, entry in config["parameters"].items()}
    params = sweep_dir / f"config-{run_id}.yaml"
    config_util.save_config_file_from_dict(str(params), args)
    variables = sweep_utils.create_sweep_command_args({"run_id": run_id, "args": args})
    variables.update(env=["/usr/bin/env"], interpreter=[sys.executable], program=[config["program"]])
    command: list[str] = []
    for chunk in config["command"]:
        command += variables[chunk[2:-1]] if chunk.startswith("${") else [chunk]
    return command, params


def record_environment(path: str) -> None:
    """A target for `apart_from_agent`: writes the W&B variables its process sees."""
    Path(path).write_text(json.dumps({k: v for k, v in os.environ.items() if k.startswith("WANDB_")}))


@pytest.mark.slow
def test_apart_from_agent_runs_in_a_process_without_the_agents_variables(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    for key in tracking.AGENT_VARIABLES:
        monkeypatch.setenv(key, "from-the-agent")
    monkeypatch.setenv("WANDB_PROJECT", "kept")
    assert tracking.apart_from_agent(record_environment, str(tmp_path / "env.json")) == 0
    seen = json.loads((tmp_path / "env.json").read_text())
    assert seen["WANDB_PROJECT"] == "kept" and not set(tracking.AGENT_VARIABLES) & set(seen)
    assert os.environ["WANDB_RUN_ID"] == "from-the-agent"  # this process keeps them


def test_under_wandb_agent_the_pretraining_run_is_trained_apart(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from common import files
    from experiments import train

    calls = []

    def apart(target: Any, spec: RunSpec, runs_dir: Path, blocking: bool, precision: str | None) -> int:
        calls.append((target, spec))
        files.write_json(RunDir.of(runs_dir, spec).result_json, {"status": "completed"})
        return 0

    monkeypatch.setattr(tracking, "under_agent", lambda: True)
    monkeypatch.setattr(tracking, "apart_from_agent", apart)
    spec = RunSpec.create("cpu", model="resnet18", wandb="offline", pretraining="fractaldb", **TINY)
    upstream = train.Prepared(spec.upstream(), datamodule=None)
    assert train.ensure_pretrained(upstream, tmp_path) == RunDir.of(tmp_path, spec.upstream())
    assert calls == [(train.run, spec.upstream())]
    calls.clear()
    monkeypatch.setattr(tracking, "under_agent", lambda: False)  # no agent: the same process, under its lock
    monkeypatch.setattr(train, "train", lambda *args: {"status": "completed"})
    train.ensure_pretrained(train.Prepared(spec.upstream().replace(seed=1), datamodule=None), tmp_path)
    assert not calls


@pytest.mark.slow
def test_under_wandb_agent_pretraining_and_fine_tuning_are_separate_wandb_runs(tmp_path: Path) -> None:
    sweep = yaml.safe_load((REPO / "tests" / "sweeps" / "tiny.yaml").read_text())
    sweep["parameters"].update(sweep={"value": "agent"}, pretraining={"value": "fractaldb"},
                               train_fraction={"value": 0.5}, min_steps={"value": 4}, max_steps={"value": 4},
                               num_evals={"value": 2}, wandb={"value": "auto"})
    sweep_file = tmp_path / "agent.yaml"
    sweep_file.write_text(yaml.safe_dump(sweep))
    command, params = agent_command(sweep_file, "agentrun01", tmp_path / "wandb" / "sweep-abc123")
    # a fresh agent's environment: none of the W&B variables an earlier in-process run of this test session left
    # behind (W&B exports e.g. the address of its service process, which a child would join)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env = {**clean, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY,
           "WANDB_SWEEP_ID": "abc123", "WANDB_RUN_ID": "agentrun01", "WANDB_SWEEP_PARAM_PATH": str(params),
           "WANDB_DIR": str(tmp_path), "WANDB_PROJECT": "vit-vs-cnn"}  # what the agent sets
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    spec = RunSpec.create("cpu", **{k: v["value"] if "value" in v else v["values"][0]
                                    for k, v in sweep["parameters"].items() if k != "profile"})
    up_dir, ft_dir = RunDir.of(tmp_path / "runs", spec.upstream()), RunDir.of(tmp_path / "runs", spec)
    up, ft = offline_run(up_dir.path), offline_run(ft_dir.path)
    assert ft.run.run_id == "agentrun01" and ft.run.sweep_id == "abc123"  # the agent's run
    assert up.run.run_id == f"agent-{spec.upstream().run_id}" and not up.run.sweep_id  # its own run
    assert (up.run.job_type, ft.run.job_type) == ("pretrain", "train") and up.run.run_group == ft.run.run_group
    assert up.summary["role"] == "pretrain" and "pretrained_from" not in up.summary
    assert ft.summary["pretrained_from"] == spec.upstream().run_id
    assert set(up.artifacts) == {f"checkpoint-agent-{spec.upstream().run_id}",
                                 f"pretrained-agent-{spec.upstream().run_id}"}
    assert set(ft.artifacts) == {f"checkpoint-agent-{spec.run_id}"}
    assert up.exit_code == ft.exit_code == 0
    # offline, the lineage is declared by `sync` once uploaded
    found = {run.run_id: run.uses for run in tracking.offline_runs(tmp_path / "runs", tmp_path / "results")}
    assert found == {"agentrun01": f"pretrained-agent-{spec.upstream().run_id}", up.run.run_id: None}
    # no secret in any file or in the output (WANDB_API_KEY was set)
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert not leaks and FAKE_KEY not in proc.stdout + proc.stderr, leaks


# ------------------------------------------------------------------ sync
def offline_dir(root: Path, name: str, run_id: str, synced: bool = False) -> Path:
    folder = root / "wandb" / f"offline-run-{name}-{run_id}"
    folder.mkdir(parents=True)
    (folder / f"run-{run_id}.wandb").write_bytes(b":W&B")
    if synced:
        (folder / f"run-{run_id}.wandb.synced").touch()
    return folder


def test_sync_finds_the_offline_runs_and_declares_their_lineage(tmp_path: Path) -> None:
    runs, results = tmp_path / "runs", tmp_path / "results"
    up = offline_dir(runs / "s" / "up0", "20260101_000000", "s-up0")
    ft = offline_dir(runs / "s" / "ft0", "20260101_000100", "s-ft0")
    (runs / "s" / "ft0" / "result.json").write_text(json.dumps({"sweep": "s", "pretrained_from": "up0"}))
    offline_dir(runs / "s" / "old0", "20251231_000000", "s-old0", synced=True)
    rep = offline_dir(results / "s", "20260101_000200", "xyz789")
    offline_dir(runs / "other" / "r0", "20260101_000300", "other-r0")
    found = tracking.offline_runs(runs, results, sweep="s")
    assert found == [tracking.OfflineRun(up, "s-up0"), tracking.OfflineRun(ft, "s-ft0", "pretrained-s-up0"),
                     tracking.OfflineRun(rep, "xyz789")]  # oldest first; synced and other sweeps left out
    assert len(tracking.offline_runs(runs, results, include_synced=True)) == 5

    calls: list[list[str]] = []
    declared: list[tuple[str, str]] = []
    api = SimpleNamespace(default_entity="me",
                          artifact=lambda name, type: SimpleNamespace(name=name),
                          run=lambda path: SimpleNamespace(use_artifact=lambda a: declared.append((path, a.name))))
    out = __import__("io").StringIO()
    assert tracking.sync(found, dry_run=True, out=out, call=calls.append, api=api) == 0
    assert not calls and "(uses pretrained-s-up0)" in out.getvalue() and "dry run" in out.getvalue()
    assert tracking.sync(found, project="p", out=out, call=lambda cmd: calls.append(cmd) or 0, api=api) == 0
    assert calls == [[sys.executable, "-m", "wandb", "sync", "--project", "p", str(up), str(ft), str(rep)]]
    assert declared == [("me/p/s-ft0", "me/p/pretrained-s-up0:latest")]
    assert tracking.sync(found, out=out, call=lambda cmd: 1, api=api) == 1  # wandb sync failed: no lineage


def test_make_sync_runs_the_sync_command() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "\nsync: install ## " in makefile and "-m experiments.tracking sync" in makefile


# ------------------------------------------------------------------ sweep files and the analysis side
def test_every_sweep_file_logs_to_the_suites_project() -> None:
    paths = sorted((REPO / "experiments" / "sweeps").rglob("*.yaml"))
    assert paths and {p.name: yaml.safe_load(p.read_text()).get("project") for p in paths} == {
        p.name: wandb_mode.DEFAULT_PROJECT for p in paths}


def test_from_wandb_leaves_out_the_report_run() -> None:
    from analysis_fixtures import SWEEP, make_result

    runs = [SimpleNamespace(id=r["run_id"], state="finished", job_type="train", config=r["spec"], summary={"result": r})
            for r in (make_result("resnet50", 0.1, 0, 0.8), make_result("vit_tiny_p8", 0.1, 0, 0.7))]
    runs.append(SimpleNamespace(id="rep", state="finished", job_type="report", config={}, summary={"table": 1}))
    queries = []

    def fake_runs(path: str, filters: dict[str, Any] | None = None) -> list[SimpleNamespace]:
        queries.append(filters)
        return runs

    collection = collect.from_wandb("me/proj", SWEEP, api=SimpleNamespace(runs=fake_runs))
    assert queries == [{"group": SWEEP}]
    assert len(collection.runs) == 2 and collection.skipped == ()


@pytest.mark.parametrize("modes, env, expected", [
    (["off", "off"], "online", "off"),  # the runs had no W&B: neither has the report
    (["offline", "offline"], None, "offline"),
    (["auto", "auto"], "disabled", "off"),
    (["auto", "off"], "offline", "offline"),
])
def test_the_reports_auto_mode_follows_the_runs(monkeypatch: pytest.MonkeyPatch, modes: list[str], env: str | None,
                                                expected: str) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    if env:
        monkeypatch.setenv("WANDB_MODE", env)
    assert report.report_wandb_mode("auto", pd.DataFrame({"spec/wandb": modes})) == expected
    assert report.report_wandb_mode("online", pd.DataFrame({"spec/wandb": modes})) == "online"


def test_the_report_with_a_bad_wandb_mode_is_one_line_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from analysis_fixtures import SWEEP, small_sweep, write_runs

    from analysis import cli

    write_runs(tmp_path / "runs", small_sweep())
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    argv = ["report", "--sweep", SWEEP, "--runs-dir", str(tmp_path / "runs"), "--results-dir",
            str(tmp_path / "results"), "--wandb", "auto"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == "error: invalid WANDB_MODE='sometimes' (allowed: online | offline | disabled)\n"
    assert not (tmp_path / "results").exists()


def test_make_sweep_logs_the_report_to_wandb_as_the_runs() -> None:
    makefile = (REPO / "Makefile").read_text()
    sweep = makefile[makefile.index("\nsweep:"):makefile.index("\nsweep-dry:")]
    assert "-m analysis report" in sweep and "--wandb auto" in sweep
