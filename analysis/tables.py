"""Paper-style tables as Markdown and LaTeX (booktabs) strings.

Every estimate cell is "mean [95% interval] n=seeds", in percent for
accuracies: a Student-t interval over seeds for n >= 2 (for a Δ, over the
differences paired by seed); at n=1 the test-sampling interval, marked ‡; "†"
marks a cell still improving when its budget ended (kept out of fits); a cell
without a completed run reads "missing". Only a Δ whose t interval excludes 0
is bold: never a single-seed "winner". Params and FLOPs stand beside every
accuracy (in the model's column header or row label).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from analysis import stats
from analysis.outputs import (NoData, condition_label, conditions_in_order, cost_label, fraction_label,
                              models_in_order, write_outputs)
from common import files

FOLDER = "tables"  # under results/SWEEP/
DASH = "–"  # a metric the runs do not record
MISSING = "missing"  # a cell without a completed run
FLAG = "†"
TEST_MARK = "‡"
CI_TEXT = ("each cell: mean [95% interval] n=seeds; Student-t interval over seeds for n ≥ 2, "
           "of the differences paired by seed for a Δ")
FLAG_NOTE = f"{FLAG}: still improving when its budget ended; kept out of fits and crossovers."
TEST_NOTE = (f"{TEST_MARK}: {stats.TEST_SAMPLING}: the Wilson interval over the test images for an accuracy, "
             "a paired bootstrap over the test images for a Δ (McNemar p in the report).")


@dataclass(frozen=True)
class Cell:
    """One table cell: its text and whether it is bold."""

    text: str
    bold: bool = False


@dataclass(frozen=True)
class Table:
    """A table, independent of its output format.

    Attributes:
        name: file stem, e.g. "table1_data_efficiency".
        title: one-line title ("Table 1. Data efficiency").
        caption: what the cells mean, incl. the number of seeds.
        header: column names.
        rows: cells; the first `n_keys` columns are row labels.
        n_keys: number of leading label columns (left-aligned).
        notes: extra footnote lines.
    """

    name: str
    title: str
    caption: str
    header: list[str]
    rows: list[list[Cell]]
    n_keys: int = 1
    notes: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        """A pipe table with a bold title line above, the caption and notes below."""
        body = [[f"**{c.text}**" if c.bold else c.text for c in row] for row in self.rows]
        align = ["left"] * self.n_keys + ["right"] * (len(self.header) - self.n_keys)
        grid = tabulate(body, headers=self.header, tablefmt="pipe", disable_numparse=True, colalign=align)
        notes = "".join(f"\n{n}\n" for n in [self.caption, *self.notes])
        return f"**{self.title}.**\n\n{grid}\n{notes}"

    def to_latex(self) -> str:
        """A booktabs `table` environment with caption, label and footnotes."""
        spec = "l" * self.n_keys + "r" * (len(self.header) - self.n_keys)
        lines = [
            r"\begin{table}[t]", r"\centering", r"\small",
            rf"\caption{{{latex_escape(self.title)}. {latex_escape(self.caption)}}}",
            rf"\label{{tab:{self.name}}}",
            rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
            " & ".join(latex_escape(h) for h in self.header) + r" \\", r"\midrule",
        ]
        for row in self.rows:
            cells = [rf"\textbf{{{latex_escape(c.text)}}}" if c.bold else latex_escape(c.text) for c in row]
            lines.append(" & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        if self.notes:
            lines += [r"\par\smallskip", r"\footnotesize " + r" \\ ".join(latex_escape(n) for n in self.notes)]
        lines.append(r"\end{table}")
        return "\n".join(lines) + "\n"


_LATEX = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "±": r"$\pm$", "Δ": r"$\Delta$", "−": r"$-$", "–": "--", "≥": r"$\geq$", "×": r"$\times$", "·": r"$\cdot$",
    "†": r"\dag{}", "‡": r"\ddag{}",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and map the few non-ASCII symbols used in tables."""
    return "".join(_LATEX.get(ch, ch) for ch in text)


# --------------------------------------------------------------- formatting
def _number(value: float, digits: int, signed: bool) -> str:
    """A number with the minus sign "−" (and "+" when signed); never "-0.0"."""
    value = round(value, digits) or 0.0
    return f"{value:{'+' if signed else ''}.{digits}f}".replace("-", "−")


def format_estimate(row: pd.Series | None, scale: float = 100.0, digits: int = 1, signed: bool = False,
                    empty: str = MISSING) -> str:
    """A stats row -> "82.0 [79.5, 84.5] n=3", "88.0 [87.4, 88.6] n=1‡", "88.0 n=1 (no interval)" or `empty`.

    A flagged row ends in " †"; an empty one names its failed and diverged runs.

    Args:
        row: a row of a `stats` frame, or None for a cell without runs.
        scale: 100 for fractions shown as percent.
        digits: decimals.
        signed: print a sign (differences).
        empty: the text of a cell without a completed run (MISSING also names its failed and diverged runs).
    """
    if row is None or row["n"] == 0 or pd.isna(row["mean"]):
        bad = [f"{int(row[f'n_{s}'])} {s}" for s in ("failed", "diverged")
               if empty == MISSING and row is not None and row.get(f"n_{s}", 0) > 0]
        return f"{empty} ({', '.join(bad)})" if bad else empty
    n = int(row["n"])
    text = _number(row["mean"] * scale, digits, signed)
    if row["interval"] in ("t", "test"):
        low, high = (_number(row[k] * scale, digits, signed) for k in ("ci_low", "ci_high"))
        text += f" [{low}, {high}] n={n}" + (TEST_MARK if row["interval"] == "test" else "")
    else:
        text += f" n={n} (no interval)"
    return text + (f" {FLAG}" if row.get("flagged", False) else "")


def excludes_zero(row: pd.Series | None) -> bool:
    """A difference whose Student-t interval over n >= 2 seeds lies wholly above or below 0."""
    return (row is not None and row["n"] >= 2 and row["interval"] == "t"
            and (row["ci_low"] > 0 or row["ci_high"] < 0))


class _Legend:
    """Formats a table's estimate cells and remembers the marks they used, for its notes."""

    def __init__(self) -> None:
        self.flagged = self.test = self.missing = False
        self.no_interval: set[str] = set()

    def cell(self, row: pd.Series | None, scale: float = 100.0, digits: int = 1, signed: bool = False,
             bold_if_excludes_zero: bool = False, empty: str = MISSING) -> Cell:
        """The Cell of one estimate (bold only for a difference whose interval excludes 0)."""
        if row is None or row["n"] == 0 or pd.isna(row["mean"]):
            self.missing |= empty == MISSING
        else:
            self.flagged |= bool(row.get("flagged", False))
            self.test |= row["interval"] == "test"
            if row["interval"] == "none" and row.get("interval_note"):
                self.no_interval.add(str(row["interval_note"]))
        return Cell(format_estimate(row, scale, digits, signed, empty), bold_if_excludes_zero and excludes_zero(row))

    def notes(self) -> list[str]:
        """One footnote per mark used."""
        notes = [FLAG_NOTE] * self.flagged + [TEST_NOTE] * self.test
        if self.no_interval:
            notes.append("n=1 (no interval): " + "; ".join(sorted(self.no_interval)) + ".")
        if self.missing:
            notes.append(f"{MISSING}: no completed run in this cell (failed and diverged runs are counted in it).")
        return notes


def seeds_text(counts: pd.Series) -> str:
    """A caption sentence about the number of seeds per cell: "n = 2–3 seeds per cell."."""
    counts = [int(n) for n in counts if n > 0]
    if not counts:
        return "No completed runs."
    lo, hi = min(counts), max(counts)
    if lo == hi:
        return f"n = {lo} seed{'s' if lo > 1 else ''} per cell."
    return f"n = {lo}–{hi} seeds per cell."


def _lookup(frame: pd.DataFrame, **keys: object) -> pd.Series | None:
    """The first row of `frame` whose columns equal `keys` (NaN matches NaN), or None."""
    hits = stats.select(frame, **keys)
    return hits.iloc[0] if len(hits) else None


def _excluded_note(runs: pd.DataFrame) -> list[str]:
    """A footnote counting the failed and diverged runs left out, if any."""
    counts = stats.status_counts(runs)
    bad = {s: counts[s] for s in ("failed", "diverged") if counts[s]}
    if not bad:
        return []
    parts = ", ".join(f"{n} {s}" for s, n in bad.items())
    return [f"Excluded from the statistics: {parts} run{'s' if sum(bad.values()) > 1 else ''}."]


def _model_label(runs: pd.DataFrame, model: str, label: str | None = None, **keys: object) -> str:
    """`label` (default: the model) with what the model's runs cost.

    "resnet50 · scratch (23.5M params · 1 GFLOPs/img · train 38.4 TFLOPs)"; `keys` select the runs.
    """
    cost = cost_label(stats.select(stats.targets(runs), model=model, **keys))
    label = label or model
    return f"{label} ({cost})" if cost else label


# --------------------------------------------------------------- the tables
def data_efficiency_table(runs: pd.DataFrame, metric: str = stats.METRIC,
                          expected: pd.DataFrame | None = None) -> Table:
    """Table 1: accuracy per training fraction (rows) x model and pretraining (columns).

    Each pretraining gets one column per model (headed by its params and
    FLOPs) and one paired Δ(ViT − CNN) column per (ViT, CNN) pair, bold where
    its interval excludes 0. `expected` cells (the sweep's plan) without runs
    read "missing".
    """
    summary = stats.summarize(runs, metric, expected=expected)
    diffs = stats.arch_differences(runs, metric)
    if not summary["n"].any():
        raise NoData(f"no completed runs with {metric}")
    conds, models = conditions_in_order(summary), models_in_order(summary)
    pairs = [(v, c) for v, va in models for c, ca in models if va == "vit" and ca == "cnn"]
    multi = summary["dataset"].nunique() > 1
    header = ["Dataset"] * multi + ["Train fraction (images)"]
    for pre, size in conds:
        label = condition_label(pre, size)
        header += [_model_label(runs, m, f"{m} · {label}", pretraining=pre, pretrain_size=size) for m, _ in models]
        header += [f"Δ {v} − {c} · {label}" for v, c in pairs]
    legend = _Legend()
    rows = []
    for (dataset, fraction), group in summary.groupby(["dataset", "train_fraction"], sort=True):
        row = [Cell(dataset)] * multi + [Cell(fraction_label(fraction, group["n_images"].max()))]
        for pre, size in conds:
            cond = dict(dataset=dataset, pretraining=pre, pretrain_size=size, train_fraction=fraction)
            row += [legend.cell(_lookup(summary, model=m, **cond)) for m, _ in models]
            row += [legend.cell(_lookup(diffs, vit_model=v, cnn_model=c, **cond), signed=True,
                                bold_if_excludes_zero=True) for v, c in pairs]
        rows.append(row)
    caption = (f"Test accuracy (%) by training-set size; {CI_TEXT}. {seeds_text(summary['n'])} "
               "Δ: ViT − CNN in points, paired by seed; bold: its interval excludes 0. Column headers: parameters, "
               "forward FLOPs per image and training FLOPs (3 × forward × images seen) of each model.")
    return Table("table1_data_efficiency", "Table 1. Data efficiency", caption, header, rows,
                 n_keys=1 + multi, notes=legend.notes() + _excluded_note(runs))


def pretraining_table(runs: pd.DataFrame, metric: str = stats.METRIC,
                      expected: pd.DataFrame | None = None) -> Table:
    """Table 2: scratch vs each pretraining source, per model, at every training fraction.

    Columns: scratch accuracy, then per source its accuracy and its paired
    gain over scratch (points), bold where the gain's interval excludes 0.
    """
    summary = stats.summarize(runs, metric, expected=expected)
    sources = [c for c in conditions_in_order(summary) if c[0] != "none"]
    if not sources or not summary["n"].any():
        raise NoData("no pretrained runs (every run trains from scratch)")
    gains = stats.pretraining_gains(runs, metric)
    multi = summary["dataset"].nunique() > 1
    header = ["Dataset"] * multi + ["Model", "Train fraction (images)", "scratch"]
    for pre, size in sources:
        label = condition_label(pre, size)
        header += [label, f"Δ {label} − scratch"]
    legend = _Legend()
    rows = []
    for (dataset, model, fraction), group in summary.groupby(["dataset", "model", "train_fraction"], sort=True):
        row = [Cell(dataset)] * multi + [Cell(_model_label(runs, model)),
                                         Cell(fraction_label(fraction, group["n_images"].max()))]
        cell = dict(dataset=dataset, model=model, train_fraction=fraction)
        row.append(legend.cell(_lookup(summary, pretraining="none", pretrain_size=math.nan, **cell)))
        for pre, size in sources:
            row.append(legend.cell(_lookup(summary, pretraining=pre, pretrain_size=size, **cell)))
            row.append(legend.cell(_lookup(gains, pretraining=pre, pretrain_size=size, **cell), signed=True,
                                   bold_if_excludes_zero=True))
        rows.append(row)
    caption = (f"Test accuracy (%) from scratch and with each pretraining, at every training fraction; {CI_TEXT}. "
               f"{seeds_text(summary['n'])} Δ: gain over scratch in points, paired by seed; bold: its interval "
               "excludes 0.")
    return Table("table2_pretraining", "Table 2. Pretraining", caption, header, rows,
                 n_keys=2 + multi, notes=legend.notes() + _excluded_note(runs))


# (column title, per-run column, scale)
GENERALIZATION_COLUMNS = [
    ("Test acc. (%)", stats.METRIC, 100.0),
    ("Train acc. (%)", "train/acc1", 100.0),
    ("Train − test gap (points)", "train_test_gap", 100.0),
]


def generalization_table(runs: pd.DataFrame) -> Table:
    """Table 3: the generalization gap per cell: test and train accuracy and their difference.

    Rows are (training fraction, pretraining, model); no cell is bold (these
    are levels, not paired differences). Metrics not recorded print "–".
    Robustness and calibration have their own tables (`analysis.robustness_report`).
    """
    runs = stats.with_train_test_gap(runs)
    per_column = [stats.summarize(runs, col) for _, col, _ in GENERALIZATION_COLUMNS]
    clean = per_column[0]
    if not clean["n"].any():
        raise NoData(f"no completed runs with {stats.METRIC}")
    multi = clean["dataset"].nunique() > 1
    header = ["Dataset"] * multi + ["Train fraction (images)", "Pretraining", "Model"]
    header += [title for title, *_ in GENERALIZATION_COLUMNS]
    legend = _Legend()
    rows = []
    for (dataset, fraction), group in clean.groupby(["dataset", "train_fraction"], sort=True):
        for pre, size in conditions_in_order(group):
            cond = dict(dataset=dataset, pretraining=pre, pretrain_size=size, train_fraction=fraction)
            for model, _ in models_in_order(stats.select(group, pretraining=pre, pretrain_size=size)):
                row = [Cell(dataset)] * multi + [Cell(fraction_label(fraction, group["n_images"].max())),
                                                 Cell(condition_label(pre, size)), Cell(_model_label(runs, model))]
                for (_, column, scale), frame in zip(GENERALIZATION_COLUMNS, per_column):
                    found = _lookup(frame, model=model, **cond)
                    row.append(legend.cell(found, scale=scale, empty=MISSING if column == stats.METRIC else DASH))
                rows.append(row)
    caption = (f"Generalization gap; {CI_TEXT}. {seeds_text(clean['n'])} Train accuracy: the selected checkpoint "
               "on a fixed part of the training subset (up to 1,024 images), without augmentation. Gap: train − test "
               "accuracy. –: not recorded.")
    return Table("table3_generalization", "Table 3. Generalization gap", caption, header, rows,
                 n_keys=3 + multi, notes=legend.notes() + _excluded_note(runs))


# (column title, per-run column, scale, digits): means over a cell's runs, beside its accuracy
COST_COLUMNS = [
    ("Params (M)", "params", 1e-6, 2),
    ("GFLOPs/image", "flops_per_image", 1e-9, 3),
    ("Train TFLOPs", "train_flops", 1e-12, 2),
    ("Train steps", "train_steps", 1.0, 0),
    ("Train images/s", "train_images_per_s", 1.0, 0),
    ("Wall time (s)", "wall_time_s", 1.0, 0),
]


def cost_table(runs: pd.DataFrame, expected: pd.DataFrame | None = None) -> Table:
    """Table 4: each cell's accuracy beside its parameters, FLOPs, steps, throughput and wall time.

    Completed fine-tuning runs only (upstream pretraining runs are not included).
    """
    accuracy = stats.summarize(runs, expected=expected)
    if not accuracy["n"].any():
        raise NoData("no completed runs")
    costs = stats.usable(runs).groupby(stats.CELL, dropna=False, sort=True)[[c for _, c, *_ in COST_COLUMNS]]
    costs = costs.mean().reset_index()
    multi = accuracy["dataset"].nunique() > 1
    header = ["Dataset"] * multi + ["Model", "Pretraining", "Train fraction (images)", "Test acc. (%)"]
    header += [title for title, *_ in COST_COLUMNS]
    legend = _Legend()
    rows = []
    for model, _ in models_in_order(accuracy):
        for pre, size in conditions_in_order(stats.select(accuracy, model=model)):
            cells = stats.select(accuracy, model=model, pretraining=pre, pretrain_size=size)
            for _, cell in cells.sort_values(["dataset", "train_fraction"], kind="mergesort").iterrows():
                cost = _lookup(costs, **{k: cell[k] for k in stats.CELL})
                row = [Cell(cell["dataset"])] * multi + [
                    Cell(model), Cell(condition_label(pre, size)),
                    Cell(fraction_label(cell["train_fraction"], cell["n_images"])), legend.cell(cell)]
                row += [Cell(DASH if cost is None or pd.isna(cost[column]) else f"{cost[column] * scale:.{digits}f}")
                        for _, column, scale, digits in COST_COLUMNS]
                rows.append(row)
    caption = (f"Accuracy and cost of each cell; accuracy: {CI_TEXT}. {seeds_text(accuracy['n'])} Cost columns: "
               "means over the cell's completed runs. GFLOPs/image: forward pass; train FLOPs = 3 × forward FLOPs "
               "× images seen; train steps: of the step budget, fewer when a run stopped early. –: not recorded.")
    return Table("table4_cost", "Table 4. Cost", caption, header, rows, n_keys=3 + multi,
                 notes=legend.notes() + _excluded_note(runs))


TABLES: dict[str, Callable[..., Table]] = {
    "table1_data_efficiency": data_efficiency_table,
    "table2_pretraining": pretraining_table,
    "table3_generalization": generalization_table,
    "table4_cost": cost_table,
}
EXPECTING = ("table1_data_efficiency", "table2_pretraining", "table4_cost")  # show the plan's missing cells


def save_table(table: Table, stem: Path) -> Table:
    """Write `table` as `<stem>.md` and `<stem>.tex` (atomically)."""
    files.write_text(stem.with_suffix(".md"), table.to_markdown())
    files.write_text(stem.with_suffix(".tex"), table.to_latex())
    return table


def write_tables(runs: pd.DataFrame, out_dir: Path,
                 expected: pd.DataFrame | None = None) -> tuple[list[Table], dict[str, str]]:
    """Build every table that has data; write each as `<name>.md` and `<name>.tex` (atomically).

    Files of tables skipped this time are deleted, so none is stale.

    Args:
        runs: the runs frame.
        out_dir: the tables folder.
        expected: the runs the sweep's plan expects (`SweepPlan.runs`): their
            cells read "missing" until they have a completed run.

    Returns:
        The tables written, and {skipped table name: reason}.
    """
    targets = None if expected is None else expected[expected["role"] == "train"]
    makers = {name: (lambda runs, make=make: make(runs, expected=targets)) if name in EXPECTING else make
              for name, make in TABLES.items()}
    built, skipped = write_outputs(makers, runs, out_dir, (".md", ".tex"), save_table, "table")
    return list(built.values()), skipped
