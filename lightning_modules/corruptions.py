"""The 15 common corruptions of ImageNet-C at CIFAR-10-C strengths, deterministic and grayscale-aware.

Hendrycks & Dietterich (ICLR 2019) corrupt each test image with 15
corruptions in four families (noise, blur, weather, digital) at 5
severities. ImageNet's strengths wipe out a 32 px image, so the parameter
tables here are those of their `make_cifar_c.py` (CIFAR-10-C). The code is
our own, on numpy, scipy.ndimage, OpenCV and PIL; the
`imagecorruptions` package is not used (it fails on NumPy 2 and current
scikit-image, rejects images under 32 px and uses ImageNet's strengths).

Where we depart from the original:

- Spatial parameters (blur radii and sigmas, zoom of the snow layer,
  displacements) are defined at 32 px and scale linearly with side / 32
  (the shorter side), so a 224 px image gets the same corruption relative
  to its size (any side >= 8). At 32 px the tables are used as printed.
- ImageMagick's motion blur is rebuilt as its kernel: a one-sided line of
  2 ceil(radius) + 1 taps with Gaussian weights exp(-i^2 / 2 sigma^2).
- Frost blends photographs of frost in the original; we do not ship them,
  so frost here blends a **procedural** frost texture (ice needles with side
  branches over a plasma haze, generated from the image's seed). Its
  strengths follow the table, its look only approximates the photographs.
- Zoom blur and the snow layer's zoom are exact zooms about the centre (the
  original's crop-and-resize rounds them to whole pixels, so at 32 px its
  zooms below 1.04 change nothing).
- Results are rounded to the nearest uint8 (the original truncated).

Determinism: `corrupt(images, name, severity, seed, indices)` is a pure
function. Image i draws from its own generator, seeded by (seed, name,
indices[i]), so a subset (with its indices) gives exactly the full set's
rows, and severities of one image share their random draws (only the
strength changes between severities).

Grey images (C = 1) stay grey and colour images (C = 3) stay colour: every
corruption acts on the intensity of a grey image (brightness adds to it,
snow and frost are grey, JPEG encodes one channel).

Caching (`corrupted_set`, one `.npz` per corruption of a set of images)
and the official CIFAR-10-C / CIFAR-100-C files
(`load_official`) are at the end of the file.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
import zipfile
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from common.files import atomic_write, file_lock

SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
MIN_SIDE = 8
REFERENCE_SIDE = 32  # the side the CIFAR-10-C tables are defined at
# Bump when any corruption's pixels change: it is part of every cache key.
CODE_VERSION = 1

CORRUPTIONS: dict[str, tuple[str, ...]] = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
CORRUPTION_NAMES: tuple[str, ...] = tuple(name for names in CORRUPTIONS.values() for name in names)
# Corruptions that draw random numbers (the others depend on the image alone).
RANDOM_CORRUPTIONS: frozenset[str] = frozenset(
    {"gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "motion_blur", "snow", "frost", "fog",
     "elastic_transform"})

# Severity 1..5 parameters, from make_cifar_c.py.
PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    "zoom_blur": tuple(np.arange(1, stop, 0.01) for stop in (1.06, 1.11, 1.16, 1.21, 1.26)),
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
             (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "elastic_transform": tuple((32 * a, 32 * s, 32 * f) for a, s, f in
                               ((0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05),
                                (0.1, 0.03, 0.03))),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
    "jpeg_compression": (80, 65, 58, 50, 40),
}

GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as cv2.COLOR_RGB2GRAY
FROST_TINT = np.array([0.86, 0.93, 1.0], dtype=np.float32)  # icy blue (colour images only)

Batch = np.ndarray  # (N, H, W, C) float32 in [0, 1]
Rngs = list[np.random.Generator]


# ------------------------------------------------------------------ helpers
def image_rngs(name: str, seed: int, indices: Sequence[int]) -> Rngs:
    """One generator per image, seeded by (seed, the corruption's name, the image's index)."""
    stream = zlib.crc32(name.encode())
    return [np.random.default_rng([seed, stream, int(i)]) for i in indices]


def _each(x: Batch, rngs: Rngs, fn: Callable[[np.ndarray, np.random.Generator], np.ndarray]) -> Batch:
    """Applies `fn(image (H, W, C), rng) -> (H, W, C)` to every image with its own generator."""
    return np.stack([fn(image, rng) for image, rng in zip(x, rngs)])  # (N, H, W, C)


def _filter(image: np.ndarray, kernel: np.ndarray, border: int) -> np.ndarray:
    """cv2.filter2D (a correlation) of an (H, W, C) image, keeping the channel axis."""
    out = cv2.filter2D(np.ascontiguousarray(image, dtype=np.float32), -1, kernel.astype(np.float32),
                       borderType=border)
    return out.reshape(image.shape)  # cv2 drops a single channel axis


def _zoom_centre(image: np.ndarray, factor: float) -> np.ndarray:
    """Zooms an (H, W, C) image by `factor` >= 1 about its centre (bilinear), keeping its size."""
    h, w, c = image.shape
    cx, cy = (w - 1) / 2, (h - 1) / 2
    to_source = np.float32([[1 / factor, 0, cx - cx / factor], [0, 1 / factor, cy - cy / factor]])
    out = cv2.warpAffine(np.ascontiguousarray(image, dtype=np.float32), to_source, (w, h),
                         flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_REPLICATE)
    return out.reshape(h, w, c)


def motion_kernel(radius: float, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's motion-blur kernel as a 2-D correlation kernel.

    Tap i = 0 .. 2 ceil(radius) sits at (i sin a, i cos a) pixels (rounded
    half up) from the output pixel and weighs exp(-i^2 / 2 sigma^2),
    normalised: a one-sided, Gaussian-weighted line.

    Args:
        radius: length parameter in pixels (> 0).
        sigma: Gaussian fall-off along the line, in pixels (> 0).
        angle: direction in degrees (0 = along +x, 90 = along +y, rows down).

    Returns:
        (K, K) float32 kernel summing to 1, K = 2 * (2 ceil(radius)) + 1.
    """
    taps = 2 * int(np.ceil(radius)) + 1
    i = np.arange(taps)
    weights = np.exp(-(i ** 2) / (2 * sigma ** 2))
    a = np.deg2rad(angle)
    dx = np.ceil(i * np.cos(a) - 0.5).astype(int)
    dy = np.ceil(i * np.sin(a) - 0.5).astype(int)
    kernel = np.zeros((2 * taps - 1, 2 * taps - 1), dtype=np.float64)
    np.add.at(kernel, (taps - 1 + dy, taps - 1 + dx), weights)
    return (kernel / kernel.sum()).astype(np.float32)


def _motion_blur_image(image: np.ndarray, radius: float, sigma: float, angle: float) -> np.ndarray:
    """Motion-blurs one (H, W, C) image, edges replicated as ImageMagick's default virtual pixels."""
    return _filter(image, motion_kernel(radius, sigma, angle), cv2.BORDER_REPLICATE)


def plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """A periodic diamond-square height map, normalised to [0, 1].

    The random offset at each level is wibble * U(-wibble, wibble) with
    wibble = 100 at the top, divided by `decay` per level, as in
    make_cifar_c.py.

    Args:
        size: side, a power of two.
        decay: wibble decay per level (larger: smoother).
        rng: the generator.

    Returns:
        (size, size) float64 in [0, 1].
    """
    grid = np.zeros((size, size))
    step, wibble = size, 100.0

    def jitter(mean: np.ndarray) -> np.ndarray:
        return mean + wibble * rng.uniform(-wibble, wibble, mean.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0::step, 0::step]  # (m, m)
        around = corners + np.roll(corners, -1, axis=0)
        around = around + np.roll(around, -1, axis=1)
        grid[half::step, half::step] = jitter(around / 4)  # square step: cell centres
        centres = grid[half::step, half::step]  # (m, m)
        # diamond step: each edge midpoint from its two corners and the two centres beside it
        across = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        grid[0::step, half::step] = jitter(across / 4)
        down = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        grid[half::step, 0::step] = jitter(down / 4)
        step, wibble = half, wibble / decay
    grid -= grid.min()
    return grid / grid.max()


def _plasma(h: int, w: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """A plasma fractal covering an (H, W) image: made at the next power of two >= max(H, W), resized, cropped."""
    side = max(h, w)
    size = 1 << max(1, (side - 1).bit_length())
    plasma = plasma_fractal(size, decay, rng).astype(np.float32)  # (size, size)
    if size != side:
        plasma = cv2.resize(plasma, (side, side), interpolation=cv2.INTER_AREA)  # (side, side)
    return plasma[:h, :w]


def frost_texture(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A procedural frost texture: ice needles with side branches over a bright plasma haze.

    Stands in for the frost photographs of the original (not shipped). At 32
    px: 40 needles of 3-10 px, each with 2-4 branches at +-60 degrees, over
    a haze between 0.35 and 0.75; lengths and line width scale with side / 32.

    Args:
        h, w: image size in pixels.
        rng: the generator (the texture is a pure function of its state).

    Returns:
        (H, W) float32 in [0, 1], mostly bright (the haze alone is 0.35-0.75).
    """
    s = min(h, w) / REFERENCE_SIDE
    n, most = 40, 4  # needles, most branches per needle
    starts = rng.uniform(0, 1, size=(n, 1, 2)) * [w, h]  # (n, 1, 2) x, y
    angles = rng.uniform(0, 2 * np.pi, size=(n, 1))
    lengths = rng.uniform(3, 10, size=(n, 1)) * s
    values = rng.uniform(100, 255, size=n)
    branches = rng.integers(2, most + 1, size=n)
    at = rng.uniform(0.2, 0.9, size=(n, most))  # where along the needle each branch starts
    turns = angles + (rng.integers(0, 2, size=(n, most)) * 2 - 1) * np.pi / 3  # (n, most) +-60 degrees
    reach = 0.4 * lengths * rng.uniform(0.5, 1.0, size=(n, most))  # (n, most)

    def along(angle: np.ndarray) -> np.ndarray:
        return np.stack([np.cos(angle), np.sin(angle)], axis=-1)  # (..., 2)

    tips = starts[:, 0] + lengths * along(angles[:, 0])  # (n, 2)
    roots = starts + (at * lengths)[..., None] * along(angles)  # (n, most, 2)
    ends = roots + reach[..., None] * along(turns)  # (n, most, 2)
    shift = 4  # cv2 sub-pixel bits: coordinates in 1/16 px
    fixed = lambda p: np.rint(p * (1 << shift)).astype(np.int32)  # noqa: E731
    needles_px, roots_px, ends_px, tips_px = fixed(starts[:, 0]), fixed(roots), fixed(ends), fixed(tips)
    canvas = np.zeros((h, w), dtype=np.uint8)
    thickness = max(1, int(round(s)))
    for j in range(n):
        cv2.line(canvas, tuple(needles_px[j].tolist()), tuple(tips_px[j].tolist()), float(values[j]), thickness,
                 cv2.LINE_AA, shift)
        for b in range(branches[j]):
            cv2.line(canvas, tuple(roots_px[j, b].tolist()), tuple(ends_px[j, b].tolist()), 0.8 * float(values[j]),
                     thickness, cv2.LINE_AA, shift)
    needles = ndimage.gaussian_filter(canvas.astype(np.float32) / 255, 0.5 * s, mode="nearest")  # (H, W)
    haze = _plasma(h, w, 1.6, rng)  # (H, W)
    return np.clip(0.35 + 0.4 * haze + 0.6 * needles, 0, 1).astype(np.float32)


def _grey(x: np.ndarray) -> np.ndarray:
    """Intensity of (..., C) images, keeping a channel axis: (..., 1)."""
    return x if x.shape[-1] == 1 else (x @ GREY_WEIGHTS)[..., None]


# ------------------------------------------------------------------ noise
def gaussian_noise(x: Batch, sigma: float, rngs: Rngs, scale: float) -> Batch:
    """Additive Gaussian noise of standard deviation `sigma` on [0, 1]."""
    return _each(x, rngs, lambda im, rng: im + rng.normal(0.0, sigma, im.shape))


def shot_noise(x: Batch, photons: float, rngs: Rngs, scale: float) -> Batch:
    """Poisson (shot) noise: x <- Poisson(x * photons) / photons."""
    return _each(x, rngs, lambda im, rng: rng.poisson(im * photons) / photons)


def impulse_noise(x: Batch, amount: float, rngs: Rngs, scale: float) -> Batch:
    """Salt and pepper: each value is replaced, with probability `amount`, by 0 or 1 (half each).

    As scikit-image's `random_noise(mode="s&p")`, per channel value.
    """
    def salt_pepper(im: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        hit = rng.random(im.shape) < amount
        salt = rng.random(im.shape) < 0.5
        return np.where(hit, salt.astype(np.float32), im)

    return _each(x, rngs, salt_pepper)


# ------------------------------------------------------------------ blur
def disk_kernel(radius: float, alias_blur: float, window: int) -> np.ndarray:
    """A disk of `radius` pixels, normalised, anti-aliased by a Gaussian (sigma `alias_blur`, `window` taps)."""
    half = max(8, int(np.ceil(radius)) + window)
    r = np.arange(-half, half + 1)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2).astype(np.float32)
    disk /= disk.sum()
    return cv2.GaussianBlur(disk, (window, window), alias_blur)


def defocus_blur(x: Batch, params: tuple[float, float], rngs: Rngs | None, scale: float) -> Batch:
    """Convolution with an anti-aliased disk (radius, alias sigma), per channel."""
    radius, alias = params
    window = 2 * max(1, int(round(scale))) + 1  # the original's 3 x 3 anti-aliasing window, scaled
    kernel = disk_kernel(radius * scale, alias * scale, window)
    return np.stack([_filter(im, kernel, cv2.BORDER_REFLECT_101) for im in x])  # (N, H, W, C)


def glass_blur(x: Batch, params: tuple[float, int, int], rngs: Rngs, scale: float) -> Batch:
    """Gaussian blur, then local pixel swaps, then the blur again.

    The swaps walk the image from the bottom-right corner, `iterations`
    times, swapping each pixel with one offset by (dy, dx), each drawn from
    {-d, ..., d - 1} (the original's `randint(-d, d)`), d = max_delta.
    """
    sigma, max_delta, iterations = params
    sigma, delta = sigma * scale, max(1, int(round(max_delta * scale)))
    n, h, w, _ = x.shape
    spatial = (0, sigma, sigma, 0)
    out = ndimage.gaussian_filter(x, spatial, mode="nearest")  # (N, H, W, C)
    rows, cols = np.arange(h - delta, delta, -1), np.arange(w - delta, delta, -1)
    offsets = np.stack([rng.integers(-delta, delta, size=(iterations, len(rows), len(cols), 2))
                        for rng in rngs])  # (N, iterations, rows, cols, 2)
    batch = np.arange(n)
    for it in range(iterations):
        for a, row in enumerate(rows):
            for b, col in enumerate(cols):
                dy, dx = offsets[:, it, a, b, 0], offsets[:, it, a, b, 1]  # (N,), (N,)
                here = out[:, row, col].copy()  # (N, C)
                out[:, row, col] = out[batch, row + dy, col + dx]
                out[batch, row + dy, col + dx] = here
    return ndimage.gaussian_filter(out, spatial, mode="nearest")  # (N, H, W, C)


def motion_blur(x: Batch, params: tuple[float, float], rngs: Rngs, scale: float) -> Batch:
    """ImageMagick-style motion blur (radius, sigma) at an angle drawn uniformly in (-45, 45) degrees."""
    radius, sigma = params
    return _each(x, rngs, lambda im, rng: _motion_blur_image(im, radius * scale, sigma * scale,
                                                             rng.uniform(-45, 45)))


def zoom_blur(x: Batch, factors: np.ndarray, rngs: Rngs | None, scale: float) -> Batch:
    """The mean of the image and its zooms about the centre by each of `factors`."""
    def blurred(im: np.ndarray) -> np.ndarray:
        return (im + sum(_zoom_centre(im, float(f)) for f in factors)) / (len(factors) + 1)

    return np.stack([blurred(im) for im in x])  # (N, H, W, C)


# ------------------------------------------------------------------ weather
def snow(x: Batch, params: tuple, rngs: Rngs, scale: float) -> Batch:
    """Snowflakes: thresholded Gaussian noise, zoomed, motion-blurred downwards, added twice (rotated 180 degrees).

    The image is first whitened towards max(x, 1.5 grey + 0.5) with weight 1 - blend.
    """
    loc, spread, zoom, threshold, radius, sigma, blend = params

    def flakes(im: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w, _ = im.shape
        layer = rng.normal(loc, spread, size=(h, w, 1)).astype(np.float32)
        layer = _zoom_centre(layer, max(1.0, zoom * scale))  # (H, W, 1)
        layer[layer < threshold] = 0
        layer = _motion_blur_image(np.clip(layer, 0, 1), radius * scale, sigma * scale, rng.uniform(-135, -45))
        whitened = blend * im + (1 - blend) * np.maximum(im, _grey(im) * 1.5 + 0.5)  # (H, W, C)
        return whitened + layer + layer[::-1, ::-1]

    return _each(x, rngs, flakes)


def frost(x: Batch, params: tuple[float, float], rngs: Rngs, scale: float) -> Batch:
    """image_weight * x + frost_weight * a procedural frost texture (see `frost_texture`; grey on grey images)."""
    image_weight, frost_weight = params

    def blend(im: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        texture = frost_texture(im.shape[0], im.shape[1], rng)[..., None]  # (H, W, 1)
        if im.shape[-1] == 3:
            texture = texture * FROST_TINT  # (H, W, 3)
        return image_weight * im + frost_weight * texture

    return _each(x, rngs, blend)


def fog(x: Batch, params: tuple[float, float], rngs: Rngs, scale: float) -> Batch:
    """Adds strength * a plasma fractal, then rescales by max / (max + strength)."""
    strength, decay = params

    def fogged(im: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        peak = im.max()
        im = im + strength * _plasma(im.shape[0], im.shape[1], decay, rng)[..., None]  # (H, W, C)
        return im * peak / (peak + strength)

    return _each(x, rngs, fogged)


def brightness(x: Batch, shift: float, rngs: Rngs | None, scale: float) -> Batch:
    """Adds `shift` to the HSV value V = max(R, G, B), clipped to 1; on grey images, to the intensity.

    Hue and saturation unchanged means RGB scales by V' / V, which is what
    is computed (a black pixel becomes grey V' = shift, as in HSV).
    """
    value = x.max(axis=-1, keepdims=True)  # (N, H, W, 1)
    lifted = np.minimum(value + shift, 1.0)  # (N, H, W, 1)
    ratio = np.divide(lifted, value, out=np.zeros_like(value), where=value > 0)
    return np.where(value > 0, x * ratio, lifted)  # (N, H, W, C)


# ------------------------------------------------------------------ digital
def contrast(x: Batch, factor: float, rngs: Rngs | None, scale: float) -> Batch:
    """Scales each image's deviation from its per-channel mean by `factor`."""
    mean = x.mean(axis=(1, 2), keepdims=True)  # (N, 1, 1, C)
    return (x - mean) * factor + mean


def elastic_warp(h: int, w: int, params: tuple[float, float, float], rng: np.random.Generator,
                 scale: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two parts of `elastic_transform`'s warp for one (H, W) image.

    Args:
        h, w: image size.
        params: (alpha, sigma, affine) at 32 px, from `PARAMS`.
        rng: the image's generator.
        scale: side / 32.

    Returns:
        ((2, 3) affine matrix for cv2.warpAffine, (H, W) row displacement,
        (H, W) column displacement), displacements in pixels.
    """
    alpha, sigma, affine = params
    # Smoothing white noise with a sigma s times wider shrinks it s times: alpha * s^2 displaces s times further.
    alpha, sigma, affine = alpha * scale ** 2, sigma * scale, affine * scale
    centre, half = np.float32([w // 2, h // 2]), min(h, w) // 3
    src = np.float32([centre + half, [centre[0] + half, centre[1] - half], centre - half])  # (3, 2) x, y
    dst = src + rng.uniform(-affine, affine, size=src.shape).astype(np.float32)  # (3, 2)
    dx, dy = (ndimage.gaussian_filter(rng.uniform(-1, 1, size=(h, w)), sigma, mode="reflect", truncate=3) * alpha
              for _ in range(2))  # (H, W) each
    return cv2.getAffineTransform(src, dst), dy, dx


def elastic_transform(x: Batch, params: tuple[float, float, float], rngs: Rngs, scale: float) -> Batch:
    """A random affine warp, then a smooth random displacement field, bilinear, edges reflected.

    The affine moves three points at +-side/3 from the centre by up to
    `affine` pixels; the field is alpha * (U(-1, 1) noise smoothed by a
    Gaussian of `sigma`), see `elastic_warp`. CIFAR-10-C's table shrinks the
    affine part with severity while it grows the local field, so severity 1
    moves pixels further than severity 5 (it distorts less locally).
    """
    def warp(im: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w, c = im.shape
        matrix, dy, dx = elastic_warp(h, w, params, rng, scale)
        im = cv2.warpAffine(im, matrix, (w, h), borderMode=cv2.BORDER_REFLECT_101).reshape(h, w, c)
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        coords = np.stack([rows + dy, cols + dx])  # (2, H, W)
        return np.stack([ndimage.map_coordinates(im[..., k], coords, order=1, mode="reflect")
                         for k in range(c)], axis=-1)  # (H, W, C)

    return _each(x, rngs, warp)


def _to_pil(im: np.ndarray) -> Image.Image:
    """(H, W, C) float in [0, 1] (from uint8) -> a PIL image, "L" or "RGB"."""
    pixels = np.rint(np.clip(im, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels, mode="L" if im.shape[-1] == 1
                           else "RGB")


def _from_pil(image: Image.Image, channels: int) -> np.ndarray:
    """A PIL image -> (H, W, C) float32 in [0, 1]."""
    return (np.asarray(image, dtype=np.float32) / 255).reshape(image.height, image.width, channels)


def pixelate(x: Batch, factor: float, rngs: Rngs | None, scale: float) -> Batch:
    """Box-downsamples to int(side * factor), then box-upsamples back (PIL)."""
    def blocky(im: np.ndarray) -> np.ndarray:
        h, w, c = im.shape
        small = _to_pil(im).resize((int(w * factor), int(h * factor)), Image.Resampling.BOX)
        return _from_pil(small.resize((w, h), Image.Resampling.BOX), c)

    return np.stack([blocky(im) for im in x])  # (N, H, W, C)


def jpeg_compression(x: Batch, quality: int, rngs: Rngs | None, scale: float) -> Batch:
    """A JPEG round trip at `quality` (PIL; grey images are encoded as one channel)."""
    def round_trip(im: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        _to_pil(im).save(buffer, format="JPEG", quality=int(quality))
        with Image.open(buffer) as decoded:
            return _from_pil(decoded, im.shape[-1])

    return np.stack([round_trip(im) for im in x])  # (N, H, W, C)


# Every corruption: (images, its severity's parameters from PARAMS, per-image generators or None, side / 32).
_APPLY: dict[str, Callable[[Batch, object, Rngs | None, float], Batch]] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur, "glass_blur": glass_blur, "motion_blur": motion_blur, "zoom_blur": zoom_blur,
    "snow": snow, "frost": frost, "fog": fog, "brightness": brightness,
    "contrast": contrast, "elastic_transform": elastic_transform, "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
}


# ------------------------------------------------------------------ entry point
def check_name(name: str) -> None:
    """Raises ValueError unless `name` is one of the 15 corruptions."""
    if name not in _APPLY:
        raise ValueError(f"invalid corruption={name!r} (allowed: {' | '.join(CORRUPTION_NAMES)})")


def check_severity(severity: int) -> None:
    """Raises ValueError unless `severity` is an int in 1..5."""
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or severity not in SEVERITIES:
        raise ValueError(f"invalid severity={severity!r} (allowed: 1 | 2 | 3 | 4 | 5)")


def check_images(images: torch.Tensor) -> None:
    """Raises ValueError unless `images` is a uint8 (N, C, H, W) tensor with C in {1, 3} and sides >= 8."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        what = (f"{type(images).__name__} {getattr(images, 'dtype', '')} of {getattr(images, 'ndim', '?')} dims"
                if isinstance(images, torch.Tensor) else type(images).__name__)
        raise ValueError(f"invalid images={what} (allowed: a uint8 tensor (N, C, H, W))")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"invalid images channels={images.shape[1]} (allowed: 1 | 3)")
    if min(images.shape[2:]) < MIN_SIDE:
        raise ValueError(f"invalid image size={tuple(images.shape[2:])} (allowed: sides >= {MIN_SIDE})")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"invalid seed={seed!r} (allowed: an int >= 0)")


def _check_indices(indices: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray:
    """The images' dataset indices: `indices` as int64, or 0..n-1 when None."""
    if indices is None:
        return np.arange(n, dtype=np.int64)
    out = np.asarray(indices, dtype=np.int64)
    if out.shape != (n,) or (n and out.min() < 0):
        raise ValueError(f"invalid indices of shape {out.shape} (allowed: {n} non-negative ints, one per image)")
    return out


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0,
            indices: Sequence[int] | np.ndarray | None = None) -> torch.Tensor:
    """Applies one corruption at one severity (CIFAR-10-C strengths) to a batch.

    Args:
        images: (N, C, H, W) uint8, C = 1 (grey) or 3 (RGB), H, W >= 8.
        name: one of `CORRUPTION_NAMES`.
        severity: 1..5.
        seed: non-negative int; with `indices`, it fixes every random draw.
        indices: (N,) the images' indices in their dataset (default 0..N-1);
            image i's draws depend on (seed, name, indices[i]) only.

    Returns:
        (N, C, H, W) uint8, the corrupted images.

    Raises:
        ValueError: an unknown corruption, a severity outside 1..5, images
            that are not uint8 (N, C, H, W) with C in {1, 3} and sides >= 8,
            a negative seed, or indices of the wrong length.
    """
    check_name(name)
    check_severity(severity)
    check_images(images)
    _check_seed(seed)
    index = _check_indices(indices, images.shape[0])
    if images.shape[0] == 0:
        return images.clone()
    x = images.cpu().permute(0, 2, 3, 1).numpy().astype(np.float32) / 255  # (N, H, W, C)
    rngs = image_rngs(name, int(seed), index) if name in RANDOM_CORRUPTIONS else None
    scale = min(images.shape[2:]) / REFERENCE_SIDE
    out = _APPLY[name](x, PARAMS[name][severity - 1], rngs, scale)  # (N, H, W, C)
    pixels = np.rint(np.clip(out, 0, 1) * 255).astype(np.uint8)  # (N, H, W, C)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))  # (N, C, H, W)


# ------------------------------------------------------------------ cache
def default_cache_dir() -> Path:
    """`$VIT_VS_CNN_CACHE/corruptions`, or `~/.cache/vit-vs-cnn/corruptions`."""
    root = os.environ.get("VIT_VS_CNN_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "vit-vs-cnn") / "corruptions"


def indices_hash(indices: np.ndarray) -> str:
    """First 16 hex digits of the SHA-256 of the int64 indices, in their order."""
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def _digest(images: torch.Tensor) -> str:
    """SHA-256 of the clean pixels and their shape (a cache built from other pixels is stale)."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_path(dataset: str, images: torch.Tensor, indices: np.ndarray, seed: int, name: str,
               cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `corrupted_set` keeps one corruption of this set of images.

    `<cache_dir>/<dataset>_<side>px_c<C>_<indices hash>_seed<seed>_v<CODE_VERSION>/<name>.npz`
    (`<H>x<W>px` for non-square images): one folder per corrupted set, one
    file per corruption.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    h, w = images.shape[-2:]
    size = f"{h}px" if h == w else f"{h}x{w}px"
    key = f"{dataset}_{size}_c{images.shape[1]}_{indices_hash(indices)}_seed{seed}_v{CODE_VERSION}"
    return folder / key / f"{name}.npz"


def _read_cache(path: Path, digest: str, severities: Sequence[int],
                shape: tuple[int, ...]) -> dict[int, np.ndarray] | None:
    """The cached severities of one corruption, or None (with a warning) when unreadable or made from other pixels."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["digest"]) != digest:
                warnings.warn(f"corruption cache {path} was made from other images; regenerating", stacklevel=3)
                return None
            cached = {s: data[f"s{s}"] for s in severities if f"s{s}" in data.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        warnings.warn(f"unreadable corruption cache {path} ({err!r}); regenerating", stacklevel=3)
        return None
    if any(v.shape != shape or v.dtype != np.uint8 for v in cached.values()):
        warnings.warn(f"corruption cache {path} has arrays of the wrong shape; regenerating", stacklevel=3)
        return None
    return cached


def corrupted_set(images: torch.Tensor, dataset: str, name: str, seed: int = 0,
                  indices: Sequence[int] | np.ndarray | None = None, severities: Sequence[int] = SEVERITIES,
                  cache_dir: str | os.PathLike | None = None) -> dict[int, torch.Tensor]:
    """One corruption of a set of images at the requested severities, from the cache or generated and cached.

    The file (see `cache_path`) holds arrays `s<severity>` (N, H, W, C)
    uint8 and the clean pixels' digest. Missing severities are generated and
    the file rewritten atomically (`common.files.atomic_write`) under a lock,
    so concurrent runs share the work; a file that cannot be read, or was
    made from other pixels, is regenerated with a warning.

    Args:
        images: (N, C, H, W) uint8 clean images.
        dataset: the dataset's name (part of the cache key).
        name: the corruption.
        seed: the corruption seed.
        indices: (N,) the images' dataset indices (default 0..N-1).
        severities: severities wanted.
        cache_dir: the cache folder (default `default_cache_dir()`).

    Returns:
        {severity: (N, C, H, W) uint8}.

    Raises:
        ValueError: as `corrupt`.
    """
    check_name(name)
    for severity in severities:
        check_severity(severity)
    check_images(images)
    _check_seed(seed)
    index = _check_indices(indices, images.shape[0])
    path = cache_path(dataset, images, index, int(seed), name, cache_dir)
    shape = tuple(images.permute(0, 2, 3, 1).shape)
    digest = _digest(images)
    with file_lock(path.with_name(path.name + ".lock")):
        stored = (_read_cache(path, digest, SEVERITIES, shape) if path.is_file() else None) or {}
        missing = [int(s) for s in severities if int(s) not in stored]
        for s in missing:
            stored[s] = corrupt(images, name, s, seed, index).permute(0, 2, 3, 1).numpy()  # (N, H, W, C)
        if missing:
            arrays = {f"s{s}": v for s, v in sorted(stored.items())} | {"digest": np.array(digest)}
            atomic_write(path, lambda fh: np.savez(fh, **arrays))
    return {int(s): torch.from_numpy(np.ascontiguousarray(stored[int(s)].transpose(0, 3, 1, 2)))
            for s in severities}


# ------------------------------------------------------------------ official CIFAR-10-C / CIFAR-100-C
def has_official(folder: str | os.PathLike | None, name: str) -> bool:
    """Whether `folder` holds `<name>.npy` and `labels.npy` (the CIFAR-10-C / CIFAR-100-C layout)."""
    return folder is not None and (Path(folder) / f"{name}.npy").is_file() and (Path(folder) / "labels.npy").is_file()


def load_official(folder: str | os.PathLike, name: str, severity: int,
                  indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Reads test images of one corruption and severity from the official CIFAR-10-C / CIFAR-100-C files.

    `<name>.npy` is (5 M, H, W, 3) uint8 (M = 10000 for the official files),
    rows (s - 1) M .. s M - 1 holding severity s of test images 0 .. M - 1;
    `labels.npy` has the matching (5 M,) labels. Only the requested rows are
    read (memory-mapped).

    Args:
        folder: the folder with the `.npy` files.
        name: a corruption name (the official file names match ours).
        severity: 1..5.
        indices: (n,) test-image indices, each < M.

    Returns:
        ((n, 3, H, W) uint8 images, (n,) int64 labels).

    Raises:
        ValueError: unknown name, severity outside 1..5, missing or
            malformed files, or an index >= M.
    """
    check_name(name)
    check_severity(severity)
    folder = Path(folder)
    if not has_official(folder, name):
        raise ValueError(f"invalid official_dir={str(folder)!r} (allowed: a folder with {name}.npy and labels.npy)")
    data = np.load(folder / f"{name}.npy", mmap_mode="r")
    labels = np.load(folder / "labels.npy", mmap_mode="r")
    if data.ndim != 4 or data.shape[-1] != 3 or data.shape[0] % 5 or data.dtype != np.uint8 \
            or labels.shape != data.shape[:1]:
        raise ValueError(f"invalid {folder / name}.npy of shape {data.shape} {data.dtype} with labels "
                         f"{labels.shape} (allowed: uint8 (5 M, H, W, 3) and labels (5 M,))")
    per_severity = data.shape[0] // 5
    index = np.asarray(indices, dtype=np.int64)
    if index.size and (index.min() < 0 or index.max() >= per_severity):
        raise ValueError(f"invalid indices in [{index.min()}, {index.max()}] "
                         f"(allowed: 0 .. {per_severity - 1}, the test images in {folder})")
    rows = (severity - 1) * per_severity + index
    images = torch.from_numpy(np.ascontiguousarray(data[rows].transpose(0, 3, 1, 2)))  # (n, 3, H, W)
    return images, np.asarray(labels[rows], dtype=np.int64)
