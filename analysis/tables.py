"""Paper-style tables as Markdown and LaTeX (booktabs) strings.

Every accuracy cell is "mean ± half-width of the 95% bootstrap CI over
seeds", in percent; a single seed prints "± n/a (n=1)"; a missing value
prints "–". The number of seeds is stated in each caption.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from analysis import stats
from analysis.outputs import (NoData, condition_label, conditions_in_order, fraction_label, models_in_order,
                              write_outputs)
from common import files

FOLDER = "tables"  # under results/SWEEP/
DASH = "–"
CI_TEXT = "mean ± half-width of the 95% percentile-bootstrap CI over seeds"


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
}


def latex_escape(text: str) -> str:
    """Escape LaTeX specials and map the few non-ASCII symbols used in tables."""
    return "".join(_LATEX.get(ch, ch) for ch in text)


# --------------------------------------------------------------- formatting
def format_estimate(
    row: pd.Series | None, scale: float = 100.0, digits: int = 1, signed: bool = False, common_n: int = 0
) -> str:
    """A stats row (mean, n, ci_low, ci_high) -> "82.0 ± 2.0", "80.0 ± n/a (n=1)" or "–".

    Negative numbers use the minus sign "−".

    Args:
        row: a row of a `stats` frame, or None for an empty cell.
        scale: 100 for fractions shown as percent.
        digits: decimals.
        signed: print a sign (differences).
        common_n: the table's usual n; another n > 1 is stated in the cell.
    """
    if row is None or row["n"] == 0 or pd.isna(row["mean"]):
        return DASH
    n = int(row["n"])
    value = round(row["mean"] * scale, digits) or 0.0  # no "-0.0"
    mean = f"{value:{'+' if signed else ''}.{digits}f}".replace("-", "−")
    if n == 1:
        return f"{mean} ± n/a (n=1)"
    half = f"{(row['ci_high'] - row['ci_low']) / 2 * scale:.{digits}f}"
    return f"{mean} ± {half}" + ("" if n == common_n else f" (n={n})")


def seeds_text(counts: pd.Series, unit: str = "seeds") -> tuple[int, str]:
    """The usual number of seeds (or runs) per cell, and a caption sentence about it."""
    counts = [int(n) for n in counts if n > 0]
    if not counts:
        return 0, "No completed runs."
    common = max(Counter(counts).items(), key=lambda kv: (kv[1], kv[0]))[0]
    lo, hi = min(counts), max(counts)
    text = f"n = {common} {unit} per cell" if lo == hi else f"n = {lo}–{hi} {unit} per cell ({common} unless stated)"
    if common == 2:
        text += f"; with n = 2 the interval is the range of the two {unit}"
    return common, text + "."


def _lookup(frame: pd.DataFrame, **keys: object) -> pd.Series | None:
    """The first row of `frame` whose columns equal `keys` (NaN matches NaN), or None."""
    hits = stats.select(frame, **keys)
    return hits.iloc[0] if len(hits) else None


def _mean(row: pd.Series | None) -> float:
    """The mean of a stats row, NaN when absent or empty."""
    return math.nan if row is None or row["n"] == 0 else float(row["mean"])


def _bold_best(cells: list[Cell], values: list[float], lower_is_better: bool = False) -> list[Cell]:
    """Bold the single best finite value among `values` (no bold on ties or < 2 values)."""
    finite = [(v, i) for i, v in enumerate(values) if not pd.isna(v)]
    if len(finite) < 2:
        return cells
    best = min(v for v, _ in finite) if lower_is_better else max(v for v, _ in finite)
    winners = [i for v, i in finite if v == best]
    if len(winners) != 1:
        return cells
    return [Cell(c.text, True) if i == winners[0] else c for i, c in enumerate(cells)]


def _excluded_note(runs: pd.DataFrame) -> list[str]:
    """A footnote counting the failed and diverged runs left out, if any."""
    counts = stats.status_counts(runs)
    bad = {s: counts[s] for s in ("failed", "diverged") if counts[s]}
    if not bad:
        return []
    parts = ", ".join(f"{n} {s}" for s, n in bad.items())
    return [f"Excluded from the statistics: {parts} run{'s' if sum(bad.values()) > 1 else ''}."]


# --------------------------------------------------------------- the tables
def data_efficiency_table(runs: pd.DataFrame, metric: str = stats.METRIC) -> Table:
    """Table 1: accuracy per training fraction (rows) x model and pretraining (columns).

    Each pretraining gets one column per model (better architecture in
    bold) and one paired Δ(ViT − CNN) column per (ViT, CNN) pair.
    """
    summary = stats.summarize(runs, metric)
    diffs = stats.arch_differences(runs, metric)
    if not summary["n"].any():
        raise NoData(f"no completed runs with {metric}")
    common, seeds = seeds_text(pd.concat([summary["n"], diffs["n"]]))
    conds, models = conditions_in_order(summary), models_in_order(summary)
    pairs = [(v, c) for v, va in models for c, ca in models if va == "vit" and ca == "cnn"]
    multi = summary["dataset"].nunique() > 1
    header = ["Dataset"] * multi + ["Train fraction (images)"]
    for pre, size in conds:
        label = condition_label(pre, size)
        header += [f"{m} · {label}" for m, _ in models] + [f"Δ {v} − {c} · {label}" for v, c in pairs]
    rows = []
    for key, group in summary.groupby(["dataset", "train_fraction"], sort=True):
        dataset, fraction = key
        row = [Cell(dataset)] * multi + [Cell(fraction_label(fraction, group["n_images"].max()))]
        for pre, size in conds:
            cond = dict(dataset=dataset, pretraining=pre, pretrain_size=size, train_fraction=fraction)
            found = [_lookup(summary, model=m, **cond) for m, _ in models]
            cells = [Cell(format_estimate(r, common_n=common)) for r in found]
            row += _bold_best(cells, [_mean(r) for r in found])
            for v, c in pairs:
                d = _lookup(diffs, vit_model=v, cnn_model=c, **cond)
                row.append(Cell(format_estimate(d, signed=True, common_n=common)))
        rows.append(row)
    caption = (f"Test accuracy (%) by training-set size; {CI_TEXT}. {seeds} Bold: the better model "
               "within each pretraining. Δ: ViT − CNN in points, paired on seed.")
    return Table("table1_data_efficiency", "Table 1. Data efficiency", caption, header, rows,
                 n_keys=1 + multi, notes=_excluded_note(runs))


def pretraining_table(runs: pd.DataFrame, metric: str = stats.METRIC) -> Table:
    """Table 2: scratch vs each pretraining source, per model, at every training fraction.

    Columns: scratch accuracy, then per source its accuracy and its paired
    gain over scratch (points); the best accuracy of each row is bold.
    """
    summary = stats.summarize(runs, metric)
    summary = summary[summary["n"] > 0]
    sources = [c for c in conditions_in_order(summary) if c[0] != "none"]
    if not sources:
        raise NoData("no pretrained runs (every run trains from scratch)")
    gains = stats.pretraining_gains(runs, metric)
    common, seeds = seeds_text(pd.concat([summary["n"], gains["n"]]))
    multi = summary["dataset"].nunique() > 1
    header = ["Dataset"] * multi + ["Model", "Train fraction (images)", "scratch"]
    for pre, size in sources:
        label = condition_label(pre, size)
        header += [label, f"Δ {label} − scratch"]
    rows = []
    for (dataset, model, fraction), group in summary.groupby(["dataset", "model", "train_fraction"], sort=True):
        row = [Cell(dataset)] * multi + [Cell(model), Cell(fraction_label(fraction, group["n_images"].max()))]
        cell = dict(dataset=dataset, model=model, train_fraction=fraction)
        scratch = _lookup(summary, pretraining="none", pretrain_size=math.nan, **cell)
        accs, values = [Cell(format_estimate(scratch, common_n=common))], [_mean(scratch)]
        gain_cells = []
        for pre, size in sources:
            found = _lookup(summary, pretraining=pre, pretrain_size=size, **cell)
            accs.append(Cell(format_estimate(found, common_n=common)))
            values.append(_mean(found))
            gain = _lookup(gains, pretraining=pre, pretrain_size=size, **cell)
            gain_cells.append(Cell(format_estimate(gain, signed=True, common_n=common)))
        accs = _bold_best(accs, values)
        row.append(accs[0])
        for acc, gain in zip(accs[1:], gain_cells):
            row += [acc, gain]
        rows.append(row)
    caption = (f"Test accuracy (%) from scratch and with each pretraining, at every training fraction; "
               f"{CI_TEXT}. {seeds} Bold: the best pretraining per row. Δ: gain over scratch in points, "
               "paired on seed.")
    return Table("table2_pretraining", "Table 2. Pretraining", caption, header, rows,
                 n_keys=2 + multi, notes=_excluded_note(runs))


# (column title, per-run column, scale, lower is better)
GENERALIZATION_COLUMNS = [
    ("Clean acc. (%)", stats.METRIC, 100.0, False),
    ("Mean corrupted acc. (%)", "corrupt/mean_acc1", 100.0, False),
    ("mCE (%)", "corrupt/mce", 1.0, True),
    ("ECE (%)", "test/ece", 100.0, True),
    ("Train − test gap (points)", "train_test_gap", 100.0, None),
]


def generalization_table(runs: pd.DataFrame, reference: str = stats.REFERENCE_CNN) -> Table:
    """Table 3: clean and corrupted accuracy, mCE, ECE and train-test gap per cell.

    Rows are (training fraction, pretraining, model); the better model of each
    (fraction, pretraining) is bold per column (not for the gap). Missing
    metrics print "–".
    """
    runs = stats.with_generalization(runs, reference)
    per_column = [stats.summarize(runs, col) for _, col, _, _ in GENERALIZATION_COLUMNS]
    clean = per_column[0]
    if not clean["n"].any():
        raise NoData(f"no completed runs with {stats.METRIC}")
    common, seeds = seeds_text(clean["n"])
    multi = clean["dataset"].nunique() > 1
    header = ["Dataset"] * multi + ["Train fraction (images)", "Pretraining", "Model"]
    header += [title for title, *_ in GENERALIZATION_COLUMNS]
    rows = []
    for (dataset, fraction), group in clean.groupby(["dataset", "train_fraction"], sort=True):
        for pre, size in conditions_in_order(group):
            models = models_in_order(stats.select(group, pretraining=pre, pretrain_size=size))
            block = [[Cell(dataset)] * multi + [Cell(fraction_label(fraction, group["n_images"].max())),
                                                  Cell(condition_label(pre, size)), Cell(m)] for m, _ in models]
            for (_, _, scale, lower), frame in zip(GENERALIZATION_COLUMNS, per_column):
                cond = dict(dataset=dataset, pretraining=pre, pretrain_size=size, train_fraction=fraction)
                found = [_lookup(frame, model=m, **cond) for m, _ in models]
                cells = [Cell(format_estimate(r, scale=scale, common_n=common)) for r in found]
                if lower is not None:
                    cells = _bold_best(cells, [_mean(r) for r in found], lower_is_better=lower)
                for line, c in zip(block, cells):
                    line.append(c)
            rows += block
    ref = stats.mce_reference(runs, reference)
    caption = (f"Generalization; {CI_TEXT}. {seeds} Mean corrupted accuracy averages every corruption and "
               f"severity. mCE (Hendrycks & Dietterich 2019): per corruption, the error summed over severities "
               f"divided by that of the reference CNN ({ref or 'none'}, its errors averaged over seeds) under the "
               "same pretraining and fraction, averaged over corruptions, in %; the reference scores 100. "
               "ECE: expected calibration error. Gap: train/acc1 − test/acc1. Bold: the better model per column.")
    return Table("table3_generalization", "Table 3. Generalization", caption, header, rows,
                 n_keys=3 + multi, notes=_excluded_note(runs))


# (column title, per-run column, scale, digits, with CI)
COST_COLUMNS = [
    ("Params (M)", "params", 1e-6, 2, False),
    ("GFLOPs/image", "flops_per_image", 1e-9, 3, False),
    ("Train PFLOPs", "train_flops", 1e-15, 3, True),
    ("Train images/s", "train_images_per_s", 1.0, 0, True),
    ("Wall time (s)", "wall_time_s", 1.0, 0, True),
]


def cost_table(runs: pd.DataFrame) -> Table:
    """Table 4: parameters, FLOPs, throughput and wall time per model and fraction.

    Pooled over pretraining conditions and seeds (completed fine-tuning runs
    only; upstream pretraining runs are not included).
    """
    ok = stats.usable(runs)
    if ok.empty:
        raise NoData("no completed runs")
    by = ["dataset", "model", "arch", "train_fraction"]
    per_column = [stats.summarize(ok, col, by=by) for _, col, *_ in COST_COLUMNS]
    base = stats.summarize(ok, by=by)
    common, seeds = seeds_text(base["n"], unit="runs")
    multi = base["dataset"].nunique() > 1
    header = ["Dataset"] * multi + ["Model", "Train fraction (images)"] + [t for t, *_ in COST_COLUMNS]
    rows = []
    for _, cell in base.iterrows():
        row = [Cell(cell["dataset"])] * multi + [Cell(cell["model"]),
                                                 Cell(fraction_label(cell["train_fraction"], cell["n_images"]))]
        for (_, _, scale, digits, with_ci), frame in zip(COST_COLUMNS, per_column):
            found = _lookup(frame, **{k: cell[k] for k in by})
            if with_ci:
                row.append(Cell(format_estimate(found, scale=scale, digits=digits, common_n=common)))
            else:
                row.append(Cell(DASH if found is None or found["n"] == 0 else f"{found['mean'] * scale:.{digits}f}"))
        rows.append(row)
    caption = (f"Cost of the fine-tuning runs, pooled over pretraining conditions; {CI_TEXT} where shown. "
               f"{seeds} GFLOPs/image: forward pass; train FLOPs = 3 × forward FLOPs × images seen.")
    return Table("table4_cost", "Table 4. Cost", caption, header, rows, n_keys=2 + multi)


TABLES: dict[str, Callable[[pd.DataFrame], Table]] = {
    "table1_data_efficiency": data_efficiency_table,
    "table2_pretraining": pretraining_table,
    "table3_generalization": generalization_table,
    "table4_cost": cost_table,
}


def write_tables(runs: pd.DataFrame, out_dir: Path) -> tuple[list[Table], dict[str, str]]:
    """Build every table that has data; write each as `<name>.md` and `<name>.tex` (atomically).

    Files of tables skipped this time are deleted, so none is stale.

    Returns:
        The tables written, and {skipped table name: reason}.
    """
    def save(table: Table, stem: Path) -> Table:
        files.write_text(stem.with_suffix(".md"), table.to_markdown())
        files.write_text(stem.with_suffix(".tex"), table.to_latex())
        return table

    built, skipped = write_outputs(TABLES, runs, out_dir, (".md", ".tex"), save, "table")
    return list(built.values()), skipped
