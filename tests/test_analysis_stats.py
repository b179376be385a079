"""analysis.stats: seed aggregates, paired differences, flags, identified power-law fits, crossover."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from analysis_fixtures import FULL_TRAIN, make_result, power_law_sweep, runs_of, small_sweep
from scipy import optimize
from scipy import stats as sps

from analysis import stats

SIZES = np.array([540.0, 1620, 5400, 16200, 54000])


def t_ci(values) -> tuple[float, float]:
    """The Student-t interval computed directly with scipy, as the module promises."""
    return sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))


def cell(frame, **keys) -> pd.Series:
    hits = stats.select(frame, **keys)
    assert len(hits) == 1, hits
    return hits.iloc[0]


def flag(records: list[dict], model: str, fraction: float) -> list[dict]:
    """Mark the runs of one cell as still improving when their budget ended."""
    for r in records:
        if r["model"] == model and r["train_fraction"] == fraction:
            r["improving_at_end"] = True
    return records


# --------------------------------------------------------------- cells and differences
def test_mean_std_n_and_t_interval_of_two_seeds(tmp_path):
    summary = stats.summarize(runs_of(tmp_path, small_sweep()))
    row = cell(summary, model="resnet50", pretraining="none", train_fraction=0.01)
    assert row["mean"] == pytest.approx(0.82) and row["n"] == 2 and row["n_images"] == 540
    assert row["std"] == pytest.approx(np.std([0.80, 0.84], ddof=1))
    low, high = t_ci([0.80, 0.84])
    assert high > 1 and (row["ci_low"], row["ci_high"]) == pytest.approx((low, 1.0))  # cut to [0, 1]
    assert row["interval"] == "t"


def test_single_seed_gets_a_test_sampling_interval_and_failures_are_counted(tmp_path):
    summary = stats.summarize(runs_of(tmp_path, small_sweep()))
    cnn = cell(summary, model="resnet50", pretraining="none", train_fraction=0.1)
    vit = cell(summary, model="vit_tiny_p8", pretraining="none", train_fraction=0.1)
    assert (cnn["mean"], cnn["n"], cnn["n_failed"], cnn["n_diverged"]) == (0.88, 1, 1, 0)
    assert (vit["mean"], vit["n"], vit["n_failed"], vit["n_diverged"]) == (0.86, 1, 0, 1)
    assert math.isnan(cnn["std"]) and cnn["interval"] == "test"  # Wilson over the 10,000 test images
    assert (cnn["ci_low"], cnn["ci_high"]) == pytest.approx(stats.wilson_interval(8800, 10_000))


def test_cell_without_the_metric_has_n_0(tmp_path):
    summary = stats.summarize(runs_of(tmp_path, small_sweep()))
    row = cell(summary, model="vit_tiny_p8", pretraining="fractaldb", train_fraction=0.1)
    assert row["n"] == 0 and math.isnan(row["mean"]) and row["interval"] == "none"


def test_expected_cells_without_runs_are_listed_with_n_0(tmp_path):
    runs = runs_of(tmp_path, [make_result("resnet50", 0.1, 0)])
    expected = pd.DataFrame({"dataset": ["fashion_mnist"] * 2, "pretraining": ["none"] * 2,
                             "pretrain_size": pd.array([None, None], dtype="Int64"), "train_fraction": [0.1, 0.3],
                             "model": ["vit_tiny_p8", "resnet50"], "arch": ["vit", "cnn"]})
    summary = stats.summarize(runs, expected=expected)
    assert list(zip(summary["model"], summary["train_fraction"], summary["n"])) == [
        ("resnet50", 0.1, 1), ("vit_tiny_p8", 0.1, 0), ("resnet50", 0.3, 0)]


def test_vit_minus_cnn_is_paired_on_seed(tmp_path):
    diffs = stats.arch_differences(runs_of(tmp_path, small_sweep()))
    scratch = cell(diffs, pretraining="none", train_fraction=0.01)
    assert (scratch["vit_model"], scratch["cnn_model"]) == ("vit_tiny_p8", "resnet50")
    assert scratch["mean"] == pytest.approx(-0.09) and scratch["n"] == 2
    assert (scratch["ci_low"], scratch["ci_high"]) == pytest.approx(t_ci([0.70 - 0.80, 0.76 - 0.84]))
    fractal = cell(diffs, pretraining="fractaldb", train_fraction=0.01)
    assert fractal["mean"] == pytest.approx(-0.05) and fractal["pretrain_size"] == 12800
    # seed 1 failed for the CNN and diverged for the ViT at 10%: one pair left, without predictions
    single = cell(diffs, pretraining="none", train_fraction=0.1)
    assert single["n"] == 1 and single["interval"] == "none" and "no predictions file" in single["interval_note"]


def test_pairing_by_seed_is_tighter_than_comparing_means(tmp_path):
    """A seed effect shared by both nets (same data subset) cancels in the paired difference."""
    records = [make_result(m, 0.1, s, base + shift) for s, shift in enumerate((0.0, 0.05, -0.04))
               for m, base in (("vit_tiny_p8", 0.70), ("resnet50", 0.72))]
    records[0]["metrics"]["test/acc1"] += 0.002
    diff = stats.arch_differences(runs_of(tmp_path, records)).iloc[0]
    assert diff["mean"] == pytest.approx(-0.02 + 0.002 / 3) and diff["ci_high"] < 0
    assert diff["ci_high"] - diff["ci_low"] < 0.01


def test_each_vit_cnn_model_pair_is_compared(tmp_path):
    records = [make_result(m, 0.1, s, acc + 0.01 * s) for s in (0, 1)
               for m, acc in (("vit_tiny_p8", 0.7), ("vit_s16", 0.75), ("resnet50", 0.8), ("resnet18", 0.78))]
    diffs = stats.arch_differences(runs_of(tmp_path, records))
    assert sorted(zip(diffs["vit_model"], diffs["cnn_model"])) == [
        ("vit_s16", "resnet18"), ("vit_s16", "resnet50"), ("vit_tiny_p8", "resnet18"), ("vit_tiny_p8", "resnet50")]
    assert cell(diffs, vit_model="vit_s16", cnn_model="resnet18")["mean"] == pytest.approx(-0.03)


def test_pretraining_gain_over_scratch(tmp_path):
    gains = stats.pretraining_gains(runs_of(tmp_path, small_sweep()))
    assert len(gains) == 2
    vit = cell(gains, model="vit_tiny_p8")
    assert vit["mean"] == pytest.approx(0.06) and vit["interval"] == "t"
    assert (vit["ci_low"], vit["ci_high"]) == pytest.approx(t_ci([0.08, 0.04]))
    assert cell(gains, model="resnet50")["mean"] == pytest.approx(0.02)


def test_a_cell_still_improving_is_flagged_and_so_are_its_differences(tmp_path):
    runs = runs_of(tmp_path, flag(small_sweep(), "vit_tiny_p8", 0.01))
    summary = stats.summarize(runs)
    assert cell(summary, model="vit_tiny_p8", pretraining="none", train_fraction=0.01)["flagged"]
    assert not cell(summary, model="resnet50", pretraining="none", train_fraction=0.01)["flagged"]
    diffs = stats.arch_differences(runs)
    assert list(diffs.sort_values(["pretraining", "train_fraction"])["flagged"]) == [True, True, False]
    gains = stats.pretraining_gains(runs)
    assert cell(gains, model="vit_tiny_p8")["flagged"] and not cell(gains, model="resnet50")["flagged"]


def test_schema_v1_runs_are_not_flagged(tmp_path):
    old = make_result(schema_version=1)
    for key in ("improving_at_end", "budget_steps", "n_evals", "stopped_early", "precision", "hardware"):
        del old[key]
    assert not stats.summarize(runs_of(tmp_path, [old]))["flagged"].any()


def test_precision_mismatch_between_paired_runs(tmp_path):
    records = [make_result("vit_tiny_p8", 0.1, 0), make_result("resnet50", 0.1, 0, precision="bf16-mixed"),
               make_result("vit_tiny_p8", 0.1, 1), make_result("resnet50", 0.1, 1)]
    bad = stats.precision_mismatches(runs_of(tmp_path, records))
    assert len(bad) == 1 and tuple(bad.iloc[0][["seed", "vit_precision", "cnn_precision"]]) == (
        0, "32-true", "bf16-mixed")


def test_upstream_runs_report_their_own_validation_and_plateau(tmp_path):
    up = make_result("vit_tiny_p8", 1.0, 0, None, dataset="fractaldb", role="pretrain", improving_at_end=True)
    up["selected"]["val/acc1"] = 0.42
    tuned = make_result("vit_tiny_p8", 0.1, 0, 0.7, "fractaldb", 12800, pretrained_from=up["run_id"])
    cached = make_result("resnet50", 0.1, 0, 0.8, "fractaldb", 12800, pretrained_from="cafe00000000",
                         upstream_val_acc1=0.55, upstream_improving_at_end=False)
    summary = stats.upstream_summary(runs_of(tmp_path, [up, tuned, cached])).set_index("run_id")
    assert summary.loc[up["run_id"], "val_acc1"] == 0.42 and summary.loc[up["run_id"], "improving_at_end"]
    assert summary.loc["cafe00000000", "val_acc1"] == 0.55 and not summary.loc["cafe00000000", "improving_at_end"]
    assert summary.loc["cafe00000000", "status"] == "no result in this sweep"


def test_train_test_gap(tmp_path):
    runs = runs_of(tmp_path, [make_result("resnet50", metrics={"train/acc1": 0.95}),
                              make_result("vit_tiny_p8", acc=0.7, metrics={"train/acc1": 0.99}),
                              make_result("resnet18")])
    out = stats.with_train_test_gap(runs).set_index("model")
    assert out.loc["resnet50", "train_test_gap"] == pytest.approx(0.15)
    assert out.loc["vit_tiny_p8", "train_test_gap"] == pytest.approx(0.29)
    assert math.isnan(out.loc["resnet18", "train_test_gap"])  # no train/acc1 recorded


# --------------------------------------------------------------- power laws
@pytest.mark.parametrize("abc", [(8.0, 0.5, 0.02), (1.0, 0.4, 0.08), (50.0, 1.2, 0.15)])
def test_power_law_fit_recovers_noiseless_parameters(abc):
    a, b, c = abc
    n = np.repeat(SIZES, 2)
    fit = stats.fit_power_law(n, a * n**-b + c)
    assert fit.identified and fit.dof == 2
    assert (fit.law.a, fit.law.b, fit.law.c) == pytest.approx(abc, rel=1e-3)


def test_a_fit_on_its_bound_is_not_identified():
    """c = 0 is a bound of the 3-parameter form: not identified; the 2-parameter form is."""
    err = 3.0 * SIZES**-0.3
    three = stats.fit_power_law(SIZES, err, 3)
    assert not three.identified and three.law is None and "c on its lower bound 0" in three.reason
    chosen = stats.fit_curve(SIZES, err)
    assert chosen.identified and chosen.form == "a·n^(−b)" and chosen.law.b == pytest.approx(0.3, rel=1e-3)


def test_an_error_that_does_not_fall_is_not_identified_in_either_form():
    fit = stats.fit_curve(SIZES, 0.2 + 0.01 * np.log(SIZES))
    assert not fit.identified and fit.law is None
    assert "a·n^(−b) + c:" in fit.reason and "a·n^(−b):" in fit.reason and "on its lower bound" in fit.reason


def test_residual_dof_count_distinct_sizes_not_seeds():
    n = np.repeat(SIZES[:4], 3)  # 4 sizes x 3 seeds: 12 points, but 1 residual dof for 3 parameters
    err = 8.0 * n**-0.5 + 0.02
    three = stats.fit_power_law(n, err, 3)
    assert not three.identified and "4 distinct sizes − 3 parameters = 1 residual degrees of freedom" in three.reason
    n3 = np.repeat(SIZES[:3], 3)
    assert not stats.fit_curve(n3, 8.0 * n3**-0.5).identified  # 3 sizes: 1 dof even with 2 parameters


def test_power_law_fits_per_model_and_pretraining(tmp_path):
    fits = stats.power_law_fits(runs_of(tmp_path, small_sweep() + power_law_sweep()))
    fitted = cell(fits, model="resnet50", pretraining="none")
    assert fitted["identified"] and fitted["form"] == "a·n^(−b) + c" and fitted["n_sizes"] == 5
    unfitted = cell(fits, model="resnet50", pretraining="fractaldb")
    assert not unfitted["identified"] and math.isnan(unfitted["b"])
    assert "1 distinct size − 2 parameters" in unfitted["reason"]


def test_flagged_cells_are_kept_out_of_fits(tmp_path):
    records = flag(power_law_sweep(fractions=(0.01, 0.03, 0.1, 0.3, 0.6, 1.0)), "resnet50", 1.0)
    fits = stats.power_law_fits(runs_of(tmp_path, records))
    cnn, vit = cell(fits, model="resnet50"), cell(fits, model="vit_tiny_p8")
    assert (cnn["n_sizes"], cnn["n_flagged_sizes"], cnn["n_max"]) == (5, 1, round(FULL_TRAIN * 0.6))
    assert (vit["n_sizes"], vit["n_flagged_sizes"], vit["n_max"]) == (6, 0, FULL_TRAIN)


# --------------------------------------------------------------- crossover
def true_crossover(vit, cnn) -> float:
    gap = lambda n: (vit[0] * n ** -vit[1] + vit[2]) - (cnn[0] * n ** -cnn[1] + cnn[2])  # noqa: E731
    return optimize.brentq(gap, 1, 1e12)


def test_crossover_is_found_where_constructed(tmp_path):
    vit, cnn = (8.0, 0.5, 0.02), (1.0, 0.4, 0.08)
    row = stats.crossovers(runs_of(tmp_path, power_law_sweep(vit, cnn, noise=0.001))).iloc[0]
    assert row["status"] == "measured" and row["n"] == pytest.approx(true_crossover(vit, cnn), rel=0.05)
    assert (row["n_min"], row["n_max"]) == (round(FULL_TRAIN * 0.01), FULL_TRAIN)


def test_a_crossover_beyond_the_measured_sizes_is_not_extrapolated(tmp_path):
    vit, cnn = (8.0, 0.5, 0.02), (1.0, 0.4, 0.08)  # they cross near 8,500 images
    runs = runs_of(tmp_path, power_law_sweep(vit, cnn, fractions=(0.004, 0.008, 0.015, 0.03, 0.06)))
    row = stats.crossovers(runs).iloc[0]
    assert true_crossover(vit, cnn) > row["n_max"]
    assert row["status"] == "none" and math.isnan(row["n"])


def test_the_crossover_never_leaves_the_measured_range():
    """Random curves that cross somewhere: a crossover is reported only when it lies inside the sizes measured."""
    rng = np.random.default_rng(7)
    inside = outside = 0
    for _ in range(200):
        vit = (rng.uniform(3, 20), rng.uniform(0.4, 0.8), rng.uniform(0.0, 0.05))
        cnn = (rng.uniform(0.5, 2), rng.uniform(0.1, 0.4), rng.uniform(0.05, 0.15))
        low = rng.uniform(100, 10_000)
        high = low * rng.uniform(3, 300)
        rows = [pd.Series({"model": m, "identified": True, "reason": "", "a": a, "b": b, "c": c,
                           "n_min": low, "n_max": high}) for m, (a, b, c) in (("v", vit), ("c", cnn))]
        result = stats.crossover(*rows)
        truth = true_crossover(vit, cnn)
        if low <= truth <= high:
            inside += 1
            assert result.status == "measured" and result.n == pytest.approx(truth, rel=1e-6)
        else:
            outside += 1
            assert result.status in ("none", "vit_ahead") and math.isnan(result.n)
    assert inside > 20 and outside > 20  # both branches are exercised


def test_no_crossover_when_the_vit_stays_worse(tmp_path):
    row = stats.crossovers(runs_of(tmp_path, power_law_sweep(vit=(8.0, 0.5, 0.10)))).iloc[0]
    assert row["status"] == "none" and math.isnan(row["n"])


def test_vit_ahead_from_the_smallest_size(tmp_path):
    row = stats.crossovers(runs_of(tmp_path, power_law_sweep(vit=(0.5, 0.4, 0.01)))).iloc[0]
    assert row["status"] == "vit_ahead" and math.isnan(row["cnn_overtakes"])


def test_reversed_crossover_names_where_the_cnn_overtakes(tmp_path):
    vit, cnn = (1.0, 0.4, 0.08), (8.0, 0.5, 0.02)  # the ViT leads on little data, the CNN on more
    row = stats.crossovers(runs_of(tmp_path, power_law_sweep(vit, cnn))).iloc[0]
    assert row["status"] == "vit_ahead" and math.isnan(row["n"])
    assert row["cnn_overtakes"] == pytest.approx(true_crossover(vit, cnn), rel=0.01)
    assert row["n_min"] < row["cnn_overtakes"] < row["n_max"]


def test_no_crossover_from_unidentified_fits(tmp_path):
    row = stats.crossovers(runs_of(tmp_path, power_law_sweep(fractions=(0.01, 0.1, 1.0)))).iloc[0]
    assert row["status"] == "not_identified" and math.isnan(row["n"])
    assert "3 distinct sizes − 2 parameters = 1 residual degrees of freedom" in row["note"]


def test_find_crossover_direct():
    vit, cnn = stats.PowerLaw(8.0, 0.5, 0.02), stats.PowerLaw(1.0, 0.4, 0.08)
    n = stats.find_crossover(vit, cnn, 500, 50_000)
    assert vit(n) == pytest.approx(cnn(n)) and n == pytest.approx(true_crossover((8, 0.5, 0.02), (1, 0.4, 0.08)))
    assert stats.find_crossover(vit, cnn, 500, 1000) is None
