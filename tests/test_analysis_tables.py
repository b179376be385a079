"""analysis.tables: golden cells, captions, Markdown and LaTeX rendering."""

from __future__ import annotations

import pandas as pd
import pytest
from analysis_fixtures import make_result, runs_of, small_sweep

from analysis import tables
from analysis.outputs import NoData


@pytest.fixture
def runs(tmp_path) -> pd.DataFrame:
    return runs_of(tmp_path, small_sweep())


def texts(table: tables.Table) -> list[list[str]]:
    return [[c.text for c in row] for row in table.rows]


def column(table: tables.Table, name: str) -> list[str]:
    i = table.header.index(name)
    return [row[i] for row in texts(table)]


RESNET = "resnet50 · scratch (23.5M params · 1 GFLOPs/img · train 38.4 TFLOPs)"
VIT = "vit_tiny_p8 · scratch (1.2M params · 200 MFLOPs/img · train 7.68 TFLOPs)"


def test_data_efficiency_golden_cells(runs):
    table = tables.data_efficiency_table(runs)
    assert table.header[:4] == ["Train fraction (images)", RESNET, VIT, "Δ vit_tiny_p8 − resnet50 · scratch"]
    assert texts(table)[0][:4] == ["1% (540)", "82.0 [56.6, 100.0] n=2", "73.0 [34.9, 100.0] n=2",
                                   "−9.0 [−21.7, +3.7] n=2"]
    assert texts(table)[1][:4] == ["10% (5,400)", "88.0 [87.3, 88.6] n=1‡", "86.0 [85.3, 86.7] n=1‡",
                                   "−2.0 n=1 (no interval)"]
    assert column(table, RESNET.replace("scratch", "fractaldb 12.8k")) == ["84.0 [58.6, 100.0] n=2", "missing"]
    assert column(table, VIT.replace("scratch", "fractaldb 12.8k")) == ["79.0 [66.3, 91.7] n=2", "missing"]
    assert not any(c.bold for row in table.rows for c in row)  # no interval excludes 0, no single-seed winner
    assert "n = 1–2 seeds per cell." in table.caption
    assert table.notes == [tables.TEST_NOTE, "n=1 (no interval): no predictions file (not recorded, or read from W&B).",
                           "missing: no completed run in this cell (failed and diverged runs are counted in it).",
                           "Excluded from the statistics: 1 failed, 1 diverged runs."]


def test_only_a_difference_whose_interval_excludes_zero_is_bold(tmp_path):
    records = [make_result(m, f, s, acc + 0.002 * s) for s in (0, 1, 2) for f, gap in ((0.01, 0.05), (0.1, 0.0))
               for m, acc in (("resnet50", 0.80), ("vit_tiny_p8", 0.80 + gap + (0.004 if f == 0.1 and s else 0)))]
    records += [make_result(m, 0.3, 0, acc) for m, acc in (("resnet50", 0.9), ("vit_tiny_p8", 0.95))]
    table = tables.data_efficiency_table(runs_of(tmp_path, records))
    delta = [row[3] for row in table.rows]
    assert [c.text for c in delta] == ["+5.0 [+5.0, +5.0] n=3", "+0.3 [−0.3, +0.8] n=3", "+5.0 n=1 (no interval)"]
    assert [c.bold for c in delta] == [True, False, False]  # the single seed's 5 points are never bold
    assert not any(c.bold for row in table.rows for c in row[1:3])  # accuracies are levels: never bold


def test_flagged_cells_are_marked(tmp_path):
    records = [make_result(m, 0.1, s, 0.8 + 0.01 * s, improving_at_end=(m == "vit_tiny_p8" and s == 1))
               for m in ("resnet50", "vit_tiny_p8") for s in (0, 1)]
    table = tables.data_efficiency_table(runs_of(tmp_path, records))
    assert texts(table)[0][1:] == ["80.5 [74.1, 86.9] n=2", "80.5 [74.1, 86.9] n=2 †", "+0.0 [+0.0, +0.0] n=2 †"]
    assert tables.FLAG_NOTE in table.notes and "kept out of fits" in tables.FLAG_NOTE


def test_expected_cells_without_runs_read_missing(tmp_path):
    runs = runs_of(tmp_path, [make_result("resnet50", 0.1, 0, 0.8), make_result("vit_tiny_p8", 0.1, 0, 0.7),
                              make_result("vit_tiny_p8", 0.3, 0, None, status="failed")])
    expected = runs[["dataset", "pretraining", "pretrain_size", "train_fraction", "model", "arch"]]
    expected = pd.concat([expected, expected.iloc[[0]].assign(train_fraction=0.3)])
    table = tables.data_efficiency_table(runs, expected=expected)
    assert texts(table)[1] == ["30% (16,200)", "missing", "missing (1 failed)", "missing"]


def test_format_estimate():
    row = pd.Series({"mean": 0.82, "n": 3, "ci_low": 0.80, "ci_high": 0.85, "interval": "t", "flagged": False})
    assert tables.format_estimate(row) == "82.0 [80.0, 85.0] n=3"
    assert tables.format_estimate(row.replace({0.82: -0.0001}), signed=True) == "+0.0 [+80.0, +85.0] n=3"
    assert tables.format_estimate(pd.Series({**row, "flagged": True})) == "82.0 [80.0, 85.0] n=3 †"
    single = pd.Series({"mean": 0.5, "n": 1, "ci_low": 0.49, "ci_high": 0.51, "interval": "test"})
    assert tables.format_estimate(single) == "50.0 [49.0, 51.0] n=1‡"
    assert tables.format_estimate(pd.Series({**single, "interval": "none"})) == "50.0 n=1 (no interval)"
    assert tables.format_estimate(None) == "missing" and tables.format_estimate(None, empty="–") == "–"


def test_pretraining_table(runs):
    table = tables.pretraining_table(runs)
    assert table.header == ["Model", "Train fraction (images)", "scratch", "fractaldb 12.8k",
                            "Δ fractaldb 12.8k − scratch"]
    vit_row = next(r for r in texts(table) if r[:2] == [VIT.replace(" · scratch", ""), "1% (540)"])
    assert vit_row[2:] == ["73.0 [34.9, 100.0] n=2", "79.0 [66.3, 91.7] n=2", "+6.0 [−19.4, +31.4] n=2"]
    cnn_row = next(r for r in table.rows if r[0].text.startswith("resnet50") and r[1].text == "1% (540)")
    assert cnn_row[4].text == "+2.0 [+2.0, +2.0] n=2" and cnn_row[4].bold  # both seeds gain 2 points
    assert not vit_row[4].startswith("**") and not any(c.bold for c in cnn_row[2:4])


def test_pretraining_table_skipped_without_pretraining(tmp_path):
    runs = runs_of(tmp_path, [make_result("resnet50"), make_result("vit_tiny_p8")])
    with pytest.raises(NoData, match="no pretrained runs"):
        tables.pretraining_table(runs)


def test_generalization_table_fills_what_exists(tmp_path):
    runs = runs_of(tmp_path, [make_result("resnet50", metrics={"train/acc1": 0.9}),
                              make_result("vit_tiny_p8", acc=0.7)])
    table = tables.generalization_table(runs)
    assert [m.split(" (")[0] for m in column(table, "Model")] == ["resnet50", "vit_tiny_p8"]
    assert column(table, "Test acc. (%)")[0] == "80.0 [79.2, 80.8] n=1‡"
    assert column(table, "Train acc. (%)") == ["90.0 n=1 (no interval)", "–"]
    assert column(table, "Train − test gap (points)") == ["10.0 n=1 (no interval)", "–"]  # none without train/acc1
    assert not any(c.bold for row in table.rows for c in row)


def test_cost_table_puts_accuracy_beside_params_and_flops(runs):
    table = tables.cost_table(runs)
    assert table.header[:5] == ["Model", "Pretraining", "Train fraction (images)", "Test acc. (%)", "Params (M)"]
    row = next(r for r in texts(table) if r[:3] == ["resnet50", "scratch", "1% (540)"])
    assert row[3:] == ["82.0 [56.6, 100.0] n=2", "23.53", "1.000", "38.40", "100", "300", "5"]
    assert next(r for r in texts(table) if r[:3] == ["resnet50", "scratch", "10% (5,400)"])[-1] == "50"
    assert next(r for r in texts(table) if r[:3] == ["vit_tiny_p8", "fractaldb 12.8k", "10% (5,400)"])[3:5] == [
        "missing", "–"]


def test_latex_is_booktabs_and_escaped(runs):
    tex = tables.data_efficiency_table(runs).to_latex()
    for piece in (r"\begin{tabular}{lrrrrrr}", r"\toprule", r"\midrule", r"\bottomrule",
                  r"82.0 [56.6, 100.0] n=2", r"vit\_tiny\_p8", r"$-$9.0 [$-$21.7, +3.7] n=2", r"1\% (540)",
                  r"n=1\ddag{}", r"\label{tab:table1_data_efficiency}", r"n = 1--2 seeds"):
        assert piece in tex
    assert tables.latex_escape("a_b & 5% #1 {x}") == r"a\_b \& 5\% \#1 \{x\}"


def test_markdown_rendering(runs):
    md = tables.data_efficiency_table(runs).to_markdown()
    lines = md.splitlines()
    assert lines[0] == "**Table 1. Data efficiency.**"
    assert lines[2].startswith("| Train fraction (images)") and " 82.0 [56.6, 100.0] n=2 |" in md
    assert lines[3].startswith("|:---")


def test_write_tables_writes_md_and_tex_and_removes_stale(tmp_path, runs):
    out = tmp_path / "tables"
    out.mkdir()
    (out / "table2_pretraining.md").write_text("stale")
    built, skipped = tables.write_tables(runs[runs["pretraining"] == "none"], out)
    assert [t.name for t in built] == ["table1_data_efficiency", "table3_generalization", "table4_cost"]
    assert list(skipped) == ["table2_pretraining"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{t.name}.{ext}" for t in built for ext in ("md", "tex"))
