"""What every output (tables, figures, the report) shares: order, labels, and how they are written.

Models are listed CNNs first (the baseline), then ViTs; conditions scratch
first, then each pretraining source by name and size. Every table, figure
and report sentence uses these two orders, so they always agree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)

# The CNN every other net is measured against where a reference is needed (relative corruption error, the
# Grad-CAM comparison): the question's own baseline.
REFERENCE_CNN = "resnet50"


class NoData(ValueError):
    """Nothing to show; str() says why (the table or figure is skipped)."""


# --------------------------------------------------------------- order
def models_in_order(frame: pd.DataFrame) -> list[tuple[str, str]]:
    """The (model, arch) pairs of `frame`: CNNs first, then ViTs, by name within each."""
    pairs = frame[["model", "arch"]].drop_duplicates().itertuples(index=False)
    return sorted(pairs, key=lambda m: (m[1] != "cnn", m[1], m[0]))


def condition_key(pretraining: str, pretrain_size: float | None) -> tuple[bool, str, float]:
    """Sort key of a condition: scratch first, then by source name and size (unknown size first)."""
    return pretraining != "none", pretraining, -1.0 if pd.isna(pretrain_size) else float(pretrain_size)


def conditions_in_order(frame: pd.DataFrame) -> list[tuple[str, float]]:
    """The (pretraining, pretrain_size) pairs of `frame`, in `condition_key` order."""
    pairs = frame[["pretraining", "pretrain_size"]].drop_duplicates().itertuples(index=False)
    return sorted(pairs, key=lambda p: condition_key(*p))


# --------------------------------------------------------------- labels
def human_count(n: float) -> str:
    """12800 -> "12.8k", 1500000 -> "1.5M", 540 -> "540"."""
    if n >= 1e6:
        return f"{n / 1e6:.3g}M"
    return f"{n / 1e3:.3g}k" if n >= 1e3 else f"{n:.0f}"


def condition_label(pretraining: str, pretrain_size: float | None) -> str:
    """"scratch" for no pretraining, else the source and its size if known."""
    if pretraining == "none":
        return "scratch"
    return pretraining if pd.isna(pretrain_size) else f"{pretraining} {human_count(float(pretrain_size))}"


def fraction_label(fraction: float, n_images: float) -> str:
    """0.01, 540 -> "1% (540)"."""
    size = "" if pd.isna(n_images) else f" ({n_images:,.0f})"
    return f"{100 * fraction:g}%{size}"


def si_label(value: float, unit: str) -> str:
    """1.64e8, "FLOPs" -> "164 MFLOPs" (3 significant digits)."""
    for scale, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def cost_label(runs: pd.DataFrame) -> str:
    """What some runs (one model, or one model under one condition) cost, from their records.

    "23.5M params · 1.05 GFLOPs/img · train 38.4 TFLOPs" (train FLOPs as a range
    when the runs differ, e.g. when some stopped early); parts not recorded are left out.
    """
    done = runs[runs["status"] == "completed"]
    parts = []
    if done["params"].notna().any():
        parts.append(f"{human_count(float(done['params'].median()))} params")
    if done["flops_per_image"].notna().any():
        parts.append(f"{si_label(float(done['flops_per_image'].median()), 'FLOPs')}/img")
    train = done["train_flops"].dropna().astype(float)
    if len(train):
        low, high = si_label(train.min(), "FLOPs"), si_label(train.max(), "FLOPs")
        parts.append(f"train {low}" if low == high else f"train {low}–{high}")
    return " · ".join(parts)


# --------------------------------------------------------------- writing
def write_outputs(makers: dict[str, Callable[[pd.DataFrame], Any]], runs: pd.DataFrame, out_dir: Path,
                  suffixes: tuple[str, ...], save: Callable[[Any, Path], Any],
                  kind: str) -> tuple[dict[str, Any], dict[str, str]]:
    """Make every table or figure that has data and `save(it, out_dir / name)`.

    A maker raising NoData is skipped with a logged reason, and its files
    (`name` + each of `suffixes`) are deleted, so none is stale.

    Args:
        makers: {name: function of the runs}, in output order.
        runs: the runs frame of `analysis.collect`.
        out_dir: the folder the files go to.
        suffixes: the file suffixes one output has (".md", ".tex").
        save: writes one made output under a path stem; its return value is collected.
        kind: "table" or "figure", for the log.

    Returns:
        {name: what `save` returned} and {skipped name: reason}.
    """
    saved, skipped = {}, {}
    for name, make in makers.items():
        stem = Path(out_dir) / name
        try:
            made = make(runs)
        except NoData as reason:
            log.info("%s %s skipped: %s", kind, name, reason)
            skipped[name] = str(reason)
            for suffix in suffixes:
                stem.with_suffix(suffix).unlink(missing_ok=True)
            continue
        saved[name] = save(made, stem)
    return saved, skipped
