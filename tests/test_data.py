"""The one DataModule: stratified nested subsets, identical data for every net, real loaders."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_modules.data import ImageDataModule, MixCollate, build_transforms, split_indices, subset_hash
from lightning_modules.datasets import (DataError, DataRequest, Normalization, load_cifar, load_idx,
                                        load_imagefolder, make_synthetic)

torch.set_num_threads(1)
FASHION = Normalization((0.2860,), (0.3530,), "dataset:fashion_mnist")
CIFAR10 = Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "dataset:cifar10")
SYNTHETIC = Normalization((0.5,), (0.25,), "dataset:synthetic")
TARGETS = np.repeat(np.arange(10), [500, 400, 300, 600, 500, 500, 200, 700, 500, 300])  # imbalanced


def test_subsets_are_stratified() -> None:
    train, val, _ = split_indices(TARGETS, data_seed=0, train_fraction=0.1, val_size=400)
    counts = np.bincount(TARGETS)
    for c in range(10):
        share_val = (TARGETS[val] == c).sum() / 400
        assert abs(share_val - counts[c] / counts.sum()) <= 1 / 400 + 1e-9
        pool_c = counts[c] - (TARGETS[val] == c).sum()
        assert (TARGETS[train] == c).sum() == max(1, round(0.1 * pool_c))


def test_subsets_are_nested_and_disjoint_from_val() -> None:
    fractions = [0.01, 0.03, 0.1, 0.32, 1.0]
    splits = [split_indices(TARGETS, 3, f, val_size=400) for f in fractions]
    for (small, val_a, _), (large, val_b, _) in zip(splits, splits[1:]):
        assert set(small) < set(large)
        assert np.array_equal(val_a, val_b)  # validation does not depend on the fraction
    full, val, _ = splits[-1]
    assert not set(full) & set(val) and len(full) + len(val) == len(TARGETS)


def test_data_seed_controls_the_subset() -> None:
    a = split_indices(TARGETS, 0, 0.1, 400)[0]
    assert np.array_equal(a, split_indices(TARGETS, 0, 0.1, 400)[0])
    assert subset_hash(a) != subset_hash(split_indices(TARGETS, 1, 0.1, 400)[0])


def test_test_split_is_carved_when_missing() -> None:
    train, val, test = split_indices(TARGETS, 0, 1.0, val_size=300, test_size=300)
    assert len(test) == 300 and not set(test) & set(val) and not set(test) & set(train)


def _batches(dm: ImageDataModule, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    return [b for _, b in zip(range(n), loader)]


def test_every_net_sees_identical_batches_whatever_the_model_rng() -> None:
    """Same data_seed -> same order and same augmentation, even when the model consumes RNG differently."""
    dms = []
    for model_seed in (0, 99):
        torch.manual_seed(model_seed)
        torch.randn(1000)  # a net's initialisation draws from the global RNG
        dm = ImageDataModule("synthetic", img_size=32, in_chans=1, batch_size=16, train_fraction=0.5,
                             val_size=32, data_seed=5, augment="randaug")
        dm.setup()
        dms.append(_batches(dm, 3))
    for (xa, ya), (xb, yb) in zip(*dms):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = ImageDataModule("synthetic", 32, 1, 16, 0.5, 32, data_seed=6, augment="randaug")
    other.setup()
    assert not torch.equal(_batches(other, 1)[0][0], dms[0][0][0])


def test_epochs_differ_in_order_and_augmentation() -> None:
    dm = ImageDataModule("synthetic", 32, 1, 16, 1.0, 32, data_seed=0)
    dm.setup()
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    first = next(iter(loader))[0]
    loader.sampler.set_epoch(1)
    assert not torch.equal(first, next(iter(loader))[0])


def test_channel_handling_and_normalisation() -> None:
    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    grey = build_transforms(FASHION, 32, 1, "none", False, native_size=28)(image)
    rgb = build_transforms(FASHION, 32, 3, "none", False, native_size=28)(image)
    assert grey.shape == (1, 32, 32) and rgb.shape == (3, 32, 32)
    assert torch.allclose(rgb[0], grey[0]) and torch.allclose(rgb[1], rgb[2])
    colour = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert build_transforms(CIFAR10, 32, 1, "none", False, native_size=32)(colour).shape == (1, 32, 32)
    flat = torch.full((1, 28, 28), round(0.2860 * 255), dtype=torch.uint8)
    assert build_transforms(FASHION, 28, 1, "none", False, 28)(flat).abs().max() < 0.01


def test_mixup_cutmix_give_soft_targets_deterministically() -> None:
    collate = MixCollate(num_classes=4, mixup_alpha=0.8, cutmix_alpha=1.0)
    batch = [(torch.rand(1, 8, 8), i % 4, 1234) for i in range(6)]
    images, targets = collate(batch)
    assert targets.shape == (6, 4) and torch.allclose(targets.sum(1), torch.ones(6))
    images2, targets2 = collate(batch)
    assert torch.equal(images, images2) and torch.equal(targets, targets2)
    plain = MixCollate(4, 0.0, 0.0)(batch)[1]
    assert plain.tolist() == [0, 1, 2, 3, 0, 1]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_debian_style_gz_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 50), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    source = load_idx(DataRequest("fashion_mnist", tmp_path))
    assert source.train.images.shape == (50, 1, 28, 28) and len(source.test) == 20
    assert source.train_targets.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_missing_data_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("lightning_modules.datasets.DEBIAN_FASHION_MNIST", tmp_path / "none")
    monkeypatch.setattr("lightning_modules.datasets.DEFAULT_DATA_ROOT", tmp_path / "none2")
    with pytest.raises(DataError) as err:
        load_idx(DataRequest("fashion_mnist", tmp_path / "empty"))
    assert "dataset=fashion_mnist" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="dataset=cifar10"):
        load_cifar(DataRequest("cifar10", tmp_path))
    with pytest.raises(DataError, match="dataset=imagefolder"):
        load_imagefolder(DataRequest("imagefolder", tmp_path))


def test_cifar_reads_python_pickles(tmp_path: Path) -> None:
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    source = load_cifar(DataRequest("cifar10", tmp_path))
    assert source.train.images.shape == (20, 3, 32, 32) and len(source.test) == 4 and source.classes[0] == "c0"


def test_imagefolder_loads_folders(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 30), (i * 50, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    dm = ImageDataModule("imagefolder", img_size=24, in_chans=3, batch_size=2, val_size=2, data_dir=tmp_path)
    dm.setup()
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape[1:] == (3, 24, 24) and dm.classes == ["cat", "dog"] and dm.n_train == 4


def test_fashion_mnist_datamodule_on_the_debian_files() -> None:
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed (make data)")
    dm = ImageDataModule("fashion_mnist", 32, 1, 128, train_fraction=0.01, val_size=2000)
    dm.setup()
    assert (dm.n_train, len(dm.val_idx), len(dm.test_set)) == (580, 2000, 10000)
    assert np.bincount(dm.source.train_targets[dm.train_idx]).tolist() == [58] * 10


def test_batched_evaluation_equals_per_sample_transforms() -> None:
    dm = ImageDataModule("synthetic", img_size=40, in_chans=3, batch_size=8, val_size=32, data_seed=0)
    dm.setup()
    batched = next(iter(dm.val_dataloader()))
    single = torch.stack([dm.val_set[i][0] for i in range(len(batched[0]))])
    assert torch.allclose(batched[0], single, atol=1e-6)
    assert batched[1].tolist() == [dm.val_set[i][1] for i in range(len(batched[1]))]


def test_fast_paths_equal_the_plain_per_sample_pipeline() -> None:
    """Pre-resizing in-memory images and batched fetching change speed, not pixels."""
    dm = ImageDataModule("synthetic", img_size=40, in_chans=1, batch_size=8, val_size=32, data_seed=3,
                         augment="randaug")
    raw = make_synthetic().train
    dm.setup()
    plain_eval = build_transforms(SYNTHETIC, 40, 1, "none", False, native_size=32)
    i = int(dm.val_idx[0])
    assert torch.allclose(dm.val_set[0][0], plain_eval(raw.images[i]), atol=1e-6)
    plain_train = build_transforms(SYNTHETIC, 40, 1, "randaug", True, native_size=32)
    items = [(0, 11), (5, 12), (9, 13)]
    batch = dm.train_set.__getitems__(items)
    for (pos, seed), (image, label, _) in zip(items, batch):
        torch.manual_seed(seed)
        expected = plain_train(raw.images[int(dm.train_idx[pos])])
        assert torch.allclose(image, expected, atol=1e-6) and label == int(raw.targets[dm.train_idx[pos]])
        assert torch.equal(image, dm.train_set[(pos, seed)][0])


def test_unaugmented_training_batches_are_transformed_as_one_tensor_with_the_same_pixels() -> None:
    """augment="none": the batched training path equals the per-sample pipeline and keeps the seeds."""
    dm = ImageDataModule("synthetic", img_size=40, in_chans=3, batch_size=8, val_size=32, data_seed=3,
                         augment="none")
    raw = make_synthetic().train
    dm.setup()
    assert dm.train_set.random is False
    plain = build_transforms(SYNTHETIC, 40, 3, "none", True, native_size=32)
    items = [(0, 11), (5, 12), (9, 13)]
    batch = dm.train_set.__getitems__(items)
    assert [seed for _, _, seed in batch] == [11, 12, 13]
    for (pos, _), (image, label, _) in zip(items, batch):
        row = int(dm.train_idx[pos])
        assert torch.allclose(image, plain(raw.images[row]), atol=1e-6) and label == int(raw.targets[row])


def test_the_validation_size_adapts_to_a_small_dataset(tmp_path: Path) -> None:
    """A cap with a share: a 300-image folder keeps 90 % for training instead of failing on val_size=1000."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", 100), ("val", 10)):
        for c in range(3):
            folder = tmp_path / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    fixed = ImageDataModule("imagefolder", 16, 3, 8, val_size=1000, data_dir=tmp_path)
    with pytest.raises(DataError, match=r"invalid val_size=1000 .*val_fraction"):
        fixed.setup()
    adaptive = ImageDataModule("imagefolder", 16, 3, 8, val_size=1000, val_fraction=0.1, data_dir=tmp_path)
    adaptive.setup()
    assert len(adaptive.val_idx) == 30 and adaptive.n_train == 270
    capped = ImageDataModule("synthetic", 32, 1, 8, val_size=20, val_fraction=0.1)
    capped.setup()
    assert len(capped.val_idx) == 20  # 10 % of 512 would be 51: the cap holds


def _fake_fashion_mnist(folder: Path) -> None:
    """Debian-style .gz idx files: 300 training and 60 test images of random pixels, shuffled labels."""
    rng = np.random.default_rng(2024)
    for prefix, n in (("train", 300), ("t10k", 60)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.permutation(np.arange(n) % 10))


def _pipeline_digest(dm: ImageDataModule) -> tuple[str, str]:
    """(subset hash, SHA-256 prefix of two training batches of epoch 1, the first val, test and train-eval
    batches: pixels as float32 bytes, then labels)."""
    import hashlib

    digest = hashlib.sha256()
    batches = _batches(dm, 2) + [next(iter(loader)) for loader in
                                 (dm.val_dataloader(), dm.test_dataloader(), dm.train_eval_dataloader())]
    for images, labels in batches:
        digest.update(images.contiguous().numpy().tobytes())
        digest.update(labels.numpy().astype(np.int64).tobytes())
    return dm.subset_hash, digest.hexdigest()[:32]


# Digests of the pipeline before the dataset registry (commit 97f393d), recorded by this same code on it:
# the registry must not change one pixel, label or index of Fashion-MNIST's batches.
@pytest.mark.parametrize("img_size, in_chans, augment, expected", [
    (28, 1, "basic", ("44f006f5427b3bb1", "c98ab64e3299c0d38972d1682dedd8e8")),
    (32, 3, "randaug", ("44f006f5427b3bb1", "546b5c2ebc3af3665f4c5b7ae29bd407")),
])
def test_fashion_mnist_batches_are_bit_for_bit_those_of_the_pipeline_before_the_registry(
        tmp_path: Path, img_size: int, in_chans: int, augment: str, expected: tuple[str, str]) -> None:
    _fake_fashion_mnist(tmp_path)
    dm = ImageDataModule("fashion_mnist", img_size=img_size, in_chans=in_chans, batch_size=16, train_fraction=0.5,
                         val_size=40, data_seed=3, augment=augment, data_dir=tmp_path, download=False)
    dm.setup()
    assert _pipeline_digest(dm) == expected
    assert dm.normalization.source == "dataset:fashion_mnist"


def test_the_cpu_profile_batches_of_the_debian_files_are_those_of_the_pipeline_before_the_registry() -> None:
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed (make data)")
    dm = ImageDataModule("fashion_mnist", 28, 1, 128, train_fraction=0.1, val_size=1000, val_fraction=0.1,
                         data_seed=0)
    dm.setup()
    assert _pipeline_digest(dm) == ("69504c39e899c3cf", "c1eea2ad7330f052de16be2b6ec63c86")
