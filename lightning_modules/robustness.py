"""Generalization measurements of a trained net: corruptions, occlusion, patch shuffle and calibration.

`evaluate_robustness` is the one entry point a training run (and later
`python -m experiments.evaluate`) calls with a net in eval mode. Everything
that could differ between two nets is fixed by the seed alone, so a ViT and
a ResNet50 see exactly the same pixels:

- the **subset**: a stratified, fixed subset of the test set
  (`stratified_subset`; nested: a smaller subset is inside a larger one);
- the **corruptions**: the 15 ImageNet-C corruptions at CIFAR-10-C
  strengths (`lightning_modules.corruptions`), applied to the uint8 images
  before the eval transform, cached on disk, or read from the official
  CIFAR-10-C / CIFAR-100-C files when a folder with them is given;
- **occlusion** (PatchDrop, Naseer et al. 2021): on a fixed grid of cells
  over the net's input (8 x 8 by default, whatever the net's patch size), a
  share of the cells is blanked; blank = 0 after normalisation, i.e. the
  dataset's mean pixel. Masks are a pure function of (seed, image index,
  fraction, grid) and nested: the cells blanked at 20 % include those at 10 %;
- **patch shuffle**: the input's grid cells (4 x 4 by default) permuted, the
  same permutation per image for every net. A ViT without position
  embedding whose patch grid refines the shuffle grid is exactly invariant
  to it (its tokens are only permuted); a CNN is not.

Metric names (flat, as result.json holds them): `corrupt/clean_acc1` (the
subset, clean), `corrupt/<name>/<severity>/acc1`, `corrupt/mean_acc1`,
`corrupt/n` (the subset size), `corrupt/official` (the share of
corruptions read from official files), `occlusion/<pct>/acc1`,
`occlusion/grid`, `shuffle/acc1`, `shuffle/grid`. Per-image correctness
comes back too, for intervals.

Calibration (`calibrate`) is separate, from validation and test logits:
temperature scaling (Guo et al. 2017) fitted on validation NLL, ECE with 15
equal-width bins (torchmetrics' `CalibrationError` default, L1) and NLL
before and after, and reliability-diagram bins as plain numbers.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy import optimize, special
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from lightning_modules import corruptions
from lightning_modules.classifier import prefers_channels_last
from lightning_modules.data import split_indices

OCCLUSION_FRACTIONS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
OCCLUSION_GRID = 8
SHUFFLE_GRID = 4
ECE_BINS = 15
PRECISIONS: dict[str, torch.dtype | None] = {"32-true": None, "bf16-mixed": torch.bfloat16,
                                             "16-mixed": torch.float16}
TEMPERATURE_BOUNDS = (0.01, 100.0)
_OCCLUSION_STREAM = zlib.crc32(b"occlusion")
_SHUFFLE_STREAM = zlib.crc32(b"shuffle")

Transform = Callable[[Tensor], Tensor]


# ------------------------------------------------------------------ subset
def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A fixed, stratified subset of the test set: each class keeps its share.

    The same per-class permutation as the data module's splits
    (`data.split_indices`), so a smaller subset is inside a larger one.

    Args:
        labels: (N,) int labels of the test set.
        size: images wanted; the whole set when size >= N.
        seed: seed of the per-class permutations.

    Returns:
        (min(size, N),) sorted int64 positions in the test set.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if size >= len(labels):
        return np.arange(len(labels), dtype=np.int64)
    return split_indices(labels, seed, 1.0, size)[1]


# ------------------------------------------------------------------ occlusion and shuffle
def _check_grid(grid: int, side: int, what: str) -> None:
    if isinstance(grid, bool) or not isinstance(grid, (int, np.integer)) or not 1 <= grid <= side:
        raise ValueError(f"invalid {what}={grid!r} (allowed: an int in 1..{side}, the input side)")


def occlusion_masks(indices: Sequence[int] | np.ndarray, fraction: float, grid: int, seed: int) -> np.ndarray:
    """Which cells of a grid x grid partition are blanked, per image.

    Image i blanks the first round(fraction * grid^2) cells of a permutation
    drawn from (seed, indices[i]) alone, so masks are the same for every
    net and every call, and nested across fractions.

    Args:
        indices: (n,) the images' indices in the test set.
        fraction: share of cells to blank, in [0, 1].
        grid: cells per side.
        seed: non-negative int.

    Returns:
        (n, grid, grid) bool, True = blanked.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"invalid occlusion fraction={fraction!r} (allowed: 0 <= fraction <= 1)")
    cells = grid * grid
    k = int(round(fraction * cells))
    masks = np.zeros((len(indices), cells), dtype=bool)
    for row, index in enumerate(indices):
        masks[row, np.random.default_rng([seed, _OCCLUSION_STREAM, int(index)]).permutation(cells)[:k]] = True
    return masks.reshape(len(indices), grid, grid)


def _cell_of_pixel(side: int, grid: int) -> np.ndarray:
    """(side,) the grid cell each pixel row (or column) falls in; cell edges at round(i * side / grid)."""
    edges = np.rint(np.linspace(0, side, grid + 1)).astype(np.int64)
    return np.searchsorted(edges, np.arange(side), side="right") - 1


def occlude(inputs: Tensor, masks: np.ndarray) -> Tensor:
    """Blanks masked cells of normalised inputs to 0 (the dataset's mean pixel).

    Args:
        inputs: (B, C, H, W) normalised net inputs.
        masks: (B, g, g) bool from `occlusion_masks`.

    Returns:
        (B, C, H, W), a new tensor.
    """
    _, _, h, w = inputs.shape
    g = masks.shape[-1]
    rows, cols = _cell_of_pixel(h, g), _cell_of_pixel(w, g)
    pixels = torch.from_numpy(masks[:, rows][:, :, cols]).to(inputs.device)  # (B, H, W)
    return inputs.masked_fill(pixels[:, None], 0.0)  # (B, C, H, W)


def shuffle_permutations(indices: Sequence[int] | np.ndarray, grid: int, seed: int) -> np.ndarray:
    """One permutation of the grid x grid cells per image, from (seed, index) alone.

    Returns:
        (n, grid^2) int64: output cell j takes input cell perm[j] (cells row by row).
    """
    return np.stack([np.random.default_rng([seed, _SHUFFLE_STREAM, int(i)]).permutation(grid * grid)
                     for i in indices]).reshape(len(indices), grid * grid)


def shuffle_patches(inputs: Tensor, permutations: np.ndarray, grid: int) -> Tensor:
    """Permutes the grid cells of each image.

    Args:
        inputs: (B, C, H, W), H and W divisible by `grid`.
        permutations: (B, grid^2) from `shuffle_permutations`.
        grid: cells per side.

    Returns:
        (B, C, H, W) with output cell j = input cell permutations[:, j].
    """
    b, c, h, w = inputs.shape
    if h % grid or w % grid:
        raise ValueError(f"invalid shuffle_grid={grid} for a {h}x{w} input (allowed: a divisor of both sides)")
    ph, pw = h // grid, w // grid
    cells = inputs.reshape(b, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5)  # (B, g, g, C, ph, pw)
    cells = cells.reshape(b, grid * grid, c, ph, pw)  # (B, g^2, C, ph, pw)
    order = torch.from_numpy(permutations).to(inputs.device)  # (B, g^2)
    moved = torch.gather(cells, 1, order[:, :, None, None, None].expand_as(cells))  # (B, g^2, C, ph, pw)
    moved = moved.reshape(b, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5)  # (B, C, g, ph, g, pw)
    return moved.reshape(b, c, h, w)


# ------------------------------------------------------------------ evaluation
@dataclass
class RobustnessResult:
    """What `evaluate_robustness` measured.

    Attributes:
        metrics: flat {name: value}, the names in the module docstring.
        correct: {accuracy metric name: (n,) bool}, per image of the subset.
        indices: (n,) the subset's positions in the test set.
    """

    metrics: dict[str, float] = field(default_factory=dict)
    correct: dict[str, np.ndarray] = field(default_factory=dict)
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def record(self, name: str, correct: np.ndarray) -> None:
        """Stores one condition's per-image correctness and its accuracy."""
        self.correct[name] = correct
        self.metrics[name] = float(correct.mean()) if correct.size else float("nan")


def _pct(fraction: float) -> str:
    """0.1 -> "10", 0.125 -> "12.5"."""
    return f"{100 * fraction:.6g}"


@torch.no_grad()
def _correct(net: Callable[[Tensor], Tensor], images: Tensor, labels: np.ndarray, transform: Transform,
             batch_size: int, dtype: torch.dtype | None, device: torch.device, channels_last: bool,
             perturb: Callable[[Tensor, slice], Tensor] | None = None) -> np.ndarray:
    """(n,) bool: whether `net` classifies each transformed (and perturbed) image correctly."""
    out = np.zeros(len(labels), dtype=bool)
    for start in range(0, len(labels), batch_size):
        rows = slice(start, min(start + batch_size, len(labels)))
        x = transform(images[rows]).as_subclass(torch.Tensor).to(device)  # (B, C, H, W) float
        if perturb is not None:
            x = perturb(x, rows)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = net(x)  # (B, K)
        predicted = logits.float().argmax(dim=1).cpu().numpy()  # (B,)
        out[rows] = predicted == labels[rows]
    return out


def _check_inputs(net: Callable[[Tensor], Tensor], images: Tensor, labels: np.ndarray, subset_size: int,
                  seed: int, precision: str, batch_size: int) -> None:
    corruptions.check_images(images)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"invalid labels of shape {labels.shape} (allowed: ({images.shape[0]},), one per image)")
    if isinstance(net, nn.Module) and net.training:
        raise ValueError("invalid net in training mode (allowed: eval mode; call net.eval() first)")
    for name, value in (("subset_size", subset_size), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"invalid {name}={value!r} (allowed: an int >= 1)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"invalid seed={seed!r} (allowed: an int >= 0)")
    if precision not in PRECISIONS:
        raise ValueError(f"invalid precision={precision!r} (allowed: {' | '.join(PRECISIONS)})")


def _official(folder: str | os.PathLike, name: str, severity: int, indices: np.ndarray, labels: np.ndarray,
              like: Tensor) -> Tensor:
    """Official CIFAR-C images of the subset, checked against the labels, at the clean images' size and channels."""
    images, official_labels = corruptions.load_official(folder, name, severity, indices)
    if not np.array_equal(official_labels, labels):
        raise ValueError(f"invalid official_dir={str(folder)!r}: {name}.npy labels differ from the test labels "
                         "(allowed: the CIFAR-C files of this dataset, with images = its test split in order)")
    if images.shape[-2:] != like.shape[-2:]:
        images = TF.resize(images, list(like.shape[-2:]), antialias=True)  # (n, 3, H, W)
    if like.shape[1] == 1:
        images = TF.rgb_to_grayscale(images)  # (n, 1, H, W)
    return images


def evaluate_robustness(
    net: Callable[[Tensor], Tensor],
    images: Tensor,
    labels: np.ndarray | Tensor,
    transform: Transform,
    *,
    subset_size: int = 200,
    seed: int = 0,
    precision: str = "32-true",
    batch_size: int = 256,
    dataset: str | None = None,
    names: Sequence[str] = corruptions.CORRUPTION_NAMES,
    severities: Sequence[int] = corruptions.SEVERITIES,
    occlusion_fractions: Sequence[float] = OCCLUSION_FRACTIONS,
    occlusion_grid: int = OCCLUSION_GRID,
    shuffle_grid: int | None = SHUFFLE_GRID,
    official_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
) -> RobustnessResult:
    """Accuracy of one net under corruptions, occlusion and patch shuffle, on a fixed stratified subset.

    Every perturbation is a pure function of `seed` and the image's index,
    so two nets evaluated with the same arguments see identical inputs.

    Args:
        net: (B, C, H, W) float inputs -> (B, K) logits, in eval mode.
        images: (N, C, H, W) uint8 test images, C in {1, 3}, the test split
            in its stored order (as the data module holds it, already at the
            net's side for small datasets).
        labels: (N,) int labels.
        transform: the data module's eval pipeline on a batch: (B, C, H, W)
            uint8 -> (B, C', H', W') normalised float; corruptions act before
            it, occlusion and shuffle after it (on the net's input grid).
        subset_size: test images evaluated (stratified, fixed by `seed`); the
            default keeps the cpu profile's sweep near its robustness budget
            (`benchmarks/robustness_cost.py`, benchmarks/RESULTS.md).
        seed: fixes the subset, the corruptions, masks and permutations.
        precision: "32-true" | "bf16-mixed" | "16-mixed" (autocast dtype).
        batch_size: images per forward pass.
        dataset: the dataset's name, the key of the corruption cache; None
            generates the corruptions without caching.
        names: corruptions to evaluate (default all 15; empty: none).
        severities: severities to evaluate.
        occlusion_fractions: shares of cells blanked (empty: no occlusion).
        occlusion_grid: occlusion cells per side of the net's input.
        shuffle_grid: cells per side for patch shuffle; None: no shuffle.
        official_dir: a folder with CIFAR-10-C / CIFAR-100-C `.npy` files;
            used for each corruption it holds, generated otherwise.
        cache_dir: the corruption cache folder (default
            `corruptions.default_cache_dir()`).
        device: where inputs go (default: the net's parameters' device, else CPU).

    Returns:
        The metrics, per-image correctness and the subset's indices.

    Raises:
        ValueError: a bad argument (one line naming it and what is allowed).
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64)
    _check_inputs(net, images, labels, subset_size, seed, precision, batch_size)
    for name in names:
        corruptions.check_name(name)
    for severity in severities:
        corruptions.check_severity(severity)
    height, width = transform(images[:1]).shape[-2:]  # the net's input
    side = min(height, width)
    for fraction in occlusion_fractions:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"invalid occlusion fraction={fraction!r} (allowed: 0 <= fraction <= 1)")
    if len(occlusion_fractions):
        _check_grid(occlusion_grid, side, "occlusion_grid")
    if shuffle_grid is not None:
        _check_grid(shuffle_grid, side, "shuffle_grid")
        if height % shuffle_grid or width % shuffle_grid:
            raise ValueError(f"invalid shuffle_grid={shuffle_grid} for a {height}x{width} input "
                             "(allowed: a divisor of both sides)")
    if device is None:
        first = next(net.parameters(), None) if isinstance(net, nn.Module) else None
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    dtype = PRECISIONS[precision]
    channels_last = isinstance(net, nn.Module) and prefers_channels_last(net)

    result = RobustnessResult(indices=stratified_subset(labels, subset_size, seed))
    subset, subset_labels = images[torch.from_numpy(result.indices)], labels[result.indices]  # (n, C, H, W), (n,)
    n = len(result.indices)

    def correct(batch: Tensor, perturb: Callable[[Tensor, slice], Tensor] | None = None) -> np.ndarray:
        return _correct(net, batch, subset_labels, transform, batch_size, dtype, device, channels_last, perturb)

    clean = correct(subset)
    result.record("corrupt/clean_acc1", clean)
    result.metrics["corrupt/n"] = float(n)

    official = [name for name in names if corruptions.has_official(official_dir, name)]
    result.metrics["corrupt/official"] = len(official) / len(names) if names else 0.0
    for name in names:
        if name in official:
            corrupted = {s: _official(official_dir, name, s, result.indices, subset_labels, subset)
                         for s in severities}
        elif dataset is not None:
            corrupted = corruptions.corrupted_set(subset, dataset, name, seed, result.indices, severities, cache_dir)
        else:
            corrupted = {s: corruptions.corrupt(subset, name, s, seed, result.indices) for s in severities}
        for severity in severities:
            result.record(f"corrupt/{name}/{severity}/acc1", correct(corrupted[severity]))
    cells = [result.metrics[f"corrupt/{name}/{s}/acc1"] for name in names for s in severities]
    if cells:
        result.metrics["corrupt/mean_acc1"] = float(np.mean(cells))

    if len(occlusion_fractions):
        result.metrics["occlusion/grid"] = float(occlusion_grid)
    for fraction in occlusion_fractions:
        masks = occlusion_masks(result.indices, fraction, occlusion_grid, seed)  # (n, g, g)
        if masks.any():
            hidden = correct(subset, lambda x, rows, m=masks: occlude(x, m[rows]))
        else:
            hidden = clean.copy()
        result.record(f"occlusion/{_pct(fraction)}/acc1", hidden)

    if shuffle_grid is not None:
        permutations = shuffle_permutations(result.indices, shuffle_grid, seed)  # (n, g^2)
        result.record("shuffle/acc1",
                      correct(subset, lambda x, rows: shuffle_patches(x, permutations[rows], shuffle_grid)))
        result.metrics["shuffle/grid"] = float(shuffle_grid)
    return result


# ------------------------------------------------------------------ calibration
def _as_numpy(logits: np.ndarray | Tensor, labels: np.ndarray | Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) float64 logits and (N,) int64 labels, checked."""
    z = np.asarray(logits.detach().float().cpu() if isinstance(logits, Tensor) else logits, dtype=np.float64)
    y = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64)
    if z.ndim != 2 or y.shape != (z.shape[0],) or z.shape[0] == 0:
        raise ValueError(f"invalid logits {z.shape} / labels {y.shape} (allowed: (N, K) and (N,), N >= 1)")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"invalid labels in [{y.min()}, {y.max()}] (allowed: 0..{z.shape[1] - 1})")
    return z, y


def nll(logits: np.ndarray | Tensor, labels: np.ndarray | Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature): (N, K), (N,) -> float."""
    z, y = _as_numpy(logits, labels)
    z = z / temperature
    return float(np.mean(special.logsumexp(z, axis=1) - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray | Tensor, labels: np.ndarray | Tensor) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) (temperature scaling).

    Bounded Brent minimisation over log T in [log 0.01, log 100]; the NLL
    is unimodal in log T. T = 1 is kept unless the fit lowers the NLL, so
    the result never increases the NLL on the data it was fitted on.

    Args:
        logits: (N, K) validation logits.
        labels: (N,) validation labels.

    Returns:
        T > 0 (logits / T are the calibrated logits).
    """
    z, y = _as_numpy(logits, labels)
    lo, hi = np.log(TEMPERATURE_BOUNDS)
    fit = optimize.minimize_scalar(lambda log_t: nll(z, y, float(np.exp(log_t))), bounds=(lo, hi),
                                   method="bounded", options={"xatol": 1e-7})
    t = float(np.exp(fit.x))
    return t if nll(z, y, t) < nll(z, y, 1.0) else 1.0


def _confidence(logits: np.ndarray | Tensor, labels: np.ndarray | Tensor,
                temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(N,) top-1 softmax probability and (N,) whether the top-1 class is right."""
    z, y = _as_numpy(logits, labels)
    probs = special.softmax(z / temperature, axis=1)  # (N, K)
    return probs.max(axis=1), probs.argmax(axis=1) == y


def expected_calibration_error(logits: np.ndarray | Tensor, labels: np.ndarray | Tensor,
                               temperature: float = 1.0, n_bins: int = ECE_BINS) -> float:
    """Top-1 ECE (L1) with `n_bins` equal-width bins, binned as torchmetrics' `CalibrationError`.

    Bin b holds confidences in [b / n_bins, (b + 1) / n_bins); as in
    torchmetrics, a confidence of exactly 1.0 gets a bin of its own.

    Args:
        logits: (N, K) logits.
        labels: (N,) labels.
        temperature: logits are divided by it first.
        n_bins: equal-width bins on [0, 1].

    Returns:
        sum over bins of |accuracy - mean confidence| * share of images.
    """
    conf, hit = _confidence(logits, labels, temperature)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    slot = np.searchsorted(edges, conf, side="right") - 1  # (N,) in 0..n_bins
    gap = np.bincount(slot, weights=hit - conf, minlength=n_bins + 1)  # per bin: sum of (correct - confidence)
    return float(np.abs(gap).sum() / len(conf))


def reliability_bins(logits: np.ndarray | Tensor, labels: np.ndarray | Tensor, temperature: float = 1.0,
                     n_bins: int = ECE_BINS) -> dict[str, list[float]]:
    """A reliability diagram's numbers: per equal-width confidence bin, its edges, mean confidence, accuracy, count.

    The last bin is closed ([1 - 1/n_bins, 1]); an empty bin has confidence
    and accuracy 0 and count 0.

    Returns:
        {"lower", "upper", "confidence", "accuracy", "count"}: lists of n_bins plain numbers.
    """
    conf, hit = _confidence(logits, labels, temperature)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    slot = np.minimum(np.searchsorted(edges, conf, side="right") - 1, n_bins - 1)  # (N,)
    count = np.bincount(slot, minlength=n_bins)
    safe = np.maximum(count, 1)
    return {"lower": edges[:-1].tolist(), "upper": edges[1:].tolist(),
            "confidence": (np.bincount(slot, weights=conf, minlength=n_bins) / safe).tolist(),
            "accuracy": (np.bincount(slot, weights=hit.astype(float), minlength=n_bins) / safe).tolist(),
            "count": [int(c) for c in count]}


@dataclass
class CalibrationResult:
    """What `calibrate` measured.

    Attributes:
        metrics: `calib/temperature`, `calib/val_nll`, `calib/val_nll_ts`,
            `test/ece`, `test/nll`, `test/ece_ts`, `test/nll_ts`.
        reliability: {"test": bins, "test_ts": bins}, see `reliability_bins`.
    """

    metrics: dict[str, float]
    reliability: dict[str, dict[str, list[float]]]


def calibrate(val_logits: np.ndarray | Tensor, val_labels: np.ndarray | Tensor, test_logits: np.ndarray | Tensor,
              test_labels: np.ndarray | Tensor, n_bins: int = ECE_BINS) -> CalibrationResult:
    """Temperature scaling fitted on validation logits; ECE and NLL of the test logits before and after.

    Args:
        val_logits: (N_val, K) logits of the validation split.
        val_labels: (N_val,) its labels.
        test_logits: (N_test, K) logits of the test split.
        test_labels: (N_test,) its labels.
        n_bins: ECE and reliability bins.

    Returns:
        The metrics and both reliability diagrams.
    """
    t = fit_temperature(val_logits, val_labels)
    metrics = {
        "calib/temperature": t,
        "calib/val_nll": nll(val_logits, val_labels),
        "calib/val_nll_ts": nll(val_logits, val_labels, t),
        "test/ece": expected_calibration_error(test_logits, test_labels, 1.0, n_bins),
        "test/nll": nll(test_logits, test_labels),
        "test/ece_ts": expected_calibration_error(test_logits, test_labels, t, n_bins),
        "test/nll_ts": nll(test_logits, test_labels, t),
    }
    reliability = {"test": reliability_bins(test_logits, test_labels, 1.0, n_bins),
                   "test_ts": reliability_bins(test_logits, test_labels, t, n_bins)}
    return CalibrationResult(metrics, reliability)
