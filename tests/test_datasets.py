"""The dataset registry: every loader on tiny files in its real layout, one-line errors naming where files go."""

from __future__ import annotations

import gzip
import os
import pickle
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from lightning_modules.catalog import DATASETS, SHIFT_SETS, parse_torchvision_name
from lightning_modules.datasets import (LOADERS, SHIFT_LOADERS, DataError, DataRequest, FileImages, TensorImages,
                                        TorchvisionImages, load_source)

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
GENERATED = ("synthetic", "fractaldb")


@pytest.fixture(autouse=True)
def no_default_data(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaders look only where a test puts files: the default data root and Debian's folder are empty."""
    empty = tmp_path_factory.mktemp("nowhere")
    monkeypatch.setattr("lightning_modules.datasets.DEFAULT_DATA_ROOT", empty / "data")
    monkeypatch.setattr("lightning_modules.datasets.DEBIAN_FASHION_MNIST", empty / "debian")


def _write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """An MNIST-format idx file (uint8)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def _solid_jpeg(path: Path, colour: tuple[int, int, int], size: int = 16) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, quality=95)


# ---------------------------------------------------------------- the registry
def test_every_catalog_dataset_has_a_loader_and_every_loader_a_catalog_entry() -> None:
    assert set(LOADERS) == set(DATASETS)
    for name, info in DATASETS.items():
        assert len(info.mean) == len(info.std) == info.in_chans, name
        assert (info.files == "") == (name in GENERATED), name


def test_every_shift_set_has_a_loader_and_no_spec_can_train_on_one() -> None:
    assert set(SHIFT_LOADERS) == set(SHIFT_SETS)
    assert not set(SHIFT_SETS) & set(DATASETS)  # test-only sets: not a dataset a spec may name
    for name, info in SHIFT_SETS.items():
        assert info.trained_on in DATASETS and info.files.startswith(name), name
        with pytest.raises(DataError, match=rf"^invalid dataset={name!r}"):
            load_source(DataRequest(name))


def test_torchvision_names_follow_one_rule() -> None:
    assert parse_torchvision_name("torchvision:EMNIST:split=balanced") == ("EMNIST", {"split": "balanced"})
    assert parse_torchvision_name("torchvision:USPS") == ("USPS", {})
    assert parse_torchvision_name("torchvision:emnist") is None and parse_torchvision_name("EMNIST") is None
    assert "torchvision:QMNIST:compat=false" in DATASETS and "torchvision:" not in DATASETS
    assert "torchvision:USPS" not in list(DATASETS)  # iteration lists the registered names only


# ---------------------------------------------------------------- each loader in its real layout
@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("kmnist", "KMNIST")])
def test_mnist_and_kmnist_read_torchvisions_raw_folder(tmp_path: Path, name: str, folder: str) -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (30, 28, 28))
    for prefix, images in (("train", train), ("t10k", rng.integers(0, 256, (10, 28, 28)))):
        _write_idx(tmp_path / folder / "raw" / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(tmp_path / folder / "raw" / f"{prefix}-labels-idx1-ubyte", np.arange(len(images)) % 10)
    source = load_source(DataRequest(name, tmp_path))
    assert isinstance(source.train, TensorImages) and source.train.images.shape == (30, 1, 28, 28)
    assert torch.equal(source.train.images[3, 0], torch.from_numpy(train[3].astype(np.uint8)))
    assert len(source.test) == 10 and len(source.classes) == 10 and source.native_size == 28
    assert source.normalization.source == f"dataset:{name}"


def test_svhn_reads_the_mat_files_as_torchvision_does(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from scipy.io import savemat

    rng = np.random.default_rng(0)
    (tmp_path / "svhn").mkdir()
    for split, n in (("train", 10), ("test", 3)):
        savemat(tmp_path / "svhn" / f"{split}_32x32.mat",
                {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                 "y": (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)})  # the digit 0 is stored as 10
    source = load_source(DataRequest("svhn", tmp_path))
    monkeypatch.setattr(torchvision.datasets.SVHN, "_check_integrity", lambda self: True)  # fake files, no MD5
    reference = torchvision.datasets.SVHN(str(tmp_path / "svhn"), split="train")
    assert torch.equal(source.train.images, torch.from_numpy(reference.data))  # (N, 3, 32, 32)
    assert source.train_targets.tolist() == reference.labels.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]
    assert len(source.test) == 3 and source.test[2][1] == 3 and source.classes[0] == "0"


def test_stl10_reads_the_column_major_binaries_as_torchvision_does(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (4, 3, 96, 96), dtype=np.uint8),
              "test": rng.integers(0, 256, (2, 3, 96, 96), dtype=np.uint8)}
    for split, array in images.items():
        array.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")  # stored column-major
        (np.arange(len(array)) + 1).astype(np.uint8).tofile(folder / f"{split}_y.bin")  # labels 1..10
    (folder / "class_names.txt").write_text("\n".join(["airplane", "bird", "car", "cat", "deer", "dog", "horse",
                                                       "monkey", "ship", "truck"]) + "\n")
    source = load_source(DataRequest("stl10", tmp_path))
    assert torch.equal(source.train.images, torch.from_numpy(images["train"]))
    assert source.train_targets.tolist() == [0, 1, 2, 3] and source.native_size == 96
    assert "monkey" in source.classes and "frog" not in source.classes  # not CIFAR-10's classes
    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)
    reference = torchvision.datasets.STL10(str(tmp_path), split="test")
    assert torch.equal(source.test.images, torch.from_numpy(reference.data))
    assert source.test.targets.tolist() == reference.labels.tolist()


def test_cifar100_reads_the_python_pickles(tmp_path: Path) -> None:
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("train", 6), ("test", 2)):
        with open(base / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         "fine_labels": list(range(n))}, f)
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    source = load_source(DataRequest("cifar100", tmp_path))
    assert source.train.images.shape == (6, 3, 32, 32) and len(source.test) == 2 and len(source.classes) == 100


WNIDS = ["n02124075", "n01443537", "n09999999"]  # not in sorted order, as in wnids.txt
COLOURS = {"n01443537": (230, 20, 20), "n02124075": (20, 230, 20), "n09999999": (20, 20, 230)}


def make_tiny_imagenet(root: Path, per_class: int = 4, size: int = 16) -> list[tuple[str, str]]:
    """A Tiny-ImageNet-200-layout folder: 3 classes, solid-colour images; returns the val annotations."""
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for wnid in WNIDS:
        for i in range(per_class):
            _solid_jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", COLOURS[wnid], size)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    annotations = [(f"val_{i}.JPEG", WNIDS[(i * 2) % 3]) for i in range(6)]
    for file, wnid in annotations:
        _solid_jpeg(root / "val" / "images" / file, COLOURS[wnid], size)
    (root / "val" / "val_annotations.txt").write_text(
        "".join(f"{file}\t{wnid}\t0\t0\t{size - 1}\t{size - 1}\n" for file, wnid in annotations))
    return annotations


def test_tiny_imagenet_maps_val_annotations_to_the_training_classes(tmp_path: Path) -> None:
    annotations = make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    source = load_source(DataRequest("tiny_imagenet", tmp_path))  # the data root holding tiny-imagenet-200/
    assert source.classes == sorted(WNIDS) and source.native_size == 64
    assert isinstance(source.train, FileImages) and np.bincount(source.train_targets).tolist() == [4, 4, 4]
    assert [source.classes[label] for _, label in source.test.samples] == [wnid for _, wnid in annotations]
    for i, (_, wnid) in enumerate(annotations):
        image, label = source.test[i]
        assert image.shape == (3, 16, 16) and source.classes[label] == wnid
        assert torch.allclose(image.float().mean(dim=(1, 2)), torch.tensor(COLOURS[wnid], dtype=torch.float), atol=8)
    image, label = source.train[0]
    assert torch.allclose(image.float().mean(dim=(1, 2)), torch.tensor(COLOURS[source.classes[label]],
                                                                         dtype=torch.float), atol=8)
    assert len(load_source(DataRequest("tiny_imagenet", tmp_path / "tiny-imagenet-200")).test) == 6  # or itself


def test_small_images_decoded_on_access_are_resized_to_the_nets_input(tmp_path: Path) -> None:
    """Only in-memory images are resized once up front; files (Tiny-ImageNet's) are resized by the transform."""
    from lightning_modules.data import ImageDataModule

    make_tiny_imagenet(tmp_path / "tiny-imagenet-200", per_class=2, size=8)
    dm = ImageDataModule("tiny_imagenet", img_size=24, in_chans=3, batch_size=2, val_size=3, data_dir=tmp_path)
    dm.setup()
    assert dm.val_set[0][0].shape == dm.test_set[0][0].shape == dm.train_set[(0, 1)][0].shape == (3, 24, 24)


def test_tiny_imagenet_annotation_of_an_unknown_class_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    make_tiny_imagenet(root)
    with open(root / "val" / "val_annotations.txt", "a") as f:
        f.write("val_0.JPEG\tn00000001\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match=r"val_annotations.txt line 7: class 'n00000001' has no train/") as err:
        load_source(DataRequest("tiny_imagenet", root))
    assert "\n" not in str(err.value)


def test_a_torchvision_dataset_by_name_with_its_own_arguments(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    raw = tmp_path / "EMNIST" / "raw"  # torchvision's EMNIST layout, uncompressed
    for part, n in (("train", 47 * 2), ("test", 47)):
        _write_idx(raw / f"emnist-balanced-{part}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"emnist-balanced-{part}-labels-idx1-ubyte", np.arange(n) % 47)
    source = load_source(DataRequest("torchvision:EMNIST:split=balanced", tmp_path))
    reference = torchvision.datasets.EMNIST(str(tmp_path), split="balanced", train=True)
    assert isinstance(source.train, TensorImages)  # its in-memory array, checked to be the images it yields
    image, label = source.train[5]
    assert torch.equal(image, torchvision.transforms.v2.functional.pil_to_tensor(reference[5][0]))
    assert label == reference[5][1] == 5 and len(source.classes) == 47 and len(source.test) == 47
    pixels = source.train.images.double() / 255
    assert source.normalization.source == "measured:torchvision:EMNIST:split=balanced"
    assert source.normalization.mean[0] == pytest.approx(float(pixels.mean()), abs=1e-4)
    assert source.normalization.std[0] == pytest.approx(float(pixels.std()), abs=1e-3)
    with pytest.raises(DataError, match=r"needs split= \(e.g. torchvision:EMNIST:split=VALUE\)"):
        load_source(DataRequest("torchvision:EMNIST", tmp_path))
    with pytest.raises(DataError, match=r"no argument 'colour'.*allowed: .*split"):
        load_source(DataRequest("torchvision:EMNIST:split=balanced:colour=red", tmp_path))
    with pytest.raises(DataError, match=r"invalid dataset='torchvision:Nope'"):
        load_source(DataRequest("torchvision:Nope", tmp_path))


def test_a_torchvision_dataset_with_a_split_argument_and_image_files(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):  # torchvision's Country211 layout: country211/SPLIT/CODE/*.jpg
        for code, colour in (("AD", (200, 0, 0)), ("AE", (0, 200, 0))):
            for i in range(n):
                _solid_jpeg(tmp_path / "country211" / split / code / f"{i}.jpg", colour, size=20)
    source = load_source(DataRequest("torchvision:Country211", tmp_path))
    assert isinstance(source.train, TorchvisionImages) and source.classes == ["AD", "AE"]
    assert source.train_targets.tolist() == [0, 0, 0, 1, 1, 1] and len(source.test) == 4
    image, label = source.test[3]
    assert image.shape == (3, 20, 20) and image.dtype == torch.uint8 and label == 1 and source.native_size == 20


# ---------------------------------------------------------------- missing files: one line naming the folder
@pytest.mark.parametrize("name, folder", [
    ("fashion_mnist", "FashionMNIST/raw"), ("mnist", "MNIST/raw"), ("kmnist", "KMNIST/raw"), ("svhn", "svhn"),
    ("stl10", "stl10_binary"), ("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
    ("tiny_imagenet", ""), ("imagefolder", "")])
def test_missing_files_name_the_folder_and_the_layout(tmp_path: Path, name: str, folder: str) -> None:
    with pytest.raises(DataError) as err:
        load_source(DataRequest(name, tmp_path))
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"dataset={name}")
    assert str(tmp_path / folder).rstrip("/") in message and "--data-dir" in message
    if name not in ("tiny_imagenet", "imagefolder"):
        assert DATASETS[name].files in message


def test_a_failed_download_is_one_line_naming_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as err:
        load_source(DataRequest("mnist", tmp_path, download=True))
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "MNIST" / "raw") in message and "download failed" in message
    with pytest.raises(DataError, match=r"dataset=torchvision:USPS: files not found or unreadable under .*"
                                        r"torchvision.datasets.USPS"):
        load_source(DataRequest("torchvision:USPS", tmp_path, download=True))


@pytest.mark.slow
def test_a_missing_dataset_stops_the_cli_before_any_work(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    env = {**os.environ, "VIT_VS_CNN_DATA": str(tmp_path / "data")}
    done = subprocess.run([sys.executable, "-m", "experiments.train", "--dataset", "tiny_imagenet", "--data-dir",
                           str(tmp_path / "empty"), "--runs-dir", str(runs), "--wandb", "off"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("error: dataset=tiny_imagenet: files not found in " + str(tmp_path / "empty"))
    assert "val/val_annotations.txt" in line
    assert not runs.exists()


# ---------------------------------------------------------------- end to end
@pytest.mark.slow
def test_a_tiny_imagenet_layout_folder_trains(tmp_path: Path) -> None:
    from experiments.spec import RunSpec
    from experiments.train import run

    make_tiny_imagenet(tmp_path / "tiny", per_class=6, size=8)
    spec = RunSpec.create("cpu", model="resnet18", dataset="tiny_imagenet", data_dir=str(tmp_path / "tiny"),
                          img_size=16, batch_size=8, min_steps=2, max_steps=2, num_evals=1, patience=0,
                          val_size=3, val_fraction=0.0, wandb="off", precision="32-true")
    result = run(spec, tmp_path / "runs")
    assert result["status"] == "completed", result["error"]
    assert (result["n_train"], result["n_val"], result["n_test"]) == (15, 3, 6)
    assert result["architecture"]["normalization"] == {"source": "dataset:tiny_imagenet",
                                                       "mean": list(DATASETS["tiny_imagenet"].mean),
                                                       "std": list(DATASETS["tiny_imagenet"].std)}
