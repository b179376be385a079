"""analysis.report: the end-to-end report (through `python -m analysis report`), its determinism, W&B hook."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from analysis_fixtures import SWEEP, power_law_sweep, runs_of, small_sweep, write_result, write_runs

from analysis import cli, report, stats


def make_sweep(root: Path) -> list[str]:
    """The golden sweep plus one malformed file; returns the arguments of `python -m analysis`."""
    write_runs(root / "runs", small_sweep())
    write_result(root / "runs", "{not json", run_id="broken000000")
    return ["report", "--sweep", SWEEP, "--runs-dir", str(root / "runs"), "--results-dir", str(root / "results"),
            "--crossover-resamples", "20"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """One report run, and a snapshot of everything it wrote."""
    root = tmp_path_factory.mktemp("report")
    assert cli.main(make_sweep(root)) == 0
    out = root / "results" / SWEEP
    return out, snapshot(out)


def test_report_writes_every_artefact(built):
    out, files = built
    assert {"report.md", "runs.csv"} <= set(files)
    assert {f"tables/table{i}_{n}.{e}" for i, n in enumerate(
        ["data_efficiency", "pretraining", "generalization", "cost"], 1) for e in ("md", "tex")} <= set(files)
    assert {"figures/fig1_data_efficiency.png", "figures/fig1_data_efficiency.pdf"} <= set(files)
    assert not any(name.endswith(".tmp") or "/." in name for name in files)


def test_report_is_byte_identical_when_run_twice(built, tmp_path):
    out, first = built
    assert cli.main(make_sweep(tmp_path)) == 0
    second = snapshot(tmp_path / "results" / SWEEP)
    assert second.keys() == first.keys()
    for name in first:  # md, csv, tex, and the PNG/PDF figures too
        assert second[name] == first[name], name


def test_report_contents(built):
    text = built[1]["report.md"].decode()
    for section in ("# Sweep `toy`: ViT vs CNN", "## Setup", "## Findings", "## Tables", "## Figures", "## Method"):
        assert section in text
    assert "- Runs: 13 (11 completed, 1 failed, 1 diverged); 0 upstream pretraining runs; 1 unreadable" in text
    assert "- Models: resnet50 (cnn), vit_tiny_p8 (vit)" in text and "- Seeds: 0, 1" in text
    assert "- Spec fields that vary: `model` ∈ {resnet50, vit_tiny_p8}" in text
    assert "`lr`=0.001" in text and "- Git commits: `abc123` (13 runs)" in text
    assert "`toy/broken000000/result.json`: unreadable" in text
    assert ("At 1% of the data (540 images), scratch: resnet50 leads vit_tiny_p8 by 9.0 ± 1.0 points "
            "(n=2, the range of two seeds).") in text
    assert "At 10% of the data (5,400 images), scratch: resnet50 leads vit_tiny_p8 by 2.0 points (n=1" in text
    assert "With fractaldb 12.8k pretraining the gap vit_tiny_p8 − resnet50 at 1% (540) is −5.0 ± 1.0" in text
    assert "not estimated, the power-law fit needs >= 3 distinct training-set sizes" in text
    assert "Only 2 training-set sizes measured" in text
    assert "| 1% (540)                  |       **82.0 ± 2.0** |" in text  # Table 1 inlined
    assert "![Figure 1. Data efficiency: test accuracy vs training images](figures/fig1_data_efficiency.png)" in text
    assert "- Figure `fig3_pretraining_scale` skipped: no pretraining source with >= 2 pretraining-set sizes." in text
    assert str(built[0]) not in text  # relative links only


def test_crossover_and_weak_evidence_findings(tmp_path):
    runs = runs_of(tmp_path, power_law_sweep(noise=0.005))
    lines = report.findings_section(runs, stats.crossovers(runs, n_boot=40))
    crossing = next(line for line in lines if line.startswith("- Crossover"))
    assert "cross at ≈ 8,491 training images (95% bootstrap interval" in crossing
    assert "inside the measured range (540–54,000 images)" in crossing
    runs = runs_of(tmp_path / "flat", power_law_sweep(vit=(8.0, 0.5, 0.10), seeds=(0,)))
    lines = report.findings_section(runs, stats.crossovers(runs, n_boot=10))
    assert any("no crossover in the measured range (540–54,000 images), nor up to 10×" in line for line in lines)
    assert "- Every cell has a single seed: no confidence intervals, every comparison is anecdotal." in lines
    runs = runs_of(tmp_path / "reversed", power_law_sweep(vit=(1.0, 0.4, 0.08), cnn=(8.0, 0.5, 0.02)))
    lines = report.findings_section(runs, stats.crossovers(runs, n_boot=10))
    assert any("reversed, the ViT's fitted error is already lower at 540 images, and the CNN's falls below it "
               "at ≈ 8,491 training images (inside the measured range)" in line for line in lines)


def test_overlapping_ci_is_called_out(tmp_path):
    records = power_law_sweep(vit=(1.0, 0.4, 0.08), fractions=(0.1,))  # ViT = CNN, seeds 0 and 1
    records[0]["metrics"]["test/acc1"] -= 0.002  # ViT seed 0 worse, seed 1 better: the CI spans 0
    records[1]["metrics"]["test/acc1"] += 0.001
    runs = runs_of(tmp_path, records)
    assert any("the 95% CI includes 0, so the order is not established" in line
               for line in report.findings_section(runs, stats.crossovers(runs)))


def test_wandb_logging_uses_one_report_run(tmp_path, monkeypatch):
    calls = {}

    class FakeRun:
        def log(self, payload):
            calls["log"] = payload

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    fake = types.SimpleNamespace(
        init=init,
        Table=lambda columns, data: ("table", columns, data),
        Image=lambda path: ("image", path),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert cli.main([*make_sweep(tmp_path), "--wandb", "offline"]) == 0
    init = calls["init"]
    assert (init["job_type"], init["group"], init["name"], init["mode"]) == ("report", SWEEP, f"{SWEEP}-report",
                                                                            "offline")
    logged = calls["log"]
    assert logged["table1_data_efficiency"][0] == "table" and logged["table1_data_efficiency"][2][0][1] == "82.0 ± 2.0"
    assert logged["fig1_data_efficiency"] == ("image", str(tmp_path / "results" / SWEEP / "figures" /
                                                           "fig1_data_efficiency.png"))
    assert calls["finished"]
