"""FractalDB: formula-driven pretraining images, generated on the fly.

After Kataoka et al. 2020, "Pre-training without Natural Images". A category
is an iterated function system (IFS) of k affine maps, k uniform in {2..7};
map j sends (x, y) to (a x + b y + e, c x + d y + f), its six parameters
uniform in (-1, 1), and the chaos game picks it with probability
proportional to |det [[a, b], [c, d]]|. A candidate IFS is kept as a category
when its render fills at least ``fill_threshold`` of the canvas. Instance i of
category c perturbs one parameter of one map by a weight in [0.8, 1.2] and
flips the image (4 patterns); it is a pure function of (seed, c, i), so the
data needs no download, has any size and is the same in every process.

Choices beyond the paper:
- Each map is drawn uniform in (-1, 1)^6 conditioned on being a contraction
  (largest singular value < 1). Without this the attractor is unbounded and
  min/max normalisation turns most categories into a speckled blob around a
  few far outliers.
- The chaos game starts every walker at the fixed point of the most likely map,
  which lies on the attractor, so every recorded point is on it (no outliers
  from burn-in); ``MIXING_STEPS`` then ``RECORDED_STEPS``, walkers in parallel.
- Images are grey: intensity = hits per pixel, saturating at the mean hits of
  the lit pixels; the fill is the fraction of lit pixels.
- Points per image default to ``POINTS_PER_PIXEL`` per pixel. The paper's fill
  threshold is kept: it rejects the thin, line-like attractors, and enough
  candidates pass it that the search stays quick.

At the cpu profile's 32 px, rendering outpaces training, and renders are
memoised (``memo_bytes``), so after the first epoch an image costs a copy.
The measured figures (render and search rates per image size from
``benchmarks/fractaldb_render.py``, the share of contractive draws, the pass
rate of the fill threshold) are in benchmarks/RESULTS.md.

Usage:
    >>> ds = FractalDB(num_classes=100, instances_per_class=100, img_size=32)
    >>> image, label = ds[0]  # image: uint8 tensor (1, 32, 32), label: int
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from common.files import atomic_write

MAX_MAPS = 7  # k in {2..7}
MIN_MAPS = 2
DEFAULT_FILL_THRESHOLD = 0.2  # Kataoka et al. 2020
POINTS_PER_PIXEL = 4
MIXING_STEPS = 6  # chaos-game steps before recording
RECORDED_STEPS = 8
WEIGHT_RANGE = (0.8, 1.2)  # intra-category perturbation of one parameter
MAX_CANDIDATES_PER_CLASS = 1000
CACHE_VERSION = 1  # bump when the search or the render changes
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "vit-vs-cnn" / "fractaldb"

# Independent random streams: category search vs instance rendering.
_SEARCH_STREAM = 0
_INSTANCE_STREAM = 1


def default_num_points(img_size: int) -> int:
    """Chaos-game points per image: ``POINTS_PER_PIXEL`` per canvas pixel."""
    return POINTS_PER_PIXEL * img_size * img_size


def map_probabilities(params: np.ndarray) -> np.ndarray:
    """Chaos-game map probabilities, proportional to |det| of the linear part.

    Args:
        params: (k, >=6) maps, columns a, b, c, d, e, f (extra columns ignored).

    Returns:
        (k,) probabilities summing to 1 (rows of zeros get probability 0).
    """
    det = np.abs(params[:, 0] * params[:, 3] - params[:, 1] * params[:, 2])  # (k,)
    return det / det.sum()


def sample_ifs(rng: np.random.Generator) -> np.ndarray:
    """Draws one candidate category: k contractive affine maps.

    Args:
        rng: random source.

    Returns:
        (MAX_MAPS, 7) float64: rows 0..k-1 are maps (a, b, c, d, e, f, p), p the
        map probability; rows k.. are zero (probability 0, never used).
    """
    k = int(rng.integers(MIN_MAPS, MAX_MAPS + 1))
    maps = np.empty((0, 6))
    while len(maps) < k:
        draws = rng.uniform(-1.0, 1.0, (4 * k, 6))  # (4k, 6)
        maps = np.concatenate([maps, draws[_largest_singular_value(draws) < 1.0]])
    ifs = np.zeros((MAX_MAPS, 7))
    ifs[:k, :6] = maps[:k]
    ifs[:k, 6] = map_probabilities(maps[:k])
    return ifs


def _largest_singular_value(params: np.ndarray) -> np.ndarray:
    """(n, >=4) maps -> (n,) spectral norms of their 2x2 linear parts."""
    a, b, c, d = params[:, :4].T
    sq = a * a + b * b + c * c + d * d
    det = a * d - b * c
    return np.sqrt((sq + np.sqrt(np.maximum(sq * sq - 4 * det * det, 0.0))) / 2)


def sample_map_indices(probs: np.ndarray, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Draws map indices with the given probabilities (inverse CDF).

    The index is the count of CDF steps below a uniform draw: branch-free, ~4x
    faster than ``np.searchsorted`` on random keys.

    Args:
        probs: (m,) probabilities, zeros allowed (those maps are never drawn).
        shape: output shape.
        rng: random source.

    Returns:
        intp array of ``shape`` with values in [0, m).
    """
    last = np.flatnonzero(probs)[-1]
    steps = np.cumsum(probs)[:last].astype(np.float32)  # (last,): never past the last drawable map
    u = rng.random(shape, dtype=np.float32) * np.float32(probs.sum())
    idx = np.zeros(shape, np.uint8)
    for step in steps:
        idx += u >= step
    return idx.astype(np.intp)


def render_ifs(ifs: np.ndarray, img_size: int, num_points: int, rng: np.random.Generator) -> np.ndarray | None:
    """Renders an IFS attractor by the chaos game, stretched to the canvas.

    Args:
        ifs: (MAX_MAPS, 7) maps (a, b, c, d, e, f, p), as from ``sample_ifs``.
        img_size: canvas side H = W.
        num_points: points to plot (rounded up to a multiple of RECORDED_STEPS).
        rng: random source for the map sequence.

    Returns:
        (H, W) uint8 grey image, or None when the attractor is degenerate
        (divergent, non-finite, or flat along an axis).
    """
    a, b, c, d, e, f, p = ifs.T  # each (MAX_MAPS,)
    start = int(np.argmax(p))
    den = (1 - a[start]) * (1 - d[start]) - b[start] * c[start]
    if den == 0.0:  # eigenvalue 1: no unique fixed point
        return None
    x0 = ((1 - d[start]) * e[start] + b[start] * f[start]) / den
    y0 = (c[start] * e[start] + (1 - a[start]) * f[start]) / den
    # Complex form of a real-affine map: z -> alpha z + beta conj(z) + gamma.
    alpha = (((a + d) + 1j * (c - b)) / 2).astype(np.complex64)
    beta = (((a - d) + 1j * (c + b)) / 2).astype(np.complex64)
    gamma = (e + 1j * f).astype(np.complex64)
    walkers = -(-num_points // RECORDED_STEPS)
    idx = sample_map_indices(p, (MIXING_STEPS + RECORDED_STEPS, walkers), rng)  # (S, walkers), all steps
    alpha_s, beta_s, gamma_s = alpha[idx], beta[idx], gamma[idx]  # (S, walkers)
    z = np.full(walkers, x0 + 1j * y0, dtype=np.complex64)  # on the attractor
    points = np.empty((RECORDED_STEPS, walkers), dtype=np.complex64)
    with np.errstate(over="ignore", invalid="ignore"):
        for s in range(MIXING_STEPS + RECORDED_STEPS):
            z = alpha_s[s] * z + beta_s[s] * z.conj() + gamma_s[s]
            if s >= MIXING_STEPS:
                points[s - MIXING_STEPS] = z
    cols = _pixel_coords(points.real, img_size)  # (RECORDED_STEPS, walkers)
    rows = _pixel_coords(points.imag, img_size)  # (RECORDED_STEPS, walkers)
    if cols is None or rows is None:
        return None
    hits = np.bincount((rows * img_size + cols).ravel(), minlength=img_size * img_size)  # (H*W,)
    scale = 255.0 * np.count_nonzero(hits) / rows.size  # saturate at the mean hits of lit pixels
    return np.minimum(hits * scale, 255.0).astype(np.uint8).reshape(img_size, img_size)


def _pixel_coords(v: np.ndarray, img_size: int) -> np.ndarray | None:
    """Stretches coordinates v (any shape) to pixel indices in [0, img_size); None if non-finite or flat."""
    lo, hi = v.min(), v.max()
    if not (np.isfinite(lo) and np.isfinite(hi) and hi - lo > 1e-6 * (1.0 + abs(lo))):
        return None
    return ((v - lo) * ((img_size - 1) / (hi - lo)) + 0.5).astype(np.intp)


def fill_fraction(image: np.ndarray) -> float:
    """Fraction of lit (non-zero) pixels of an (H, W) image."""
    return float(np.count_nonzero(image)) / image.size


def search_categories(
    num_classes: int,
    seed: int = 0,
    img_size: int = 32,
    fill_threshold: float = DEFAULT_FILL_THRESHOLD,
    num_points: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> np.ndarray:
    """Finds ``num_classes`` IFS categories whose render fills the canvas enough.

    Candidate t is drawn from its own stream (seed, t), so the categories of a
    smaller ``num_classes`` are a prefix of those of a larger one. The result is
    cached in ``cache_dir`` as a .npz keyed by every argument, written
    atomically (temp file + os.replace), so concurrent searches are safe; a
    corrupt or mismatching cache file is regenerated with a warning.

    Args:
        num_classes: categories to find.
        seed: non-negative integer seed.
        img_size: canvas side the fill is measured on.
        fill_threshold: minimal fraction of lit pixels, in [0, 1].
        num_points: points per render; default ``default_num_points(img_size)``.
        cache_dir: cache folder; default ``~/.cache/vit-vs-cnn/fractaldb``.

    Returns:
        (num_classes, MAX_MAPS, 7) float64, see ``sample_ifs``.

    Raises:
        ValueError: when ``fill_threshold`` is outside [0, 1].
        RuntimeError: when fewer than one candidate in MAX_CANDIDATES_PER_CLASS
            passes (the threshold is too high).
    """
    if not 0.0 <= fill_threshold <= 1.0:
        raise ValueError(f"fill_threshold must be in [0, 1], got {fill_threshold}")
    num_points = num_points or default_num_points(img_size)
    path = Path(cache_dir or DEFAULT_CACHE_DIR) / (
        f"ifs_v{CACHE_VERSION}_n{num_classes}_seed{seed}_px{img_size}"
        f"_fill{fill_threshold!r}_pts{num_points}.npz"
    )
    if path.exists():
        cached = _load_cache(path, num_classes)
        if cached is not None:
            return cached
    categories = []
    for t in range(MAX_CANDIDATES_PER_CLASS * num_classes):
        rng = np.random.default_rng((_SEARCH_STREAM, seed, t))
        ifs = sample_ifs(rng)
        image = render_ifs(ifs, img_size, num_points, rng)
        if image is not None and fill_fraction(image) >= fill_threshold:
            categories.append(ifs)
            if len(categories) == num_classes:
                break
    else:
        raise RuntimeError(f"found {len(categories)}/{num_classes} categories filling >= {fill_threshold!r}")
    result = np.stack(categories)  # (num_classes, MAX_MAPS, 7)
    _save_cache(path, result)
    return result


def _load_cache(path: Path, num_classes: int) -> np.ndarray | None:
    """Reads cached categories; None (with a warning) when unreadable or wrong."""
    try:
        with np.load(path) as data:
            categories = data["categories"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        warnings.warn(f"unreadable FractalDB cache {path} ({err!r}); regenerating", stacklevel=3)
        return None
    if categories.shape != (num_classes, MAX_MAPS, 7) or not np.isfinite(categories).all():
        warnings.warn(f"FractalDB cache {path} has wrong content; regenerating", stacklevel=3)
        return None
    return categories


def _save_cache(path: Path, categories: np.ndarray) -> None:
    """Writes the cache atomically (common.files): readers see no file or the whole one."""
    atomic_write(path, lambda f: np.savez(f, categories=categories))


def render_instance(category: np.ndarray, seed: int, label: int, instance: int, img_size: int,
                    num_points: int) -> np.ndarray:
    """Renders instance ``instance`` of category ``label``: a pure function of its arguments.

    One parameter of one map is multiplied by a weight in WEIGHT_RANGE (map
    probabilities follow the new determinants), then the image is flipped
    horizontally and/or vertically. A perturbation that makes the attractor
    degenerate falls back to the unperturbed category.

    Args:
        category: (MAX_MAPS, 7) IFS of the category.
        seed: dataset seed.
        label: category index c.
        instance: instance index i.
        img_size: canvas side H = W.
        num_points: chaos-game points.

    Returns:
        (H, W) uint8 image.
    """
    rng = np.random.default_rng((_INSTANCE_STREAM, seed, label, instance))
    k = np.count_nonzero(category[:, 6])
    u_map, u_param, u_weight, u_hflip, u_vflip = rng.random(5)
    low, high = WEIGHT_RANGE
    perturbed = category.copy()
    perturbed[int(u_map * k), int(u_param * 6)] *= low + (high - low) * u_weight
    perturbed[:k, 6] = map_probabilities(perturbed[:k])
    hflip, vflip = u_hflip < 0.5, u_vflip < 0.5
    image = render_ifs(perturbed, img_size, num_points, rng)
    if image is None:
        image = render_ifs(category, img_size, num_points, rng)
    if hflip:
        image = image[:, ::-1]
    if vflip:
        image = image[::-1, :]
    return np.ascontiguousarray(image)


class FractalDB(Dataset):
    """FractalDB images rendered on the fly, memoised in memory when small.

    Index i is instance ``i % instances_per_class`` of class
    ``i // instances_per_class``. Images are plain uint8 tensors
    (in_chans, H, W) in [0, 255], which torchvision v2 transforms treat as
    images (e.g. ``v2.ToDtype(torch.float32, scale=True)`` maps them to [0, 1]).

    Attributes:
        categories: (num_classes, MAX_MAPS, 7) IFS parameters.
        targets: (num_classes * instances_per_class,) list of int labels.
        classes: class names "fractal_00000", ...
    """

    def __init__(
        self,
        num_classes: int,
        instances_per_class: int,
        img_size: int = 32,
        in_chans: int = 1,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        transform: Callable[[torch.Tensor], Any] | None = None,
        fill_threshold: float = DEFAULT_FILL_THRESHOLD,
        num_points: int | None = None,
        memo_bytes: int = 256 * 2**20,
    ) -> None:
        """Builds (or loads from the cache) the categories; renders nothing yet.

        Args:
            num_classes: number of categories.
            instances_per_class: images per category.
            img_size: image side H = W.
            in_chans: output channels (the grey image is replicated).
            seed: non-negative integer seed of categories and instances.
            cache_dir: category cache folder, see ``search_categories``.
            transform: applied to the (in_chans, H, W) uint8 tensor.
            fill_threshold: category search threshold, see ``search_categories``.
            num_points: chaos-game points per image; default 4 per pixel.
            memo_bytes: keep rendered images in memory when all of them fit in
                this many bytes (0: never).
        """
        self.num_classes = num_classes
        self.instances_per_class = instances_per_class
        self.img_size = img_size
        self.in_chans = in_chans
        self.seed = seed
        self.transform = transform
        self.num_points = num_points or default_num_points(img_size)
        self.categories = search_categories(num_classes, seed, img_size, fill_threshold, self.num_points, cache_dir)
        self.targets = [c for c in range(num_classes) for _ in range(instances_per_class)]
        self.classes = [f"fractal_{c:05d}" for c in range(num_classes)]
        self._memoise = len(self) * img_size * img_size <= memo_bytes
        # Allocated on first use, so a fresh dataset pickles small (spawned workers).
        self._memo: np.ndarray | None = None  # (N, H, W) uint8
        self._rendered: np.ndarray | None = None  # (N,) bool

    def __len__(self) -> int:
        return self.num_classes * self.instances_per_class

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """Returns (image, label): image a uint8 tensor (in_chans, H, W) in [0, 255]."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        label, instance = divmod(index, self.instances_per_class)
        if self._memoise and self._memo is None:
            self._memo = np.zeros((len(self), self.img_size, self.img_size), np.uint8)
            self._rendered = np.zeros(len(self), bool)
        if self._memo is not None and self._rendered[index]:
            image = self._memo[index]
        else:
            image = render_instance(self.categories[label], self.seed, label, instance, self.img_size,
                                    self.num_points)
            if self._memo is not None:
                self._memo[index] = image
                self._rendered[index] = True
        tensor = torch.from_numpy(image).expand(self.in_chans, -1, -1).clone()  # (C, H, W), not the memo's memory
        if self.transform is not None:
            tensor = self.transform(tensor)
        return tensor, label
