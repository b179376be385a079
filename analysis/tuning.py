"""The validation table of a tuning sweep: every configuration's selected validation accuracy, never a test number.

    python -m analysis tuning --sweep tuning_recipe [--runs-dir runs] [--results-dir results]

Rows are the sweep's runs, one per configuration (model and the parameters
the sweep varies), sorted by model and then by validation accuracy, best
first; columns are the selected validation accuracy, the step it was
selected at, whether validation stopped the run early or it was still
improving when its budget ended, the training-subset accuracy, and the net's
size and cost. Written to `results/SWEEP/tuning.md`. Test metrics are left
out on purpose: a recipe is chosen on validation only.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from tabulate import tabulate

from analysis import stats
from analysis.collect import Collection
from analysis.outputs import human_count, models_in_order, si_label
from common import files

FILE = "tuning.md"
IDENTITY = ("sweep", "seed", "data_seed", "model", "role", "wandb", "profile")


def swept_columns(runs: pd.DataFrame) -> list[str]:
    """The spec fields that differ between the sweep's runs (the configurations compared), model excluded."""
    spec = [c for c in runs if c.startswith("spec/") and c.removeprefix("spec/") not in IDENTITY]
    return [c for c in spec if runs[c].astype(str).nunique() > 1]


def tuning_table(collection: Collection) -> str:
    """The Markdown validation table of a tuning sweep."""
    runs = stats.targets(collection.runs)
    runs = runs[runs["status"] == "completed"]
    swept = swept_columns(runs)
    rows = []
    for model, _ in models_in_order(runs):
        mine = runs[runs["model"] == model].sort_values("selected/val/acc1", ascending=False, kind="mergesort")
        for _, run in mine.iterrows():
            ending = ("stopped early" if run.get("stopped_early") is True else
                      "still improving" if run.get("improving_at_end") is True else "plateaued")
            rows.append([model, *[run[c] for c in swept], f"{100 * run['selected/val/acc1']:.1f}",
                         int(run["selected/step"]), int(run["train_steps"]), ending,
                         f"{100 * run['train/acc1']:.1f}", human_count(float(run["params"])),
                         si_label(float(run["flops_per_image"]), "FLOPs")])
    header = ["model", *[c.removeprefix("spec/") for c in swept], "val acc. (%)", "selected at step", "steps",
              "budget ended", "train acc. (%)", "params", "FLOPs/img"]
    return tabulate(rows, headers=header, tablefmt="pipe", disable_numparse=True) + "\n"


def write_tuning_table(collection: Collection, results_dir: Path | str, sweep: str) -> Path:
    """Write `results/SWEEP/tuning.md` (atomically) and return its path."""
    return files.write_text(Path(results_dir) / sweep / FILE, tuning_table(collection))
