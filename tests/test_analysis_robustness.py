"""analysis.robustness_report: relative corruption error, intervals, calibration, figures and findings."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from analysis_fixtures import SWEEP, make_result, runs_of, write_runs
from generalization_fixtures import CORRUPTIONS, N_SUBSET, SEVERITIES, robust_run
from scipy import stats as sps

from analysis import collect, estimates, plots, robustness_report
from analysis.outputs import NoData, write_outputs


def collected(runs_dir) -> pd.DataFrame:
    return collect.collect(runs_dir, SWEEP).runs


def corruption_metrics(error_per_severity: float, spread: float = 1.0) -> dict[str, float]:
    """err_{s,c} = error_per_severity · s · spread · (1 + c / 15): every corruption has its own size."""
    return {f"corrupt/{name}/{s}/acc1": 1.0 - error_per_severity * s * spread * (1 + c / 15)
            for c, name in enumerate(CORRUPTIONS) for s in SEVERITIES}


def column_of(table, title: str) -> int:
    return table.header.index(title)


def row_of(table, model: str, condition: str = "scratch"):
    return next(r for r in table.rows if r[2].text == model and r[0].text == condition)


# ----------------------------------------------------------------- relative corruption error
def test_relative_ce_is_100_for_the_reference_and_50_with_half_its_errors(tmp_path):
    records = [make_result("resnet50", 0.32, 0, 0.9, metrics=corruption_metrics(0.02)),
               make_result("vit_tiny_p8", 0.32, 0, 0.9, metrics=corruption_metrics(0.01))]
    runs = runs_of(tmp_path, records)
    rce = robustness_report.relative_corruption_error(runs)
    assert dict(zip(runs["model"], rce)) == pytest.approx({"resnet50": 100.0, "vit_tiny_p8": 50.0})


def test_reference_errors_are_averaged_over_its_seeds(tmp_path):
    # resnet50 seeds at 0.8x and 1.2x a base error: the reference is the base; the ViT has half the base error
    records = [make_result("resnet50", 0.32, 0, 0.9, metrics=corruption_metrics(0.02, 0.8)),
               make_result("resnet50", 0.32, 1, 0.9, metrics=corruption_metrics(0.02, 1.2)),
               make_result("vit_tiny_p8", 0.32, 0, 0.9, metrics=corruption_metrics(0.01)),
               make_result("vit_tiny_p8", 0.32, 1, 0.9, metrics=corruption_metrics(0.01))]
    runs = runs_of(tmp_path, records)
    rce = robustness_report.relative_corruption_error(runs)
    assert rce.groupby(runs["model"]).mean().to_dict() == pytest.approx({"resnet50": 100.0, "vit_tiny_p8": 50.0})
    assert sorted(rce[runs["model"] == "resnet50"]) == pytest.approx([80.0, 120.0])


def test_relative_ce_at_one_seed_from_the_arrays(tmp_path):
    # per (corruption, severity): resnet50 wrong on the first 8·s subset images, the ViT on the first 4·s
    def errors(per_severity: int) -> np.ndarray:
        wrong = np.zeros((len(CORRUPTIONS), len(SEVERITIES), N_SUBSET), dtype=bool)
        for s in SEVERITIES:
            wrong[:, s - 1, :per_severity * s] = True
        return wrong

    robust_run(tmp_path, "resnet50", corrupt_errors=errors(8))
    robust_run(tmp_path, "vit_tiny_p8", corrupt_errors=errors(4))
    table = robustness_report.robustness_table(collected(tmp_path), tmp_path)
    col = column_of(table, "Relative corruption error (%)")
    assert row_of(table, "resnet50")[col].text == "100.0 [100.0, 100.0]†"
    vit = row_of(table, "vit_tiny_p8")[col].text
    assert vit.startswith("50.0 [") and vit.endswith("]†")
    low, high = (float(x) for x in vit[len("50.0 ["):-2].split(", "))
    assert low < 50.0 < high
    assert estimates.TEST_SAMPLING_NOTE in table.notes


# ----------------------------------------------------------------- intervals
def test_intervals_are_t_over_seeds_and_test_sampling_at_one_seed(tmp_path):
    records = [robust_run(tmp_path, m, seed, skill) for m, skill in (("resnet50", 0.8), ("vit_tiny_p8", 0.7))
               for seed in (0, 1, 2)]
    robust_run(tmp_path, "resnet50", 0, 0.8, pretraining="fractaldb", pretrain_size=1000)
    table = robustness_report.robustness_table(collected(tmp_path), tmp_path)
    col = column_of(table, "Clean acc. (%)")
    # three seeds: mean ± t(0.975, 2) · s / √3
    accs = np.array([r["metrics"]["test/acc1"] for r in records if r["model"] == "resnet50"])
    half = sps.t.ppf(0.975, 2) * accs.std(ddof=1) / math.sqrt(3)
    expected = f"{100 * accs.mean():.1f} [{100 * (accs.mean() - half):.1f}, {100 * (accs.mean() + half):.1f}]"
    row = row_of(table, "resnet50")
    assert row[col].text == expected and row[3].text == "3"
    # one seed: Clopper-Pearson over the test images of predictions.npz, marked and explained
    one = row_of(table, "resnet50", "fractaldb 1k")
    path = collected(tmp_path).query("pretraining == 'fractaldb'")["path"].iloc[0]
    pred = np.load(tmp_path / Path(path).parent / "predictions.npz")
    correct = pred["test_pred"] == pred["test_target"]
    interval = sps.binomtest(int(correct.sum()), correct.size).proportion_ci(0.95, method="exact")
    assert one[3].text == "1"
    assert one[col].text == f"{100 * correct.mean():.1f} [{100 * interval.low:.1f}, {100 * interval.high:.1f}]†"
    assert any("test-sampling only" in note for note in table.notes)
    assert "Student-t over seeds when n ≥ 2" in table.caption


def test_one_seed_without_arrays_has_no_interval(tmp_path):
    robust_run(tmp_path, "resnet50", with_files=False)
    table = robustness_report.robustness_table(collected(tmp_path), tmp_path)
    assert table.rows[0][column_of(table, "Clean acc. (%)")].text.endswith("(n=1, no interval)")
    assert estimates.TEST_SAMPLING_NOTE not in table.notes


def test_the_largest_fraction_is_shown_and_said(tmp_path):
    robust_run(tmp_path, "resnet50", fraction=0.08)
    robust_run(tmp_path, "resnet50", fraction=0.32)
    table = robustness_report.robustness_table(collected(tmp_path), tmp_path)
    assert [r[1].text for r in table.rows] == ["32% (17,280)"]
    assert "largest training fraction" in table.caption
    chosen = robustness_report.robustness_table(collected(tmp_path), tmp_path, fraction=0.08)
    assert [r[1].text for r in chosen.rows] == ["8% (4,320)"]


def test_occlusion_column_is_the_measured_share_nearest_half(tmp_path):
    metrics = {"occlusion/40/acc1": 0.6, "occlusion/70/acc1": 0.3, "shuffle/acc1": 0.5}
    table = robustness_report.robustness_table(runs_of(tmp_path, [make_result(metrics=metrics)]), tmp_path)
    assert "40 % occluded acc. (%)" in table.header
    assert "40 %: the measured share nearest 50 %" in table.caption


# ----------------------------------------------------------------- calibration
def two_class_logits(confidence: list[float], temperature: float = 1.0) -> np.ndarray:
    """Logits whose softmax at `temperature` puts `confidence` on class 0."""
    p = np.asarray(confidence)
    return temperature * np.log(np.stack([p, 1 - p], axis=1))


def test_ece_equals_a_hand_computation():
    # bins of width 1/15: 0.95, 0.95 -> bin 14 (one right: accuracy 0.5); 0.65 -> bin 9; 0.55 -> bin 8 (right)
    confidence = [0.95, 0.95, 0.65, 0.55]
    targets = np.array([0, 1, 0, 0])
    hand = (2 * abs(0.5 - 0.95) + abs(1 - 0.65) + abs(1 - 0.55)) / 4  # 0.425
    for temperature in (1.0, 2.5):
        conf, correct, _ = robustness_report.per_image_calibration(
            two_class_logits(confidence, temperature), targets, temperature)
        assert robustness_report.expected_calibration_error(conf, correct) == pytest.approx(hand)
        diagram = robustness_report.reliability([(two_class_logits(confidence, temperature), targets, temperature)])
        assert diagram.ece == pytest.approx(hand)
        assert diagram.bins.loc[14, ["confidence", "accuracy", "count"]].tolist() == pytest.approx([0.95, 0.5, 2])


def test_calibration_table_and_reliability_legend_agree_with_the_runs(tmp_path):
    record = robust_run(tmp_path, "resnet50")
    runs = collected(tmp_path)
    table = robustness_report.calibration_table(runs, tmp_path)
    assert table.rows[0][column_of(table, "Temperature T")].text == "1.50 (n=1, no interval)"
    assert table.rows[0][column_of(table, "ECE (%)")].text.startswith(f"{100 * record['metrics']['test/ece']:.2f} [")
    fig = robustness_report.plot_reliability(runs, tmp_path)
    (ax,) = [a for a in fig.axes if a.get_visible()]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"before TS: ECE {100 * record['metrics']['test/ece']:.2f} %",
                      f"after TS (T = 1.50): ECE {100 * record['metrics']['test/ece_ts']:.2f} %"]


# ----------------------------------------------------------------- figures
@pytest.mark.slow
def test_figures_from_the_arrays_are_byte_identical_when_made_twice(tmp_path):
    robust_run(tmp_path / "runs", "resnet50", 0, 0.8)
    robust_run(tmp_path / "runs", "vit_tiny_p8", 0, 0.7)
    runs = collected(tmp_path / "runs")
    makers = robustness_report.figure_makers(tmp_path / "runs")
    first, skipped = write_outputs(makers, runs, tmp_path / "a", (".png", ".pdf"), plots.save_figure, "figure")
    second, _ = write_outputs(makers, runs, tmp_path / "b", (".png", ".pdf"), plots.save_figure, "figure")
    assert not skipped and list(first) == list(robustness_report.FIGURES)
    for name in first:
        assert [p.read_bytes() for p in first[name]] == [p.read_bytes() for p in second[name]]


def test_severity_and_occlusion_curves_have_bands_over_seeds_or_test_images(tmp_path):
    for seed in (0, 1):
        robust_run(tmp_path, "resnet50", seed, 0.8)
        robust_run(tmp_path, "vit_tiny_p8", seed, 0.7)
    robust_run(tmp_path, "resnet50", 0, 0.8, pretraining="fractaldb", pretrain_size=1000)
    robust_run(tmp_path, "vit_tiny_p8", 0, 0.7, pretraining="fractaldb", pretrain_size=1000, with_files=False)
    runs = collected(tmp_path)
    scratch, fractal = robustness_report.plot_corruption_severity(runs, tmp_path).axes
    assert [line.get_label() for line in scratch.get_lines()] == ["resnet50", "vit_tiny_p8"]
    assert list(scratch.get_lines()[0].get_xdata()) == [0, 1, 2, 3, 4, 5]
    # n = 2: both lines have t bands; n = 1: only the run with robustness.npz has a (test-sampling) band
    assert len(scratch.collections) == 2 and len(fractal.collections) == 1
    assert "test sampling only" in fractal.texts[0].get_text()
    vit = [r for _, r in runs.iterrows() if r["model"] == "vit_tiny_p8" and r["pretraining"] == "none"]
    means = [np.mean([r[f"corrupt/{c}/{s}/acc1"] for r in vit for c in CORRUPTIONS]) for s in SEVERITIES]
    clean = np.mean([r["test/acc1"] for r in vit])
    assert list(scratch.get_lines()[1].get_ydata()) == pytest.approx(100 * np.array([clean, *means]))
    occlusion = robustness_report.plot_occlusion(runs, tmp_path)
    assert list(occlusion.axes[0].get_lines()[0].get_xdata()) == [0, 10, 20, 30, 40, 50, 60, 70, 80]


def test_no_data_is_said_in_one_line(tmp_path):
    runs = runs_of(tmp_path, [make_result(), make_result("vit_tiny_p8")])
    for make, reason in ((robustness_report.robustness_table, "corrupt/"),
                         (robustness_report.calibration_table, "calibration metrics"),
                         (robustness_report.plot_corruption_severity, "corrupt/"),
                         (robustness_report.plot_occlusion, "occlusion/"),
                         (robustness_report.plot_reliability, "calibration metrics")):
        with pytest.raises(NoData, match=reason) as err:
            make(runs, tmp_path)
        assert "\n" not in str(err.value)


def test_reliability_needs_the_predictions_file(tmp_path):
    runs = runs_of(tmp_path, [make_result(metrics={"test/ece": 0.05, "test/ece_ts": 0.02})])
    with pytest.raises(NoData, match="predictions.npz"):
        robustness_report.plot_reliability(runs, tmp_path)


# ----------------------------------------------------------------- findings
def test_findings_claim_a_direction_only_when_the_interval_excludes_zero(tmp_path):
    records = []
    for seed, (cnn, vit) in enumerate([(0.60, 0.70), (0.62, 0.73), (0.58, 0.69)]):
        noise = {"shuffle/acc1": 0.5 + 0.1 * (-1) ** seed}
        records += [make_result("resnet50", 0.32, seed, 0.9, metrics={**corruption_metrics((1 - cnn) / 3), **noise}),
                    make_result("vit_tiny_p8", 0.32, seed, 0.9,
                                metrics={**corruption_metrics((1 - vit) / 3), "shuffle/acc1": 0.5})]
    write_runs(tmp_path, records)
    found = robustness_report.robustness_findings(collected(tmp_path), tmp_path)
    corruption = next(s for s in found if "Mean corruption acc" in s)
    assert "n=3 seeds, Student-t over seeds" in corruption
    assert "vit_tiny_p8 is more accurate under corruption" in corruption
    relative = next(s for s in found if "Relative corruption error" in s)
    assert "vit_tiny_p8 is lower in relative corruption error than resnet50" in relative
    shuffle = next(s for s in found if "Patch-shuffle" in s)
    assert "the interval includes 0, so no difference is established" in shuffle


def test_findings_at_one_seed_pair_use_the_shared_images(tmp_path):
    robust_run(tmp_path, "resnet50", 0, 0.9)
    robust_run(tmp_path, "vit_tiny_p8", 0, 0.3)
    found = robustness_report.robustness_findings(collected(tmp_path), tmp_path)
    corruption = next(s for s in found if "Mean corruption acc" in s)
    assert "n=1 seed, test-sampling only, bootstrap over images" in corruption
    assert "resnet50 is more accurate under corruption (mean of every corruption and severity) than vit_tiny_p8 " \
           "(test sampling only: another seed may differ)" in corruption


# ----------------------------------------------------------------- no torch
@pytest.mark.slow
def test_the_analysis_package_never_imports_torch():
    code = ("import pkgutil, importlib, sys, analysis\n"
            "for m in pkgutil.iter_modules(analysis.__path__):\n"
            "    importlib.import_module(f'analysis.{m.name}')\n"
            "assert 'torch' not in sys.modules, sorted(k for k in sys.modules if k.startswith('torch'))\n"
            "print(' '.join(sorted(k for k in sys.modules if k.startswith('analysis.'))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert "analysis.robustness_report" in done.stdout.split()  # every module of the package was imported
