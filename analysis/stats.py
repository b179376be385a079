"""Statistics over seeds: means with bootstrap CIs, paired differences, power laws.

Conventions:
- Only target runs (`role` "train") with status "completed" and a finite
  metric enter the statistics; failed and diverged runs are counted per cell
  (`n_failed`, `n_diverged`).
- The 95% CI of a mean is a percentile bootstrap over seeds
  (`scipy.stats.bootstrap`, `N_RESAMPLES` resamples, a fixed seed): reports are
  reproducible. With n=1 there is no interval (NaN); with n=2 the interval is
  the range of the two values, so n is always reported with it.
- Accuracies stay fractions here; tables and plots show percent.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np
import pandas as pd
from scipy import optimize
from scipy import stats as sps

METRIC = "test/acc1"
CONFIDENCE = 0.95
N_RESAMPLES = 9999
SEED = 0
# A cell: one model under one condition at one training-set size.
CONDITION = ["dataset", "pretraining", "pretrain_size"]
CELL = [*CONDITION, "train_fraction", "model", "arch"]
# ViT and CNN runs are paired when these agree.
PAIR = [*CONDITION, "train_fraction", "seed"]
MIN_SIZES = 3  # distinct training-set sizes needed for a power-law fit
EXTRAPOLATION = 10.0  # crossovers are also searched up to this many times the largest n
STAT_COLUMNS = ["n_images", "mean", "std", "n", "ci_low", "ci_high"]
CORRUPTION = re.compile(r"^corrupt/(?P<name>[^/]+)/(?P<severity>\d+)/acc1$")
REFERENCE_CNN = "resnet50"  # the mCE baseline when present (ImageNet-C uses AlexNet)


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


# --------------------------------------------------------------- intervals
def bootstrap_ci(
    values: Sequence[float], confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = SEED
) -> tuple[float, float]:
    """Percentile-bootstrap CI of the mean over seeds; (nan, nan) when n < 2.

    Args:
        values: one value per seed.
        confidence: confidence level.
        n_resamples: bootstrap resamples.
        seed: seed of the resampling generator (fixed: reproducible reports).

    Returns:
        (low, high); a zero-width interval when all values are equal.
    """
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return math.nan, math.nan
    if np.all(x == x[0]):
        return float(x[0]), float(x[0])
    res = sps.bootstrap(
        (x,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
        method="percentile", rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def describe(values: Sequence[float], seed: int = SEED) -> dict[str, float]:
    """mean, std (ddof=1; NaN at n=1), n, ci_low, ci_high of one cell."""
    x = np.asarray(values, dtype=float)
    low, high = bootstrap_ci(x, seed=seed)
    return {
        "mean": float(x.mean()) if x.size else math.nan,
        "std": float(x.std(ddof=1)) if x.size > 1 else math.nan,
        "n": int(x.size), "ci_low": low, "ci_high": high,
    }


def _aggregate(frame: pd.DataFrame, by: list[str], column: str, seed: int) -> pd.DataFrame:
    """Group `frame` by `by` and describe `column` (plus median n_train)."""
    out = []
    for key, group in frame.groupby(by, dropna=False, sort=True):
        n_images = group["n_train"].astype(float).median() if "n_train" in group else math.nan
        out.append({**dict(zip(by, key)), "n_images": n_images, **describe(group[column], seed)})
    return pd.DataFrame(out, columns=[*by, *STAT_COLUMNS]).astype({c: frame[c].dtype for c in by})


# --------------------------------------------------------------- summaries
def summarize(runs: pd.DataFrame, metric: str = METRIC, by: list[str] = CELL, seed: int = SEED) -> pd.DataFrame:
    """Mean, std, n and CI of `metric` per cell, with failure counts.

    Returns:
        One row per cell that has any target run: `by` columns, n_images
        (median n_train), mean, std, n, ci_low, ci_high, n_failed,
        n_diverged. Cells whose runs all failed have n=0 and NaN statistics.
    """
    groups = targets(runs).groupby(by, dropna=False, sort=True)
    out = groups["n_train"].median().astype(float).rename("n_images").reset_index()
    for status in ("failed", "diverged"):
        out[f"n_{status}"] = groups["status"].agg(lambda s, status=status: int((s == status).sum())).to_numpy()
    stats = _aggregate(usable(runs, metric), by, metric, seed).drop(columns="n_images")
    out = out.merge(stats, on=by, how="left")
    out["n"] = out["n"].fillna(0).astype(int)
    return out[[*by, *STAT_COLUMNS, "n_failed", "n_diverged"]]


def status_counts(runs: pd.DataFrame) -> dict[str, int]:
    """Number of target runs per status (every status listed, zeros included)."""
    counts = targets(runs)["status"].value_counts()
    return {s: int(counts.get(s, 0)) for s in ("completed", "failed", "diverged")}


def arch_differences(runs: pd.DataFrame, metric: str = METRIC, seed: int = SEED) -> pd.DataFrame:
    """Paired ViT - CNN differences of `metric`, per (ViT model, CNN model) pair.

    Runs are matched on dataset, train_fraction, pretraining, pretrain_size
    and seed; the CI is the bootstrap over the matched seeds.

    Returns:
        Columns: dataset, pretraining, pretrain_size, train_fraction,
        vit_model, cnn_model, n_images, mean, std, n, ci_low, ci_high.
    """
    ok = usable(runs, metric)
    cols = [*PAIR, "model", "n_train", metric]
    vit = ok.loc[ok["arch"] == "vit", cols].rename(columns={"model": "vit_model"})
    cnn = ok.loc[ok["arch"] == "cnn", cols].rename(columns={"model": "cnn_model"}).drop(columns="n_train")
    pairs = vit.merge(cnn, on=PAIR, suffixes=("_vit", "_cnn"))
    pairs["diff"] = pairs[f"{metric}_vit"] - pairs[f"{metric}_cnn"]
    by = [*CONDITION, "train_fraction", "vit_model", "cnn_model"]
    return _aggregate(pairs, by, "diff", seed)


def pretraining_gains(runs: pd.DataFrame, metric: str = METRIC, seed: int = SEED) -> pd.DataFrame:
    """Paired gain of each pretraining over scratch (`pretraining` "none").

    Runs are matched on dataset, model, train_fraction and seed.

    Returns:
        Columns: dataset, pretraining, pretrain_size, train_fraction, model,
        arch, n_images, mean, std, n, ci_low, ci_high.
    """
    ok = usable(runs, metric)
    match = ["dataset", "model", "arch", "train_fraction", "seed"]
    scratch = ok.loc[ok["pretraining"] == "none", [*match, metric]]
    pre = ok.loc[ok["pretraining"] != "none", [*match, "pretraining", "pretrain_size", "n_train", metric]]
    pairs = pre.merge(scratch, on=match, suffixes=("", "_scratch"))
    pairs["diff"] = pairs[metric] - pairs[f"{metric}_scratch"]
    return _aggregate(pairs, CELL, "diff", seed)


# --------------------------------------------------------- generalization
def corruption_columns(runs: pd.DataFrame) -> dict[str, tuple[str, int]]:
    """`corrupt/<name>/<severity>/acc1` columns -> (name, severity), sorted."""
    found = {c: CORRUPTION.match(c) for c in runs.columns}
    return {c: (m["name"], int(m["severity"])) for c, m in sorted(found.items()) if m}


def mce_reference(runs: pd.DataFrame, reference: str = REFERENCE_CNN) -> str | None:
    """The mCE baseline: `reference` if it has runs, else the first CNN by name."""
    cnns = sorted(set(targets(runs).loc[runs["arch"] == "cnn", "model"]))
    return reference if reference in cnns else (cnns[0] if cnns else None)


def _mce(runs: pd.DataFrame, columns: dict[str, tuple[str, int]], reference: str | None) -> pd.Series:
    """Hendrycks & Dietterich mCE (%) of each run against the reference CNN.

    CE_c = sum over severities of the run's error on corruption c, divided by
    the same sum for the reference (its errors averaged over its seeds) in the
    same dataset, pretraining and train_fraction; mCE = mean of CE_c over c.
    """
    errors = 1.0 - runs[list(columns)].astype(float)
    names = sorted({name for name, _ in columns.values()})
    mce = pd.Series(math.nan, index=runs.index)
    ok = runs["status"] == "completed"
    for _, group in runs[ok].groupby([*CONDITION, "train_fraction"], dropna=False):
        ref = errors.loc[group.index[group["model"] == reference]].mean()
        for idx in group.index:
            ces = []
            for name in names:
                cols = [c for c, (n, _) in columns.items() if n == name]
                both = errors.loc[idx, cols].notna() & ref[cols].notna()
                if both.any() and ref[cols][both].sum() > 0:
                    ces.append(errors.loc[idx, cols][both].sum() / ref[cols][both].sum())
            mce[idx] = 100.0 * float(np.mean(ces)) if ces else math.nan
    return mce


def with_generalization(runs: pd.DataFrame, reference: str = REFERENCE_CNN) -> pd.DataFrame:
    """Add per-run columns `corrupt/mean_acc1`, `corrupt/mce` and `train_test_gap` where computable.

    `corrupt/mean_acc1` averages every corruption and severity;
    `corrupt/mce` is in percent of the reference CNN (see `_mce`);
    `train_test_gap` is train/acc1 - test/acc1.
    """
    out = runs.copy()
    if "train/acc1" in out and METRIC in out:
        out["train_test_gap"] = out["train/acc1"].astype(float) - out[METRIC].astype(float)
    columns = corruption_columns(out)
    if columns:
        out["corrupt/mean_acc1"] = out[list(columns)].astype(float).mean(axis=1)
        out["corrupt/mce"] = _mce(out, columns, mce_reference(out, reference))
    return out


# --------------------------------------------------------------- power law
class FitError(ValueError):
    """A power law could not be fitted; str() says why."""


@dataclass(frozen=True)
class PowerLaw:
    """err(n) = a * n^(-b) + c."""

    a: float
    b: float
    c: float

    def __call__(self, n: np.ndarray | float) -> np.ndarray:
        """Predicted error at `n` training images."""
        return self.a * np.power(np.asarray(n, dtype=float), -self.b) + self.c


_B_GRID = np.linspace(0.02, 2.0, 100)


def fit_power_law(n: Sequence[float], err: Sequence[float]) -> PowerLaw:
    """Least-squares fit of err ≈ a·n^(−b) + c with a > 0, b in (0, 2], c in [0, 1].

    The start point comes from a grid over b (for fixed b the model is
    linear in a and c); `scipy.optimize.curve_fit` then refines all three.
    n is scaled by its maximum inside the fit, for conditioning.

    Args:
        n: training-set size of each point (one point per run).
        err: test error (1 - accuracy) of each point.

    Raises:
        FitError: fewer than `MIN_SIZES` distinct sizes, or no convergence.
    """
    n, err = np.asarray(n, dtype=float), np.asarray(err, dtype=float)
    n_sizes = np.unique(n).size
    if n_sizes < MIN_SIZES:
        raise FitError(f"needs >= {MIN_SIZES} distinct training-set sizes, has {n_sizes}")
    scale = n.max()
    x = n / scale
    basis = x[None, :] ** -_B_GRID[:, None]  # (grid, points)
    bx, bm = basis.mean(1), err.mean()
    a0 = ((basis - bx[:, None]) * (err - bm)).sum(1) / ((basis - bx[:, None]) ** 2).sum(1)
    a0 = np.maximum(a0, 1e-9)
    c0 = np.clip(bm - a0 * bx, 0.0, 1.0)
    sse = ((a0[:, None] * basis + c0[:, None] - err) ** 2).sum(1)
    best = int(np.argmin(sse))

    def model(x: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
        return a * x ** -b + c

    try:
        with warnings.catch_warnings():  # the covariance is not used
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            (a, b, c), _ = optimize.curve_fit(
                model, x, err, p0=(a0[best], _B_GRID[best], c0[best]), bounds=([0, 0, 0], [np.inf, 2, 1]), maxfev=5000
            )
    except (RuntimeError, ValueError) as e:
        raise FitError(f"no convergence ({e})") from e
    return PowerLaw(a=float(a * scale**b), b=float(b), c=float(c))


def _points(runs: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(n_train, error) arrays of some runs, sorted by size."""
    runs = runs.sort_values("n_train", kind="mergesort")
    return runs["n_train"].to_numpy(dtype=float), 1.0 - runs[metric].to_numpy(dtype=float)


def power_law_fits(runs: pd.DataFrame, metric: str = METRIC) -> pd.DataFrame:
    """Fit test error vs training images per (dataset, model, pretraining).

    Returns:
        Columns: dataset, pretraining, pretrain_size, model, arch, n_sizes,
        n_runs, fitted, a, b, c, reason ("" when fitted).
    """
    ok = usable(runs, metric).dropna(subset=["n_train"])
    rows = []
    for key, group in ok.groupby([*CONDITION, "model", "arch"], dropna=False, sort=True):
        row = {**dict(zip([*CONDITION, "model", "arch"], key)),
               "n_sizes": group["n_train"].nunique(), "n_runs": len(group)}
        try:
            fit = fit_power_law(*_points(group, metric))
            row.update(fitted=True, a=fit.a, b=fit.b, c=fit.c, reason="")
        except FitError as e:
            row.update(fitted=False, a=math.nan, b=math.nan, c=math.nan, reason=str(e))
        rows.append(row)
    cols = [*CONDITION, "model", "arch", "n_sizes", "n_runs", "fitted", "a", "b", "c", "reason"]
    return pd.DataFrame(rows, columns=cols)


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


def _resample(n: np.ndarray, err: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Resample points with replacement within each training-set size (n sorted)."""
    starts = np.flatnonzero(np.r_[True, n[1:] != n[:-1]])
    counts = np.diff(np.r_[starts, n.size])
    idx = np.concatenate([s + rng.integers(0, c, c) for s, c in zip(starts, counts)])
    return n[idx], err[idx]


@dataclass(frozen=True)
class Crossover:
    """Where a ViT's fitted error curve crosses below a CNN's.

    Attributes:
        status: "measured" (inside the measured sizes), "extrapolated" (up to
            EXTRAPOLATION x the largest), "none" (neither), "vit_ahead" (the
            ViT is already better at the smallest size) or "not_fitted".
        n: the crossover size (NaN unless measured/extrapolated).
        ci_low, ci_high: bootstrap interval of n (NaN = undetermined).
        found: fraction of bootstrap resamples with a crossover in range.
        n_min, n_max: the measured size range.
        note: why the interval is undetermined, or why nothing was fitted.
        cnn_overtakes: with "vit_ahead", the size where the CNN's fitted error
            falls below the ViT's (the reversed crossover; NaN = not in range).
    """

    status: str
    n: float = math.nan
    ci_low: float = math.nan
    ci_high: float = math.nan
    found: float = math.nan
    n_min: float = math.nan
    n_max: float = math.nan
    note: str = ""
    cnn_overtakes: float = math.nan


def crossover(
    vit_runs: pd.DataFrame, cnn_runs: pd.DataFrame, metric: str = METRIC,
    n_boot: int = 200, confidence: float = CONFIDENCE, seed: int = SEED,
) -> Crossover:
    """Crossover size of one ViT/CNN pair under one condition, with its uncertainty.

    The uncertainty is a bootstrap over runs (seeds) within each size: both
    curves are refitted on each resample and the crossover searched in
    [n_min, EXTRAPOLATION * n_max]. The percentile interval is reported only
    when at least `confidence` of the resamples find one; with a single run
    at some size the bootstrap cannot vary and the interval is undetermined.

    Args:
        vit_runs, cnn_runs: usable runs of each model (with n_train).
        metric: accuracy column; error = 1 - metric.
        n_boot: bootstrap resamples.
        confidence: interval level.
        seed: resampling seed.
    """
    (vit_n, vit_err), (cnn_n, cnn_err) = _points(vit_runs, metric), _points(cnn_runs, metric)
    sizes = np.unique(np.concatenate([vit_n, cnn_n]))
    if sizes.size == 0:
        return Crossover("not_fitted", note="no runs with n_train")
    n_min, n_max = float(sizes.min()), float(sizes.max())
    try:
        vit_fit, cnn_fit = fit_power_law(vit_n, vit_err), fit_power_law(cnn_n, cnn_err)
    except FitError as e:
        return Crossover("not_fitted", n_min=n_min, n_max=n_max, note=str(e))
    n_high = EXTRAPOLATION * n_max
    point = find_crossover(vit_fit, cnn_fit, n_min, n_high)
    if point is None:
        if vit_fit(n_min) < cnn_fit(n_min):
            reverse = find_crossover(cnn_fit, vit_fit, n_min, n_high)
            return Crossover("vit_ahead", n_min=n_min, n_max=n_max,
                             cnn_overtakes=math.nan if reverse is None else reverse)
        return Crossover("none", n_min=n_min, n_max=n_max)
    status = "measured" if point <= n_max else "extrapolated"
    if min(np.unique(vit_n, return_counts=True)[1].min(), np.unique(cnn_n, return_counts=True)[1].min()) < 2:
        return Crossover(status, point, n_min=n_min, n_max=n_max, note="n=1 at some sizes: no bootstrap over seeds")
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(n_boot):
        try:
            v = fit_power_law(*_resample(vit_n, vit_err, rng))
            c = fit_power_law(*_resample(cnn_n, cnn_err, rng))
        except FitError:
            continue
        hit = find_crossover(v, c, n_min, n_high)
        if hit is not None:
            found.append(hit)
    share = len(found) / n_boot
    if share < confidence:
        note = f"crossover in only {share:.0%} of {n_boot} bootstrap resamples"
        return Crossover(status, point, found=share, n_min=n_min, n_max=n_max, note=note)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(found, [alpha, 1 - alpha])
    return Crossover(status, point, float(low), float(high), share, n_min, n_max)


def crossovers(runs: pd.DataFrame, metric: str = METRIC, n_boot: int = 200, seed: int = SEED) -> pd.DataFrame:
    """`crossover` for every (condition, ViT model, CNN model) in the sweep.

    Returns:
        Columns: dataset, pretraining, pretrain_size, vit_model, cnn_model,
        and the `Crossover` fields.
    """
    ok = usable(runs, metric).dropna(subset=["n_train"])
    rows = []
    for key, group in ok.groupby(CONDITION, dropna=False, sort=True):
        models = group.groupby("model", sort=True)
        for vit_model, vit_runs in models:
            for cnn_model, cnn_runs in models:
                if vit_runs["arch"].iat[0] == "vit" and cnn_runs["arch"].iat[0] == "cnn":
                    result = crossover(vit_runs, cnn_runs, metric, n_boot=n_boot, seed=seed)
                    rows.append({**dict(zip(CONDITION, key)), "vit_model": vit_model, "cnn_model": cnn_model,
                                 **asdict(result)})
    cols = [*CONDITION, "vit_model", "cnn_model", *(f.name for f in fields(Crossover))]
    return pd.DataFrame(rows, columns=cols)
