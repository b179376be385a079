"""What the robustness and interpretability figures share with `analysis.plots`: style, colours, panels, legend.

Colours follow the model exactly as in `analysis.plots` (seaborn's
colour-blind palette over `models_in_order` of the sweep's target runs), so a
model has one colour in every figure of a report. Figures that read run
files are declared as `RunsDirFigure`: the title and caption written once,
next to the function that draws them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from analysis import plots, stats
from analysis.outputs import condition_label, fraction_label, models_in_order


@dataclass(frozen=True)
class RunsDirFigure:
    """One figure drawn from the runs and their files.

    Attributes:
        title: the report's caption line ("Figure R1. ...").
        caption: what the marks mean and the caveats, for under the figure.
        draw: (runs, runs_dir) -> Figure; raises `NoData` with a one-line reason.
    """

    title: str
    caption: str
    draw: Callable[[pd.DataFrame, Path], Figure]


def model_colors(runs: pd.DataFrame) -> dict[str, tuple[float, float, float]]:
    """One colour per model of the sweep, the same as `analysis.plots` gives it."""
    models = models_in_order(stats.targets(runs))
    palette = sns.color_palette("colorblind", max(len(models), 1))
    return {model: palette[i] for i, (model, _) in enumerate(models)}


def panels(n_rows: int, n_cols: int, width: float = plots.COLUMN_WIDTH,
           height: float = plots.PANEL_HEIGHT) -> tuple[Figure, np.ndarray]:
    """A constrained-layout figure of `n_rows` x `n_cols` panels, `width` inches per panel column."""
    fig = Figure(figsize=(width * n_cols, height * n_rows + 0.5), layout="constrained")
    return fig, np.asarray(fig.subplots(n_rows, n_cols, squeeze=False))


def legend_below(fig: Figure, ncols: int = 2) -> Figure:
    """One legend under the panels with every distinct labelled artist."""
    handles = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=ncols)
    return fig


def cell_title(dataset: str, pretraining: str, pretrain_size: float, fraction: float, n_images: float,
               with_dataset: bool = True) -> str:
    """"fashion_mnist · scratch · 32% (17,280)": a panel's or row's setting."""
    parts = [dataset] * with_dataset + [condition_label(pretraining, pretrain_size), fraction_label(fraction, n_images)]
    return " · ".join(parts)
