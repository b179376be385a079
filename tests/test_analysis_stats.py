"""analysis.stats: seed aggregates, paired differences, power-law fits, crossover."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from analysis_fixtures import FULL_TRAIN, make_result, power_law_sweep, runs_of, small_sweep
from scipy import optimize
from scipy import stats as sps

from analysis import stats


def scipy_ci(values) -> tuple[float, float]:
    """The interval computed directly with scipy, as the module promises."""
    res = sps.bootstrap((np.asarray(values),), np.mean, n_resamples=stats.N_RESAMPLES, method="percentile",
                        confidence_level=0.95, rng=np.random.default_rng(stats.SEED))
    return res.confidence_interval.low, res.confidence_interval.high


def cell(frame, **keys) -> pd.Series:
    hits = stats.select(frame, **keys)
    assert len(hits) == 1, hits
    return hits.iloc[0]


def test_mean_std_n_and_ci_of_two_seeds(tmp_path):
    summary = stats.summarize(runs_of(tmp_path, small_sweep()))
    row = cell(summary, model="resnet50", pretraining="none", train_fraction=0.01)
    assert row["mean"] == pytest.approx(0.82) and row["n"] == 2 and row["n_images"] == 540
    assert row["std"] == pytest.approx(np.std([0.80, 0.84], ddof=1))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(scipy_ci([0.80, 0.84]))


def test_single_seed_has_no_interval_and_failures_are_counted(tmp_path):
    summary = stats.summarize(runs_of(tmp_path, small_sweep()))
    cnn = cell(summary, model="resnet50", pretraining="none", train_fraction=0.1)
    vit = cell(summary, model="vit_tiny_p8", pretraining="none", train_fraction=0.1)
    assert (cnn["mean"], cnn["n"], cnn["n_failed"], cnn["n_diverged"]) == (0.88, 1, 1, 0)
    assert (vit["mean"], vit["n"], vit["n_failed"], vit["n_diverged"]) == (0.86, 1, 0, 1)
    assert math.isnan(cnn["ci_low"]) and math.isnan(cnn["ci_high"]) and math.isnan(cnn["std"])


def test_cell_without_the_metric_has_n_0(tmp_path):
    summary = stats.summarize(runs_of(tmp_path, small_sweep()))
    row = cell(summary, model="vit_tiny_p8", pretraining="fractaldb", train_fraction=0.1)
    assert row["n"] == 0 and math.isnan(row["mean"])


def test_bootstrap_ci_matches_scipy_and_is_reproducible():
    values = [0.71, 0.74, 0.69, 0.80, 0.77]
    assert stats.bootstrap_ci(values) == pytest.approx(scipy_ci(values))
    assert stats.bootstrap_ci(values) == stats.bootstrap_ci(values)
    assert all(math.isnan(v) for v in stats.bootstrap_ci([0.5]))
    assert stats.bootstrap_ci([0.5, 0.5]) == (0.5, 0.5)


def test_vit_minus_cnn_is_paired_on_seed(tmp_path):
    diffs = stats.arch_differences(runs_of(tmp_path, small_sweep()))
    scratch = cell(diffs, pretraining="none", train_fraction=0.01)
    assert (scratch["vit_model"], scratch["cnn_model"]) == ("vit_tiny_p8", "resnet50")
    assert scratch["mean"] == pytest.approx(-0.09) and scratch["n"] == 2
    assert (scratch["ci_low"], scratch["ci_high"]) == pytest.approx(scipy_ci([0.70 - 0.80, 0.76 - 0.84]))
    fractal = cell(diffs, pretraining="fractaldb", train_fraction=0.01)
    assert fractal["mean"] == pytest.approx(-0.05) and fractal["pretrain_size"] == 12800
    # seed 1 failed for the CNN and diverged for the ViT at 10%: one pair left
    assert cell(diffs, pretraining="none", train_fraction=0.1)["n"] == 1


def test_each_vit_cnn_model_pair_is_compared(tmp_path):
    records = [make_result(m, 0.1, s, acc) for s in (0, 1)
               for m, acc in (("vit_tiny_p8", 0.7), ("vit_s16", 0.75), ("resnet50", 0.8), ("resnet18", 0.78))]
    diffs = stats.arch_differences(runs_of(tmp_path, records))
    assert sorted(zip(diffs["vit_model"], diffs["cnn_model"])) == [
        ("vit_s16", "resnet18"), ("vit_s16", "resnet50"), ("vit_tiny_p8", "resnet18"), ("vit_tiny_p8", "resnet50")]
    assert cell(diffs, vit_model="vit_s16", cnn_model="resnet18")["mean"] == pytest.approx(-0.03)


def test_pretraining_gain_over_scratch(tmp_path):
    gains = stats.pretraining_gains(runs_of(tmp_path, small_sweep()))
    assert len(gains) == 2
    assert cell(gains, model="vit_tiny_p8")["mean"] == pytest.approx(0.06)
    assert cell(gains, model="resnet50")["mean"] == pytest.approx(0.02)


def test_generalization_columns_and_mce(tmp_path):
    corr = {"corrupt/noise/1/acc1": 0.7, "corrupt/noise/2/acc1": 0.6,
            "corrupt/blur/1/acc1": 0.8, "corrupt/blur/2/acc1": 0.8, "train/acc1": 0.95}
    vit_corr = {"corrupt/noise/1/acc1": 0.75, "corrupt/noise/2/acc1": 0.65,
                "corrupt/blur/1/acc1": 0.6, "corrupt/blur/2/acc1": 0.6, "train/acc1": 0.99}
    runs = runs_of(tmp_path, [make_result("resnet50", metrics=corr), make_result("vit_tiny_p8", acc=0.7,
                                                                                   metrics=vit_corr)])
    out = stats.with_generalization(runs).set_index("model")
    assert out.loc["resnet50", "corrupt/mce"] == pytest.approx(100.0)
    # noise: (0.25 + 0.35) / (0.3 + 0.4); blur: (0.4 + 0.4) / (0.2 + 0.2); mean of the two, in %
    assert out.loc["vit_tiny_p8", "corrupt/mce"] == pytest.approx(100 * (0.6 / 0.7 + 0.8 / 0.4) / 2)
    assert out.loc["vit_tiny_p8", "corrupt/mean_acc1"] == pytest.approx(0.65)
    assert out.loc["vit_tiny_p8", "train_test_gap"] == pytest.approx(0.29)


@pytest.mark.parametrize("abc", [(8.0, 0.5, 0.02), (1.0, 0.4, 0.08), (50.0, 1.2, 0.15)])
def test_power_law_fit_recovers_noiseless_parameters(abc):
    a, b, c = abc
    n = np.repeat([540.0, 1620, 5400, 16200, 54000], 2)
    fit = stats.fit_power_law(n, a * n**-b + c)
    assert (fit.a, fit.b, fit.c) == pytest.approx(abc, rel=1e-3)


def test_power_law_needs_three_sizes():
    with pytest.raises(stats.FitError, match="needs >= 3 distinct training-set sizes, has 2"):
        stats.fit_power_law([100, 100, 1000, 1000], [0.5, 0.5, 0.3, 0.3])


def test_power_law_fits_per_model_and_pretraining(tmp_path):
    fits = stats.power_law_fits(runs_of(tmp_path, small_sweep() + power_law_sweep(fractions=(0.03, 0.3, 1.0))))
    assert cell(fits, model="resnet50", pretraining="none")["fitted"]
    unfitted = cell(fits, model="resnet50", pretraining="fractaldb")
    assert not unfitted["fitted"] and "has 1" in unfitted["reason"]


def true_crossover(vit, cnn) -> float:
    gap = lambda n: (vit[0] * n ** -vit[1] + vit[2]) - (cnn[0] * n ** -cnn[1] + cnn[2])  # noqa: E731
    return optimize.brentq(gap, 10, 1e7)


def test_crossover_is_found_where_constructed(tmp_path):
    vit, cnn = (8.0, 0.5, 0.02), (1.0, 0.4, 0.08)
    cross = stats.crossovers(runs_of(tmp_path, power_law_sweep(vit, cnn, noise=0.005)), n_boot=40)
    row = cross.iloc[0]
    expected = true_crossover(vit, cnn)
    assert row["status"] == "measured" and row["n"] == pytest.approx(expected, rel=0.01)
    assert row["ci_low"] < expected < row["ci_high"] and row["found"] >= 0.95
    assert (row["n_min"], row["n_max"]) == (round(FULL_TRAIN * 0.01), FULL_TRAIN)


def test_crossover_beyond_the_measured_range_is_extrapolated(tmp_path):
    vit, cnn = (8.0, 0.5, 0.02), (1.0, 0.4, 0.08)
    runs = runs_of(tmp_path, power_law_sweep(vit, cnn, fractions=(0.01, 0.03, 0.1)))
    row = stats.crossovers(runs, n_boot=10).iloc[0]
    assert row["status"] == "extrapolated" and row["n"] == pytest.approx(true_crossover(vit, cnn), rel=0.01)
    assert row["n"] > row["n_max"]


def test_no_crossover_when_the_vit_stays_worse(tmp_path):
    row = stats.crossovers(runs_of(tmp_path, power_law_sweep(vit=(8.0, 0.5, 0.10))), n_boot=10).iloc[0]
    assert row["status"] == "none" and math.isnan(row["n"])


def test_vit_ahead_from_the_smallest_size(tmp_path):
    row = stats.crossovers(runs_of(tmp_path, power_law_sweep(vit=(0.5, 0.4, 0.01))), n_boot=10).iloc[0]
    assert row["status"] == "vit_ahead" and math.isnan(row["cnn_overtakes"])


def test_reversed_crossover_names_where_the_cnn_overtakes(tmp_path):
    vit, cnn = (1.0, 0.4, 0.08), (8.0, 0.5, 0.02)  # the ViT leads on little data, the CNN on more
    row = stats.crossovers(runs_of(tmp_path, power_law_sweep(vit, cnn)), n_boot=10).iloc[0]
    assert row["status"] == "vit_ahead" and math.isnan(row["n"])
    assert row["cnn_overtakes"] == pytest.approx(true_crossover(vit, cnn), rel=0.01)
    assert row["n_min"] < row["cnn_overtakes"] < row["n_max"]


def test_crossover_interval_undetermined_with_one_seed(tmp_path):
    row = stats.crossovers(runs_of(tmp_path, power_law_sweep(seeds=(0,))), n_boot=10).iloc[0]
    assert row["status"] == "measured" and math.isnan(row["ci_low"]) and "n=1" in row["note"]


def test_crossover_not_fitted_with_two_sizes(tmp_path):
    row = stats.crossovers(runs_of(tmp_path, power_law_sweep(fractions=(0.01, 0.1))), n_boot=10).iloc[0]
    assert row["status"] == "not_fitted" and "has 2" in row["note"]


def test_find_crossover_direct():
    vit, cnn = stats.PowerLaw(8.0, 0.5, 0.02), stats.PowerLaw(1.0, 0.4, 0.08)
    n = stats.find_crossover(vit, cnn, 500, 50_000)
    assert vit(n) == pytest.approx(cnn(n)) and n == pytest.approx(true_crossover((8, 0.5, 0.02), (1, 0.4, 0.08)))
    assert stats.find_crossover(vit, cnn, 500, 1000) is None
