"""Interpretability figures from the runs' `explain.npz` files: how far each layer looks, and where each net looks.

- "How far each layer looks": distance in pixels against relative depth,
  for both nets in one panel: the ViT's mean attention distance per head
  (dots) and over heads (line), and the gradient-based effective receptive
  field's mean distance (Luo et al. 2016) for the ViT's blocks and the CNN's
  stages (dashed lines), averaged over the seeds that have the file. The
  two measures are comparable in kind, not number for number: the ERF is
  measured from one unit at the centre, attention distance averages over
  every query patch.
- "Where each net looks": the same test images side by side, the input,
  then each ViT's attention rollout and Grad-CAM and each CNN's Grad-CAM,
  from the runs of one cell and seed that saved identical images: a ViT and
  a CNN in a comparison sweep, the ViT's variants in an ablation sweep.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.image import AxesImage

from analysis import estimates, plots, stats
from analysis.ablations import VARIANT_FIELDS, Variant, variant_of
from analysis.figure_kit import RunsDirFigure, cell_title, legend_below, model_colors, panels
from analysis.outputs import NoData, condition_key, models_in_order
from analysis.run_files import EXPLAIN, Arrays, RunArrays, bind_runs_dir

log = logging.getLogger(__name__)

CELL_KEYS = ["dataset", "pretraining", "pretrain_size", "train_fraction"]
MAX_IMAGES = 4  # rows of the side-by-side figure
MAP_CMAP = "inferno"
MAP_ALPHA = 0.6
ERF_CAVEAT = ("The ERF's mean distance is the gradient-weighted mean distance from a single unit at the centre of "
              "the feature map, while attention distance averages over all query patches: comparable in kind, not "
              "number for number (a field uniform over the image lies closer to its centre on average than two "
              "uniform points lie to each other).")


# --------------------------------------------------------------- which runs
@dataclass(frozen=True)
class Net:
    """One net of a cell and its runs' explain.npz arrays (one per seed).

    Attributes:
        model: registry name.
        arch: "vit" | "cnn".
        variant: the ViT's architecture variant (None for a CNN).
        runs: (run, explain arrays), by seed.
    """

    model: str
    arch: str
    variant: Variant | None
    runs: tuple[tuple[pd.Series, Arrays], ...]

    @property
    def n(self) -> int:
        return len(self.runs)

    def label(self, with_variant: bool) -> str:
        """The model, with its variant when the cell has several."""
        return f"{self.model} ({self.variant.label})" if with_variant and self.variant else self.model


@dataclass(frozen=True)
class ExplainedCell:
    """A cell (dataset, pretraining, training fraction) and its nets with explain.npz."""

    keys: dict[str, object]
    title: str
    nets: tuple[Net, ...]

    def of(self, arch: str) -> list[Net]:
        return [net for net in self.nets if net.arch == arch]

    @property
    def several_variants(self) -> bool:
        return len({net.variant for net in self.of("vit")}) > 1


def explained_cells(runs: pd.DataFrame, runs_dir: Path | str) -> list[ExplainedCell]:
    """The cells with at least one completed run that has explain.npz, in dataset then condition order
    (largest training fraction first); nets in `models_in_order`, the paper's default ViT variant first."""
    done = stats.targets(runs)
    done = done[done["status"] == "completed"].sort_values("seed", kind="mergesort")
    files = RunArrays(runs_dir)
    found = []
    for key, cell in done.groupby(CELL_KEYS, dropna=False, sort=False):
        nets = []
        for model, arch in models_in_order(cell):
            same = cell[cell["model"] == model]
            variants = [variant_of(run) if arch == "vit" else None for _, run in same.iterrows()]
            for variant in sorted(set(variants), key=lambda v: (v is None or not v.is_default,
                                                                 v.sort_key() if v else ())):
                chosen = [run for (_, run), v in zip(same.iterrows(), variants) if v == variant]
                loaded = tuple((run, arrays) for run in chosen if (arrays := files.get(run, EXPLAIN)) is not None)
                if loaded:
                    nets.append(Net(model, arch, variant, loaded))
        if nets:
            keys = dict(zip(CELL_KEYS, key))
            title = cell_title(*key, cell["n_train"].astype(float).median())
            found.append(ExplainedCell(keys, title, tuple(nets)))
    return sorted(found, key=lambda c: (c.keys["dataset"], condition_key(c.keys["pretraining"],
                                                                          c.keys["pretrain_size"]),
                                        -c.keys["train_fraction"]))


# --------------------------------------------------------------- how far each layer looks
def uniform_attention_distance(grid: tuple[int, int], patch_size: float) -> float:
    """Mean distance (px) between patch centres over all query-key pairs: what a uniform head gives."""
    rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
    centres = np.stack([rows.ravel(), cols.ravel()], axis=1) * patch_size  # (N, 2)
    return float(np.linalg.norm(centres[:, None] - centres[None], axis=-1).mean())


def erf_profile(net: Net) -> tuple[np.ndarray, np.ndarray, int]:
    """(relative depth (L,), ERF mean distance (L,) averaged over runs, runs averaged).

    Runs whose probed layers differ from the first run's are left out, with a warning.
    """
    depth = net.runs[0][1]["erf_relative_depth"]
    same = [a["erf_mean_distance_px"] for _, a in net.runs
            if a["erf_relative_depth"].shape == depth.shape and np.allclose(a["erf_relative_depth"], depth)]
    if len(same) < net.n:
        log.warning("%s: %d of %d explain.npz files probe other layers; left out", net.model, net.n - len(same), net.n)
    return depth, np.mean(same, axis=0), len(same)


def attention_profile(net: Net) -> tuple[np.ndarray, np.ndarray]:
    """(relative depth (L,), mean attention distance per (run, layer, head) as (R, L, h))."""
    return net.runs[0][1]["attention_relative_depth"], np.stack([a["attention_distance_px"] for _, a in net.runs])


def _vit_geometry(net: Net) -> tuple[tuple[int, int], float]:
    """The ViT's patch grid and patch size in pixels, from the rollout's and the images' shapes."""
    arrays = net.runs[0][1]
    grid = arrays["rollout"].shape[-2:]
    return (int(grid[0]), int(grid[1])), arrays["images"].shape[-1] / grid[1]


def _draw_distance_panel(ax: Axes, cell: ExplainedCell, vit: Net | None, colors: dict) -> None:
    """The ViT's attention (dots, mean line) and ERF, and every CNN's ERF, of one cell."""
    counts = []
    if vit is not None:
        color = colors[vit.model]
        depth, distance = attention_profile(vit)  # (L,), (R, L, h)
        heads = np.broadcast_to(depth[None, :, None], distance.shape)
        ax.scatter(heads.ravel(), distance.ravel(), s=5, color=color, alpha=0.45, linewidths=0,
                   label=f"{vit.model}: attention distance per head")
        ax.plot(depth, distance.mean(axis=(0, 2)), color=color, marker="o",
                label=f"{vit.model}: attention distance, mean over heads")
        grid, patch = _vit_geometry(vit)
        ax.axhline(uniform_attention_distance(grid, patch), color="0.5", linestyle=":", linewidth=0.8,
                   label="uniform attention (global)")
        erf_depth, erf, _ = erf_profile(vit)
        ax.plot(erf_depth, erf, color=color, linestyle="--", marker="s", label=f"{vit.model}: gradient ERF")
        counts.append(f"{vit.model} {vit.n}")
    for cnn in cell.of("cnn"):
        erf_depth, erf, n = erf_profile(cnn)
        ax.plot(erf_depth, erf, color=colors[cnn.model], linestyle="--", marker="s",
                label=f"{cnn.model}: gradient ERF")
        counts.append(f"{cnn.model} {n}")
    ax.text(0.98, 0.02, "seeds: " + ", ".join(counts), transform=ax.transAxes, fontsize=6, ha="right")
    title = cell.title if vit is None or not cell.several_variants else f"{cell.title}\n{vit.variant.label}"
    ax.set(xlabel="relative depth (layer / layers probed)", ylabel="distance (px)", title=title, xlim=(0, 1.05))
    ax.set_ylim(bottom=0)


def plot_layer_distance(runs: pd.DataFrame, runs_dir: Path | str) -> Figure:
    """How far each layer looks: one panel per cell and ViT variant, both nets in pixels against relative depth.

    Raises:
        NoData: no completed run has explain.npz.
    """
    cells = explained_cells(runs, runs_dir)
    if not cells:
        raise NoData(f"no completed run has {EXPLAIN} (python -m experiments.explain RUN_DIR...)")
    panels_of = [(cell, vit) for cell in cells for vit in (cell.of("vit") or [None])]
    colors = model_colors(runs)
    with mpl.rc_context(plots.STYLE):
        fig, axes = panels(1, len(panels_of))
        for ax, (cell, vit) in zip(axes[0], panels_of):
            _draw_distance_panel(ax, cell, vit, colors)
        return legend_below(fig, ncols=1 if len(panels_of) == 1 else 2)


# --------------------------------------------------------------- where each net looks
@dataclass(frozen=True)
class MapSet:
    """The nets of one cell and seed whose saved explain images are identical (ViTs first, then CNNs).

    Attributes:
        cell: the cell.
        seed: the seed.
        nets: (net, run, explain arrays) per net.
    """

    cell: ExplainedCell
    seed: int
    nets: tuple[tuple[Net, pd.Series, Arrays], ...]


def map_set(runs: pd.DataFrame, runs_dir: Path | str) -> MapSet:
    """The first (cell, seed) where two or more nets (a ViT and a CNN, or ViT variants) saved identical images.

    Cells in `explained_cells` order, seeds ascending; the nets are the seed's runs whose images equal those of
    the cell's first net (the paper's default ViT variant first, CNNs after the ViTs).

    Raises:
        NoData: no such set, saying why (one net per cell and seed at most, or the images differ).
    """
    cells = explained_cells(runs, runs_dir)
    if not cells:
        raise NoData(f"no completed run has {EXPLAIN} (python -m experiments.explain RUN_DIR...)")
    differing = []
    for cell in cells:
        nets = cell.of("vit") + cell.of("cnn")
        for seed in sorted({int(run["seed"]) for net in nets for run, _ in net.runs}):
            found = [(net, run, arrays) for net in nets for run, arrays in net.runs if int(run["seed"]) == seed]
            if len(found) < 2:
                continue
            first = found[0][2]["images"]
            same = tuple(f for f in found if f[2]["images"].shape == first.shape
                         and np.array_equal(f[2]["images"], first))
            if len(same) >= 2:
                return MapSet(cell, seed, same)
            differing.append(" vs ".join(str(run["run_id"]) for _, run, _ in found))
    if differing:
        raise NoData(f"the nets' explain.npz images differ for every cell and seed ({'; '.join(differing)}): "
                     "refusing to compare maps of different images")
    raise NoData(f"no cell and seed has {EXPLAIN} for two nets (a ViT and a CNN, or two ViT variants)")


def _display_image(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """(C, H, W) -> an image for imshow, min-max scaled: gray for one channel, RGB for three, else channel mean."""
    if image.shape[0] == 3:
        shown = np.transpose(image, (1, 2, 0))
    else:
        shown = image.mean(axis=0)
    low, high = float(shown.min()), float(shown.max())
    shown = (shown - low) / (high - low) if high > low else np.zeros_like(shown)
    return shown, ("gray" if shown.ndim == 2 else None)


def _overlay(ax: Axes, image: np.ndarray, heat: np.ndarray) -> AxesImage:
    """The image in gray, the (h, w) map stretched over it, scaled to [0, 1] per image."""
    height, width = image.shape[-2:]
    gray = _display_image(image.mean(axis=0, keepdims=True))[0]
    ax.imshow(gray, cmap="gray", interpolation="nearest")
    low, high = float(heat.min()), float(heat.max())
    scaled = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    return ax.imshow(scaled, cmap=MAP_CMAP, alpha=MAP_ALPHA, vmin=0.0, vmax=1.0, interpolation="nearest",
                     extent=(-0.5, width - 0.5, height - 0.5, -0.5))


def _net_names(found: MapSet) -> list[str]:
    """Per net, what tells it apart in the figure: the model where the set has several, and the variant's
    differing fields where it has several ViT variants ("pos. none", "avg pool", "patch 7")."""
    models = {net.model for net, _, _ in found.nets}
    variants = [net.variant for net, _, _ in found.nets if net.variant is not None]
    differing = [name for name in VARIANT_FIELDS if len({getattr(v, name) for v in variants}) > 1]
    names = []
    for net, _, _ in found.nets:
        parts = [net.model] if len(models) > 1 else []
        if net.variant is not None and differing:
            parts.append(net.variant.describe(differing))
        names.append(", ".join(parts) or net.model)
    return names


def _map_columns(found: MapSet) -> list[tuple[str, Callable[[int], np.ndarray]]]:
    """(title, image index -> (h, w) map) per column after the input: each ViT's attention rollout and
    Grad-CAM, then each CNN's Grad-CAM."""
    columns = []
    for name, (net, _, arrays) in zip(_net_names(found), found.nets):
        if net.arch == "vit":
            columns.append((f"{name}\nattention rollout", lambda i, a=arrays: a["rollout"][i]))
        columns.append((f"{name}\nGrad-CAM", lambda i, a=arrays: a["gradcam"][i]))
    return columns


def plot_attention_maps(runs: pd.DataFrame, runs_dir: Path | str) -> Figure:
    """The same test images (rows): input, then each net's maps (`_map_columns`).

    Raises:
        NoData: no two nets of one cell and seed with identical explain images.
    """
    found = map_set(runs, runs_dir)
    images = found.nets[0][2]["images"]
    n_images = min(MAX_IMAGES, len(images))
    columns = _map_columns(found)
    side = plots.COLUMN_WIDTH * 2 / max(4, len(columns) + 1)
    with mpl.rc_context(plots.STYLE):
        fig, axes = panels(n_images, len(columns) + 1, width=side, height=side)
        for i, row in enumerate(axes):
            shown, cmap = _display_image(images[i])
            row[0].imshow(shown, cmap=cmap, interpolation="nearest")
            predicted = " / ".join(str(int(arrays["predictions"][i])) for _, _, arrays in found.nets)
            row[0].set_ylabel(f"predicted: {predicted}", fontsize=6)
            for ax, (_, heat_of) in zip(row[1:], columns):
                heat = _overlay(ax, images[i], heat_of(i))
            for ax in row:
                ax.set(xticks=[], yticks=[])
                ax.grid(False)
                ax.spines[:].set_visible(False)
        for ax, title in zip(axes[0], ["input"] + [title for title, _ in columns]):
            ax.set_title(title, fontsize=6.5)
        fig.colorbar(heat, ax=axes[:, 1:].ravel().tolist(), shrink=0.6, label="relative importance (per image)")
        layers = sorted({f"{net.model} {arrays['gradcam_layer']}" for net, _, arrays in found.nets})
        fig.suptitle(f"{found.cell.title} · seed {found.seed} · predicted classes in column order\n"
                     f"Grad-CAM at {', '.join(layers)}", fontsize=6.5)
        return fig


FIGURES: dict[str, RunsDirFigure] = {
    "fig_i1_layer_distance": RunsDirFigure(
        "Figure I1. How far each layer looks: ViT attention distance and both nets' effective receptive fields",
        "Distance in pixels against relative depth (layer / number of layers probed). ViT: mean attention "
        "distance of every head of every seed (dots; heads are not matched across seeds) and its mean over heads "
        "and seeds (solid line); the dotted line is what a uniform, fully global head gives. Both nets: the "
        "gradient-based effective receptive field's mean distance (dashed; Luo et al. 2016), mean over seeds, for "
        "the ViT's blocks and the CNN's stem and residual blocks. " + ERF_CAVEAT,
        plot_layer_distance),
    "fig_i2_attention_maps": RunsDirFigure(
        "Figure I2. Where each net looks: the same test images, ViT attention rollout and Grad-CAM of every net",
        "Input, then each ViT's attention rollout (Abnar & Zuidema 2020: the class token's share of each patch "
        "through all layers; for average pooling, the patches' mean share) and Grad-CAM, and each CNN's Grad-CAM, "
        "from the runs of one cell and seed whose saved images are identical (a ViT and a CNN, or the ViT variants "
        "of an ablation); each map is min-max scaled per image, over the image in gray. Row labels: the classes "
        "each net predicts, in column order; Grad-CAM explains those classes.",
        plot_attention_maps),
}


def figure_makers(runs_dir: Path | str) -> dict[str, Callable[[pd.DataFrame], Figure]]:
    """{name: f(runs)} for `analysis.outputs.write_outputs` with `plots.save_figure`."""
    return bind_runs_dir({name: figure.draw for name, figure in FIGURES.items()}, runs_dir)


# --------------------------------------------------------------- findings
def _depth_trend(vit: Net) -> str:
    """Mean attention distance of the first and last block, and their difference over seeds."""
    _, distance = attention_profile(vit)  # (R, L, h)
    per_run = distance.mean(axis=2)  # (R, L)
    first, last = per_run[:, 0].mean(), per_run[:, -1].mean()
    change = estimates.over_seeds(per_run[:, -1] - per_run[:, 0])
    text = (f"mean attention distance {first:.1f} px in the first block and {last:.1f} px in the last "
            f"(mean over heads); last − first = {change.sentence(scale=1.0, unit='px')}")
    if change.excludes_zero:
        text += f", so attention reaches {'farther' if change.mean > 0 else 'less far'} with depth"
    return text


def _erf_comparison(vit: Net, cnn: Net) -> str:
    """The deepest probed layer's ERF mean distance of both nets, paired by seed."""
    vit_by_seed = {int(r["seed"]): a["erf_mean_distance_px"][-1] for r, a in vit.runs}
    cnn_by_seed = {int(r["seed"]): a["erf_mean_distance_px"][-1] for r, a in cnn.runs}
    seeds = sorted(set(vit_by_seed) & set(cnn_by_seed))
    if not seeds:
        return ""
    found = estimates.over_seeds([vit_by_seed[s] - cnn_by_seed[s] for s in seeds])
    text = (f"gradient ERF mean distance at the deepest probed layer: {vit.model} "
            f"{np.mean([vit_by_seed[s] for s in seeds]):.1f} px, {cnn.model} "
            f"{np.mean([cnn_by_seed[s] for s in seeds]):.1f} px; {vit.model} − {cnn.model} = "
            f"{found.sentence(scale=1.0, unit='px')}")
    if found.excludes_zero:
        text += f", so the {'ViT' if found.mean > 0 else 'CNN'}'s deepest layer draws on a wider region"
    return text


def interpret_findings(runs: pd.DataFrame, runs_dir: Path | str) -> list[str]:
    """Sentences per cell and ViT: attention distance from the first to the last block, and the deepest
    layers' ERF of both nets; a direction only when the interval over seeds excludes 0."""
    sentences = []
    for cell in explained_cells(runs, runs_dir):
        for vit in cell.of("vit"):
            name = vit.label(cell.several_variants)
            grid, patch = _vit_geometry(vit)
            sentences.append(f"{cell.title}, {name}: {_depth_trend(vit)}; a uniform head would give "
                             f"{uniform_attention_distance(grid, patch):.1f} px.")
            for cnn in cell.of("cnn"):
                comparison = _erf_comparison(vit, cnn)
                if comparison:
                    sentences.append(f"{cell.title}: {comparison}.")
    return sentences

