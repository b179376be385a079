"""Behaviour of the on-the-fly FractalDB pretraining data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from lightning_modules import fractaldb
from lightning_modules.fractaldb import (
    FractalDB,
    fill_fraction,
    map_probabilities,
    render_ifs,
    sample_ifs,
    sample_map_indices,
    search_categories,
)

torch.set_num_threads(1)

NUM_CLASSES = 6
INSTANCES = 6


def make(tmp_path, **kwargs) -> FractalDB:
    """A small dataset with its own category cache in ``tmp_path``."""
    kwargs = dict(num_classes=NUM_CLASSES, instances_per_class=INSTANCES, cache_dir=tmp_path) | kwargs
    return FractalDB(**kwargs)


def images(ds: FractalDB) -> np.ndarray:
    """(N, H, W) uint8: channel 0 of every image."""
    return np.stack([ds[i][0][0].numpy() for i in range(len(ds))])


def test_image_dtype_shape_range_and_label(tmp_path):
    ds = make(tmp_path)
    image, label = ds[len(ds) - 1]
    assert image.dtype == torch.uint8 and image.shape == (1, 32, 32)
    assert image.min() == 0 and image.max() == 255
    assert isinstance(label, int) and label == NUM_CLASSES - 1
    assert len(ds) == NUM_CLASSES * INSTANCES
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_in_chans_3_replicates_the_grey_image(tmp_path):
    grey, _ = make(tmp_path)[7]
    rgb, _ = make(tmp_path, in_chans=3)[7]
    assert rgb.shape == (3, 32, 32)
    assert all(torch.equal(channel, grey[0]) for channel in rgb)


def test_transform_is_applied(tmp_path):
    ds = make(tmp_path, transform=lambda x: x.float() / 255)
    image, _ = ds[0]
    assert image.dtype == torch.float32 and 0.0 <= image.min() and image.max() == 1.0


def test_same_seed_same_images_different_seed_different_categories(tmp_path):
    a = make(tmp_path / "a", seed=3)
    b = make(tmp_path / "b", seed=3)  # separate caches: searched twice
    c = make(tmp_path / "c", seed=4)
    np.testing.assert_array_equal(a.categories, b.categories)
    backwards = [b[i][0][0].numpy() for i in reversed(range(len(b)))]  # order does not matter
    np.testing.assert_array_equal(images(a), np.stack(backwards[::-1]))
    assert not np.isclose(a.categories, c.categories).all(axis=(1, 2)).any()


def test_smaller_search_is_a_prefix_of_a_larger_one(tmp_path):
    small = search_categories(3, seed=1, cache_dir=tmp_path)
    large = search_categories(NUM_CLASSES, seed=1, cache_dir=tmp_path)
    np.testing.assert_array_equal(small, large[:3])


def test_labels_are_balanced(tmp_path):
    ds = make(tmp_path)
    assert np.bincount(ds.targets).tolist() == [INSTANCES] * NUM_CLASSES
    assert [ds[i][1] for i in range(len(ds))] == ds.targets
    assert len(ds.classes) == NUM_CLASSES == len(set(ds.classes))


def test_categories_meet_the_fill_threshold_which_filters(tmp_path):
    threshold = 0.35
    categories = search_categories(NUM_CLASSES, fill_threshold=threshold, cache_dir=tmp_path)
    rng = np.random.default_rng(0)
    # A fresh chaos game fills within a point or two of the search's render.
    fills = [fill_fraction(render_ifs(ifs, 32, 4096, rng)) for ifs in categories]
    assert min(fills) >= threshold - 0.02
    candidates = [render_ifs(sample_ifs(rng), 32, 4096, rng) for _ in range(50)]
    assert min(0.0 if c is None else fill_fraction(c) for c in candidates) < threshold


def test_categories_are_contractive_ifs_with_det_proportional_probabilities(tmp_path):
    categories = search_categories(NUM_CLASSES, cache_dir=tmp_path)
    assert categories.shape == (NUM_CLASSES, 7, 7)
    for ifs in categories:
        k = np.count_nonzero(ifs[:, 6])
        maps = ifs[:k]
        assert 2 <= k <= 7 and not ifs[k:].any()  # zero padding after the k maps
        assert (np.abs(maps[:, :6]) < 1).all()
        assert (np.linalg.norm(maps[:, :4].reshape(k, 2, 2), ord=2, axis=(1, 2)) < 1).all()
        det = np.abs(np.linalg.det(maps[:, :4].reshape(k, 2, 2)))
        np.testing.assert_allclose(maps[:, 6], det / det.sum())
        np.testing.assert_allclose(map_probabilities(maps), maps[:, 6])


def test_map_indices_follow_the_probabilities():
    probs = np.array([0.5, 0.0, 0.2, 0.3, 0.0])
    idx = sample_map_indices(probs, (400, 500), np.random.default_rng(0))
    freq = np.bincount(idx.ravel(), minlength=5) / idx.size
    np.testing.assert_allclose(freq, probs, atol=0.005)


def test_instances_differ_but_resemble_their_class(tmp_path):
    masks = images(make(tmp_path)).reshape(NUM_CLASSES, INSTANCES, 32, 32) > 0

    def similarity(x: np.ndarray, y: np.ndarray) -> float:
        """IoU of two masks, best over the 4 flips of y (flips are part of the variation)."""
        flips = (y, y[:, ::-1], y[::-1], y[::-1, ::-1])
        return max((x & f).sum() / (x | f).sum() for f in flips)

    within, between = [], []
    for (c1, i1), (c2, i2) in itertools.combinations(np.ndindex(NUM_CLASSES, INSTANCES), 2):
        (within if c1 == c2 else between).append(similarity(masks[c1, i1], masks[c2, i2]))
        if c1 == c2:
            assert (masks[c1, i1] != masks[c2, i2]).any()
    assert np.mean(within) > np.mean(between) + 0.1


def test_memoised_images_equal_fresh_renders_and_are_not_aliased(tmp_path):
    memo, fresh = make(tmp_path), make(tmp_path, memo_bytes=0)
    first, _ = memo[5]
    first.zero_()  # a caller writing into its tensor must not reach the memo
    assert torch.equal(memo[5][0], fresh[5][0])
    assert memo[5][0].any()


def test_cache_round_trip_reads_the_file(tmp_path, monkeypatch):
    first = search_categories(NUM_CLASSES, seed=2, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()  # one file, no temp left over
    assert path.suffix == ".npz"

    def no_search(rng):
        raise AssertionError("searched instead of reading the cache")

    monkeypatch.setattr(fractaldb, "sample_ifs", no_search)
    np.testing.assert_array_equal(make(tmp_path, seed=2).categories, first)


@pytest.mark.parametrize("content", ["garbage", "wrong_shape"])
def test_corrupt_cache_is_regenerated_with_a_warning(tmp_path, content):
    first = search_categories(NUM_CLASSES, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    if content == "garbage":
        path.write_bytes(b"not a zip file")
    else:
        np.savez(path, categories=np.zeros((2, 7, 7)))
    with pytest.warns(UserWarning, match="regenerating"):
        again = search_categories(NUM_CLASSES, cache_dir=tmp_path)
    np.testing.assert_array_equal(again, first)
    with np.load(path) as data:  # repaired on disk
        np.testing.assert_array_equal(data["categories"], first)


def test_a_write_that_breaks_leaves_the_previous_cache_whole(tmp_path, monkeypatch):
    first = search_categories(NUM_CLASSES, seed=5, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    before = path.read_bytes()

    def savez_then_crash(file, **arrays):  # the process dies halfway through writing the file
        file.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(fractaldb.np, "savez", savez_then_crash)
    with pytest.raises(OSError, match="disk full"):
        fractaldb._save_cache(path, first[::-1].copy())
    assert [p.name for p in tmp_path.iterdir()] == [path.name] and path.read_bytes() == before
    monkeypatch.undo()
    np.testing.assert_array_equal(search_categories(NUM_CLASSES, seed=5, cache_dir=tmp_path), first)


def test_impossible_thresholds_are_errors(tmp_path):
    with pytest.raises(ValueError):
        search_categories(1, fill_threshold=1.5, cache_dir=tmp_path)
    with pytest.raises(RuntimeError, match="found 0/1"):
        search_categories(1, fill_threshold=1.0, cache_dir=tmp_path)
