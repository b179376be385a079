"""Robustness, calibration and dataset shift of each net: three tables, three figures and the finding sentences.

What is compared (per cell: one dataset, pretraining and training fraction;
by default the largest fraction of each dataset and pretraining, stated in
every caption):

- clean test accuracy; mean accuracy over the 15 ImageNet-C corruptions x 5
  severities (on a fixed stratified subset of the test set); the relative
  corruption error, CE_c = Σ_s E_{s,c}(model) / Σ_s E_{s,c}(reference CNN,
  errors averaged over its seeds in the same cell), averaged over the
  corruptions, in % (Hendrycks & Dietterich's AlexNet normaliser exists for
  ImageNet only, so the sweep's own ResNet50 is the reference: it scores 100);
  accuracy with half the image occluded (or the nearest measured share); and
  with the image's grid cells shuffled;
- calibration: ECE (15 equal-width bins, L1, binned as torchmetrics'
  `CalibrationError`) and NLL before and after temperature scaling, the
  temperature fitted on the validation split;
- dataset shift (runs trained on CIFAR-10): accuracy on CIFAR-10's test set
  and on CIFAR-10.1, and on CIFAR-10's and STL-10's test images of their 9
  shared classes (argmax over those 9), with each drop (CIFAR-10 − shifted, in
  points, per run), from the `shift/*` metrics and `shift.npz`.

Every number has its n and a 95% interval (`analysis.estimates`): Student-t
over seeds at n >= 2; at n = 1 the test-sampling interval from the run's
per-image arrays (`robustness.npz`, `predictions.npz`, `shift.npz`), labelled so.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from scipy import special

from analysis import estimates, plots, stats
from analysis.estimates import Estimate, ImageSample
from analysis.figure_kit import RunsDirFigure, cell_title, legend_below, model_colors, panels
from analysis.outputs import (REFERENCE_CNN, NoData, condition_key, condition_label, fraction_label,
                              models_in_order)
from analysis.run_files import PREDICTIONS, ROBUSTNESS, SHIFT, RunArrays, bind_runs_dir
from analysis.tables import Cell, Table

CELL_KEYS = ["dataset", "pretraining", "pretrain_size", "train_fraction"]
CORRUPTION = re.compile(r"^corrupt/(?P<name>[^/]+)/(?P<severity>\d+)/acc1$")
OCCLUSION = re.compile(r"^occlusion/(?P<pct>\d+(?:\.\d+)?)/acc1$")
OCCLUSION_TARGET = 50.0  # percent of the image occluded in the table
ECE_BINS = 15
CLEAN = stats.METRIC
MEAN_CORRUPTION = "corrupt/mean_acc1"
RELATIVE_CE = "corrupt/relative_ce"  # added per run by `with_derived_columns`, in %
SHUFFLE = "shuffle/acc1"
TEMPERATURE = "calib/temperature"
# shifted set -> CIFAR-10's set under the same rule; "shift/<shifted>/drop" (added per run) = acc(ref) − acc(shifted)
SHIFT_PAIRS = {"cifar10.1": "cifar10", "stl10_shared": "cifar10_shared"}


# --------------------------------------------------------------- columns
def corruption_columns(runs: pd.DataFrame) -> dict[str, tuple[str, int]]:
    """`corrupt/<name>/<severity>/acc1` columns -> (name, severity), sorted by column."""
    found = {column: CORRUPTION.match(column) for column in runs.columns}
    return {column: (m["name"], int(m["severity"])) for column, m in sorted(found.items()) if m}


def occlusion_columns(runs: pd.DataFrame) -> dict[str, float]:
    """`occlusion/<pct>/acc1` columns that hold a value -> the percent occluded, by percent."""
    found = {column: OCCLUSION.match(column) for column in runs.columns}
    columns = {column: float(m["pct"]) for column, m in found.items() if m and runs[column].notna().any()}
    return dict(sorted(columns.items(), key=lambda item: item[1]))


def nearest_occlusion(runs: pd.DataFrame, target: float = OCCLUSION_TARGET) -> tuple[str, float] | None:
    """The occlusion column nearest `target` percent (the smaller share on a tie), or None."""
    columns = occlusion_columns(runs)
    if not columns:
        return None
    column = min(columns, key=lambda c: (abs(columns[c] - target), columns[c]))
    return column, columns[column]


def shift_column(name: str, what: str = "acc1") -> str:
    """`shift/<set>/acc1`, or `shift/<shifted set>/drop`, the per-run column `with_derived_columns` adds."""
    return f"shift/{name}/{what}"


def severity_column(severity: int) -> str:
    """The per-run column `with_severity_means` adds: accuracy at one severity, mean over corruptions."""
    return f"corrupt/severity_{severity}/acc1"


def reference_model(cell: pd.DataFrame, reference: str = REFERENCE_CNN) -> str | None:
    """The relative-CE reference of a cell: `reference` if it has runs there, else its first CNN by name."""
    cnns = sorted(set(cell.loc[cell["arch"] == "cnn", "model"]))
    return reference if reference in cnns else (cnns[0] if cnns else None)


def relative_corruption_error(runs: pd.DataFrame, reference: str = REFERENCE_CNN) -> pd.Series:
    """Each completed run's relative corruption error (%), NaN where it cannot be computed.

    CE_c = Σ_s E_{s,c}(run) / Σ_s E_{s,c}(reference), E = 1 − accuracy, the
    reference's errors averaged over its completed runs in the same cell
    (dataset, pretraining, pretraining size, training fraction); the value is
    100 × the mean of CE_c over the corruptions. Severities missing in either
    are left out of both sums.
    """
    columns = corruption_columns(runs)
    out = pd.Series(math.nan, index=runs.index, name=RELATIVE_CE)
    if not columns:
        return out
    names = sorted({name for name, _ in columns.values()})
    of_name = np.array([[name == n for n in names] for name, _ in columns.values()], dtype=float)  # (K, C)
    errors = 1.0 - runs[list(columns)].to_numpy(dtype=float)  # (R, K)
    done = stats.targets(runs)
    done = done[done["status"] == "completed"]
    for _, cell in done.groupby(CELL_KEYS, dropna=False):
        model = reference_model(cell, reference)
        if model is None:
            continue
        rows = runs.index.get_indexer(cell.index)
        ref_rows = runs.index.get_indexer(cell.index[cell["model"] == model])
        with warnings.catch_warnings():  # a severity no reference run measured stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            ref = np.nanmean(errors[ref_rows], axis=0)  # (K,) the reference's errors, mean over its seeds
        both = ~np.isnan(errors[rows]) & ~np.isnan(ref)  # (r, K)
        run_sums = np.where(both, errors[rows], 0.0) @ of_name  # (r, C) Σ_s E_{s,c}(run)
        ref_sums = np.where(both, ref, 0.0) @ of_name  # (r, C) Σ_s E_{s,c}(reference), same severities
        with np.errstate(invalid="ignore", divide="ignore"):
            ratios = np.where(ref_sums > 0, run_sums / ref_sums, np.nan)  # (r, C)
        measured = np.isfinite(ratios).any(axis=1)
        out.iloc[rows[measured]] = 100.0 * np.nanmean(ratios[measured], axis=1)
    return out


def with_derived_columns(runs: pd.DataFrame, reference: str = REFERENCE_CNN) -> pd.DataFrame:
    """`runs` plus the relative corruption error, the per-severity means over corruptions, and
    `corrupt/mean_acc1` where a record lacks it, and each dataset-shift drop (CIFAR-10's accuracy − the shifted
    set's, where a run has both)."""
    columns = corruption_columns(runs)
    added = {RELATIVE_CE: relative_corruption_error(runs, reference)}
    if columns:  # records that list every corruption but not their mean get it computed
        mean = runs[list(columns)].astype(float).mean(axis=1)
        added[MEAN_CORRUPTION] = runs[MEAN_CORRUPTION].astype(float).fillna(mean) if MEAN_CORRUPTION in runs else mean
    for severity in sorted({s for _, s in columns.values()}):
        same = [c for c, (_, s) in columns.items() if s == severity]
        added[severity_column(severity)] = runs[same].astype(float).mean(axis=1)
    for shifted, reference in SHIFT_PAIRS.items():
        both = [shift_column(reference), shift_column(shifted)]
        if all(c in runs for c in both):
            added[shift_column(shifted, "drop")] = runs[both[0]].astype(float) - runs[both[1]].astype(float)
    return pd.concat([runs.drop(columns=[c for c in added if c in runs]), pd.DataFrame(added, index=runs.index)],
                     axis=1)


# --------------------------------------------------------------- calibration from logits
def per_image_calibration(logits: np.ndarray, targets: np.ndarray,
                          temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-1 confidence, correctness and NLL of each image under softmax(logits / temperature).

    Args:
        logits: (N, K) logits (any float dtype; computed in float64).
        targets: (N,) labels.
        temperature: T > 0.

    Returns:
        (N,) confidence, (N,) bool correct, (N,) negative log-likelihood of the target.
    """
    z = np.asarray(logits, dtype=np.float64) / temperature  # (N, K)
    log_probs = z - special.logsumexp(z, axis=1, keepdims=True)  # (N, K)
    top = log_probs.argmax(axis=1)  # (N,)
    rows = np.arange(len(z))
    return np.exp(log_probs[rows, top]), top == np.asarray(targets), -log_probs[rows, np.asarray(targets)]


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-1 ECE (L1) with `n_bins` equal-width bins, binned as torchmetrics' `CalibrationError`.

    Bin b holds confidences in [b / n_bins, (b + 1) / n_bins); a confidence
    of exactly 1 has a bin of its own, as in torchmetrics. ECE = Σ_b |accuracy_b −
    confidence_b| · share_b = |Σ_{i in b} (correct_i − confidence_i)| summed over bins / N.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    slot = np.searchsorted(edges, confidence, side="right") - 1  # (N,) in 0..n_bins
    gap = np.bincount(slot, weights=np.asarray(correct, dtype=float) - confidence, minlength=n_bins + 1)
    return float(np.abs(gap).sum() / len(confidence))


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> pd.DataFrame:
    """A reliability diagram's points: per equal-width bin its edges, mean confidence, accuracy and count.

    The last bin is closed ([1 − 1/n_bins, 1]); empty bins have NaN confidence and accuracy.
    """
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    slot = np.minimum(np.searchsorted(edges, confidence, side="right") - 1, n_bins - 1)  # (N,)
    count = np.bincount(slot, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(slot, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(slot, weights=np.asarray(correct, dtype=float), minlength=n_bins) / count
    return pd.DataFrame({"lower": edges[:-1], "upper": edges[1:], "confidence": mean_confidence,
                         "accuracy": accuracy, "count": count})


# --------------------------------------------------------------- per-image samples (n = 1)
def _subset_images(rob: dict[str, np.ndarray]) -> str:
    return estimates.fingerprint("subset", rob["subset"])


def _test_images(pred: dict[str, np.ndarray]) -> str:
    return estimates.fingerprint("test", pred["test_target"])


@dataclass
class CellRuns:
    """The completed runs of one cell and lazy access to their array files.

    Attributes:
        keys: dataset, pretraining, pretrain_size, train_fraction.
        runs: the cell's completed target runs (with the derived columns).
        files: the runs' array files.
        reference: the relative-CE reference model of the cell, or None.
    """

    keys: dict[str, object]
    runs: pd.DataFrame
    files: RunArrays
    reference: str | None

    def of(self, model: str, column: str) -> pd.DataFrame:
        """The model's runs with a finite `column`, by seed."""
        runs = self.runs[self.runs["model"] == model]
        if column not in runs:
            return runs.iloc[0:0].assign(**{column: pd.Series(dtype=float)})
        return runs[np.isfinite(runs[column].astype(float))].sort_values("seed", kind="mergesort")

    @property
    def title(self) -> str:
        """"fashion_mnist · scratch · 32% (17,280)"."""
        return self.short_title(with_dataset=True)

    def short_title(self, with_dataset: bool) -> str:
        """The title, without the dataset unless `with_dataset`."""
        return cell_title(*self.keys.values(), self.runs["n_train"].astype(float).median(), with_dataset)

    # ---- samples: one run's statistic as a function of the test images drawn
    def clean(self, run: pd.Series) -> ImageSample | None:
        pred = self.files.get(run, PREDICTIONS)
        if pred is None:
            return None
        return estimates.accuracy_sample(_test_images(pred), pred["test_pred"] == pred["test_target"])

    def corruption_mean(self, run: pd.Series, severity: int | None = None) -> ImageSample | None:
        """Accuracy averaged over corruptions (and severities, or one `severity`), per image."""
        rob = self.files.get(run, ROBUSTNESS)
        if rob is None:
            return None
        correct = rob["corrupt_correct"] if severity is None else rob["corrupt_correct"][:, severity - 1:severity]
        per_image = correct.mean(axis=(0, 1))  # (n,)
        return ImageSample(_subset_images(rob), per_image.size, lambda idx: float(per_image[idx].mean()))

    def relative_ce(self, run: pd.Series) -> ImageSample | None:
        """The relative corruption error on resampled subset images (the reference's seeds averaged per image)."""
        rob = self.files.get(run, ROBUSTNESS)
        refs = [self.files.get(r, ROBUSTNESS) for _, r in self.of(self.reference or "", RELATIVE_CE).iterrows()]
        if rob is None or not refs or any(r is None for r in refs):
            return None
        if any(not (np.array_equal(r["subset"], rob["subset"]) and np.array_equal(r["corruptions"], rob["corruptions"]))
               for r in refs):
            return None
        errors = (~rob["corrupt_correct"]).sum(axis=1).astype(float)  # (C, n): errors summed over severities
        ref_errors = np.mean([(~r["corrupt_correct"]).sum(axis=1) for r in refs], axis=0)  # (C, n)

        def statistic(idx: np.ndarray) -> float:
            ref = ref_errors[:, idx].sum(axis=1)  # (C,)
            usable = ref > 0
            if not usable.any():
                return math.nan
            return 100.0 * float(np.mean(errors[usable][:, idx].sum(axis=1) / ref[usable]))

        return ImageSample(_subset_images(rob), rob["subset"].size, statistic)

    def occlusion(self, run: pd.Series, pct: float) -> ImageSample | None:
        rob = self.files.get(run, ROBUSTNESS)
        if rob is None:
            return None
        at = np.flatnonzero(np.isclose(100.0 * rob["occlusion_fractions"], pct))
        return None if at.size == 0 else estimates.accuracy_sample(_subset_images(rob), rob["occlusion_correct"][at[0]])

    def shuffle(self, run: pd.Series) -> ImageSample | None:
        rob = self.files.get(run, ROBUSTNESS)
        return None if rob is None else estimates.accuracy_sample(_subset_images(rob), rob["shuffle_correct"])

    def shift(self, run: pd.Series, sets: tuple[str, ...]) -> ImageSample | None:
        """Accuracy on one shift set, or for (reference, shifted) the drop acc(reference) − acc(shifted), per image.

        A drop's two sets are different images: its sample pools them, and a resample's statistic is the
        difference of the means of the images it drew from each (a bootstrap over the pooled images).
        """
        arrays = self.files.get(run, SHIFT)
        if arrays is None or any(f"{s}_correct" not in arrays for s in sets):
            return None
        images = estimates.fingerprint("shift:" + "+".join(sets), np.concatenate(
            [np.stack([arrays[f"{s}_index"], arrays[f"{s}_target"]]) for s in sets], axis=1))
        if len(sets) == 1:
            return estimates.accuracy_sample(images, arrays[f"{sets[0]}_correct"])
        first, second = (np.asarray(arrays[f"{s}_correct"], dtype=float) for s in sets)
        pooled = np.concatenate([first, second])  # (n1 + n2,)
        in_first = np.arange(pooled.size) < first.size

        def statistic(idx: np.ndarray) -> float:
            a, b = idx[in_first[idx]], idx[~in_first[idx]]
            return float(pooled[a].mean() - pooled[b].mean()) if a.size and b.size else math.nan

        return ImageSample(images, pooled.size, statistic)

    def calibration(self, run: pd.Series, kind: str, scaled: bool) -> ImageSample | None:
        """ECE (`kind` "ece") or NLL ("nll") of the test logits, before or after temperature scaling."""
        pred = self.files.get(run, PREDICTIONS)
        temperature = float(run.get(TEMPERATURE, math.nan)) if scaled else 1.0
        if pred is None or not math.isfinite(temperature):
            return None
        confidence, correct, nll = per_image_calibration(pred["test_logits"], pred["test_target"], temperature)
        if kind == "nll":
            return ImageSample(_test_images(pred), nll.size, lambda idx: float(nll[idx].mean()))
        return ImageSample(_test_images(pred), nll.size,
                           lambda idx: expected_calibration_error(confidence[idx], correct[idx]))


def chosen_cells(runs: pd.DataFrame, runs_dir: Path | str, columns: list[str], fraction: float | None = None,
                 reference: str = REFERENCE_CNN) -> list[CellRuns]:
    """Per dataset and pretraining, the cell at `fraction` (default: the largest with any of `columns`).

    Returns:
        The cells in dataset, then condition order (scratch first); empty when no run has any of `columns`.
    """
    runs = with_derived_columns(runs, reference)
    done = stats.targets(runs)
    done = done[done["status"] == "completed"]
    present = [c for c in columns if c in done]
    if not present:
        return []
    measured = done[done[present].astype(float).notna().any(axis=1)]
    files = RunArrays(runs_dir)
    cells = []
    groups = measured.groupby(["dataset", "pretraining", "pretrain_size"], dropna=False, sort=False)
    for (dataset, pre, size), group in sorted(groups, key=lambda g: (g[0][0], condition_key(*g[0][1:]))):
        chosen = group["train_fraction"].max() if fraction is None else fraction
        keys = dict(dataset=dataset, pretraining=pre, pretrain_size=size, train_fraction=chosen)
        cell = stats.select(done, **keys)
        if len(stats.select(group, train_fraction=chosen)):
            cells.append(CellRuns(keys, cell, files, reference_model(cell, reference)))
    return cells


# --------------------------------------------------------------- measures
@dataclass(frozen=True)
class Measure:
    """One compared quantity.

    Attributes:
        title: column header.
        column: the per-run column (after `with_derived_columns`).
        scale, digits: display (100 for fractions shown in %).
        higher_is_better: direction of "better"; None for no direction.
        claim: what "better" means, for findings ("more accurate under corruption").
        unit: of a difference, for findings.
        sample: (cell, run) -> the run's `ImageSample` for its n = 1 interval.
        difference: a per-run difference (a drop): bold in a table when its Student-t interval excludes 0.
    """

    title: str
    column: str
    scale: float
    digits: int
    higher_is_better: bool | None
    claim: str
    unit: str
    sample: Callable[[CellRuns, pd.Series], ImageSample | None]
    difference: bool = False


def robustness_measures(runs: pd.DataFrame) -> list[Measure]:
    """Clean, mean corruption accuracy, relative CE, occlusion near 50 % and patch shuffle (those with data)."""
    measures = [Measure("Clean acc. (%)", CLEAN, 100.0, 1, True, "more accurate on clean test images", "points",
                        CellRuns.clean)]
    if corruption_columns(runs):
        measures += [
            Measure("Mean corruption acc. (%)", MEAN_CORRUPTION, 100.0, 1, True,
                    "more accurate under corruption (mean of every corruption and severity)", "points",
                    CellRuns.corruption_mean),
            Measure("Relative corruption error (%)", RELATIVE_CE, 1.0, 1, False,
                    "lower in relative corruption error", "points", CellRuns.relative_ce),
        ]
    occlusion = nearest_occlusion(runs)
    if occlusion is not None:
        column, pct = occlusion
        measures.append(Measure(f"{pct:g} % occluded acc. (%)", column, 100.0, 1, True,
                                f"more accurate with {pct:g} % of the image occluded", "points",
                                lambda cell, run, pct=pct: cell.occlusion(run, pct)))
    if SHUFFLE in runs and runs[SHUFFLE].notna().any():
        measures.append(Measure("Patch-shuffle acc. (%)", SHUFFLE, 100.0, 1, True,
                                "more accurate on patch-shuffled images", "points", CellRuns.shuffle))
    return measures


CALIBRATION_MEASURES = [
    Measure("ECE (%)", "test/ece", 100.0, 2, False, "better calibrated before temperature scaling (lower ECE)",
            "points", lambda cell, run: cell.calibration(run, "ece", scaled=False)),
    Measure("ECE after TS (%)", "test/ece_ts", 100.0, 2, False,
            "better calibrated after temperature scaling (lower ECE)", "points",
            lambda cell, run: cell.calibration(run, "ece", scaled=True)),
    Measure("NLL", "test/nll", 1.0, 3, False, "lower in test NLL before temperature scaling", "nats",
            lambda cell, run: cell.calibration(run, "nll", scaled=False)),
    Measure("NLL after TS", "test/nll_ts", 1.0, 3, False, "lower in test NLL after temperature scaling", "nats",
            lambda cell, run: cell.calibration(run, "nll", scaled=True)),
    Measure("Temperature T", TEMPERATURE, 1.0, 2, None, "", "", lambda cell, run: None),
]


def _shift_accuracy(title: str, name: str, claim: str) -> Measure:
    return Measure(title, shift_column(name), 100.0, 1, True, claim, "points",
                   lambda cell, run: cell.shift(run, (name,)))


def _shift_drop(title: str, shifted: str, claim: str) -> Measure:
    sets = (SHIFT_PAIRS[shifted], shifted)
    return Measure(title, shift_column(shifted, "drop"), 100.0, 1, False, claim, "points",
                   lambda cell, run: cell.shift(run, sets), difference=True)


SHIFT_MEASURES = [
    _shift_accuracy("CIFAR-10 test (%)", "cifar10", "more accurate on CIFAR-10's test set"),
    _shift_accuracy("CIFAR-10.1 (%)", "cifar10.1", "more accurate on CIFAR-10.1"),
    _shift_drop("Drop to CIFAR-10.1 (points)", "cifar10.1",
                "less hurt by the shift from CIFAR-10 to CIFAR-10.1 (a smaller drop)"),
    _shift_accuracy("CIFAR-10, 9 shared classes (%)", "cifar10_shared",
                    "more accurate on CIFAR-10's test images of the classes it shares with STL-10"),
    _shift_accuracy("STL-10, 9 shared classes (%)", "stl10_shared", "more accurate on STL-10's shared classes"),
    _shift_drop("Drop to STL-10 (points)", "stl10_shared",
                "less hurt by the shift from CIFAR-10 to STL-10 (a smaller drop on the shared classes)"),
]


def shift_measures(runs: pd.DataFrame) -> list[Measure]:
    """The dataset-shift measures that some run has (after `with_derived_columns`)."""
    return [m for m in SHIFT_MEASURES if m.column in runs and runs[m.column].notna().any()]


def cell_estimate(cell: CellRuns, model: str, measure: Measure) -> Estimate:
    """The model's `measure` in the cell: Student-t over seeds, or test sampling at n = 1."""
    found = cell.of(model, measure.column)
    return estimates.cell_estimate(found[measure.column].astype(float).tolist(),
                                   lambda: measure.sample(cell, found.iloc[0]))


def paired_difference(cell: CellRuns, first: str, second: str, measure: Measure) -> Estimate:
    """first − second paired by seed: Student-t over pairs, or a paired bootstrap over images at one pair."""
    a = cell.of(first, measure.column).set_index("seed")
    b = cell.of(second, measure.column).set_index("seed")
    seeds = sorted(set(a.index) & set(b.index))
    differences = [float(a.at[s, measure.column]) - float(b.at[s, measure.column]) for s in seeds]

    def single() -> tuple[ImageSample, ImageSample] | None:
        pair = measure.sample(cell, a.loc[seeds[0]]), measure.sample(cell, b.loc[seeds[0]])
        return None if None in pair else pair

    return estimates.paired_estimate(differences, single)


# --------------------------------------------------------------- tables
def _cells_text(measures: list[Measure], cells: list[CellRuns]) -> tuple[list[list[Cell]], bool, bool]:
    """Rows of (dataset,) pretraining, fraction, model, n, then one cell per measure; whether there are
    several datasets; whether any cell has a test-sampling interval."""
    multi = len({c.keys["dataset"] for c in cells}) > 1
    rows, marked = [], False
    for cell in cells:
        fraction = fraction_label(cell.keys["train_fraction"], cell.runs["n_train"].astype(float).median())
        for model, _ in models_in_order(cell.runs):
            n = len(cell.of(model, CLEAN))
            row = [Cell(str(cell.keys["dataset"]))] * multi + [
                Cell(condition_label(cell.keys["pretraining"], cell.keys["pretrain_size"])), Cell(fraction),
                Cell(model), Cell(str(n))]
            for measure in measures:
                found = cell_estimate(cell, model, measure)
                text = found.text(measure.scale, measure.digits)
                if found.n not in (0, n) and found.has_interval:
                    text += f" (n={found.n})"
                marked |= found.test_sampling
                row.append(Cell(text, bold=measure.difference and found.method == "t" and found.excludes_zero))
            rows.append(row)
    return rows, multi, marked


def _choice_text(fraction: float | None) -> str:
    if fraction is None:
        return "at the largest training fraction of each dataset and pretraining that has these metrics"
    return f"at training fraction {100 * fraction:g}%"


def _grid_text(runs: pd.DataFrame) -> str:
    """"15 corruptions × 5 severities": what the sweep's corruption columns cover."""
    columns = corruption_columns(runs).values()
    return (f"{len({name for name, _ in columns})} corruptions × {len({s for _, s in columns})} severities "
            "(ImageNet-C's)")


def _subset_note(cells: list[CellRuns]) -> list[str]:
    """The size(s) of the robustness subset, read from the runs' robustness.npz."""
    sizes = sorted({int(arrays["subset"].size) for cell in cells for _, run in cell.runs.iterrows()
                    if (arrays := cell.files.get(run, ROBUSTNESS)) is not None})
    if not sizes:
        return []
    return [f"Corruption, occlusion and patch-shuffle accuracy are measured on a fixed stratified subset of "
            f"{' / '.join(f'{s:,}' for s in sizes)} test images, the same images for every net."]


def robustness_table(runs: pd.DataFrame, runs_dir: Path | str, fraction: float | None = None,
                     reference: str = REFERENCE_CNN) -> Table:
    """Table R1: clean, mean corruption, relative CE, occlusion near 50 % and patch-shuffle accuracy per model.

    Args:
        runs: the runs frame of `analysis.collect`.
        runs_dir: the folder it was collected from (for the runs' array files).
        fraction: the training fraction to show; None: the largest of each dataset and pretraining.
        reference: the relative-CE reference CNN (the cell's first CNN by name when it has no such runs).

    Raises:
        NoData: no run has corruption, occlusion or patch-shuffle metrics.
    """
    measures = robustness_measures(runs)
    robust = [m for m in measures if m.column != CLEAN]
    cells = chosen_cells(runs, runs_dir, [m.column for m in robust], fraction, reference)
    if not robust or not cells:
        raise NoData("no completed run has corrupt/*, occlusion/* or shuffle/acc1 metrics")
    rows, multi, marked = _cells_text(measures, cells)
    header = ["Dataset"] * multi + ["Pretraining", "Train fraction (images)", "Model", "n"]
    header += [m.title for m in measures]
    refs = sorted({c.reference for c in cells if c.reference})
    occlusion = nearest_occlusion(runs)
    caption = (f"Robustness {_choice_text(fraction)}. Cells: mean [95% interval], Student-t over seeds when n ≥ 2. "
               f"Clean: accuracy on the whole test set. Mean corruption accuracy averages {_grid_text(runs)}. "
               f"Relative corruption error: CE_c = Σ_s E_s,c(model) / Σ_s E_s,c({' / '.join(refs) or 'no CNN'}, "
               "errors averaged over its seeds, same cell), averaged over corruptions, in % (the reference scores "
               "100; lower is better; the AlexNet normaliser of ImageNet-C does not exist for other datasets).")
    if occlusion is not None:
        pct = occlusion[1]
        nearest = "" if pct == OCCLUSION_TARGET else f" ({pct:g} %: the measured share nearest {OCCLUSION_TARGET:g} %)"
        caption += (f" Occluded: {pct:g} % of the cells of a fixed pixel grid blanked{nearest}, the same masks for "
                    "both nets.")
    if any(m.column == SHUFFLE for m in measures):
        caption += " Patch shuffle: the image's grid cells permuted, the same permutation for every net."
    notes = _subset_note(cells)
    notes += [estimates.TEST_SAMPLING_NOTE] * marked
    return Table("table_r1_robustness", "Table R1. Robustness", caption, header, rows, n_keys=3 + multi, notes=notes)


def calibration_table(runs: pd.DataFrame, runs_dir: Path | str, fraction: float | None = None) -> Table:
    """Table R2: ECE and NLL before and after temperature scaling, and the fitted temperature, per model.

    Raises:
        NoData: no run has test/ece or test/ece_ts.
    """
    cells = chosen_cells(runs, runs_dir, ["test/ece", "test/ece_ts"], fraction)
    if not cells:
        raise NoData("no completed run has calibration metrics (test/ece, test/ece_ts)")
    rows, multi, marked = _cells_text(CALIBRATION_MEASURES, cells)
    header = ["Dataset"] * multi + ["Pretraining", "Train fraction (images)", "Model", "n"]
    header += [m.title for m in CALIBRATION_MEASURES]
    caption = (f"Calibration on the test set {_choice_text(fraction)}. Cells: mean [95% interval], Student-t over "
               f"seeds when n ≥ 2. ECE: top-1, {ECE_BINS} equal-width bins, L1 (torchmetrics' binning); NLL in nats. "
               "TS: temperature scaling, T fitted on the validation split's NLL (no test-sampling interval: T is "
               "not a test statistic). Lower is better for ECE and NLL; T > 1 means the raw net was overconfident.")
    notes = [estimates.TEST_SAMPLING_NOTE] * marked
    return Table("table_r2_calibration", "Table R2. Calibration", caption, header, rows, n_keys=3 + multi, notes=notes)


def _shift_images_note(runs: pd.DataFrame, measures: list[Measure]) -> str:
    """"Test images: CIFAR-10.1 2,000; ...": the images each evaluated set has, as the runs recorded them."""
    parts = []
    for measure in measures:
        column = measure.column.replace("/acc1", "/n")
        if measure.difference or column not in runs:
            continue
        sizes = sorted({int(n) for n in runs[column].dropna()})
        parts.append(f"{measure.title.replace(' (%)', '')} {' / '.join(f'{n:,}' for n in sizes)}")
    return f"Test images per set: {'; '.join(parts)}." if parts else ""


def shift_table(runs: pd.DataFrame, runs_dir: Path | str, fraction: float | None = None) -> Table:
    """Table R3: dataset shift of runs trained on CIFAR-10: CIFAR-10 test, CIFAR-10.1 and the drop; CIFAR-10 and
    STL-10 on their 9 shared classes and the drop; per model, mean over seeds.

    Raises:
        NoData: no run has shift/* metrics.
    """
    measures = shift_measures(with_derived_columns(runs))
    cells = chosen_cells(runs, runs_dir, [m.column for m in measures], fraction)
    if not measures or not cells:
        raise NoData("no completed run has dataset-shift metrics (shift/*: runs on cifar10 evaluated with "
                     "CIFAR-10.1 or STL-10 present)")
    rows, multi, marked = _cells_text(measures, cells)
    header = ["Dataset"] * multi + ["Pretraining", "Train fraction (images)", "Model", "n"]
    header += [m.title for m in measures]
    caption = (f"Dataset shift {_choice_text(fraction)}, of nets trained on CIFAR-10. Cells: mean [95% interval], "
               "Student-t over seeds when n ≥ 2 (n: seeds). CIFAR-10 test and CIFAR-10.1 (v6, Recht et al. 2018): "
               "argmax over the 10 classes. 9 shared classes: CIFAR-10's and STL-10's test images of the classes "
               "both have (STL's car is CIFAR's automobile; STL's monkey images left out), predicted by the argmax "
               "over those 9 classes (the frog logit masked on both), at the run's input size and normalisation. "
               "Drop: CIFAR-10 − the shifted set, per run, in points; bold when its Student-t interval over seeds "
               "excludes 0.")
    notes = [note for note in [_shift_images_note(runs, measures)] if note]
    notes += [estimates.TEST_SAMPLING_NOTE + " A drop's interval bootstraps the images of both sets pooled."] * marked
    return Table("table_r3_shift", "Table R3. Dataset shift", caption, header, rows, n_keys=3 + multi, notes=notes)


TABLES: dict[str, Callable[..., Table]] = {
    "table_r1_robustness": robustness_table,
    "table_r2_calibration": calibration_table,
    "table_r3_shift": shift_table,
}


def table_makers(runs_dir: Path | str) -> dict[str, Callable[[pd.DataFrame], Table]]:
    """{name: f(runs)} for `analysis.outputs.write_outputs`."""
    return bind_runs_dir(TABLES, runs_dir)


# --------------------------------------------------------------- figures
def _curve(ax: Axes, xs: list[float], found: list[Estimate], color: tuple, label: str) -> None:
    """Means as a line with markers and the intervals as a band (where there are some)."""
    keep = [i for i, e in enumerate(found) if e.n > 0]
    x = np.asarray(xs, dtype=float)[keep]
    mean = np.array([found[i].mean for i in keep]) * 100
    ax.plot(x, mean, color=color, marker="o", label=label)
    low = np.array([found[i].low for i in keep]) * 100
    high = np.array([found[i].high for i in keep]) * 100
    band = np.isfinite(low)
    if band.any():
        ax.fill_between(x, low, high, where=band, color=color, alpha=0.18, linewidth=0)


def _seeds_text(counts: list[int], sampled: bool) -> str:
    """"n = 3 seeds per model" / "n = 1–3 seeds" plus what the bands are."""
    lo, hi = min(counts), max(counts)
    text = f"n = {lo} seed{'s' if hi > 1 else ''}" if lo == hi else f"n = {lo}–{hi} seeds"
    return text + (" (n = 1 bands: test sampling only)" if sampled else "")


def _curves_figure(runs: pd.DataFrame, runs_dir: Path | str, points: list[tuple[float, Measure]],
                   xlabel: str, xticks: list[float]) -> Figure:
    """One panel per chosen cell; one line per model through `points` (x, measure)."""
    cells = chosen_cells(runs, runs_dir, [m.column for _, m in points if m.column != CLEAN])
    if not cells:
        raise NoData(f"no completed run has {xlabel} metrics")
    colors = model_colors(runs)
    with mpl.rc_context(plots.STYLE):
        fig, axes = panels(1, len(cells))
        for ax, cell in zip(axes[0], cells):
            counts, sampled = [], False
            for model, _ in models_in_order(cell.runs):
                found = [cell_estimate(cell, model, m) for _, m in points]
                if not any(e.n for e in found):
                    continue
                counts.append(max(e.n for e in found))
                sampled |= any(e.test_sampling for e in found)
                _curve(ax, [x for x, _ in points], found, colors[model], model)
            ax.text(0.02, 0.02, _seeds_text(counts, sampled), transform=ax.transAxes, fontsize=6)
            ax.set(xlabel=xlabel, ylabel=plots.ACC_LABEL, title=cell.title, xticks=xticks)
        return legend_below(fig)


def plot_corruption_severity(runs: pd.DataFrame, runs_dir: Path | str) -> Figure:
    """Accuracy (%) vs corruption severity (mean over corruptions; 0 = clean), one line per model."""
    severities = sorted({s for _, s in corruption_columns(runs).values()})
    if not severities:
        raise NoData("no run has corrupt/<name>/<severity>/acc1 metrics")
    clean = next(m for m in robustness_measures(runs) if m.column == CLEAN)
    points = [(0.0, clean)] + [
        (float(s), Measure(f"severity {s}", severity_column(s), 100.0, 1, True, "", "points",
                           lambda cell, run, s=s: cell.corruption_mean(run, s)))
        for s in severities]
    return _curves_figure(runs, runs_dir, points, "corruption severity (0 = clean)", [x for x, _ in points])


def plot_occlusion(runs: pd.DataFrame, runs_dir: Path | str) -> Figure:
    """Accuracy (%) vs share of the image occluded (%), one line per model."""
    columns = occlusion_columns(runs)
    if not columns:
        raise NoData("no run has occlusion/<pct>/acc1 metrics")
    points = [(pct, Measure(f"{pct:g} %", column, 100.0, 1, True, "", "points",
                            lambda cell, run, pct=pct: cell.occlusion(run, pct)))
              for column, pct in columns.items()]
    return _curves_figure(runs, runs_dir, points, "share of the image occluded (%)", [x for x, _ in points])


@dataclass(frozen=True)
class Reliability:
    """A reliability diagram of pooled test predictions.

    Attributes:
        bins: `reliability_bins` of the pooled predictions.
        ece: their ECE (`expected_calibration_error`).
        n_runs: runs pooled.
    """

    bins: pd.DataFrame
    ece: float
    n_runs: int


def reliability(predictions: list[tuple[np.ndarray, np.ndarray, float]], n_bins: int = ECE_BINS) -> Reliability:
    """The reliability diagram of several runs' test predictions pooled, each at its own temperature.

    Args:
        predictions: (logits (N, K), targets (N,), temperature) per run.
        n_bins: equal-width confidence bins.
    """
    parts = [per_image_calibration(logits, targets, t)[:2] for logits, targets, t in predictions]
    confidence = np.concatenate([p[0] for p in parts])
    correct = np.concatenate([p[1] for p in parts])
    return Reliability(reliability_bins(confidence, correct, n_bins),
                       expected_calibration_error(confidence, correct, n_bins), len(parts))


def _reliability_line(ax: Axes, diagram: Reliability, label: str, **style: object) -> None:
    used = diagram.bins[diagram.bins["count"] > 0]
    ax.plot(used["confidence"] * 100, used["accuracy"] * 100, label=f"{label}: ECE {100 * diagram.ece:.2f} %",
            **style)


def plot_reliability(runs: pd.DataFrame, runs_dir: Path | str) -> Figure:
    """Reliability diagrams: one panel per model (columns) and cell (rows), before and after temperature scaling."""
    cells = chosen_cells(runs, runs_dir, ["test/ece", "test/ece_ts"])
    if not cells:
        raise NoData("no completed run has calibration metrics (test/ece, test/ece_ts)")
    drawn = []
    for cell in cells:
        for model, _ in models_in_order(cell.runs):
            found = [(run, cell.files.get(run, PREDICTIONS)) for _, run in cell.of(model, CLEAN).iterrows()]
            found = [(run, pred) for run, pred in found if pred is not None]
            if found:
                drawn.append((cell, model, found))
    if not drawn:
        raise NoData(f"no completed run has {PREDICTIONS}")
    multi = len({cell.keys["dataset"] for cell, _, _ in drawn}) > 1
    rows = list(dict.fromkeys(id(cell) for cell, _, _ in drawn))
    columns = list(dict.fromkeys(model for _, model, _ in drawn))
    colors = model_colors(runs)
    with mpl.rc_context(plots.STYLE):
        fig, axes = panels(len(rows), len(columns), width=plots.COLUMN_WIDTH * 0.75, height=plots.COLUMN_WIDTH * 0.75)
        for ax in axes.flat:
            ax.set_visible(False)
        for cell, model, found in drawn:
            ax = axes[rows.index(id(cell)), columns.index(model)]
            ax.set_visible(True)
            ax.plot([0, 100], [0, 100], color="0.6", linewidth=0.8, linestyle=":")
            before = reliability([(p["test_logits"], p["test_target"], 1.0) for _, p in found])
            _reliability_line(ax, before, "before TS", color="0.45", linestyle="--", marker="o",
                              markerfacecolor="none")
            scaled = [(p["test_logits"], p["test_target"], float(run[TEMPERATURE])) for run, p in found
                      if math.isfinite(float(run.get(TEMPERATURE, math.nan)))]
            if scaled:
                temperature = np.mean([t for _, _, t in scaled])
                _reliability_line(ax, reliability(scaled), f"after TS (T = {temperature:.2f})", color=colors[model],
                                  marker="s")
            ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.2), fontsize=6)
            ax.set(xlim=(0, 100), ylim=(0, 100), xlabel="confidence (%)", ylabel="accuracy (%)",
                   title=f"{model} (n = {len(found)})\n{cell.short_title(multi)}")
            ax.set_aspect("equal")
        return fig


FIGURES: dict[str, RunsDirFigure] = {
    "fig_r1_corruption_severity": RunsDirFigure(
        "Figure R1. Accuracy vs corruption severity",
        "Accuracy averaged over the 15 corruptions at each severity (on the fixed robustness subset); 0 = clean "
        "accuracy on the whole test set. One line per model, at the largest training fraction of each dataset and "
        "pretraining. Bands: 95% Student-t interval over seeds; at n = 1 test sampling only (bootstrap over the "
        "subset images; Clopper-Pearson for the clean point).",
        plot_corruption_severity),
    "fig_r2_occlusion": RunsDirFigure(
        "Figure R2. Accuracy vs share of the image occluded",
        "Accuracy as a growing share of a fixed pixel grid's cells is blanked (the same masks for both nets; "
        "Naseer et al. 2021 report ViTs keep far more accuracy than CNNs). Bands: 95% Student-t interval over "
        "seeds; at n = 1 the Clopper-Pearson interval over the subset images (test sampling only).",
        plot_occlusion),
    "fig_r3_reliability": RunsDirFigure(
        "Figure R3. Reliability diagrams before and after temperature scaling",
        f"Accuracy against mean confidence in {ECE_BINS} equal-width confidence bins (empty bins left out), from "
        "the test logits of the selected checkpoints, the seeds' predictions pooled, each seed at its own "
        "temperature (fitted on the validation split). The dotted diagonal is perfect calibration; ECE of the "
        "pooled predictions in the legend (torchmetrics' binning).",
        plot_reliability),
}


def figure_makers(runs_dir: Path | str) -> dict[str, Callable[[pd.DataFrame], Figure]]:
    """{name: f(runs)} for `analysis.outputs.write_outputs` with `plots.save_figure`."""
    return bind_runs_dir({name: figure.draw for name, figure in FIGURES.items()}, runs_dir)


# --------------------------------------------------------------- findings
def _verdict(found: Estimate, first: str, second: str, measure: Measure) -> str:
    """Who is better, only when the interval excludes 0; otherwise why no direction is claimed."""
    if not found.has_interval:
        return "no interval, so no direction is claimed"
    if not found.excludes_zero:
        return "the interval includes 0, so no difference is established"
    first_better = (found.mean > 0) == bool(measure.higher_is_better)
    better, worse = (first, second) if first_better else (second, first)
    caveat = " (test sampling only: another seed may differ)" if found.test_sampling else ""
    return f"{better} is {measure.claim} than {worse}{caveat}"


def _pairs(cell: CellRuns) -> Iterator[tuple[str, str]]:
    models = models_in_order(cell.runs)
    yield from ((v, c) for v, va in models for c, ca in models if va == "vit" and ca == "cnn")


def robustness_findings(runs: pd.DataFrame, runs_dir: Path | str) -> list[str]:
    """Sentences: per chosen cell and (ViT, CNN) pair, the paired difference of each robustness measure, of ECE
    before and after temperature scaling and of each dataset-shift measure, with its n and interval, and a
    direction only when the interval excludes 0."""
    measures = [m for m in robustness_measures(runs) if m.column != CLEAN]
    measures += [m for m in CALIBRATION_MEASURES if m.column in ("test/ece", "test/ece_ts") and m.column in runs]
    measures += shift_measures(with_derived_columns(runs))
    cells = chosen_cells(runs, runs_dir, [m.column for m in measures])
    sentences = []
    for cell in cells:
        for vit, cnn in _pairs(cell):
            for measure in measures:
                found = paired_difference(cell, vit, cnn, measure)
                if found.n == 0:
                    continue
                label = re.sub(r" \((%|points)\)$", "", measure.title)
                sentences.append(f"{cell.title}: {label}, {vit} − {cnn} = "
                                 f"{found.sentence(measure.scale, measure.digits, measure.unit)}; "
                                 f"{_verdict(found, vit, cnn, measure)}.")
    return sentences
