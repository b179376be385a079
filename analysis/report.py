"""The sweep report: collect -> stats -> tables -> figures -> `results/SWEEP/report.md`.

`make_report` writes `runs.csv`, `tables/*.md|*.tex`, `figures/*.png|*.pdf`
and `report.md` under `results/SWEEP/`, each atomically. The output depends
only on the runs: running it twice gives byte-identical files.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from analysis import collect, plots, stats, tables
from analysis.collect import Collection
from analysis.outputs import condition_key, condition_label, conditions_in_order, fraction_label, models_in_order
from analysis.tables import Table
from common import files
from common.schema import PLACEMENT_FIELDS

CROSSOVER_RESAMPLES = 200  # bootstrap resamples behind the crossover intervals of the report


# --------------------------------------------------------------- formatting
def _value(v: object) -> str:
    """A spec or version value for prose: floats compactly, integers without ".0"."""
    if isinstance(v, float):
        return f"{v:g}" if not v.is_integer() else f"{int(v)}"
    return str(v)


def _values(series: pd.Series) -> list[str]:
    """Distinct non-null values, as text, in natural order."""
    distinct = series.dropna().unique().tolist()
    return [_value(v) for v in sorted(distinct, key=lambda v: (isinstance(v, str), v))]


def _points(row: pd.Series, absolute: bool = False) -> str:
    """A stats row in points: "9.0 ± 1.0 points (n=2, the range of two seeds)"."""
    mean = abs(row["mean"]) if absolute else row["mean"]
    text = f"{100 * mean:{'' if absolute else '+'}.1f}".replace("-", "−")
    if row["n"] == 1:
        return f"{text} points (n=1: a single seed, no interval)"
    half = 100 * (row["ci_high"] - row["ci_low"]) / 2
    suffix = ", the range of two seeds" if row["n"] == 2 else ""
    return f"{text} ± {half:.1f} points (n={int(row['n'])}{suffix})"


def _includes_zero(row: pd.Series) -> bool:
    return row["n"] >= 2 and row["ci_low"] <= 0 <= row["ci_high"]


def _images(n: float) -> str:
    return f"{n:,.0f}"


def _in_condition_order(frame: pd.DataFrame, then: list[str]) -> pd.DataFrame:
    """`frame` sorted by dataset, then condition (`condition_key`: scratch first), then the columns `then`."""
    keys = [condition_key(p, s) for p, s in zip(frame["pretraining"], frame["pretrain_size"])]
    rank = {key: i for i, key in enumerate(sorted(set(keys)))}
    keyed = frame.assign(_condition=[rank[key] for key in keys])
    return keyed.sort_values(["dataset", "_condition", *then], kind="mergesort").drop(columns="_condition")


# --------------------------------------------------------------- sections
def setup_section(collection: Collection, sweep: str) -> list[str]:
    """Markdown lines: what was run, what varies, versions, commits, counts."""
    runs = collection.runs
    target = stats.targets(runs)
    counts = stats.status_counts(runs)
    models = models_in_order(target)
    lines = [
        "## Setup", "",
        f"- Sweep: `{sweep}`; profile: {', '.join(_values(runs['profile'])) or 'unknown'}",
        f"- Datasets: {', '.join(_values(target['dataset']))}",
        f"- Models: {', '.join(f'{m} ({a})' for m, a in models)}",
        f"- Training fractions: {', '.join(f'{100 * f:g}%' for f in sorted(target['train_fraction'].unique()))}",
        f"- Pretraining: {', '.join(condition_label(p, s) for p, s in conditions_in_order(target))}",
        f"- Seeds: {', '.join(_values(target['seed']))}",
        f"- Runs: {len(target)} ({counts['completed']} completed, {counts['failed']} failed, "
        f"{counts['diverged']} diverged); {len(runs) - len(target)} upstream pretraining runs; "
        f"{len(collection.skipped)} unreadable result.json files skipped",
    ]
    spec_cols = sorted(c for c in runs if c.startswith("spec/") and c.removeprefix("spec/") not in PLACEMENT_FIELDS)
    varying = [c for c in spec_cols if target[c].nunique() > 1]
    fixed = [c for c in spec_cols if target[c].nunique() == 1]
    if varying:
        lines.append("- Spec fields that vary: " + "; ".join(
            f"`{c.removeprefix('spec/')}` ∈ {{{', '.join(_values(target[c]))}}}" for c in varying))
    if fixed:
        lines.append("- Fixed spec fields: " + ", ".join(
            f"`{c.removeprefix('spec/')}`={_values(target[c])[0]}" for c in fixed))
    versions = [c for c in runs if c.startswith("versions/")]
    if versions:
        lines.append("- Versions: " + "; ".join(
            f"{c.removeprefix('versions/')} {', '.join(_values(runs[c]))}" for c in sorted(versions)))
    commits = runs["git_commit"].fillna("unknown").value_counts()
    lines.append("- Git commits: " + ", ".join(
        f"`{c}` ({commits[c]} runs)" for c in sorted(commits.index)))
    bad = target[target["status"] != "completed"]
    if not bad.empty:
        lines += ["", "Runs excluded from the statistics:", "",
                  "| run | model | pretraining | fraction | seed | status | error |", "|---|---|---|---|---|---|---|"]
        for _, r in bad.iterrows():
            error = " ".join(str(r["error"] or "").split())[:120].replace("|", "\\|")
            lines.append(f"| `{r['run_id']}` | {r['model']} | {condition_label(r['pretraining'], r['pretrain_size'])} "
                         f"| {100 * r['train_fraction']:g}% | {r['seed']} | {r['status']} | {error} |")
    if collection.skipped:
        lines += ["", "Unreadable result.json files (skipped):", ""]
        lines += [f"- `{path}`: {reason}" for path, reason in collection.skipped]
    return lines


def _gap_findings(runs: pd.DataFrame, diffs: pd.DataFrame) -> Iterable[str]:
    """ViT − CNN at the smallest and largest fraction of each condition."""
    multi = stats.targets(runs)["dataset"].nunique() > 1
    keys = ["dataset", "pretraining", "pretrain_size", "vit_model", "cnn_model"]
    ordered = _in_condition_order(diffs, ["vit_model", "cnn_model"])
    for (dataset, pre, size, vit, cnn), group in ordered.groupby(keys, dropna=False, sort=False):
        group = group[group["n"] > 0].sort_values("train_fraction")
        where = f" on {dataset}" if multi else ""
        ends = group.iloc[sorted({0, len(group) - 1})] if len(group) else group
        for _, row in ends.iterrows():
            leader, other = (vit, cnn) if row["mean"] > 0 else (cnn, vit)
            text = (f"At {100 * row['train_fraction']:g}% of the data ({_images(row['n_images'])} images){where}, "
                    f"{condition_label(pre, size)}: ")
            if row["mean"] == 0:
                yield text + f"{vit} and {cnn} tie ({_points(row)})."
                continue
            text += f"{leader} leads {other} by {_points(row, absolute=True)}"
            if _includes_zero(row):
                text += "; the 95% CI includes 0, so the order is not established"
            yield text + "."


def _pretraining_findings(gains: pd.DataFrame, diffs: pd.DataFrame) -> Iterable[str]:
    """Gain of each source over scratch, and the ViT − CNN gap with it, at the smallest fraction."""
    for (dataset, pre, size), group in gains.groupby(["dataset", "pretraining", "pretrain_size"],
                                                     dropna=False, sort=True):
        label = condition_label(pre, size)
        fraction = group["train_fraction"].min()
        at = group[group["train_fraction"] == fraction]
        where = fraction_label(fraction, at["n_images"].max())
        parts = [f"{r['model']} {_points(r)}" for _, r in at.iterrows()]
        yield f"With {label} pretraining at {where}, the gain over scratch is: " + "; ".join(parts) + "."
        both = diffs[(diffs["dataset"] == dataset) & (diffs["train_fraction"] == fraction)]
        for _, gap in stats.select(both, pretraining=pre, pretrain_size=size).iterrows():
            scratch = stats.select(both, pretraining="none", vit_model=gap["vit_model"], cnn_model=gap["cnn_model"])
            versus = f", vs {_points(scratch.iloc[0])} from scratch" if len(scratch) else ""
            yield (f"With {label} pretraining the gap {gap['vit_model']} − {gap['cnn_model']} at {where} is "
                   f"{_points(gap)}{versus}.")


def _crossover_findings(cross: pd.DataFrame) -> Iterable[str]:
    """One sentence per (condition, ViT, CNN) crossover estimate."""
    multi = cross["dataset"].nunique() > 1
    for _, c in _in_condition_order(cross, ["vit_model", "cnn_model"]).iterrows():
        where = f"{c['dataset']}, " if multi else ""
        who = f"{c['vit_model']} vs {c['cnn_model']} ({where}{condition_label(c['pretraining'], c['pretrain_size'])})"
        measured = f"{_images(c['n_min'])}–{_images(c['n_max'])} images"
        if c["status"] == "not_fitted":
            yield f"Crossover {who}: not estimated, the power-law fit {c['note']}."
            continue
        if c["status"] == "none":
            yield (f"Crossover {who}: no crossover in the measured range ({measured}), nor up to "
                   f"{stats.EXTRAPOLATION:g}× the largest size: the ViT's fitted error stays above the CNN's.")
            continue
        if c["status"] == "vit_ahead":
            lead = f"the ViT's fitted error is already lower at {_images(c['n_min'])} images"
            if math.isnan(c["cnn_overtakes"]):
                yield (f"Crossover {who}: none, {lead} and stays lower up to {stats.EXTRAPOLATION:g}× the "
                       "largest size.")
            else:
                beyond = ("inside the measured range" if c["cnn_overtakes"] <= c["n_max"]
                          else "beyond the largest measured size, an extrapolation")
                yield (f"Crossover {who}: reversed, {lead}, and the CNN's falls below it at "
                       f"≈ {_images(c['cnn_overtakes'])} training images ({beyond}).")
            continue
        where = ("inside the measured range" if c["status"] == "measured"
                 else f"beyond the largest measured size, an extrapolation (up to {stats.EXTRAPOLATION:g}×)")
        interval = (f"95% bootstrap interval {_images(c['ci_low'])}–{_images(c['ci_high'])}"
                    if not math.isnan(c["ci_low"]) else f"interval undetermined: {c['note']}")
        yield (f"Crossover {who}: the fitted error curves cross at ≈ {_images(c['n'])} training images "
               f"({interval}), {where} ({measured}); above it the ViT's fitted error is lower.")


def _evidence_findings(runs: pd.DataFrame, summary: pd.DataFrame, fits: pd.DataFrame) -> Iterable[str]:
    """Explicit statements where the evidence is weak."""
    cells = summary[summary["n"] > 0]
    single = int((cells["n"] == 1).sum())
    if len(cells) and single == len(cells):
        yield "Every cell has a single seed: no confidence intervals, every comparison is anecdotal."
    elif single:
        yield f"{single} of {len(cells)} cells have a single seed (no interval)."
    if len(cells) and cells["n"].max() == 2:
        yield "At most 2 seeds per cell: a bootstrap interval from two values is only their range."
    sizes = int(stats.usable(runs)["train_fraction"].nunique())
    if sizes == 0:
        yield "No completed runs: there is nothing to compare."
    elif sizes < stats.MIN_SIZES:
        yield (f"Only {sizes} training-set size{'s' if sizes != 1 else ''} measured: power-law fits and crossover "
               f"estimates need at least {stats.MIN_SIZES}.")
    unfitted = fits[~fits["fitted"]]
    if 0 < len(unfitted) < len(fits):
        yield f"{len(unfitted)} of {len(fits)} (model, pretraining) curves could not be fitted."
    counts = stats.status_counts(runs)
    if counts["failed"] or counts["diverged"]:
        yield (f"{counts['failed']} failed and {counts['diverged']} diverged runs are excluded from every "
               "statistic (listed under Setup).")
    target = stats.targets(runs)
    repeats = target.groupby([*stats.CELL, "seed"], dropna=False).size()
    if (repeats > 1).any():
        yield (f"{int((repeats > 1).sum())} (cell, seed) combinations have several runs (other spec fields differ): "
               "their cells pool over those runs.")


def findings_section(runs: pd.DataFrame, crossovers: pd.DataFrame) -> list[str]:
    """Markdown lines: the numbers behind each claim, with their caveats."""
    diffs = stats.arch_differences(runs)
    gains = stats.pretraining_gains(runs)
    lines = ["## Findings", ""]
    lines += [f"- {s}" for s in _gap_findings(runs, diffs)]
    if diffs.empty:
        lines.append("- No paired ViT − CNN comparison: no ViT and CNN runs completed with the same dataset, "
                     "fraction, pretraining and seed.")
    lines += [f"- {s}" for s in _pretraining_findings(gains, diffs)]
    lines += [f"- {s}" for s in _crossover_findings(crossovers)]
    lines += [f"- {s}" for s in _evidence_findings(runs, stats.summarize(runs), stats.power_law_fits(runs))]
    return lines


def method_section() -> list[str]:
    """Markdown lines: how the numbers are computed."""
    return [
        "## Method", "",
        f"- Cells aggregate completed runs over seeds: mean ± half-width of the {stats.CONFIDENCE:.0%} "
        f"percentile-bootstrap CI (`scipy.stats.bootstrap`, {stats.N_RESAMPLES} resamples, seed {stats.SEED}); "
        "n=1 gives no interval; failed and diverged runs are counted but excluded.",
        "- ViT − CNN differences and pretraining gains are paired on seed (same dataset, fraction, pretraining).",
        f"- Power law: test error ≈ a·n^(−b) + c per (model, pretraining), fitted on every run with "
        f"`scipy.optimize.curve_fit` (a > 0, 0 < b ≤ 2, 0 ≤ c ≤ 1), only with ≥ {stats.MIN_SIZES} training-set "
        f"sizes. The crossover is where the ViT's fitted error falls below the CNN's, searched up to "
        f"{stats.EXTRAPOLATION:g}× the largest size; its interval is a bootstrap over runs within each size, "
        "reported only when most resamples find a crossover.",
    ]


def build_report(
    collection: Collection, sweep: str, built: list[Table], table_skips: dict[str, str],
    figures: dict[str, list[Path]], figure_skips: dict[str, str], crossovers: pd.DataFrame,
) -> str:
    """The whole report.md text."""
    lines = [f"# Sweep `{sweep}`: ViT vs CNN", ""]
    lines += setup_section(collection, sweep) + [""]
    lines += findings_section(collection.runs, crossovers) + [""]
    lines += ["## Tables", ""]
    for table in built:
        link = f"{tables.FOLDER}/{table.name}"
        lines += [table.to_markdown(), f"[Markdown]({link}.md) · [LaTeX]({link}.tex)", ""]
    lines += [f"- Table `{name}` skipped: {reason}." for name, reason in table_skips.items()]
    lines += ["", "## Figures", ""]
    for name, paths in figures.items():
        png, pdf = (p.name for p in paths)
        title = plots.FIGURES[name].title
        lines += [f"![{title}]({plots.FOLDER}/{png})", "", f"*{title}* ([PDF]({plots.FOLDER}/{pdf}))", ""]
    lines += [f"- Figure `{name}` skipped: {reason}." for name, reason in figure_skips.items()]
    lines += [""] + method_section()
    return "\n".join(lines).replace("\n\n\n", "\n\n").rstrip("\n") + "\n"


# --------------------------------------------------------------- W&B
def log_to_wandb(mode: str, sweep: str, built: list[Table], figures: dict[str, list[Path]]) -> None:
    """Log the tables and figures to one W&B run (job_type "report", group SWEEP)."""
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "vit-vs-cnn"), job_type="report", group=sweep,
                     name=f"{sweep}-report", mode=mode)
    payload = {t.name: wandb.Table(columns=t.header, data=[[c.text for c in row] for row in t.rows]) for t in built}
    payload.update({name: wandb.Image(str(paths[0])) for name, paths in figures.items()})
    run.log(payload)
    run.finish()


# --------------------------------------------------------------- driver
def make_report(
    collection: Collection, sweep: str, results_dir: Path | str, n_boot: int = CROSSOVER_RESAMPLES,
    wandb_mode: str = "off",
) -> Path:
    """Write runs.csv, tables, figures and report.md for one sweep (and log them to W&B unless off).

    Returns:
        The path of report.md.
    """
    out = Path(results_dir) / sweep
    runs = collection.runs
    collect.save_runs(runs, results_dir, sweep)
    built, table_skips = tables.write_tables(runs, out / tables.FOLDER)
    figures, figure_skips = plots.write_figures(runs, out / plots.FOLDER)
    crossovers = stats.crossovers(runs, n_boot=n_boot)
    text = build_report(collection, sweep, built, table_skips, figures, figure_skips, crossovers)
    path = files.write_text(out / "report.md", text)
    if wandb_mode != "off":
        log_to_wandb(wandb_mode, sweep, built, figures)
    return path
