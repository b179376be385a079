"""Comparison figures: DataFrames of runs in, matplotlib Figures out.

Every `plot_*` function takes the tidy runs frame of `analysis.collect` and
returns a Figure (tests inspect its axes), or raises `NoData` with the reason
when the sweep has nothing to show: no figure is ever empty. Colours follow
the model (seaborn's colour-blind palette), line style and marker the
pretraining; shaded bands are 95% Student-t intervals over seeds (none at
n=1); a hollow marker is a cell still improving when its budget ended (kept out
of fits). Figure 1 adds each identified power-law fit as a thin line over the
sizes it was fitted on, never beyond. `FIGURES` names each figure, its title
and the function that draws it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from analysis import stats
from analysis.outputs import NoData, condition_label, conditions_in_order, models_in_order, write_outputs
from common import files

FOLDER = "figures"  # under results/SWEEP/
COLUMN_WIDTH = 3.5  # inches: one column of a two-column paper
PANEL_HEIGHT = 2.4
DPI = 200
STYLE = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 6.5,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "lines.linewidth": 1.2, "lines.markersize": 3.5,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "grid.linewidth": 0.5, "legend.frameon": False,
}
LINESTYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P"]
ACC_LABEL = "test accuracy (%)"
IMAGES_LABEL = "training images"
FLAGGED = "_flagged"  # label of the hollow markers (a leading "_" keeps them out of the legend)
FIT = "_fit"  # label of the fitted curves
KEYS = {  # what the legend says about hollow markers and fitted curves, when a figure has them
    FLAGGED: Line2D([], [], color="0.35", marker="o", markerfacecolor="white", linestyle="none",
                    label="hollow: still improving (not fitted)"),
    FIT: Line2D([], [], color="0.35", linewidth=0.6, alpha=0.6,
                label="thin: identified power-law fit"),
}


# --------------------------------------------------------------- styling
class _Styler:
    """Consistent colour per model and line style/marker per condition."""

    def __init__(self, runs: pd.DataFrame) -> None:
        models = models_in_order(runs)
        colors = sns.color_palette("colorblind", max(len(models), 1))
        self.color = {m: colors[i] for i, (m, _) in enumerate(models)}
        labels = [condition_label(p, s) for p, s in conditions_in_order(runs)]
        self.style = {c: (LINESTYLES[i % len(LINESTYLES)], MARKERS[i % len(MARKERS)]) for i, c in enumerate(labels)}
        self.order = {key: i for i, key in enumerate((m, c) for m, _ in models for c in labels)}

    def line(self, model: str, condition: str) -> dict:
        """Keyword arguments for `Axes.plot`."""
        linestyle, marker = self.style[condition]
        return dict(color=self.color[model], linestyle=linestyle, marker=marker, label=f"{model} · {condition}")


def _figure(n_rows: int, n_cols: int) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure, one column width per panel column."""
    fig = Figure(figsize=(COLUMN_WIDTH * n_cols, PANEL_HEIGHT * n_rows + 0.5), layout="constrained")
    axes = np.asarray(fig.subplots(n_rows, n_cols, squeeze=False))
    return fig, axes


def _finish(fig: Figure) -> Figure:
    """Put one legend (all distinct labelled lines, then the keys of hollow markers and fits) under the panels."""
    handles = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    drawn = {line.get_label() for ax in fig.axes for line in ax.get_lines()}
    for label, key in KEYS.items():
        if label in drawn:
            handles[key.get_label()] = key
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=2)
    return fig


def _band_line(ax: Axes, x: np.ndarray, cell: pd.DataFrame, scale: float, **kw: object) -> None:
    """Means as a line with markers (hollow where flagged), plus a t-interval band where n >= 2."""
    order = np.argsort(x, kind="stable")
    x, cell = np.asarray(x, dtype=float)[order], cell.iloc[order]
    y = cell["mean"].to_numpy(dtype=float) * scale
    flagged = cell["flagged"].to_numpy(dtype=bool) if "flagged" in cell else np.zeros(len(cell), dtype=bool)
    ax.plot(x, y, markevery=np.flatnonzero(~flagged).tolist(), **kw)
    if flagged.any():
        ax.plot(x[flagged], y[flagged], linestyle="none", marker=kw["marker"], color=kw["color"],
                markerfacecolor="white", label=FLAGGED)
    band = (cell["interval"] == "t").to_numpy() if "interval" in cell else (cell["n"] >= 2).to_numpy()
    if band.any():
        ax.fill_between(x, cell["ci_low"] * scale, cell["ci_high"] * scale, where=band,
                        color=kw["color"], alpha=0.18, linewidth=0)


def _curves(ax: Axes, summary: pd.DataFrame, x: str, styler: _Styler, scale: float = 100.0) -> None:
    """One line per (model, condition) of `summary` against column `x`."""
    groups = summary[summary["n"] > 0].groupby(["model", "pretraining", "pretrain_size"], dropna=False)
    lines = {(model, condition_label(pre, size)): cell for (model, pre, size), cell in groups}
    for key in sorted(lines, key=styler.order.__getitem__):
        _band_line(ax, lines[key][x].to_numpy(), lines[key], scale, **styler.line(*key))


def _datasets(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    return [(str(d), g) for d, g in frame.groupby("dataset", sort=True)]


def _fits(ax: Axes, fits: pd.DataFrame, styler: _Styler) -> None:
    """Each identified fit of `fits` as accuracy (%) over the sizes it was fitted on (no extrapolation)."""
    for _, fit in fits[fits["identified"]].iterrows():
        n = np.geomspace(fit["n_min"], fit["n_max"], 64)
        style = styler.line(fit["model"], condition_label(fit["pretraining"], fit["pretrain_size"]))
        ax.plot(n, 100.0 * (1.0 - stats.law_of(fit)(n)), color=style["color"], linestyle=style["linestyle"],
                linewidth=0.6, alpha=0.6, label=FIT)


# --------------------------------------------------------------- the figures
def plot_data_efficiency(runs: pd.DataFrame, metric: str = stats.METRIC) -> Figure:
    """Fig. 1: test accuracy (%) vs training images (log x), one line per model × pretraining, with identified fits."""
    summary = stats.summarize(runs, metric)
    summary = summary[summary["n"] > 0]
    if summary.empty:
        raise NoData(f"no completed runs with {metric}")
    styler = _Styler(stats.targets(runs))
    panels = _datasets(summary)
    fits = stats.power_law_fits(runs, metric)
    with mpl.rc_context(STYLE):
        fig, axes = _figure(1, len(panels))
        for ax, (dataset, cell) in zip(axes[0], panels):
            _curves(ax, cell, "n_images", styler)
            _fits(ax, fits[fits["dataset"] == dataset], styler)
            ax.set(xscale="log", xlabel=IMAGES_LABEL, ylabel=ACC_LABEL, title=dataset)
        return _finish(fig)


def plot_pretraining_effect(runs: pd.DataFrame, metric: str = stats.METRIC) -> Figure:
    """Fig. 2: accuracy gain (points) of each pretraining over scratch vs training images (log x)."""
    gains = stats.pretraining_gains(runs, metric)
    if gains.empty:
        raise NoData("no pretrained runs with a matching scratch run (same model, fraction and seed)")
    styler = _Styler(stats.targets(runs))
    panels = _datasets(gains)
    with mpl.rc_context(STYLE):
        fig, axes = _figure(1, len(panels))
        for ax, (dataset, cell) in zip(axes[0], panels):
            ax.axhline(0.0, color="0.4", linewidth=0.8)
            _curves(ax, cell, "n_images", styler)
            ax.set(xscale="log", xlabel=IMAGES_LABEL, ylabel="gain over scratch (points)", title=dataset)
        return _finish(fig)


def plot_pretraining_scale(runs: pd.DataFrame, metric: str = stats.METRIC) -> Figure:
    """Fig. 3: accuracy vs pretraining-set size (log x), per source with >= 2 sizes.

    One panel per (dataset, source); one line per model and training fraction
    (colour: model, style: fraction).
    """
    summary = stats.summarize(runs, metric)
    summary = summary[(summary["n"] > 0) & summary["pretrain_size"].notna()]
    panels = [(d, s, g) for (d, s), g in summary.groupby(["dataset", "pretraining"], sort=True)
              if g["pretrain_size"].nunique() >= 2]
    if not panels:
        raise NoData("no pretraining source with >= 2 pretraining-set sizes")
    styler = _Styler(stats.targets(runs))
    with mpl.rc_context(STYLE):
        fig, axes = _figure(1, len(panels))
        for ax, (dataset, source, cell) in zip(axes[0], panels):
            fractions = sorted(cell["train_fraction"].unique())
            for (model, fraction), line in cell.groupby(["model", "train_fraction"], sort=True):
                i = fractions.index(fraction)
                _band_line(ax, line["pretrain_size"].to_numpy(dtype=float), line, 100.0,
                           color=styler.color[model], linestyle=LINESTYLES[i % len(LINESTYLES)],
                           marker=MARKERS[i % len(MARKERS)], label=f"{model} · {100 * fraction:g}% of data")
            ax.set(xscale="log", xlabel=f"{source} pretraining images", ylabel=ACC_LABEL, title=dataset)
        return _finish(fig)


def plot_generalization(runs: pd.DataFrame, metric: str = stats.METRIC) -> Figure:
    """Fig. 4: the generalization gap (train − test accuracy, in points) against training images, log x, one
    panel per dataset (robustness and calibration figures: `analysis.robustness_report`)."""
    runs = stats.with_train_test_gap(runs)
    if "train_test_gap" not in runs or not stats.usable(runs, "train_test_gap").shape[0]:
        raise NoData("runs carry no train/acc1")
    styler = _Styler(stats.targets(runs))
    gap = stats.summarize(runs, "train_test_gap")
    datasets = sorted(stats.usable(runs, metric)["dataset"].unique())
    with mpl.rc_context(STYLE):
        fig, axes = _figure(1, len(datasets))
        for ax, dataset in zip(axes.flat, datasets):
            _curves(ax, gap[gap["dataset"] == dataset], "n_images", styler)
            ax.set(xscale="log", xlabel=IMAGES_LABEL, ylabel="train − test accuracy (points)", title=dataset)
        return _finish(fig)


COST_AXES = {"train_flops": "training FLOPs", "wall_time_s": "wall time (s)"}


def plot_cost(runs: pd.DataFrame, metric: str = stats.METRIC) -> Figure:
    """Fig. 5: test accuracy vs training FLOPs and vs wall time (log x), where recorded."""
    ok = stats.usable(runs, metric)
    kinds = [c for c in COST_AXES if c in ok and ok[c].notna().any()]
    if not kinds:
        raise NoData("runs record neither train_flops nor wall_time_s")
    acc = stats.summarize(runs, metric)
    styler = _Styler(stats.targets(runs))
    datasets = sorted(ok["dataset"].unique())
    with mpl.rc_context(STYLE):
        fig, axes = _figure(len(datasets), len(kinds))
        for row, dataset in zip(axes, datasets):
            for ax, kind in zip(row, kinds):
                cost = stats.summarize(runs, kind)[[*stats.CELL, "mean"]].rename(columns={"mean": kind})
                cell = acc[acc["dataset"] == dataset].merge(cost, on=stats.CELL).dropna(subset=[kind])
                _curves(ax, cell, kind, styler)
                ax.set(xscale="log", xlabel=COST_AXES[kind], ylabel=ACC_LABEL, title=dataset)
                ax.xaxis.set_minor_formatter(NullFormatter())  # no crowded minor labels on short spans
        return _finish(fig)


@dataclass(frozen=True)
class FigureMaker:
    """One figure: its title (the report's caption) and the function that draws it from the runs."""

    title: str
    draw: Callable[[pd.DataFrame], Figure]


FIGURES: dict[str, FigureMaker] = {
    "fig1_data_efficiency": FigureMaker("Figure 1. Data efficiency: test accuracy vs training images "
                                        "(bands: 95% t intervals over seeds; hollow: still improving when its "
                                        "budget ended; thin: identified power-law fits, fitted range only)",
                                        plot_data_efficiency),
    "fig2_pretraining_effect": FigureMaker("Figure 2. Pretraining effect: gain over scratch",
                                           plot_pretraining_effect),
    "fig3_pretraining_scale": FigureMaker("Figure 3. Pretraining scale: accuracy vs pretraining-set size",
                                          plot_pretraining_scale),
    "fig4_generalization": FigureMaker("Figure 4. Generalization gap: train − test accuracy vs training images",
                                       plot_generalization),
    "fig5_cost": FigureMaker("Figure 5. Cost: accuracy vs training FLOPs and wall time", plot_cost),
}


# --------------------------------------------------------------- saving
def save_figure(fig: Figure, stem: Path) -> list[Path]:
    """Write `stem.png` (at `DPI`) and `stem.pdf` atomically, without timestamps (byte-reproducible)."""
    stem = Path(stem)
    out = []
    for fmt, metadata in (("png", {"Software": None}),
                          ("pdf", {"Creator": None, "Producer": None, "CreationDate": None})):
        path = stem.with_suffix(f".{fmt}")
        files.atomic_write(path, lambda fh, fmt=fmt, md=metadata: fig.savefig(fh, format=fmt, dpi=DPI, metadata=md))
        out.append(path)
    return out


def write_figures(runs: pd.DataFrame, out_dir: Path) -> tuple[dict[str, list[Path]], dict[str, str]]:
    """Draw and save every figure that has data (and delete stale files of skipped ones).

    Returns:
        {figure name: [png, pdf]} and {skipped figure name: reason}.
    """
    draw = {name: figure.draw for name, figure in FIGURES.items()}
    return write_outputs(draw, runs, out_dir, (".png", ".pdf"), save_figure, "figure")
