"""analysis.ablations: variants from the architecture, the default row, paired differences, patch shuffle."""

from __future__ import annotations

import math

import numpy as np
import pytest
from analysis_fixtures import SWEEP, make_result, runs_of, write_runs
from generalization_fixtures import variant_run, variant_run_with_files
from scipy import stats as sps

from analysis import ablations, collect, estimates
from analysis.outputs import NoData

# (pos_embed, pool, patch) -> test accuracy per seed 0, 1, 2
ACCURACIES = {
    ("learn", "token", 4): (0.80, 0.82, 0.78),
    ("sincos2d", "token", 4): (0.81, 0.80, 0.79),  # within noise of the default
    ("none", "token", 4): (0.70, 0.71, 0.69),  # clearly worse
    ("learn", "avg", 4): (0.79, 0.83, 0.78),
    ("learn", "token", 8): (0.75, 0.74, 0.76),  # the default of patch 8
    ("none", "avg", 8): (0.66, 0.64, 0.65),
}


def ablation_sweep() -> list[dict]:
    records = [variant_run(None, pos, pool, patch, seed, acc)
               for (pos, pool, patch), accs in ACCURACIES.items() for seed, acc in enumerate(accs)]
    return records + [make_result("resnet50", 0.32, seed, 0.85) for seed in range(3)]


def row(table, pos: str, pool: str, patch: str):
    return next(r for r in table.rows if (r[1].text, r[2].text, r[3].text) == (pos, pool, patch))


def cell(table, r, title: str):
    return r[table.header.index(title)]


def test_rows_follow_the_paper_layout_and_the_default_is_marked(tmp_path):
    table = ablations.ablation_table(runs_of(tmp_path, ablation_sweep()), tmp_path)
    keys = [(r[1].text, r[2].text, r[3].text) for r in table.rows]
    assert keys == [("learned 1-D", "class token", "4"), ("learned 1-D", "avg pool", "4"),
                    ("2-D sin-cos", "class token", "4"), ("none", "class token", "4"),
                    ("learned 1-D", "class token", "8"), ("none", "avg pool", "8")]
    defaults = [k for k, r in zip(keys, table.rows) if cell(table, r, "Δ vs default (points)").text == "default"]
    assert defaults == [("learned 1-D", "class token", "4")]  # patch 4 has the most variants: the reference
    assert all(r[0].text == "vit_tiny_p8" for r in table.rows)  # the CNN is not a variant
    assert any("Table 8" in note for note in table.notes)
    assert "Shuffle acc. (%)" not in table.header and any("no patch-shuffle" in note for note in table.notes)


def test_differences_are_paired_by_seed_against_the_default_of_the_same_patch(tmp_path):
    table = ablations.ablation_table(runs_of(tmp_path, ablation_sweep()), tmp_path)

    def expected(variant: tuple, default: tuple) -> str:
        d = np.subtract(ACCURACIES[variant], ACCURACIES[default])
        half = sps.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
        return estimates.Estimate(d.mean(), d.mean() - half, d.mean() + half, 3, "t").text(signed=True)

    none4 = cell(table, row(table, "none", "class token", "4"), "Δ vs default (points)")
    assert none4.text == expected(("none", "token", 4), ("learn", "token", 4)) and none4.bold
    sincos = cell(table, row(table, "2-D sin-cos", "class token", "4"), "Δ vs default (points)")
    assert sincos.text == expected(("sincos2d", "token", 4), ("learn", "token", 4)) and not sincos.bold
    none8 = cell(table, row(table, "none", "avg pool", "8"), "Δ vs default (points)")
    assert none8.text == expected(("none", "avg", 8), ("learn", "token", 8)) and none8.bold
    # patch size is an ablation too: the default of patch 8 against the default of the reference patch 4
    patch8 = cell(table, row(table, "learned 1-D", "class token", "8"), "Δ vs default (points)")
    assert patch8.text == expected(("learn", "token", 8), ("learn", "token", 4)) + " vs patch 4"
    assert not patch8.bold  # −5, −8, −2 points: the interval includes 0 at n = 3
    found = ablations.ablation_findings(runs_of(tmp_path, ablation_sweep()), tmp_path)
    assert any("learned 1-D position embedding, class token, patch 8 vs the default (learned 1-D position "
               "embedding, class token, patch 4)" in s and "within noise" in s for s in found)
    acc = cell(table, row(table, "none", "class token", "4"), "Test acc. (%)").text
    assert acc.startswith("70.0 [")


def test_pairs_are_matched_on_seed_not_on_order(tmp_path):
    records = [variant_run(None, "learn", "token", seed=s, acc=0.8 + 0.01 * s) for s in (0, 1, 2)]
    records += [variant_run(None, "none", "token", seed=s, acc=0.7 + 0.01 * s) for s in (1, 2, 3)]
    table = ablations.ablation_table(runs_of(tmp_path, records), tmp_path)
    delta = cell(table, row(table, "none", "class token", "4"), "Δ vs default (points)").text
    assert delta == "−10.0 [−10.0, −10.0] (n=2)"  # seeds 1 and 2 only, both −10 points; n = 3 on either side


def test_one_seed_uses_the_test_images_and_patch_shuffle_invariance(tmp_path):
    variant_run_with_files(tmp_path, "learn", "token", skill=0.85)
    variant_run_with_files(tmp_path, "none", "avg", skill=0.6, shuffle_invariant=True)
    runs = collect.collect(tmp_path, SWEEP).runs
    table = ablations.ablation_table(runs, tmp_path)
    none = row(table, "none", "avg pool", "4")
    delta = cell(table, none, "Δ vs default (points)")
    assert delta.text.endswith("]†") and delta.bold  # 25 points apart over 200 shared test images
    assert estimates.TEST_SAMPLING_NOTE in table.notes
    assert cell(table, none, "Invariance expected; images changed").text == "yes; 0 of 120 changed"
    assert cell(table, none, "Shuffle − clean (points)").text == "+0.0 [0.0, 0.0]†"
    default = cell(table, row(table, "learned 1-D", "class token", "4"), "Invariance expected; images changed").text
    assert default.startswith("no; ") and not default.startswith("no; 0 of")
    found = ablations.ablation_findings(runs, tmp_path)
    invariant = next(s for s in found if "no position embedding, avg pool" in s and "patch shuffle" in s)
    assert "correctness changed on 0 of 120 subset images" in invariant
    assert "consistent with the exact invariance" in invariant
    difference = next(s for s in found if "vs the default" in s)
    assert "n=1 seed, test-sampling only, bootstrap over images" in difference
    assert "lower than the default (test sampling only)" in difference


def test_invariance_needs_no_position_embedding_and_whole_patches_per_shuffle_cell():
    none4 = ablations.Variant(4, "none", "avg", False)
    assert ablations.shuffle_invariance_expected(none4, 16, 4)
    assert ablations.shuffle_invariance_expected(ablations.Variant(4, "none", "token", True), 16, 4)
    assert not ablations.shuffle_invariance_expected(ablations.Variant(8, "none", "avg", False), 16, 4)
    assert not ablations.shuffle_invariance_expected(ablations.Variant(4, "sincos2d", "avg", False), 16, 4)
    assert ablations.shuffle_invariance_expected(none4, math.nan, math.nan)


def test_findings_say_within_noise_when_the_interval_includes_zero(tmp_path):
    found = ablations.ablation_findings(runs_of(tmp_path, ablation_sweep()), tmp_path)
    sincos = next(s for s in found if "vit_tiny_p8: 2-D sin-cos" in s)
    assert "n=3 seeds, Student-t over seeds" in sincos and "within noise: the interval includes 0" in sincos
    none = next(s for s in found if "no position embedding, class token, patch 4 vs" in s)
    assert "lower than the default." in none


def test_one_variant_means_no_table(tmp_path):
    write_runs(tmp_path, [make_result("vit_tiny_p8", 0.32, s, 0.8) for s in (0, 1)] + [make_result()])
    with pytest.raises(NoData, match="one ViT variant"):
        ablations.ablation_table(collect.collect(tmp_path, SWEEP).runs, tmp_path)
