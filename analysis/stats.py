"""Statistics: cell means and paired differences with honest intervals, power-law fits, crossovers.

Conventions:
- Only target runs (`role` "train") with status "completed" and a finite
  metric enter the statistics; failed and diverged runs are counted per cell
  (`n_failed`, `n_diverged`).
- Every interval is a 95% interval with its nominal coverage at the n it is
  computed from; the column `interval` of a statistics row says which kind it is:
  - "t": n >= 2 seeds. The Student-t interval of the mean over seeds,
    mean ± t(n−1) · s / √n; a difference is the mean of differences paired by
    seed. (A percentile bootstrap over 2–5 seeds covers far less than 95%.)
  - "test": n = 1 seed, where the only uncertainty left to measure is test
    sampling (`TEST_SAMPLING`): the Wilson interval of an accuracy over the
    `n_test` images; for a paired difference, a paired bootstrap over the test
    images plus an exact McNemar test (`p_value`), from both runs' predictions.
  - "none": no interval; `interval_note` says why (e.g. no predictions file).
  An accuracy's interval is cut to [0, 1], where the accuracy lies.
- A cell is flagged (`flagged`) when any of its runs was still improving when
  its budget ended (`improving_at_end`); a difference is flagged when either of
  its cells is. Flagged cells stay in the tables, marked, and out of every fit
  and crossover.
- Power laws err(n) = a·n^(−b) + c, or a·n^(−b), are fitted only where
  identified (`fit_curve`); a crossover is searched only between the smallest
  and the largest size both fits cover: no extrapolation.
- Accuracies stay fractions here; tables and plots show percent.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import optimize
from scipy import stats as sps

METRIC = "test/acc1"
CONFIDENCE = 0.95
N_RESAMPLES = 10_000  # paired bootstrap over test images
SEED = 0  # of the test-image bootstrap: reports are reproducible
# A cell: one model under one condition at one training-set size.
CONDITION = ["dataset", "pretraining", "pretrain_size"]
CELL = [*CONDITION, "train_fraction", "model", "arch"]
# ViT and CNN runs are paired when these agree.
PAIR = [*CONDITION, "train_fraction", "seed"]
STAT_COLUMNS = ["n_images", "mean", "std", "n", "ci_low", "ci_high", "interval", "p_value", "interval_note",
                "n_improving", "flagged"]
TEST_SAMPLING = "test-sampling uncertainty only (n=1 seed)"
# Metrics that are a proportion of test images -> the column with the number of images.
PROPORTIONS = {METRIC: "n_test"}


# --------------------------------------------------------------- selection
def targets(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs being compared: all but upstream pretraining runs."""
    return runs[runs["role"] != "pretrain"]


def usable(runs: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Completed target runs with a finite `metric`."""
    runs = targets(runs)
    if metric not in runs:
        return runs.iloc[0:0].assign(**{metric: pd.Series(dtype=float)})
    values = runs[metric].astype(float)
    return runs[(runs["status"] == "completed") & np.isfinite(values)]


def select(frame: pd.DataFrame, **keys: object) -> pd.DataFrame:
    """Rows of `frame` whose columns equal `keys` (a NaN key matches NaN)."""
    mask = pd.Series(True, index=frame.index)
    for col, value in keys.items():
        mask &= frame[col].isna() if pd.isna(value) else frame[col] == value
    return frame[mask]


def improving(runs: pd.DataFrame) -> pd.Series:
    """Per run: still improving when its budget ended (False where not recorded, e.g. schema v1)."""
    if "improving_at_end" not in runs:
        return pd.Series(False, index=runs.index)
    return runs["improving_at_end"].astype("boolean").fillna(False).astype(bool)


def cell_flags(runs: pd.DataFrame, metric: str = METRIC, by: list[str] = CELL) -> pd.DataFrame:
    """Per cell (`by`): how many usable runs were still improving at the end (`n_improving`)."""
    ok = usable(runs, metric)
    counts = ok.assign(n_improving=improving(ok).astype(int)).groupby(by, dropna=False, sort=True)["n_improving"]
    return counts.sum().reset_index()


def unflagged(runs: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Usable runs of the cells none of whose runs was still improving at the end: what fits may use."""
    ok = usable(runs, metric)
    flags = cell_flags(runs, metric)
    flagged = flags.loc[flags["n_improving"] > 0, CELL]
    if flagged.empty:
        return ok
    hit = ok[CELL].merge(flagged.assign(hit=True), on=CELL, how="left")["hit"].fillna(False).to_numpy(dtype=bool)
    return ok[~hit]


# --------------------------------------------------------------- intervals
def t_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student-t interval of the mean: mean ± t(n−1) · s / √n; (nan, nan) when n < 2.

    Exact for normal data at every n >= 2 (covers `confidence` of the time).
    """
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return math.nan, math.nan
    half = sps.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)


def wilson_interval(correct: int, total: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a proportion `correct / total` (test-sampling uncertainty of an accuracy)."""
    ci = sps.binomtest(int(correct), int(total)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (a binomial test with p = 1/2)."""
    discordant = only_first + only_second
    if discordant == 0:
        return 1.0
    return float(sps.binomtest(min(only_first, only_second), discordant, 0.5).pvalue)


@dataclass(frozen=True)
class PairedTest:
    """Two runs compared image by image on one test set.

    Attributes:
        n_images: test images.
        only_first: images the first run classifies correctly and the second does not.
        only_second: the reverse.
        diff: accuracy of the first − accuracy of the second.
        ci_low, ci_high: percentile interval of `diff` from the paired bootstrap over test images.
        p_value: exact McNemar test of equal accuracy.
    """

    n_images: int
    only_first: int
    only_second: int
    diff: float
    ci_low: float
    ci_high: float
    p_value: float


def paired_test(first_correct: np.ndarray, second_correct: np.ndarray, confidence: float = CONFIDENCE,
                n_resamples: int = N_RESAMPLES, seed: int = SEED) -> PairedTest:
    """Paired bootstrap over test images of an accuracy difference, and the exact McNemar test.

    Resampling N images with replacement draws the counts of the three kinds of
    image (only the first right, only the second right, both or neither) from a
    multinomial with the observed shares, so the bootstrap draws those counts
    directly: the same distribution, without an (resamples × N) index array.

    Args:
        first_correct, second_correct: (N,) bool, per test image, in the same image order.
        confidence: interval level.
        n_resamples: bootstrap resamples.
        seed: seed of the resampling generator (fixed: reproducible reports).
    """
    first, second = np.asarray(first_correct, dtype=bool), np.asarray(second_correct, dtype=bool)
    n = first.size
    only_first, only_second = int(np.sum(first & ~second)), int(np.sum(~first & second))
    shares = np.array([only_first, only_second, n - only_first - only_second], dtype=float) / n
    counts = np.random.default_rng(seed).multinomial(n, shares, size=n_resamples)  # (resamples, 3)
    diffs = (counts[:, 0] - counts[:, 1]) / n
    alpha = (1 - confidence) / 2
    low, high = np.quantile(diffs, [alpha, 1 - alpha])
    return PairedTest(n, only_first, only_second, (only_first - only_second) / n, float(low), float(high),
                      mcnemar_exact(only_first, only_second))


class PredictionsError(ValueError):
    """A run's predictions cannot give a test-sampling interval; str() says why."""


def correct_on_test(path: object) -> tuple[np.ndarray, np.ndarray]:
    """(test_target, per-image correctness) from a run's `predictions.npz`.

    Raises:
        PredictionsError: no file recorded, missing, unreadable or lacking `test_target`/`test_pred`.
    """
    if path is None or (isinstance(path, float) and math.isnan(path)):
        raise PredictionsError("no predictions file (not recorded, or read from W&B)")
    path = Path(str(path))
    if not path.is_file():
        raise PredictionsError(f"{path.name} missing in run {path.parent.name}")
    try:
        with np.load(path, allow_pickle=False) as data:
            target, pred = np.asarray(data["test_target"]), np.asarray(data["test_pred"])
    except (OSError, ValueError, KeyError) as err:
        raise PredictionsError(f"{path.name} of run {path.parent.name} unreadable: {err}") from err
    if target.shape != pred.shape or target.ndim != 1 or target.size == 0:
        raise PredictionsError(f"{path.name} of run {path.parent.name}: test_target {target.shape} and "
                               f"test_pred {pred.shape} are not two equal (N,) arrays")
    return target, target == pred


def compare_predictions(first: tuple[object, float], second: tuple[object, float],
                        seed: int = SEED) -> PairedTest:
    """`paired_test` of two runs from their predictions files.

    Args:
        first, second: (predictions path, the run's recorded test accuracy), each.
        seed: bootstrap seed.

    Raises:
        PredictionsError: a file is unusable, the runs' `test_target` differ, or a
            file's accuracy is not the run's recorded accuracy.
    """
    loaded = []
    for path, accuracy in (first, second):
        target, correct = correct_on_test(path)
        if abs(correct.mean() - accuracy) > 1.0 / correct.size:
            raise PredictionsError(f"{Path(str(path)).name} of run {Path(str(path)).parent.name} gives accuracy "
                                   f"{correct.mean():.4f}, its result records {accuracy:.4f}")
        loaded.append((target, correct))
    (target_a, correct_a), (target_b, correct_b) = loaded
    if not np.array_equal(target_a, target_b):
        raise PredictionsError("the two runs' test_target differ (not the same test images)")
    return paired_test(correct_a, correct_b, seed=seed)


# --------------------------------------------------------------- aggregates
NO_INTERVAL = {"ci_low": math.nan, "ci_high": math.nan, "interval": "none", "p_value": math.nan}
Single = Callable[[pd.Series], dict[str, Any]]  # the interval of a group with one value (n = 1 seed)


def describe(values: Sequence[float], single: dict[str, Any] | None = None) -> dict[str, Any]:
    """mean, std (ddof=1), n and the interval of one cell or difference.

    Args:
        values: one value per seed.
        single: the interval fields to use at n = 1 (from `Single`); None: no interval.
    """
    x = np.asarray(values, dtype=float)
    out = {"mean": float(x.mean()) if x.size else math.nan, "std": float(x.std(ddof=1)) if x.size > 1 else math.nan,
           "n": int(x.size), **NO_INTERVAL, "interval_note": ""}
    if x.size >= 2:
        low, high = t_interval(x)
        out.update(ci_low=low, ci_high=high, interval="t")
    elif x.size == 1:
        out.update(single or {"interval_note": "no test-sampling interval for this quantity"})
    else:
        out["interval_note"] = "no completed run"
    return out


def _aggregate(frame: pd.DataFrame, by: list[str], column: str, single: Single | None) -> pd.DataFrame:
    """Group `frame` by `by` and describe `column` (plus median n_train), without the flag columns."""
    out = []
    for key, group in frame.groupby(by, dropna=False, sort=True):
        n_images = group["n_train"].astype(float).median() if "n_train" in group else math.nan
        one = single(group.iloc[0]) if single is not None and len(group) == 1 else None
        out.append({**dict(zip(by, key)), "n_images": n_images, **describe(group[column], one)})
    columns = [*by, *STAT_COLUMNS[:-2]]
    return pd.DataFrame(out, columns=columns).astype({c: frame[c].dtype for c in by})


def _wilson_single(metric: str) -> Single | None:
    """At n = 1, the Wilson interval of a test-set proportion over its images (None for other metrics)."""
    images = PROPORTIONS.get(metric)
    if images is None:
        return None

    def single(row: pd.Series) -> dict[str, Any]:
        total = row.get(images)
        if total is None or pd.isna(total) or total <= 0:
            return {"interval_note": f"{images} not recorded"}
        low, high = wilson_interval(round(float(row[metric]) * total), int(total))
        return {"ci_low": low, "ci_high": high, "interval": "test"}

    return single


def _with_expected(cells: pd.DataFrame, expected: pd.DataFrame | None, by: list[str]) -> pd.DataFrame:
    """`cells` (one row per `by` key) plus the expected keys it lacks."""
    if expected is None or expected.empty:
        return cells
    wanted = expected[by].astype({c: cells[c].dtype for c in by}).drop_duplicates()
    out = cells.merge(wanted, on=by, how="outer", sort=False)
    return out.sort_values(by, kind="mergesort", na_position="first").reset_index(drop=True)


def summarize(runs: pd.DataFrame, metric: str = METRIC, by: list[str] = CELL,
              expected: pd.DataFrame | None = None) -> pd.DataFrame:
    """Mean, std, n and interval of `metric` per cell, with failure counts and the flag.

    Args:
        runs: the runs frame.
        metric: the column to summarise.
        by: the cell's columns.
        expected: cells that should exist (e.g. from the sweep's plan): those
            without any run get a row with n=0 too.

    Returns:
        One row per cell: `by` columns, `STAT_COLUMNS`, n_failed, n_diverged.
        Cells without a usable run have n=0 and NaN statistics.
    """
    groups = targets(runs).groupby(by, dropna=False, sort=True)
    out = groups["n_train"].median().astype(float).rename("n_images").reset_index()
    for status in ("failed", "diverged"):
        out[f"n_{status}"] = groups["status"].agg(lambda s, status=status: int((s == status).sum())).to_numpy()
    out = _with_expected(out, expected, by)
    described = _aggregate(usable(runs, metric), by, metric, _wilson_single(metric)).drop(columns="n_images")
    if metric in PROPORTIONS:  # the parameter lies in [0, 1]: cutting the interval there keeps its coverage
        described[["ci_low", "ci_high"]] = described[["ci_low", "ci_high"]].clip(0.0, 1.0)
    out = out.merge(described, on=by, how="left").merge(cell_flags(runs, metric, by), on=by, how="left")
    out["n"] = out["n"].fillna(0).astype(int)
    out["interval"] = out["interval"].fillna("none")
    out["interval_note"] = out["interval_note"].fillna("no completed run")
    for col in ("n_improving", "n_failed", "n_diverged"):
        out[col] = out[col].fillna(0).astype(int)
    out["flagged"] = out["n_improving"] > 0
    return out[[*by, *STAT_COLUMNS, "n_failed", "n_diverged"]]


def status_counts(runs: pd.DataFrame) -> dict[str, int]:
    """Number of target runs per status (every status listed, zeros included)."""
    counts = targets(runs)["status"].value_counts()
    return {s: int(counts.get(s, 0)) for s in ("completed", "failed", "diverged")}


def _paired_single(metric: str, seed: int) -> Single:
    """At n = 1 pair: the test-sampling interval and McNemar p from both runs' predictions (test/acc1 only)."""
    if metric not in PROPORTIONS:
        return lambda row: {"interval_note": "no test-sampling interval for this quantity"}

    def single(row: pd.Series) -> dict[str, Any]:
        try:
            test = compare_predictions((row["predictions_path_a"], row[f"{metric}_a"]),
                                       (row["predictions_path_b"], row[f"{metric}_b"]), seed=seed)
        except PredictionsError as err:
            return {"interval_note": str(err)}
        return {"ci_low": test.ci_low, "ci_high": test.ci_high, "interval": "test", "p_value": test.p_value}

    return single


def _paired(first: pd.DataFrame, second: pd.DataFrame, on: list[str], by: list[str], metric: str,
            seed: int) -> pd.DataFrame:
    """Differences first − second of `metric`, paired on `on`, described per `by`."""
    keep = [metric, "predictions_path"]
    a = first[[*on, *(c for c in by if c not in on and c in first), "n_train", *keep]]
    b = second[[*on, *(c for c in by if c not in on and c in second), *keep]]
    pairs = a.merge(b, on=on, suffixes=("_a", "_b"))
    pairs["diff"] = pairs[f"{metric}_a"] - pairs[f"{metric}_b"]
    return _aggregate(pairs, by, "diff", _paired_single(metric, seed))


def _add_flags(out: pd.DataFrame, sides: list[pd.DataFrame]) -> pd.DataFrame:
    """Add `n_improving` (summed over the cells of both sides) and `flagged` to difference rows.

    Args:
        out: difference rows.
        sides: per side, `cell_flags` with its key columns renamed as in `out`.
    """
    total = np.zeros(len(out), dtype=int)
    for side in sides:
        keys = [c for c in side.columns if c != "n_improving"]
        merged = out[keys].merge(side, on=keys, how="left")
        total += merged["n_improving"].fillna(0).astype(int).to_numpy()
    return out.assign(n_improving=total, flagged=total > 0)


def arch_differences(runs: pd.DataFrame, metric: str = METRIC, seed: int = SEED) -> pd.DataFrame:
    """Paired ViT − CNN differences of `metric`, per (ViT model, CNN model) pair.

    Runs are matched on dataset, train_fraction, pretraining, pretrain_size and
    seed. n >= 2: Student-t interval of the paired differences; n = 1: the
    test-sampling interval and McNemar p from both runs' predictions (see module
    docstring). Flagged when the ViT's or the CNN's cell is flagged.

    Returns:
        Columns: dataset, pretraining, pretrain_size, train_fraction,
        vit_model, cnn_model, then `STAT_COLUMNS`.
    """
    ok = usable(runs, metric)
    vit = ok[ok["arch"] == "vit"].rename(columns={"model": "vit_model"})
    cnn = ok[ok["arch"] == "cnn"].rename(columns={"model": "cnn_model"})
    by = [*CONDITION, "train_fraction", "vit_model", "cnn_model"]
    out = _paired(vit, cnn, PAIR, by, metric, seed)
    flags = cell_flags(runs, metric).drop(columns="arch")
    sides = [flags.rename(columns={"model": f"{side}_model"}) for side in ("vit", "cnn")]
    return _add_flags(out, sides)[[*by, *STAT_COLUMNS]]


def pretraining_gains(runs: pd.DataFrame, metric: str = METRIC, seed: int = SEED) -> pd.DataFrame:
    """Paired gain of each pretraining over scratch (`pretraining` "none").

    Runs are matched on dataset, model, train_fraction and seed; intervals as
    in `arch_differences`. Flagged when the pretrained or the scratch cell is.

    Returns:
        Columns: dataset, pretraining, pretrain_size, train_fraction, model,
        arch, then `STAT_COLUMNS`.
    """
    ok = usable(runs, metric)
    match = ["dataset", "model", "arch", "train_fraction", "seed"]
    scratch = ok[ok["pretraining"] == "none"].drop(columns=["pretraining", "pretrain_size"])
    pre = ok[ok["pretraining"] != "none"]
    out = _paired(pre, scratch, match, CELL, metric, seed)
    flags = cell_flags(runs, metric)
    scratch_flags = flags[flags["pretraining"] == "none"].drop(columns=["pretraining", "pretrain_size"])
    return _add_flags(out, [flags, scratch_flags])[[*CELL, *STAT_COLUMNS]]


def precision_mismatches(runs: pd.DataFrame) -> pd.DataFrame:
    """Paired ViT and CNN runs (same condition, size and seed) whose resolved precision differs.

    Both nets of a comparison must share their precision (a fairness rule);
    runs that do not record it (schema v1) are left out.

    Returns:
        Columns: `PAIR`, vit_model, cnn_model, vit_precision, cnn_precision.
    """
    done = targets(runs)
    done = done[(done["status"] == "completed") & done["precision"].notna()]
    cols = [*PAIR, "model", "precision"]
    vit = done.loc[done["arch"] == "vit", cols].rename(columns={"model": "vit_model", "precision": "vit_precision"})
    cnn = done.loc[done["arch"] == "cnn", cols].rename(columns={"model": "cnn_model", "precision": "cnn_precision"})
    pairs = vit.merge(cnn, on=PAIR)
    out = pairs[pairs["vit_precision"] != pairs["cnn_precision"]]
    return out[[*PAIR, "vit_model", "cnn_model", "vit_precision", "cnn_precision"]].reset_index(drop=True)


def upstream_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """The upstream pretraining runs the sweep's fine-tuning runs start from: their own validation and plateau.

    Taken from the pretraining run's result when the sweep holds it, else from
    what its fine-tuning runs recorded (`upstream_val_acc1`, `upstream_improving_at_end`).

    Returns:
        One row per upstream run_id: run_id, model, pretraining and pretrain_size
        (the source, as its fine-tuning runs name it; else the run's own dataset
        and training images), status, val_acc1, improving_at_end (pd.NA when
        unknown), n_evals, train_steps, budget_steps, train_flops (what pretraining cost; the fine-tuning
        runs' own train_flops leave it out), n_finetuned.
    """
    columns = ["run_id", "model", "pretraining", "pretrain_size", "status", "val_acc1", "improving_at_end",
               "n_evals", "train_steps", "budget_steps", "train_flops", "n_finetuned"]
    target = targets(runs)
    children_of = target.dropna(subset=["pretrained_from"]).groupby("pretrained_from", sort=True)
    own = runs[runs["role"] == "pretrain"].set_index("run_id")
    rows = []
    for run_id in sorted(set(children_of.groups) | set(own.index)):
        children = children_of.get_group(run_id) if run_id in children_of.groups else target.iloc[0:0]
        row = {"run_id": run_id, "n_finetuned": len(children)}
        if len(children):
            first = children.iloc[0]
            row.update(model=first["model"], pretraining=first["pretraining"], pretrain_size=first["pretrain_size"])
        if run_id in own.index:
            up = own.loc[run_id]
            if not len(children):
                row.update(model=up["model"], pretraining=up["dataset"], pretrain_size=up["n_train"])
            row.update(status=up["status"], val_acc1=up.get("selected/val/acc1", math.nan),
                       improving_at_end=up["improving_at_end"], n_evals=up["n_evals"], train_steps=up["train_steps"],
                       budget_steps=up["budget_steps"], train_flops=up["train_flops"])
        else:
            plateau = children["upstream_improving_at_end"].dropna()
            row.update(status="no result in this sweep", val_acc1=children["upstream_val_acc1"].dropna().max(),
                       improving_at_end=bool(plateau.any()) if len(plateau) else pd.NA, n_evals=pd.NA,
                       train_steps=pd.NA, budget_steps=pd.NA, train_flops=pd.NA)
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


# --------------------------------------------------------- generalization
def with_train_test_gap(runs: pd.DataFrame) -> pd.DataFrame:
    """Add the per-run column `train_test_gap` = train/acc1 − test/acc1 (on a fixed part of the training subset,
    without augmentation) where both are recorded. Robustness and calibration: `analysis.robustness_report`."""
    out = runs.copy()
    if "train/acc1" in out and METRIC in out:
        out["train_test_gap"] = out["train/acc1"].astype(float) - out[METRIC].astype(float)
    return out


# --------------------------------------------------------------- power law
MIN_RESIDUAL_DOF = 2  # distinct training sizes − parameters, at least
B_MAX = 2.0  # upper bound of the exponent b
BOUND_TOL = 1e-4  # a parameter this close to a bound sits on it
FORMS = {3: "a·n^(−b) + c", 2: "a·n^(−b)"}


@dataclass(frozen=True)
class PowerLaw:
    """err(n) = a * n^(-b) + c (c = 0 for the 2-parameter form)."""

    a: float
    b: float
    c: float = 0.0

    def __call__(self, n: np.ndarray | float) -> np.ndarray:
        """Predicted error at `n` training images."""
        return self.a * np.power(np.asarray(n, dtype=float), -self.b) + self.c


@dataclass(frozen=True)
class Fit:
    """A least-squares power-law fit, and whether it is identified.

    Attributes:
        n_params: 3 (a·n^(−b) + c) or 2 (a·n^(−b)).
        n_sizes: distinct training sizes it was fitted on.
        law: the fitted law; None unless identified (an unidentified fit is never used).
        reason: why it is not identified ("" when it is).
    """

    n_params: int
    n_sizes: int
    law: PowerLaw | None = None
    reason: str = ""

    @property
    def identified(self) -> bool:
        """Converged, no parameter on a bound, and >= MIN_RESIDUAL_DOF residual dof over distinct sizes."""
        return self.law is not None

    @property
    def dof(self) -> int:
        """Residual degrees of freedom counted over distinct training sizes."""
        return self.n_sizes - self.n_params

    @property
    def form(self) -> str:
        """The formula, e.g. "a·n^(−b) + c"."""
        return FORMS[self.n_params]


_B_GRID = np.linspace(0.02, B_MAX, 100)


def _start(x: np.ndarray, err: np.ndarray, n_params: int) -> tuple[float, ...]:
    """A start point: for each b of a grid the model is linear in a (and c); the best b wins."""
    basis = x[None, :] ** -_B_GRID[:, None]  # (grid, points)
    if n_params == 2:
        a0 = np.maximum((basis * err).sum(1) / (basis**2).sum(1), 1e-9)
        sse = ((a0[:, None] * basis - err) ** 2).sum(1)
        best = int(np.argmin(sse))
        return a0[best], _B_GRID[best]
    bx, bm = basis.mean(1), err.mean()
    a0 = ((basis - bx[:, None]) * (err - bm)).sum(1) / ((basis - bx[:, None]) ** 2).sum(1)
    a0 = np.maximum(a0, 1e-9)
    c0 = np.clip(bm - a0 * bx, 0.0, 1.0)
    sse = ((a0[:, None] * basis + c0[:, None] - err) ** 2).sum(1)
    best = int(np.argmin(sse))
    return a0[best], _B_GRID[best], c0[best]


def _on_bounds(params: Sequence[float]) -> list[str]:
    """The parameters (a scaled to n / n_max, b, c) that sit on one of their bounds."""
    names = ["a", "b", "c"][: len(params)]
    bounds = {"a": (0.0, math.inf), "b": (0.0, B_MAX), "c": (0.0, 1.0)}
    hits = []
    for name, value in zip(names, params):
        low, high = bounds[name]
        if value - low <= BOUND_TOL:
            hits.append(f"{name} on its lower bound {low:g}")
        elif high - value <= BOUND_TOL:
            hits.append(f"{name} on its upper bound {high:g}")
    return hits


def fit_power_law(n: Sequence[float], err: Sequence[float], n_params: int = 3) -> Fit:
    """Least-squares fit of err ≈ a·n^(−b) + c (n_params=3) or a·n^(−b) (n_params=2).

    Bounds: a >= 0, 0 <= b <= B_MAX, 0 <= c <= 1. n is scaled by its maximum
    inside the fit, for conditioning. The fit is identified only if it
    converged, no parameter sits on a bound, and the distinct sizes exceed the
    parameters by at least MIN_RESIDUAL_DOF (seeds at one size add no dof).

    Args:
        n: training-set size of each point (one point per run).
        err: test error (1 − accuracy) of each point.
        n_params: 3 or 2.

    Returns:
        The Fit; its `law` is None, and `reason` says why, when not identified.
    """
    n, err = np.asarray(n, dtype=float), np.asarray(err, dtype=float)
    n_sizes = int(np.unique(n).size)
    fit = Fit(n_params, n_sizes)
    if fit.dof < MIN_RESIDUAL_DOF:
        dof = f"{fit.dof}".replace("-", "−")
        return Fit(n_params, n_sizes, reason=f"{n_sizes} distinct size{'s' if n_sizes != 1 else ''} − {n_params} "
                                             f"parameters = {dof} residual degrees of freedom "
                                             f"(needs ≥ {MIN_RESIDUAL_DOF})")
    scale = n.max()
    x = n / scale

    def model(x: np.ndarray, a: float, b: float, c: float = 0.0) -> np.ndarray:
        return a * x**-b + c

    upper = [np.inf, B_MAX, 1.0][:n_params]
    try:
        with warnings.catch_warnings():  # the covariance is not used
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            params, _ = optimize.curve_fit(model, x, err, p0=_start(x, err, n_params), bounds=([0.0] * n_params, upper),
                                           maxfev=5000)
    except (RuntimeError, ValueError) as e:
        return Fit(n_params, n_sizes, reason=f"did not converge ({' '.join(str(e).split())})")
    if not np.all(np.isfinite(params)):
        return Fit(n_params, n_sizes, reason="did not converge (non-finite parameters)")
    on_bounds = _on_bounds(params)
    if on_bounds:
        return Fit(n_params, n_sizes, reason=", ".join(on_bounds))
    a, b, *c = (float(p) for p in params)
    return Fit(n_params, n_sizes, PowerLaw(a * scale**b, b, c[0] if c else 0.0))


def fit_curve(n: Sequence[float], err: Sequence[float]) -> Fit:
    """The 3-parameter fit when identified, else the 2-parameter one when identified, else not identified.

    Returns:
        The chosen Fit; when neither is identified, a 2-parameter Fit without a
        law whose reason names both forms' reasons (only the 2-parameter one's
        when too few sizes rule out both).
    """
    three = fit_power_law(n, err, 3)
    if three.identified:
        return three
    two = fit_power_law(n, err, 2)
    if two.identified:
        return two
    if two.dof < MIN_RESIDUAL_DOF:
        return Fit(2, two.n_sizes, reason=f"{FORMS[2]}: {two.reason}")
    return Fit(2, two.n_sizes, reason=f"{FORMS[3]}: {three.reason}; {FORMS[2]}: {two.reason}")


def _points(runs: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(n_train, error) arrays of some runs, sorted by size."""
    runs = runs.sort_values("n_train", kind="mergesort")
    return runs["n_train"].to_numpy(dtype=float), 1.0 - runs[metric].to_numpy(dtype=float)


FIT_COLUMNS = [*CONDITION, "model", "arch", "n_sizes", "n_runs", "n_flagged_sizes", "identified", "form",
               "n_params", "dof", "a", "b", "c", "n_min", "n_max", "reason"]


def power_law_fits(runs: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Fit test error vs training images per (dataset, pretraining, model), on unflagged cells only.

    Returns:
        Columns `FIT_COLUMNS`: n_sizes and n_runs fitted, n_flagged_sizes kept
        out (still improving at the end), identified, the form used, its
        parameters (NaN unless identified), n_min and n_max of the fitted
        points, and the reason when not identified.
    """
    ok = usable(runs, metric).dropna(subset=["n_train"])
    kept = unflagged(runs, metric).dropna(subset=["n_train"])
    rows = []
    for key, group in ok.groupby([*CONDITION, "model", "arch"], dropna=False, sort=True):
        keys = dict(zip([*CONDITION, "model", "arch"], key))
        points = select(kept, **keys)
        n_flagged = group["train_fraction"].nunique() - points["train_fraction"].nunique()
        row = {**keys, "n_sizes": points["n_train"].nunique(), "n_runs": len(points), "n_flagged_sizes": n_flagged,
               "n_min": points["n_train"].min() if len(points) else math.nan,
               "n_max": points["n_train"].max() if len(points) else math.nan}
        fit = fit_curve(*_points(points, metric))
        law = fit.law or PowerLaw(math.nan, math.nan, math.nan)
        reason = fit.reason
        if n_flagged and not fit.identified:
            reason += f"; {n_flagged} size{'s' if n_flagged > 1 else ''} kept out: still improving at the end"
        row.update(identified=fit.identified, form=fit.form if fit.identified else "", n_params=fit.n_params,
                   dof=fit.dof, a=law.a, b=law.b, c=law.c, reason=reason)
        rows.append(row)
    return pd.DataFrame(rows, columns=FIT_COLUMNS)


def law_of(fit: pd.Series) -> PowerLaw:
    """The PowerLaw of an identified row of `power_law_fits`."""
    return PowerLaw(float(fit["a"]), float(fit["b"]), float(fit["c"]))


# --------------------------------------------------------------- crossover
def find_crossover(vit: PowerLaw, cnn: PowerLaw, n_low: float, n_high: float) -> float | None:
    """Smallest n in [n_low, n_high] where the ViT's fitted error drops below the CNN's.

    Returns:
        The crossover size, or None when the ViT's error is not above the
        CNN's at `n_low` or never drops below it within the range.
    """
    grid = np.geomspace(n_low, n_high, 1024)
    gap = vit(grid) - cnn(grid)
    if gap[0] <= 0:
        return None
    below = np.flatnonzero(gap < 0)
    if below.size == 0:
        return None
    i = below[0]
    log_n = optimize.brentq(lambda t: float(vit(np.exp(t)) - cnn(np.exp(t))), np.log(grid[i - 1]), np.log(grid[i]))
    return float(np.exp(log_n))


@dataclass(frozen=True)
class Crossover:
    """Where a ViT's fitted error curve crosses below a CNN's, inside the measured range only.

    Attributes:
        status: "measured" (a crossover inside the range), "none" (the ViT's
            fitted error stays above the CNN's over the range), "vit_ahead" (the
            ViT's is already lower at the smallest size) or "not_identified".
        n: the crossover size (NaN unless measured).
        n_min, n_max: the range searched: the sizes both fits cover.
        note: why nothing was estimated.
        cnn_overtakes: with "vit_ahead", where the CNN's fitted error falls
            below the ViT's inside the range (NaN = nowhere).
    """

    status: str
    n: float = math.nan
    n_min: float = math.nan
    n_max: float = math.nan
    note: str = ""
    cnn_overtakes: float = math.nan


def crossover(vit_fit: pd.Series, cnn_fit: pd.Series) -> Crossover:
    """The crossover of two rows of `power_law_fits`, searched only inside the sizes both cover.

    Args:
        vit_fit, cnn_fit: a ViT's and a CNN's fit under one condition.
    """
    n_min, n_max = max(vit_fit["n_min"], cnn_fit["n_min"]), min(vit_fit["n_max"], cnn_fit["n_max"])
    unidentified = [f"{f['model']}: {f['reason']}" for f in (vit_fit, cnn_fit) if not f["identified"]]
    if unidentified:
        return Crossover("not_identified", n_min=n_min, n_max=n_max,
                         note="fit not identified, " + "; ".join(unidentified))
    if not n_min < n_max:
        return Crossover("not_identified", n_min=n_min, n_max=n_max, note="the two fits share no range of sizes")
    vit, cnn = law_of(vit_fit), law_of(cnn_fit)
    point = find_crossover(vit, cnn, n_min, n_max)
    if point is not None:
        return Crossover("measured", point, n_min, n_max)
    if vit(n_min) < cnn(n_min):
        reverse = find_crossover(cnn, vit, n_min, n_max)
        return Crossover("vit_ahead", n_min=n_min, n_max=n_max, cnn_overtakes=math.nan if reverse is None else reverse)
    return Crossover("none", n_min=n_min, n_max=n_max)


def crossovers(runs: pd.DataFrame, metric: str = METRIC, fits: pd.DataFrame | None = None) -> pd.DataFrame:
    """`crossover` for every (condition, ViT model, CNN model) of the sweep.

    Args:
        runs: the runs frame.
        metric: accuracy column; error = 1 − metric.
        fits: `power_law_fits(runs, metric)`, when already computed.

    Returns:
        Columns: dataset, pretraining, pretrain_size, vit_model, cnn_model, and the `Crossover` fields.
    """
    fits = power_law_fits(runs, metric) if fits is None else fits
    rows = []
    for key, group in fits.groupby(CONDITION, dropna=False, sort=True):
        for _, vit_fit in group[group["arch"] == "vit"].iterrows():
            for _, cnn_fit in group[group["arch"] == "cnn"].iterrows():
                rows.append({**dict(zip(CONDITION, key)), "vit_model": vit_fit["model"],
                             "cnn_model": cnn_fit["model"], **asdict(crossover(vit_fit, cnn_fit))})
    cols = [*CONDITION, "vit_model", "cnn_model", *(f.name for f in fields(Crossover))]
    return pd.DataFrame(rows, columns=cols)
