"""One run end to end: result.json contract, W&B offline logging, reuse, faults and bad input."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from common import schema
from experiments.rundir import RunDir
from experiments.spec import RunSpec
from experiments.train import budget_ending, main, precision_choice, run

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
TINY = dict(dataset="synthetic", min_steps=6, max_steps=6, num_evals=2, val_size=32, batch_size=32,
            precision="32-true")
# every key of the contract that a completed first attempt from scratch has (the others: an error, a resume,
# the robustness evaluation, the pretraining run's facts)
COMPLETED_KEYS = (set(schema.FIELDS) - {"error", "resumed_at_step", "robustness", "shift", "upstream_val_acc1",
                                        "upstream_improving_at_end"}) | set(schema.SECTIONS)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunSpec, dict, Path]:
    runs = tmp_path_factory.mktemp("runs")
    spec = RunSpec.create("cpu", model="resnet18", wandb="offline", **TINY)
    return spec, run(spec, runs), runs


def test_result_json_follows_the_contract(finished: tuple[RunSpec, dict, Path]) -> None:
    spec, result, runs = finished
    rundir = RunDir.of(runs, spec)
    on_disk = json.loads(rundir.result_json.read_text())
    assert on_disk == json.loads(json.dumps(result))
    schema.check(on_disk)
    assert COMPLETED_KEYS <= set(on_disk), COMPLETED_KEYS - set(on_disk)
    assert on_disk["schema_version"] == schema.SCHEMA_VERSION
    assert on_disk["status"] == "completed" and on_disk["arch"] == "cnn"
    assert on_disk["architecture"]["timm_name"] == "resnet18" and on_disk["architecture"]["in_chans"] == 1
    assert RunSpec.from_dict(json.loads(rundir.spec_json.read_text())).run_id == spec.run_id
    m = on_disk["metrics"]
    assert set(m) == {"test/acc1", "test/acc5", "test/nll", "test/ece", "train/acc1", "train/loss",
                      "test/nll_ts", "test/ece_ts", "calib/temperature", "calib/val_nll", "calib/val_nll_ts"}
    assert all(0 <= m[k] <= 1 for k in ("test/acc1", "test/acc5", "test/ece", "train/acc1"))
    assert on_disk["train_steps"] == 6 and on_disk["train_images_seen"] == 6 * 32

    # the selected checkpoint holds the weights only; the training state to resume from is gone once completed
    best = torch.load(rundir.best_ckpt, map_location="cpu", weights_only=True)
    assert "optimizer_states" not in best and best["state_dict"]
    assert not rundir.last_ckpt.exists()


def test_selection_is_on_validation(finished: tuple[RunSpec, dict, Path]) -> None:
    spec, result, runs = finished
    rows = list(csv.DictReader(open(RunDir.of(runs, spec).metrics_csv)))
    val = [float(r["val/acc1"]) for r in rows if r.get("val/acc1")]
    assert len(val) == spec.num_evals and result["selected"]["val/acc1"] == pytest.approx(max(val))
    assert any(r.get("train/loss") for r in rows)
    assert not any(r.get("test/acc1") and r.get("val/acc1") for r in rows)
    (tested,) = [r for r in rows if r.get("test/acc1")]  # the test set and the training subset, one evaluation
    assert float(tested["test/acc1"]) == result["metrics"]["test/acc1"]
    assert float(tested["train/acc1"]) == result["metrics"]["train/acc1"]
    lr = [float(v) for r in rows for k, v in r.items() if k.startswith("lr") and v]  # LearningRateMonitor's
    assert lr and max(lr) == pytest.approx(spec.lr)


def wandb_records(path: Path) -> Iterator[object]:
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


def test_wandb_offline_run_holds_config_and_metrics(finished: tuple[RunSpec, dict, Path]) -> None:
    spec, result, runs = finished
    offline = list((runs / "adhoc" / spec.run_id / "wandb").glob("offline-run-*/*.wandb"))
    assert len(offline) == 1
    config, history, summary, run_record = {}, set(), {}, None
    for record in wandb_records(offline[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_record = record.run
            config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            history |= {i.key or "/".join(i.nested_key) for i in record.history.item}
        elif kind == "summary":
            summary.update({i.key: json.loads(i.value_json) for i in record.summary.update if i.key})
    assert run_record.run_group == "adhoc" and {"resnet18", "synthetic", "pretraining=none"} <= set(run_record.tags)
    assert config["model"] == "resnet18" and config["run_id"] == spec.run_id and config["train_fraction"] == 1.0
    assert {"train/loss", "val/acc1"} <= history
    assert summary["test/acc1"] == pytest.approx(result["metrics"]["test/acc1"])


def test_completed_runs_are_not_repeated(finished: tuple[RunSpec, dict, Path]) -> None:
    spec, result, runs = finished
    path = runs / "adhoc" / spec.run_id / "result.json"
    before = path.stat().st_mtime_ns
    assert run(spec, runs) == json.loads(path.read_text()) and path.stat().st_mtime_ns == before


@pytest.mark.slow
def test_both_nets_get_the_same_subset(tmp_path: Path) -> None:
    results = [run(RunSpec.create("cpu", model=m, wandb="off", train_fraction=0.5, **TINY), tmp_path)
               for m in ("vit_tiny_p4", "resnet18")]
    assert results[0]["arch"] == "vit" and results[1]["arch"] == "cnn"
    assert results[0]["subset_hash"] == results[1]["subset_hash"]
    assert results[0]["n_train"] == results[1]["n_train"] == 256 - 16


def test_a_run_that_breaks_records_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("lightning_modules.classifier.ImageClassifier.training_step", boom)
    spec = RunSpec.create("cpu", model="resnet18", wandb="off", **TINY)
    result = run(spec, tmp_path)
    assert result["status"] == "failed" and result["error"] == "RuntimeError: disk on fire"
    assert "Traceback" in (tmp_path / "adhoc" / spec.run_id / "error.log").read_text()


@pytest.mark.slow
def test_fractaldb_pretraining_then_fine_tuning(tmp_path: Path) -> None:
    spec = RunSpec.create("cpu", model="vit_tiny_p4", wandb="off", pretraining="fractaldb", pretrain_steps=4,
                          pretrain_size=64, pretrain_classes=4, **TINY)
    result = run(spec, tmp_path)
    up = spec.upstream()
    up_result = json.loads((tmp_path / "adhoc" / up.run_id / "result.json").read_text())
    assert result["status"] == up_result["status"] == "completed", (result["error"], up_result["error"])
    assert up_result["role"] == "pretrain" and up_result["dataset"] == "fractaldb"
    assert result["pretrained_from"] == up.run_id and result["pretrain_size"] == up_result["n_train"] == 64
    assert (tmp_path / "adhoc" / up.run_id / "model.pt").is_file()


@pytest.mark.parametrize("args, needle", [
    (["--model", "vgg16"], "model='vgg16'"),
    (["--dataset", "imagenet21k"], "dataset='imagenet21k'"),
    (["--train-fraction", "1.5"], "train_fraction=1.5"),
    (["--max-steps", "0"], "max_steps=0"),
    (["--dataset", "imagefolder", "--data-dir", "/nonexistent"], "dataset=imagefolder"),
    (["--model", "vit_tiny_p4", "--patch-size", "5"], "patch_size=5"),
    (["--model", "vit_tiny_p4", "--pool", "avg", "--class-token", "maybe"], "class_token='maybe'"),
    (["--model", "resnet18", "--pos-embed", "none"], "pos_embed='none'"),
    (["--model", "resnet18", "--model-kwargs", "{drop_rate: 0.1, colour: red}"], "unexpected keyword argument"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, args: list[str], needle: str,
                                                             capsys: pytest.CaptureFixture) -> None:
    code = main(args + ["--runs-dir", str(tmp_path / "runs"), "--wandb", "off"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_cli_is_a_module_entry_point(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "experiments.train", "--train-fraction", "2"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: invalid train_fraction=2.0")


# ------------------------------------------------------------------ the protocol (issue 9)
def _history(accs: list[float]) -> list[dict[str, float]]:
    return [{"step": 10 * (i + 1), "epoch": 0, "val/acc1": a, "val/loss": 1 - a} for i, a in enumerate(accs)]


@pytest.mark.parametrize("accs, steps_done, patience, stopped, improving", [
    ([.5, .6, .7, .8, .9, .95, .96, .97], 80, 0, False, True),  # best at the last of 8: more steps would help
    ([.5, .9, .8, .8, .8, .8, .8, .8], 80, 0, False, False),  # plateaued long before the budget ended
    ([.5, .9, .8, .8, .8, .8], 60, 4, True, False),  # validation stopped it early
    ([.5, .6, .7, .8, .9, .8, .8, .9], 80, 4, False, True),  # the whole budget, best within the last 4
])
def test_a_run_still_improving_when_its_budget_ends_is_flagged(accs: list[float], steps_done: int, patience: int,
                                                                stopped: bool, improving: bool) -> None:
    spec = RunSpec.create("cpu", num_evals=8, max_steps=80, min_steps=40, epochs=0.0, patience=patience)
    ending = budget_ending(spec, _history(accs), steps_done, budget=80)
    assert (ending["stopped_early"], ending["improving_at_end"]) == (stopped, improving)
    assert ending["selected"]["val/acc1"] == max(accs) and ending["n_evals"] == len(accs)
    assert ending["selected"]["step"] == 10 * (accs.index(max(accs)) + 1)  # the first best, as the checkpoint


def test_predictions_hold_the_selected_checkpoints_logits(finished: tuple[RunSpec, dict, Path]) -> None:
    spec, result, runs = finished
    with np.load(RunDir.of(runs, spec).path / result["predictions"], allow_pickle=False) as saved:
        test_pred, target = saved["test_pred"], saved["test_target"]
        assert len(target) == result["n_test"] and saved["val_target"].shape == (result["n_val"],)
        assert (saved["test_logits"].argmax(1) == test_pred).all()
        assert saved["val_logits"].shape == (result["n_val"], 4)
    # the same checkpoint the test metrics came from
    assert (test_pred == target).mean() == pytest.approx(result["metrics"]["test/acc1"])


def test_precision_is_recorded_as_requested_and_resolved(finished: tuple[RunSpec, dict, Path]) -> None:
    spec, result, _ = finished
    assert result["spec"]["precision"] == "32-true" and result["precision"] == "32-true"
    assert result["hardware"].startswith("cpu: ")


@pytest.mark.parametrize("flags, bf16_step_s, expected", [
    ({"avx2"}, None, "32-true"),  # no native bf16: fp32 by rule, nothing timed
    ({"amx_bf16"}, 0.5, "bf16-mixed"),  # native and faster
    ({"amx_bf16"}, 2.0, "32-true"),  # native but slower (as on a 2-core Xeon)
])
def test_a_single_run_settles_auto_for_this_machine(monkeypatch: pytest.MonkeyPatch, flags: set[str],
                                                    bf16_step_s: float | None, expected: str) -> None:
    from experiments import eta, precision

    monkeypatch.setattr(precision, "detect", lambda: precision.cpu_hardware(flags))
    timed: list[str] = []

    def fake_measure(spec: RunSpec, chosen: str) -> eta.StepTimes:
        timed.append(chosen)
        return eta.StepTimes({"bf16-mixed": bf16_step_s, "32-true": 1.0}[chosen], 0.001)

    monkeypatch.setattr(eta, "measure", fake_measure)
    auto = RunSpec.create("cpu", model="resnet18", **{**TINY, "precision": "auto"})
    choice = precision_choice(auto)
    assert choice.precision == expected and choice.hardware.startswith("cpu: ")
    assert bool(timed) == (bf16_step_s is not None) and ("auto timed here" in choice.hardware) == bool(timed)
    with pytest.raises(ValueError, match="devices=2") if timed else contextlib.nullcontext():
        precision_choice(dataclasses.replace(auto, devices=2))


@pytest.mark.slow
def test_patience_stops_a_plateaued_run_early_never_before_min_steps(tmp_path: Path) -> None:
    # a learning rate this small cannot improve validation accuracy beyond its first evaluations
    spec = RunSpec.create("cpu", model="resnet18", wandb="off", lr=1e-7, warmup_frac=0.0, epochs=0.0, patience=2,
                          **{**TINY, "min_steps": 8, "max_steps": 24, "num_evals": 12})
    result = run(spec, tmp_path)
    assert result["status"] == "completed" and result["stopped_early"] and not result["improving_at_end"]
    assert 8 <= result["train_steps"] < 24 and result["budget_steps"] == 24
    assert result["n_evals"] == result["train_steps"] // 2  # one validation every 2 steps
