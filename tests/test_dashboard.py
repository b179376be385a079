"""analysis.dashboard: the W&B Report of a sweep, checked as the object W&B's reports library would save
(no network, no account)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from analysis_fixtures import SWEEP, make_result, small_sweep, write_plan, write_runs

from analysis import cli, collect, dashboard

wr = pytest.importorskip("wandb_workspaces.reports.v2")


def grids(report: Any) -> dict[str, Any]:
    """{heading above: panel grid} (a dataset's H3 for the accuracy curves)."""
    out, heading = {}, ""
    for block in report.blocks:
        if isinstance(block, (wr.H2, wr.H3)):
            heading = block.text
        elif isinstance(block, wr.PanelGrid):
            out[heading] = block
    return out


def panels(grid: Any) -> dict[str, Any]:
    return {getattr(p, "title", None) or type(p).__name__: p for p in grid.panels}


def scaled_sweep() -> list[dict[str, Any]]:
    """The small sweep plus FractalDB runs at two pretraining sizes on a second dataset."""
    extra = [make_result(model, 0.1, seed, 0.7, pretraining="fractaldb", pretrain_size=size, dataset="cifar10")
             for model in ("resnet50", "vit_tiny_p8") for size in (1000, 10000) for seed in (0, 1)]
    return small_sweep() + extra


def test_the_dashboard_holds_the_comparison_panels(tmp_path: Path) -> None:
    write_runs(tmp_path, scaled_sweep())
    report = dashboard.build(collect.collect(tmp_path, SWEEP), SWEEP, "me", "vit-vs-cnn")
    assert isinstance(report, wr.Report) and (report.entity, report.project) == ("me", "vit-vs-cnn")
    found = grids(report)
    assert list(found) == ["cifar10", "fashion_mnist", "Accuracy by cell", "Robustness and calibration", "Cost",
                           "Runs, grouped by cell"]

    # accuracy vs training images: one run set per (model, pretraining), CNN first, scratch first
    curves = found["fashion_mnist"]
    assert [r.name for r in curves.runsets] == ["resnet50 · none", "resnet50 · fractaldb", "vit_tiny_p8 · none",
                                                "vit_tiny_p8 · fractaldb"]
    accuracy = panels(curves)["fashion_mnist: test accuracy vs training images"]
    assert isinstance(accuracy, wr.ScatterPlot) and accuracy.log_x
    assert (accuracy.x.name, accuracy.y.name) == ("n_train", "test/acc1")
    assert panels(curves)["fashion_mnist: selected validation accuracy vs training images"].y.name == \
        "selected/val/acc1"
    assert "fashion_mnist: test accuracy vs pretraining images" in panels(curves)  # the sweep varies the size
    for runset in curves.runsets:  # the sweep's comparison runs only
        assert f'Metric("Group") == \'{SWEEP}\'' in runset.filters
        assert "Metric(\"JobType\") != 'report'" in runset.filters and "Config(\"role\") == 'train'" in runset.filters
    assert "Config(\"model\") == 'vit_tiny_p8'" in curves.runsets[2].filters
    assert "Config(\"pretraining\") == 'fractaldb'" in curves.runsets[3].filters

    # by cell: grouped on the cell's keys, means with standard errors
    cell = [f"config.{k}" for k in ("dataset", "model", "pretraining", "pretrain_size", "train_fraction")]
    for heading in ("Accuracy by cell", "Robustness and calibration", "Cost", "Runs, grouped by cell"):
        (runset,) = found[heading].runsets
        assert runset.groupby == cell and f'Metric("Group") == \'{SWEEP}\'' in runset.filters
    bars = {p.metrics[0].name: p for p in found["Accuracy by cell"].panels}
    assert set(bars) == {"test/acc1", "selected/val/acc1", "train/acc1"}
    assert {(p.groupby_aggfunc, p.groupby_rangefunc) for p in bars.values()} == {("mean", "stderr")}
    robustness = {p.metrics[0].name for p in found["Robustness and calibration"].panels}
    assert robustness == {"corrupt/mean_acc1", "shuffle/acc1", "test/ece", "test/nll"}
    cost = found["Cost"].panels
    assert {p.metrics[0].name for p in cost if isinstance(p, wr.BarPlot)} == {
        "params", "flops_per_image", "train_images_per_s", "wall_time_s"}
    assert [(p.x.name, p.y.name) for p in cost if isinstance(p, wr.ScatterPlot)] == [("train_flops", "test/acc1")]
    table = found["Runs, grouped by cell"].runsets[0]
    assert "config:model.value" in table.pinned_columns and "summary:test/acc1" in table.visible_columns


def test_the_plan_adds_the_curves_of_runs_not_done_yet(tmp_path: Path) -> None:
    records = small_sweep()
    write_runs(tmp_path, [r for r in records if r["model"] == "resnet50"])
    write_plan(tmp_path, records)
    report = dashboard.build(collect.collect(tmp_path, SWEEP), SWEEP, "me", "p")
    names = [r.name for r in grids(report)["fashion_mnist"].runsets]
    assert "vit_tiny_p8 · none" in names
    assert "fashion_mnist: test accuracy vs pretraining images" not in panels(grids(report)["fashion_mnist"])


def test_dashboard_command_dry_run_prints_the_outline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_runs(tmp_path / "runs", small_sweep())
    argv = ["dashboard", "--sweep", SWEEP, "--runs-dir", str(tmp_path / "runs")]
    assert cli.main([*argv, "--entity", "me", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"W&B report for me/vit-vs-cnn: vit-vs-cnn: sweep {SWEEP}\n")
    assert "ScatterPlot: fashion_mnist: test accuracy vs training images" in out
    assert "grouped by config.dataset, config.model" in out and out.endswith("dry run: the report was not saved\n")


def test_dashboard_without_entity_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_ENTITY", raising=False)
    write_runs(tmp_path / "runs", small_sweep())
    assert cli.main(["dashboard", "--sweep", SWEEP, "--runs-dir", str(tmp_path / "runs"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == "error: dashboard: no W&B entity (allowed: --entity E, --from-wandb E/P or WANDB_ENTITY)\n"


def test_entity_and_project_default_to_the_runs_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_ENTITY", "env-entity")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert dashboard.where(None, None, "lab/proj") == ("lab", "proj")
    assert dashboard.where(None, None, None) == ("env-entity", "vit-vs-cnn")
    assert dashboard.where("me", "p", "lab/proj") == ("me", "p")


def test_a_refused_save_is_one_line() -> None:
    def refuse() -> None:
        raise PermissionError("not logged in to W&B\nsecond line")

    with pytest.raises(dashboard.SaveError, match=r"^dashboard: W&B did not save the report: PermissionError: "
                                                  r"not logged in to W&B$"):
        dashboard.save(SimpleNamespace(save=refuse))
