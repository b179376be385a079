"""The 15 common corruptions: determinism, strength, shapes, subsets, the cache and the official CIFAR-C files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules import corruptions
from lightning_modules.corruptions import (
    CORRUPTION_NAMES,
    CORRUPTIONS,
    RANDOM_CORRUPTIONS,
    cache_path,
    corrupt,
    corrupted_set,
    default_cache_dir,
    elastic_warp,
    has_official,
    load_official,
    motion_kernel,
    plasma_fractal,
)

torch.set_num_threads(1)


def smooth_images(n: int, channels: int, side: int = 32, seed: int = 0, width: int | None = None) -> torch.Tensor:
    """(n, C, side, width) uint8: smooth waves plus a disc and a gradient, mid-grey on average, no saturation."""
    rng = np.random.default_rng(seed)
    width = width or side
    y, x = np.mgrid[0:side, 0:width] / np.array([side, width])[:, None, None]
    images = np.empty((n, channels, side, width))
    for i in range(n):
        for c in range(channels):
            fx, fy, px, py = rng.uniform(1, 3), rng.uniform(1, 3), *rng.uniform(0, 2 * np.pi, 2)
            disc = (x - rng.uniform(0.3, 0.7)) ** 2 + (y - rng.uniform(0.3, 0.7)) ** 2 < 0.05
            images[i, c] = 0.45 + 0.2 * np.sin(2 * np.pi * fx * x + px) * np.cos(2 * np.pi * fy * y + py) \
                + 0.15 * disc + 0.1 * (x - 0.5)
    return torch.from_numpy(np.rint(np.clip(images, 0, 1) * 255).astype(np.uint8))


GREY = smooth_images(4, 1)
COLOUR = smooth_images(4, 3, seed=1)


def distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute pixel difference."""
    return (a.float() - b.float()).abs().mean().item()


def test_families_hold_the_15_corruptions():
    assert [len(v) for v in CORRUPTIONS.values()] == [3, 4, 4, 4]
    assert len(set(CORRUPTION_NAMES)) == 15 and RANDOM_CORRUPTIONS < set(CORRUPTION_NAMES)
    assert set(corruptions.PARAMS) == set(CORRUPTION_NAMES)
    assert all(len(table) == 5 for table in corruptions.PARAMS.values())


@pytest.mark.parametrize("images", [GREY, COLOUR], ids=["grey", "colour"])
@pytest.mark.parametrize("name", CORRUPTION_NAMES)
def test_deterministic_shape_preserving_and_seeded(name, images):
    out = corrupt(images, name, 3, seed=0)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    assert torch.equal(out, corrupt(images, name, 3, seed=0))
    other_seed = corrupt(images, name, 3, seed=1)
    assert torch.equal(out, other_seed) == (name not in RANDOM_CORRUPTIONS)
    assert not torch.equal(out, images)


STRENGTH_EXCEPTIONS = {
    # CIFAR-10-C's elastic table shrinks the random affine part from 0.08 to 0.03 of the side from severity 1
    # to 5 while it grows the local field (test_elastic_local_field_grows_with_severity), so severity 5
    # moves pixels less far than severity 1. Kept as the table has it; strict, so a change shows up.
    "elastic_transform": pytest.mark.xfail(strict=True, reason="CIFAR-10-C's elastic severity 1 has the larger affine"),
}


@pytest.mark.parametrize("images", [GREY, COLOUR], ids=["grey", "colour"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=STRENGTH_EXCEPTIONS.get(n, ())) for n in CORRUPTION_NAMES])
def test_severity_5_moves_further_than_severity_1(name, images):
    for seed in (0, 1):
        mild, severe = corrupt(images, name, 1, seed), corrupt(images, name, 5, seed)
        assert distance(severe, images) > distance(mild, images) > 0


def test_elastic_local_field_grows_with_severity():
    rms = []
    for severity in (1, 2, 5):
        _, dy, dx = elastic_warp(32, 32, corruptions.PARAMS["elastic_transform"][severity - 1],
                                 np.random.default_rng(0), 1.0)
        rms.append(float(np.sqrt(np.mean(dy ** 2 + dx ** 2))))
    assert rms[0] == 0.0 < rms[1] < rms[2]


@pytest.mark.parametrize("name", CORRUPTION_NAMES)
def test_grey_stays_grey_and_other_sizes_work(name):
    for side, width in ((8, 8), (40, 40), (24, 36)):
        images = smooth_images(2, 1, side, width=width)
        out = corrupt(images, name, 5, seed=0)
        assert out.shape == (2, 1, side, width) and out.dtype == torch.uint8


@pytest.mark.parametrize("name", sorted(RANDOM_CORRUPTIONS))
def test_a_subset_gets_the_full_sets_pixels(name):
    images = smooth_images(6, 3, seed=2)
    full = corrupt(images, name, 4, seed=7)
    rows = np.array([5, 1, 3])
    part = corrupt(images[torch.from_numpy(rows)], name, 4, seed=7, indices=rows)
    assert torch.equal(part, full[torch.from_numpy(rows)])


def test_bad_input_fails_with_one_line_naming_the_field():
    cases = [
        (lambda: corrupt(GREY, "rain", 1), "corruption='rain'"),
        (lambda: corrupt(GREY, "fog", 0), "severity=0"),
        (lambda: corrupt(GREY, "fog", 6), "severity=6"),
        (lambda: corrupt(GREY[..., :7, :7], "fog", 1), "image size=(7, 7)"),
        (lambda: corrupt(GREY.float(), "fog", 1), "images="),
        (lambda: corrupt(torch.zeros(1, 2, 32, 32, dtype=torch.uint8), "fog", 1), "channels=2"),
        (lambda: corrupt(GREY, "fog", 1, seed=-1), "seed=-1"),
        (lambda: corrupt(GREY, "fog", 1, indices=[0, 1]), "indices"),
    ]
    for call, field in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert field in str(err.value) and "allowed" in str(err.value) and "\n" not in str(err.value)


def test_motion_kernel_is_a_one_sided_gaussian_line():
    kernel = motion_kernel(3, 1.0, 0.0)
    centre = kernel.shape[0] // 2
    assert kernel.sum() == pytest.approx(1.0)
    assert np.count_nonzero(kernel) == 7 and np.count_nonzero(kernel[centre, centre:]) == 7
    weights = kernel[centre, centre:]
    assert np.all(np.diff(weights) < 0) and weights[1] / weights[0] == pytest.approx(np.exp(-0.5), rel=1e-5)
    vertical = motion_kernel(3, 1.0, 90.0)
    assert np.count_nonzero(vertical[centre:, centre]) == 7


def test_plasma_fractal_is_normalised_and_seeded():
    a = plasma_fractal(32, 2.0, np.random.default_rng(0))
    assert a.shape == (32, 32) and a.min() == 0.0 and a.max() == 1.0
    assert np.array_equal(a, plasma_fractal(32, 2.0, np.random.default_rng(0)))


# ------------------------------------------------------------------ cache
def test_cache_round_trips_and_is_keyed(tmp_path, monkeypatch):
    images, rows = COLOUR, np.array([10, 11, 12, 13])
    first = corrupted_set(images, "synthetic", "snow", seed=3, indices=rows, severities=(1, 5), cache_dir=tmp_path)
    path = cache_path("synthetic", images, rows, 3, "snow", tmp_path)
    assert path.is_file() and path.parent.name.startswith("synthetic_32px_c3_") and "seed3_v" in path.parent.name
    assert torch.equal(first[5], corrupt(images, "snow", 5, seed=3, indices=rows))

    def no_generation(*args, **kwargs):
        raise AssertionError("generated although cached")

    monkeypatch.setattr(corruptions, "corrupt", no_generation)
    again = corrupted_set(images, "synthetic", "snow", seed=3, indices=rows, severities=(5, 1), cache_dir=tmp_path)
    assert all(torch.equal(first[s], again[s]) for s in (1, 5))


def test_missing_severities_are_added_to_the_cache(tmp_path):
    corrupted_set(GREY, "synthetic", "fog", severities=(2,), cache_dir=tmp_path)
    both = corrupted_set(GREY, "synthetic", "fog", severities=(2, 4), cache_dir=tmp_path)
    with np.load(cache_path("synthetic", GREY, np.arange(4), 0, "fog", tmp_path)) as data:
        assert {"s2", "s4", "digest"} <= set(data.files)
    assert torch.equal(both[4], corrupt(GREY, "fog", 4))


def test_a_corrupt_or_stale_cache_file_is_regenerated_with_a_warning(tmp_path):
    path = cache_path("synthetic", GREY, np.arange(4), 0, "frost", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an npz")
    with pytest.warns(UserWarning, match="unreadable corruption cache"):
        out = corrupted_set(GREY, "synthetic", "frost", severities=(2,), cache_dir=tmp_path)
    assert torch.equal(out[2], corrupt(GREY, "frost", 2))
    other = GREY.flip(-1)  # same key (dataset, size, indices, seed), other pixels
    with pytest.warns(UserWarning, match="other images"):
        out = corrupted_set(other, "synthetic", "frost", severities=(2,), cache_dir=tmp_path)
    assert torch.equal(out[2], corrupt(other, "frost", 2))


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VIT_VS_CNN_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "corruptions"
    monkeypatch.delenv("VIT_VS_CNN_CACHE")
    assert default_cache_dir().parts[-3:] == (".cache", "vit-vs-cnn", "corruptions")


# ------------------------------------------------------------------ official CIFAR-C files
def write_fake_cifar_c(folder, per_severity: int, name: str = "gaussian_noise") -> None:
    """`<name>.npy` (5 M, 32, 32, 3) whose pixels hold the row number, and labels.npy (row % 10)."""
    rows = np.arange(5 * per_severity)
    np.save(folder / f"{name}.npy", np.broadcast_to((rows % 256).astype(np.uint8)[:, None, None, None],
                                                     (len(rows), 32, 32, 3)).copy())
    np.save(folder / "labels.npy", (rows % 10).astype(np.uint8))


def test_official_files_are_read_with_the_right_severity_rows(tmp_path):
    write_fake_cifar_c(tmp_path, per_severity=4)
    assert has_official(tmp_path, "gaussian_noise") and not has_official(tmp_path, "fog")
    images, labels = load_official(tmp_path, "gaussian_noise", 3, [0, 2, 3])
    assert images.shape == (3, 3, 32, 32) and images.dtype == torch.uint8
    assert images[:, 0, 0, 0].tolist() == [8, 10, 11]  # rows (3 - 1) * 4 + index
    assert labels.tolist() == [8, 0, 1]
    with pytest.raises(ValueError, match="indices"):
        load_official(tmp_path, "gaussian_noise", 1, [4])
    with pytest.raises(ValueError, match="official_dir"):
        load_official(tmp_path, "fog", 1, [0])
