"""analysis.stats intervals: nominal coverage over seeds, test-sampling uncertainty at n = 1."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from analysis_fixtures import make_result, runs_of, write_predictions
from scipy import stats as sps

from analysis import stats


@pytest.mark.parametrize("n", [2, 3, 5])
def test_t_interval_covers_the_true_mean_at_its_nominal_rate(n):
    """Normal data with a known mean: the 95% interval covers it 93-97% of the time."""
    rng = np.random.default_rng(20240)
    true_mean, trials = 0.8, 4000
    samples = rng.normal(true_mean, 0.03, size=(trials, n))
    covered = sum(low <= true_mean <= high for low, high in map(stats.t_interval, samples))
    assert 0.93 <= covered / trials <= 0.97


def test_t_interval_is_mean_plus_minus_t_times_standard_error():
    values = [0.70, 0.76, 0.73]
    low, high = stats.t_interval(values)
    expected = sps.t.interval(0.95, 2, loc=np.mean(values), scale=sps.sem(values))
    assert (low, high) == pytest.approx(expected)
    assert all(math.isnan(v) for v in stats.t_interval([0.5]))
    assert stats.t_interval([0.5, 0.5]) == (0.5, 0.5)


def test_wilson_interval_matches_its_closed_form():
    k, n, z = 86, 100, sps.norm.ppf(0.975)
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / (1 + z**2 / n)
    assert stats.wilson_interval(k, n) == pytest.approx((centre - half, centre + half))


def hand_built(only_vit: int = 30, only_cnn: int = 10, both: int = 50, neither: int = 10):
    """Targets and the two nets' predictions: the ViT alone right on `only_vit` images, the CNN on `only_cnn`."""
    n = only_vit + only_cnn + both + neither
    target = np.arange(n) % 10
    wrong = (target + 1) % 10
    vit_right = np.r_[np.ones(only_vit), np.zeros(only_cnn), np.ones(both), np.zeros(neither)].astype(bool)
    cnn_right = np.r_[np.zeros(only_vit), np.ones(only_cnn), np.ones(both), np.zeros(neither)].astype(bool)
    return target, np.where(vit_right, target, wrong), np.where(cnn_right, target, wrong)


def test_paired_test_counts_discordant_images_and_gives_the_exact_mcnemar_p():
    target, vit_pred, cnn_pred = hand_built()
    test = stats.paired_test(vit_pred == target, cnn_pred == target)
    assert (test.n_images, test.only_first, test.only_second) == (100, 30, 10)
    assert test.diff == pytest.approx(0.20)
    assert test.p_value == pytest.approx(2 * sps.binom.cdf(10, 40, 0.5))  # 0.00222
    assert test.ci_low < 0.20 < test.ci_high and test.ci_low > 0
    assert stats.paired_test(vit_pred == target, cnn_pred == target) == test  # fixed seed: reproducible
    assert stats.mcnemar_exact(0, 0) == 1.0


def test_the_count_bootstrap_equals_resampling_images():
    """Drawing the discordant counts from a multinomial is the bootstrap over images."""
    target, vit_pred, cnn_pred = hand_built(12, 7, 21, 10)
    vit, cnn = vit_pred == target, cnn_pred == target
    rng = np.random.default_rng(1)
    index = rng.integers(0, vit.size, size=(20_000, vit.size))
    explicit = (vit[index].astype(int) - cnn[index].astype(int)).mean(axis=1)
    test = stats.paired_test(vit, cnn, n_resamples=20_000)
    assert (test.ci_low, test.ci_high) == pytest.approx(tuple(np.quantile(explicit, [0.025, 0.975])), abs=0.021)


def single_seed_pair(tmp_path, vit_target=None):
    target, vit_pred, cnn_pred = hand_built()
    vit, cnn = make_result("vit_tiny_p8", 0.1, 0), make_result("resnet50", 0.1, 0)
    write_predictions(tmp_path, vit, target if vit_target is None else vit_target, vit_pred)
    write_predictions(tmp_path, cnn, target, cnn_pred)
    return runs_of(tmp_path, [vit, cnn])


def test_single_seed_difference_has_a_test_sampling_interval_and_mcnemar(tmp_path):
    row = stats.arch_differences(single_seed_pair(tmp_path)).iloc[0]
    assert row["n"] == 1 and row["interval"] == "test" and row["mean"] == pytest.approx(0.20)
    assert row["p_value"] == pytest.approx(0.0022214, rel=1e-4)
    assert 0 < row["ci_low"] < 0.20 < row["ci_high"]


def test_single_seed_accuracy_has_a_wilson_interval_over_the_test_images(tmp_path):
    summary = stats.summarize(single_seed_pair(tmp_path))
    cnn = stats.select(summary, model="resnet50").iloc[0]
    assert cnn["interval"] == "test" and cnn["mean"] == pytest.approx(0.60)
    assert (cnn["ci_low"], cnn["ci_high"]) == pytest.approx(stats.wilson_interval(60, 100))


def test_no_interval_when_the_test_targets_differ_or_the_file_is_missing(tmp_path):
    target = hand_built()[0]
    row = stats.arch_differences(single_seed_pair(tmp_path / "a", vit_target=target[::-1].copy())).iloc[0]
    assert row["interval"] == "none" and "test_target differ" in row["interval_note"]
    runs = single_seed_pair(tmp_path / "b")
    Path(stats.select(runs, model="resnet50")["predictions_path"].iloc[0]).unlink()
    row = stats.arch_differences(runs).iloc[0]
    assert row["interval"] == "none" and "predictions.npz missing in run" in row["interval_note"]
    old = runs_of(tmp_path / "c", [make_result("vit_tiny_p8", 0.1, 0), make_result("resnet50", 0.1, 0)])
    row = stats.arch_differences(old).iloc[0]
    assert row["interval"] == "none" and "no predictions file" in row["interval_note"]


def test_predictions_that_do_not_match_the_recorded_accuracy_give_no_interval(tmp_path):
    runs = single_seed_pair(tmp_path)
    runs.loc[runs["model"] == "resnet50", "test/acc1"] = 0.7
    row = stats.arch_differences(runs).iloc[0]
    assert row["interval"] == "none" and "its result records 0.7000" in row["interval_note"]
