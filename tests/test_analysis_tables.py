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


def test_data_efficiency_golden_cells(runs):
    table = tables.data_efficiency_table(runs)
    assert table.header[:4] == ["Train fraction (images)", "resnet50 · scratch", "vit_tiny_p8 · scratch",
                                "Δ vit_tiny_p8 − resnet50 · scratch"]
    assert texts(table)[0][:4] == ["1% (540)", "82.0 ± 2.0", "73.0 ± 3.0", "−9.0 ± 1.0"]
    assert texts(table)[1][:4] == ["10% (5,400)", "88.0 ± n/a (n=1)", "86.0 ± n/a (n=1)", "−2.0 ± n/a (n=1)"]
    assert column(table, "resnet50 · fractaldb 12.8k") == ["84.0 ± 2.0", "–"]
    assert column(table, "vit_tiny_p8 · fractaldb 12.8k") == ["79.0 ± 1.0", "–"]  # the run without test/acc1
    assert [c.bold for c in table.rows[0][1:3]] == [True, False]  # the better architecture
    assert "n = 1–2 seeds per cell (2 unless stated)" in table.caption
    assert table.notes == ["Excluded from the statistics: 1 failed, 1 diverged runs."]


def test_format_estimate():
    row = pd.Series({"mean": 0.82, "n": 3, "ci_low": 0.80, "ci_high": 0.85})
    assert tables.format_estimate(row, common_n=3) == "82.0 ± 2.5"
    assert tables.format_estimate(row, common_n=2) == "82.0 ± 2.5 (n=3)"
    assert tables.format_estimate(row.replace({0.82: -0.0001}), signed=True, common_n=3) == "+0.0 ± 2.5"
    assert tables.format_estimate(pd.Series({"mean": 0.5, "n": 1, "ci_low": None, "ci_high": None})) == \
        "50.0 ± n/a (n=1)"
    assert tables.format_estimate(None) == "–"


def test_pretraining_table(runs):
    table = tables.pretraining_table(runs)
    assert table.header == ["Model", "Train fraction (images)", "scratch", "fractaldb 12.8k",
                            "Δ fractaldb 12.8k − scratch"]
    vit_row = next(r for r in texts(table) if r[:2] == ["vit_tiny_p8", "1% (540)"])
    assert vit_row[2:] == ["73.0 ± 3.0", "79.0 ± 1.0", "+6.0 ± 2.0"]
    bold = next(r for r in table.rows if r[0].text == "vit_tiny_p8")
    assert [c.bold for c in bold[2:4]] == [False, True]


def test_pretraining_table_skipped_without_pretraining(tmp_path):
    runs = runs_of(tmp_path, [make_result("resnet50"), make_result("vit_tiny_p8")])
    with pytest.raises(NoData, match="no pretrained runs"):
        tables.pretraining_table(runs)


def test_generalization_table_fills_what_exists(tmp_path):
    corr = {"corrupt/noise/1/acc1": 0.7, "corrupt/noise/2/acc1": 0.6, "test/ece": 0.031}
    vit_corr = {"corrupt/noise/1/acc1": 0.6, "corrupt/noise/2/acc1": 0.5, "test/ece": 0.052}
    runs = runs_of(tmp_path, [make_result("resnet50", metrics=corr), make_result("vit_tiny_p8", acc=0.7,
                                                                                 metrics=vit_corr)])
    table = tables.generalization_table(runs)
    assert column(table, "Model") == ["resnet50", "vit_tiny_p8"]
    assert column(table, "Mean corrupted acc. (%)") == ["65.0 ± n/a (n=1)", "55.0 ± n/a (n=1)"]
    assert column(table, "mCE (%)") == ["100.0 ± n/a (n=1)", f"{100 * 0.9 / 0.7:.1f} ± n/a (n=1)"]
    assert column(table, "ECE (%)") == ["3.1 ± n/a (n=1)", "5.2 ± n/a (n=1)"]
    assert column(table, "Train − test gap (points)") == ["–", "–"]  # no train/acc1 recorded
    assert "mCE (Hendrycks & Dietterich 2019)" in table.caption and "resnet50" in table.caption


def test_cost_table(runs):
    table = tables.cost_table(runs)
    row = next(r for r in texts(table) if r[:2] == ["resnet50", "1% (540)"])
    assert row[2:] == ["23.53", "1.000", "0.038 ± 0.000", "300 ± 0", "5 ± 0"]  # pooled: 4 runs
    assert next(r for r in texts(table) if r[:2] == ["resnet50", "10% (5,400)"])[-1] == "50 ± n/a (n=1)"
    assert "n = 1–4 runs per cell (4 unless stated)" in table.caption


def test_latex_is_booktabs_and_escaped(runs):
    tex = tables.data_efficiency_table(runs).to_latex()
    for piece in (r"\begin{tabular}{lrrrrrr}", r"\toprule", r"\midrule", r"\bottomrule",
                  r"\textbf{82.0 $\pm$ 2.0}", r"vit\_tiny\_p8", r"$-$9.0 $\pm$ 1.0", r"1\% (540)",
                  r"\label{tab:table1_data_efficiency}", r"n = 1--2 seeds"):
        assert piece in tex
    assert tables.latex_escape("a_b & 5% #1 {x}") == r"a\_b \& 5\% \#1 \{x\}"


def test_markdown_rendering(runs):
    md = tables.data_efficiency_table(runs).to_markdown()
    lines = md.splitlines()
    assert lines[0] == "**Table 1. Data efficiency.**"
    assert lines[2].startswith("| Train fraction (images)") and "**82.0 ± 2.0**" in md
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
