"""A run's array files (`predictions.npz`, `robustness.npz`, `explain.npz`, `shift.npz`), read without torch.

The runs frame (`analysis.collect`) holds each run's `path` (its
`result.json`, relative to the runs folder); the array files sit next to it.
A file that is missing is simply absent (None); one that cannot be read or
lacks a key is absent too, with one logged warning naming the file. Files
are read with `allow_pickle=False`: strings are numpy unicode arrays.
"""

from __future__ import annotations

import functools
import logging
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

PREDICTIONS = "predictions.npz"
ROBUSTNESS = "robustness.npz"
EXPLAIN = "explain.npz"
SHIFT = "shift.npz"  # per set of `sets`: <set>_correct, <set>_target, <set>_index (experiments.generalization)
# The keys each file must have to be used.
REQUIRED: dict[str, tuple[str, ...]] = {
    PREDICTIONS: ("test_target", "test_pred", "test_logits"),
    ROBUSTNESS: ("subset", "corruptions", "corrupt_correct", "occlusion_fractions", "occlusion_correct",
                 "shuffle_correct"),
    EXPLAIN: ("arch", "images", "predictions", "gradcam", "gradcam_layer", "erf_layers", "erf_relative_depth",
              "erf_mean_distance_px"),
    SHIFT: ("sets",),
}
VIT_EXPLAIN = ("rollout", "attention_distance_px", "attention_relative_depth")  # required of a ViT's explain.npz
SHIFT_ARRAYS = ("correct", "target", "index")  # required of each set a shift.npz lists
# result.json names its predictions, robustness and shift files in these fields (the default names otherwise).
FILE_FIELDS = {PREDICTIONS: "predictions", ROBUSTNESS: "robustness", SHIFT: "shift"}

Arrays = dict[str, np.ndarray]
Made = TypeVar("Made")


def run_dir(runs_dir: Path | str, run: pd.Series) -> Path:
    """The folder of one run: where its result.json is."""
    return Path(runs_dir) / Path(str(run["path"])).parent


def file_of(runs_dir: Path | str, run: pd.Series, name: str) -> Path:
    """The path of one of the run's array files (the name its result.json gives, if any)."""
    field = FILE_FIELDS.get(name)
    given = run.get(field) if field else None
    return run_dir(runs_dir, run) / (given if isinstance(given, str) and given else name)


def load(runs_dir: Path | str, run: pd.Series, name: str) -> Arrays | None:
    """Every array of one of the run's files, or None when it is missing, unreadable or incomplete.

    Args:
        runs_dir: the runs folder the frame was collected from.
        run: a row of the runs frame.
        name: PREDICTIONS, ROBUSTNESS, EXPLAIN or SHIFT.
    """
    path = file_of(runs_dir, run, name)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        log.warning("skipping %s: unreadable (%s)", path, " ".join(str(err).split()))
        return None
    missing = [key for key in required_keys(name, arrays) if key not in arrays]
    if missing:
        log.warning("skipping %s: missing %s", path, ", ".join(missing))
        return None
    return arrays


def required_keys(name: str, arrays: Arrays) -> tuple[str, ...]:
    """The keys `arrays`, read from the file `name`, must have: REQUIRED, plus a ViT's explain arrays and each
    listed shift set's arrays."""
    if name == EXPLAIN and str(arrays.get("arch", "")) == "vit":
        return REQUIRED[name] + VIT_EXPLAIN
    if name == SHIFT:
        sets = arrays["sets"].tolist() if "sets" in arrays else []
        return REQUIRED[name] + tuple(f"{s}_{what}" for s in sets for what in SHIFT_ARRAYS)
    return REQUIRED[name]


class RunArrays:
    """The array files of a set of runs, each read at most once.

    Args:
        runs_dir: the runs folder the frame was collected from.
    """

    def __init__(self, runs_dir: Path | str) -> None:
        self.runs_dir = Path(runs_dir)
        self._read: dict[tuple[str, str], Arrays | None] = {}

    def get(self, run: pd.Series, name: str) -> Arrays | None:
        """`load(runs_dir, run, name)`, cached by run_id."""
        key = (str(run["run_id"]), name)
        if key not in self._read:
            self._read[key] = load(self.runs_dir, run, name)
        return self._read[key]


def bind_runs_dir(makers: dict[str, Callable[..., Made]],
                  runs_dir: Path | str) -> dict[str, Callable[[pd.DataFrame], Made]]:
    """{name: f(runs, runs_dir)} -> {name: f(runs)}, the form `analysis.outputs.write_outputs` takes."""
    return {name: functools.partial(make, runs_dir=Path(runs_dir)) for name, make in makers.items()}
