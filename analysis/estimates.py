"""Estimates with 95% intervals for the generalization analysis: over seeds, or over test images at n = 1.

A cell (one model under one condition and training size) is summarised by
an `Estimate`:

- n >= 2 seeds: the Student-t interval of the mean over seeds
  (mean ± t_{0.975, n-1} · s / √n), which has its nominal coverage at any n
  when the seed-to-seed values are roughly normal;
- n = 1: only test sampling can be quantified, from the run's per-image
  arrays (`ImageSample`): the exact Clopper-Pearson interval for an accuracy,
  a percentile bootstrap over the test images for anything else (a mean of
  accuracies, a corruption-error ratio, ECE, NLL, a paired difference). It
  says how much the number would move with other test images of the same
  distribution, not with another seed, and is labelled "test-sampling only".
  Its point estimate is the statistic on those arrays: the recorded metric
  for an accuracy; for ECE and NLL, recomputed from the float16 logits, it
  can differ from the recorded value in the last digits.

Kept here, apart from `analysis.stats`, for the robustness, ablation and
interpretability outputs; to be unified with `stats`' Student-t intervals.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

CONFIDENCE = 0.95
RESAMPLES = 2000  # bootstrap resamples over test images
SEED = 0  # of the bootstrap's generator: the same numbers on every run
DASH = "–"
TEST_SAMPLING_MARK = "†"
TEST_SAMPLING_NOTE = (f"{TEST_SAMPLING_MARK} n = 1: test-sampling only. The 95% interval covers which test images "
                      "were drawn (exact Clopper-Pearson for an accuracy, a percentile bootstrap over the images "
                      "otherwise), not the variation between seeds, which one run cannot show.")
METHOD_TEXT = {"t": "Student-t over seeds", "binomial": "test-sampling only, Clopper-Pearson",
               "bootstrap": "test-sampling only, bootstrap over images", "none": "no interval"}


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% interval, its n and how the interval was made.

    Attributes:
        mean: the point estimate (NaN when nothing was measured).
        low, high: the interval (NaN when there is none).
        n: seeds (or seed pairs for a paired difference) behind it.
        method: "t" (over seeds), "binomial" or "bootstrap" (test sampling, n = 1), "none".
    """

    mean: float
    low: float = math.nan
    high: float = math.nan
    n: int = 0
    method: str = "none"

    @property
    def test_sampling(self) -> bool:
        """The interval covers test sampling only (one run)."""
        return self.method in ("binomial", "bootstrap")

    @property
    def has_interval(self) -> bool:
        return not math.isnan(self.low)

    @property
    def excludes_zero(self) -> bool:
        """The interval lies entirely on one side of 0."""
        return self.has_interval and (self.low > 0 or self.high < 0)

    def text(self, scale: float = 100.0, digits: int = 1, signed: bool = False) -> str:
        """A table cell: "82.0 [80.1, 83.9]", "+1.2 [0.3, 2.1]†", "82.0 (n=1, no interval)" or "–"."""
        if self.n == 0 or math.isnan(self.mean):
            return DASH
        mean = _number(self.mean * scale, digits, signed)
        if not self.has_interval:
            return f"{mean} (n={self.n}, no interval)"
        interval = f"[{_number(self.low * scale, digits)}, {_number(self.high * scale, digits)}]"
        return f"{mean} {interval}" + (TEST_SAMPLING_MARK if self.test_sampling else "")

    def sentence(self, scale: float = 100.0, digits: int = 1, unit: str = "points", signed: bool = True) -> str:
        """For prose: "+1.2 points (95% interval 0.3 to 2.1; n=3 seeds, Student-t over seeds)"."""
        value = f"{_number(self.mean * scale, digits, signed)} {unit}".rstrip()
        seeds = f"n={self.n} {'seed' if self.n == 1 else 'seeds'}"
        if not self.has_interval:
            return f"{value} ({seeds}, no interval)"
        low, high = _number(self.low * scale, digits), _number(self.high * scale, digits)
        return f"{value} (95% interval {low} to {high}; {seeds}, {METHOD_TEXT[self.method]})"


def _number(value: float, digits: int, signed: bool = False) -> str:
    """A rounded number with the minus sign "−" and no "-0.0"."""
    rounded = round(value, digits) or 0.0
    return f"{rounded:{'+' if signed else ''}.{digits}f}".replace("-", "−")


NOTHING = Estimate(math.nan)


# --------------------------------------------------------------- over seeds
def over_seeds(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
    """The mean over seeds with its Student-t interval (n >= 2; none at n = 1, NOTHING at n = 0)."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return NOTHING
    mean = float(x.mean())
    if x.size == 1:
        return Estimate(mean, n=1)
    half = float(sps.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Estimate(mean, mean - half, mean + half, int(x.size), "t")


# --------------------------------------------------------------- over test images
@dataclass(frozen=True)
class ImageSample:
    """One run's statistic as a function of which test images were drawn.

    Attributes:
        images: a fingerprint of the image set (which images, in which order):
            two samples pair image by image only when their fingerprints agree.
        n_images: how many images.
        statistic: positions (k,) into the images -> the statistic on those images.
        correct: (n_images,) per-image correctness when the statistic is their
            mean accuracy (then the interval is Clopper-Pearson), else None.
    """

    images: str
    n_images: int
    statistic: Callable[[np.ndarray], float]
    correct: np.ndarray | None = None


def fingerprint(kind: str, array: np.ndarray) -> str:
    """A short hash naming an image set, e.g. ("subset", the test indices) or ("test", the targets)."""
    return hashlib.sha256(kind.encode() + np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def accuracy_sample(images: str, correct: np.ndarray) -> ImageSample:
    """The sample of a plain accuracy: the mean of per-image correctness."""
    correct = np.asarray(correct, dtype=bool)
    return ImageSample(images, correct.size, lambda idx: float(correct[idx].mean()), correct)


def bootstrap(statistic: Callable[[np.ndarray], float], n_images: int, confidence: float = CONFIDENCE,
              resamples: int = RESAMPLES, seed: int = SEED) -> Estimate:
    """Percentile bootstrap over images of one run's statistic (n = 1 seed)."""
    rng = np.random.default_rng(seed)
    point = statistic(np.arange(n_images))
    draws = np.array([statistic(rng.integers(0, n_images, n_images)) for _ in range(resamples)])
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return Estimate(point, n=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return Estimate(float(point), float(low), float(high), 1, "bootstrap")


def from_images(sample: ImageSample, confidence: float = CONFIDENCE) -> Estimate:
    """One run's test-sampling estimate: Clopper-Pearson for an accuracy, else the bootstrap."""
    if sample.correct is None:
        return bootstrap(sample.statistic, sample.n_images, confidence)
    k, n = int(sample.correct.sum()), int(sample.correct.size)
    interval = sps.binomtest(k, n).proportion_ci(confidence, method="exact")
    return Estimate(k / n, float(interval.low), float(interval.high), 1, "binomial")


def paired_from_images(first: ImageSample, second: ImageSample, confidence: float = CONFIDENCE) -> Estimate | None:
    """first − second on the same images: a paired bootstrap; None when the image sets differ."""
    if first.images != second.images or first.n_images != second.n_images:
        return None
    return bootstrap(lambda idx: first.statistic(idx) - second.statistic(idx), first.n_images, confidence)


# --------------------------------------------------------------- either
def cell_estimate(values: Sequence[float], single: Callable[[], ImageSample | None]) -> Estimate:
    """Over seeds when n >= 2; at n = 1 the run's test-sampling estimate when `single()` gives a sample.

    Args:
        values: the cell's per-seed values.
        single: builds the one run's `ImageSample` (called only at n = 1); None when its arrays are missing.
    """
    if len(values) != 1:
        return over_seeds(values)
    sample = single()
    return over_seeds(values) if sample is None else from_images(sample)


def paired_estimate(differences: Sequence[float],
                    single: Callable[[], tuple[ImageSample, ImageSample] | None]) -> Estimate:
    """A paired difference: over seed pairs when n >= 2; at one pair a paired bootstrap over shared images."""
    if len(differences) != 1:
        return over_seeds(differences)
    samples = single()
    paired = None if samples is None else paired_from_images(*samples)
    return over_seeds(differences) if paired is None else paired
