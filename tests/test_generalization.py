"""Generalization of finished runs: in training and afterwards (evaluate, explain) give the same numbers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from analysis import collect, interpret_figures, robustness_report
from experiments import evaluate, explain
from experiments.generalization import evaluation_grid
from experiments.rundir import RunDir
from experiments.spec import RunSpec
from experiments.train import run

TINY = dict(dataset="synthetic", wandb="off", img_size=16, min_steps=8, max_steps=8, num_evals=2, val_size=32,
            batch_size=32, precision="32-true", robust_subset=40, explain_images=4, sweep="gen")
ADDED = ("calib/", "corrupt/", "occlusion/", "shuffle/")

pytestmark = pytest.mark.slow  # every test here trains a run (module fixture: ~13 s)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, RunSpec]]:
    runs = tmp_path_factory.mktemp("runs")
    specs = {"vit": RunSpec.create("cpu", model="vit_tiny_p4", patch_size=4, **TINY),
             "cnn": RunSpec.create("cpu", model="resnet18", **TINY)}
    for spec in specs.values():
        assert run(spec, runs)["status"] == "completed"
    return runs, specs


def test_the_grid_tiles_the_image_in_patch_sized_cells() -> None:
    assert [evaluation_grid(s) for s in (16, 28, 32, 224)] == [4, 7, 8, 14]
    assert evaluation_grid(30) == 10  # the nearest cell (3 px) that tiles 30 px


def test_a_run_records_calibration_robustness_and_explanations(trained: tuple[Path, dict[str, RunSpec]]) -> None:
    runs, specs = trained
    for spec in specs.values():
        rundir = RunDir.of(runs, spec)
        result = rundir.read_result()
        metrics = result["metrics"]
        assert {"calib/temperature", "test/ece_ts", "test/nll_ts", "corrupt/mean_acc1", "occlusion/50/acc1",
                "shuffle/acc1"} <= set(metrics)
        assert metrics["calib/val_nll_ts"] <= metrics["calib/val_nll"] + 1e-9  # fitted on validation
        with np.load(rundir.robustness, allow_pickle=False) as saved:
            assert saved["corrupt_correct"].shape == (15, 5, 40)
            assert saved["corrupt_correct"].mean() == pytest.approx(metrics["corrupt/mean_acc1"])
        assert rundir.explain.is_file() and result["robustness"] == "robustness.npz"
    # both nets were evaluated on the same test images
    subsets = [np.load(RunDir.of(runs, s).robustness)["subset"] for s in specs.values()]
    explained = [np.load(RunDir.of(runs, s).explain)["test_indices"] for s in specs.values()]
    assert (subsets[0] == subsets[1]).all() and (explained[0] == explained[1]).all()


def test_evaluating_later_gives_the_same_numbers_and_twice_changes_nothing(
        trained: tuple[Path, dict[str, RunSpec]], tmp_path: Path) -> None:
    runs, specs = trained
    source = RunDir.of(runs, specs["vit"])
    copy = tmp_path / "gen" / source.path.name
    shutil.copytree(source.path, copy)
    stripped = json.loads((copy / "result.json").read_text())
    stripped["metrics"] = {k: v for k, v in stripped["metrics"].items() if not k.startswith(ADDED)}
    stripped.pop("robustness")
    (copy / "result.json").write_text(json.dumps(stripped))
    (copy / "robustness.npz").unlink()

    assert evaluate.main([str(copy), "--robust-subset", "40"]) == 0
    after = json.loads((copy / "result.json").read_text())
    before = source.read_result()
    assert {k: v for k, v in after["metrics"].items() if k.startswith(ADDED)} == pytest.approx(
        {k: v for k, v in before["metrics"].items() if k.startswith(ADDED)})
    written = (copy / "robustness.npz").stat().st_mtime_ns
    assert evaluate.main([str(copy), "--robust-subset", "40"]) == 0  # idempotent: nothing is redone
    assert (copy / "robustness.npz").stat().st_mtime_ns == written
    assert json.loads((copy / "result.json").read_text()) == after


def test_explain_writes_what_the_report_draws(trained: tuple[Path, dict[str, RunSpec]], tmp_path: Path) -> None:
    runs, specs = trained
    for spec in specs.values():
        (RunDir.of(runs, spec).explain).unlink()
    assert explain.main([str(RunDir.of(runs, s).path) for s in specs.values()] + ["--images", "4"]) == 0
    frame = collect.collect(runs, "gen").runs
    figures = interpret_figures.figure_makers(runs)
    assert figures["fig_i1_layer_distance"](frame).axes  # both nets' layers, in pixels
    assert figures["fig_i2_attention_maps"](frame).axes  # the same images side by side
    assert robustness_report.table_makers(runs)["table_r1_robustness"](frame).rows


@pytest.mark.parametrize("args, needle", [
    (["nowhere"], "invalid run directory='nowhere'"),
    (["--robust-subset", "0", "x"], "invalid --robust-subset=0"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    assert evaluate.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
