"""Every dataset the suite reads: one loader per catalog name, and any torchvision dataset by name.

The static facts of a dataset (classes, channels, native size, pixel
statistics, where its files go) live in the torch-free catalog
(`lightning_modules.catalog.REGISTERED_DATASETS`); its loader lives here, in
`LOADERS`, under the same name (a test checks that the two cover each other).
A loader turns a `DataRequest` into a `Source`: the training and test splits
as uint8 images (C, H, W) with int labels, the class names, the stored image
size and the normalisation. When the files are missing (and the download is
not allowed or fails), it raises `DataError` with one line naming the folder
it looked in and the layout it expects there.

The data root is `--data-dir`, else `$VIT_VS_CNN_DATA`, else
`~/.cache/vit-vs-cnn/data`. Downloads go through torchvision; Tiny-ImageNet
and image folders are never downloaded. Small datasets are read into memory
(`TensorImages`); folders of image files are decoded on access (`FileImages`).

`torchvision:CLASS[:KEY=VALUE...]` loads any `torchvision.datasets` class
whose constructor takes `root` and selects the split with `train=` (True /
False) or `split=` (its default or "train" / "test", else "val"), with
`download=` when it has one; KEY=VALUE pairs are further constructor arguments
(`torchvision:EMNIST:split=balanced`). Classes come from the dataset's
`classes`, the image size from its first image, and the pixel statistics are
measured on up to `STATS_IMAGES` of its training images.

Test-only sets (the catalog's `SHIFT_SETS`, e.g. CIFAR-10.1) have loaders of
their own in `SHIFT_LOADERS`: they return the test images only, never a
`Source`, so no spec can train on them.
"""

from __future__ import annotations

import gzip
import inspect
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_modules.catalog import DATASETS, SHIFT_SETS, TORCHVISION_RULE, parse_torchvision_name

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DATA_ROOT = Path(os.environ.get("VIT_VS_CNN_DATA", Path.home() / ".cache" / "vit-vs-cnn" / "data"))
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
CIFAR10_1_URL = "https://github.com/modestyachts/CIFAR-10.1/raw/master/datasets/"  # + a file name
CIFAR10_1_FILES = ("cifar10.1_v6_data.npy", "cifar10.1_v6_labels.npy")
STATS_IMAGES = 2000  # training images the pixel statistics of a torchvision dataset are measured on
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """The data a spec names cannot be found or read; str() is one line."""


# ---------------------------------------------------------------- what a loader returns
@dataclass(frozen=True)
class Normalization:
    """Per-channel input statistics (in [0, 1] pixel units) and where they come from.

    Attributes:
        mean / std: one value per channel.
        source: "dataset:NAME" (the catalog's statistics), "measured:NAME" (measured on the
            training images) or "weights:TIMM_NAME" (the pretrained weights' own configuration).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    def for_channels(self, in_chans: int) -> Normalization:
        """The statistics for `in_chans` net inputs: channels averaged (grey from RGB, or grey repeated)."""
        if in_chans == len(self.mean):
            return self
        mean, std = float(np.mean(self.mean)), float(np.mean(self.std))
        return Normalization((mean,) * in_chans, (std,) * in_chans, self.source)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "mean": list(self.mean), "std": list(self.std)}


@dataclass
class Source:
    """A dataset's splits before subsetting.

    Attributes:
        train: indexable dataset of (uint8 image (C, H, W), label).
        train_targets: (N_train,) int labels of `train`.
        test: the held-out test split, or None when the dataset has none
            (then a test split is carved from `train`, disjoint from val).
        classes: class names.
        native_size: side of the stored images.
        normalization: the dataset's pixel statistics.
    """

    train: Dataset
    train_targets: np.ndarray
    test: Dataset | None
    classes: list[str]
    native_size: int
    normalization: Normalization


class TensorImages(Dataset):
    """In-memory uint8 images (N, C, H, W) with int labels (N,)."""

    def __init__(self, images: torch.Tensor, targets: np.ndarray) -> None:
        self.images, self.targets = images, np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])


class FileImages(Dataset):
    """Image files decoded on access to uint8 RGB tensors (3, H, W).

    Args:
        samples: (path, label) pairs.
    """

    def __init__(self, samples: Sequence[tuple[str, int]]) -> None:
        self.samples = [(str(path), int(label)) for path, label in samples]
        self.targets = np.asarray([label for _, label in self.samples], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from torchvision.io import ImageReadMode, decode_image

        path, label = self.samples[i]
        return decode_image(path, mode=ImageReadMode.RGB), label


class TorchvisionImages(Dataset):
    """A torchvision dataset's (PIL image or tensor, label) items as (uint8 tensor (C, H, W), int label).

    Grey images keep one channel; every other mode is converted to RGB.
    """

    def __init__(self, dataset: Dataset, targets: np.ndarray) -> None:
        self.dataset, self.targets = dataset, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, _ = self.dataset[i]
        return _to_uint8_chw(image), int(self.targets[i])


def _to_uint8_chw(image: Any) -> torch.Tensor:
    """A PIL image or a uint8 tensor (H, W) / (C, H, W) -> uint8 tensor (C, H, W)."""
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    if isinstance(image, Image.Image):
        grey = image.mode in ("1", "L", "LA", "I", "I;16", "F")
        return pil_to_tensor(image.convert("L" if grey else "RGB"))
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.ndim in (2, 3):
        return image.unsqueeze(0) if image.ndim == 2 else image
    raise DataError(f"items are {type(image).__name__}, not PIL images or uint8 tensors")


# ---------------------------------------------------------------- the registry
@dataclass(frozen=True)
class DataRequest:
    """What a loader is asked for.

    Attributes:
        name: the dataset's catalog name.
        data_dir: `--data-dir` (None: the default data root).
        download: allow torchvision downloads when files are missing.
        img_size: side of generated images (fractaldb).
        fractal_classes / fractal_size / fractal_seed: FractalDB's categories, images (all splits) and seed.
    """

    name: str
    data_dir: Path | None = None
    download: bool = False
    img_size: int = 32
    fractal_classes: int = 0
    fractal_size: int = 0
    fractal_seed: int = 0

    @property
    def root(self) -> Path:
        """The data root: `data_dir`, else the default."""
        return self.data_dir or DEFAULT_DATA_ROOT


Loader = Callable[[DataRequest], Source]
LOADERS: dict[str, Loader] = {}


def registers(*names: str) -> Callable[[Loader], Loader]:
    """Register a loader under catalog names (a test checks every catalog name has one)."""

    def register(loader: Loader) -> Loader:
        for name in names:
            LOADERS[name] = loader
        return loader

    return register


def load_source(request: DataRequest) -> Source:
    """Read (or generate) the dataset `request.name` names.

    Raises:
        DataError: an unknown name, or files that are missing or unreadable (one line naming where they go).
    """
    if request.name in LOADERS:
        return LOADERS[request.name](request)
    if parse_torchvision_name(request.name) is not None:
        return load_torchvision(request)
    raise DataError(f"invalid dataset={request.name!r} (allowed: {DATASETS.allowed()})")


def files_missing(request: DataRequest, folder: Path, download_error: str | None = None, hint: str = "") -> DataError:
    """The one-line error for files that are not there: the folder looked in, the layout expected, what to do."""
    layout = (SHIFT_SETS.get(request.name) or DATASETS[request.name]).files
    how = f"download failed ({download_error}); " if download_error else ""
    fix = hint or ("put the files there or pass --data-dir DIR" if request.download or download_error else
                   "put the files there, pass --data-dir DIR, or allow the download")
    return DataError(f"dataset={request.name}: files not found in {folder} (expected under the data root "
                     f"{request.root}: {layout}); {how}{fix}")


def _catalog_source(name: str, train: Dataset, targets: np.ndarray, test: Dataset | None,
                    classes: list[str]) -> Source:
    """A Source with the catalog's native size and statistics for `name`."""
    info = DATASETS[name]
    return Source(train, np.asarray(targets, dtype=np.int64), test, classes, info.native_size,
                  Normalization(info.mean, info.std, f"dataset:{name}"))


def _torchvision_download(request: DataRequest, make: Callable[[], Any], folder: Path) -> None:
    """Run a torchvision download (a dataset class's, or `download_url`); DataError naming `folder` when it
    fails."""
    try:
        make()
    except Exception as exc:  # noqa: BLE001 - no network, a broken mirror, a bad archive
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        raise files_missing(request, folder, reason) from None


# ---------------------------------------------------------------- MNIST-format files
def _read_idx(path: Path) -> np.ndarray:
    """Read an MNIST-format idx file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_folder(candidates: Sequence[Path]) -> Path | None:
    """First folder holding the four idx files (.gz or raw)."""
    return next((folder for folder in candidates if all(_idx_file(folder, stem) for stem in IDX_STEMS)), None)


_IDX_SETS = {  # name -> (torchvision class and folder, class names)
    "fashion_mnist": ("FashionMNIST", ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]),
    "mnist": ("MNIST", [str(d) for d in range(10)]),
    "kmnist": ("KMNIST", ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]),
}


@registers(*_IDX_SETS)
def load_idx(request: DataRequest) -> Source:
    """Fashion-MNIST, MNIST, KMNIST: idx files (.gz or raw) in `--data-dir` itself or torchvision's
    `ROOT/CLASS/raw/`; Fashion-MNIST also in Debian's `dataset-fashion-mnist` folder; else torchvision's
    download into the data root."""
    tv_class, classes = _IDX_SETS[request.name]
    default = DEFAULT_DATA_ROOT / tv_class / "raw"
    candidates = [request.data_dir, request.data_dir / tv_class / "raw"] if request.data_dir else []
    candidates += ([DEBIAN_FASHION_MNIST] if request.name == "fashion_mnist" else []) + [default]
    folder = _idx_folder(candidates)
    expected = request.root / tv_class / "raw"
    if folder is None and request.download:
        import torchvision

        cls = getattr(torchvision.datasets, tv_class)
        _torchvision_download(request, lambda: [cls(str(request.root), train=t, download=True) for t in (True, False)],
                              expected)
        folder = _idx_folder([expected])
    if folder is None:
        hint = ("run `make data` (Debian's dataset-fashion-mnist), put the files there or pass --data-dir DIR"
                if request.name == "fashion_mnist" else "")
        raise files_missing(request, expected, hint=hint)

    def split(prefix: str) -> TensorImages:
        images = _read_idx(_idx_file(folder, f"{prefix}-images-idx3-ubyte"))  # (N, 28, 28)
        labels = _read_idx(_idx_file(folder, f"{prefix}-labels-idx1-ubyte"))  # (N,)
        return TensorImages(torch.from_numpy(images.copy()).unsqueeze(1), labels.astype(np.int64))

    train = split("train")
    return _catalog_source(request.name, train, train.targets, split("t10k"), classes)


# ---------------------------------------------------------------- CIFAR, SVHN, STL-10
_CIFAR = {  # name -> (folder, train files, test file, label key, (meta file, names key), torchvision class)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels",
                ("batches.meta", "label_names"), "CIFAR10"),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", ("meta", "fine_label_names"), "CIFAR100"),
}


class _ArraysOnly(pickle.Unpickler):
    """An unpickler for CIFAR's python batches that builds numpy arrays and plain data only: a file that pickles
    anything else (code that unpickling would run) is refused, as `torch.load(weights_only=True)` refuses it."""

    ALLOWED = {(module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
               for name in ("_reconstruct", "scalar")} | {("numpy", "ndarray"), ("numpy", "dtype"),
                                                            ("_codecs", "encode")}  # bytes, in protocol 2

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it holds pickled code ({module}.{name}): refused, as loading it would "
                                         f"run it")
        return super().find_class(module, name)


@registers(*_CIFAR)
def load_cifar(request: DataRequest) -> Source:
    """CIFAR-10/100 from the python pickles in `ROOT/cifar-10-batches-py` (`cifar-100-python`), downloaded by
    torchvision when missing."""
    folder_name, train_files, test_file, label_key, meta, tv_class = _CIFAR[request.name]
    base = request.root / folder_name
    complete = lambda: all((base / f).is_file() for f in [*train_files, test_file, meta[0]])  # noqa: E731
    if not complete() and request.download:
        import torchvision

        cls = getattr(torchvision.datasets, tv_class)
        _torchvision_download(request, lambda: cls(str(request.root), train=True, download=True), base)
    if not complete():
        raise files_missing(request, base)

    def unpickle(file: str) -> dict:
        with open(base / file, "rb") as f:
            try:
                return _ArraysOnly(f, encoding="latin1").load()
            except pickle.UnpicklingError as exc:
                raise DataError(f"dataset={request.name}: {base / file} is not a CIFAR batch ({exc})") from None

    def split(files: Sequence[str]) -> TensorImages:
        parts = [unpickle(f) for f in files]
        images = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32)  # (N, 3, 32, 32)
        labels = np.concatenate([p[label_key] for p in parts])
        return TensorImages(torch.from_numpy(images.copy()), labels)

    train = split(train_files)
    classes = list(unpickle(meta[0])[meta[1]])
    return _catalog_source(request.name, train, train.targets, split([test_file]), classes)


@registers("svhn")
def load_svhn(request: DataRequest) -> Source:
    """SVHN's cropped digits: `{train,test}_32x32.mat` (MATLAB: X (32, 32, 3, N), y (N, 1) with 10 for the
    digit 0) in `ROOT/svhn` (or `--data-dir` itself), downloaded by torchvision when missing."""
    from scipy.io import loadmat

    names = ("train_32x32.mat", "test_32x32.mat")
    candidates = [request.root / "svhn"] + ([request.data_dir] if request.data_dir else [])
    find = lambda: next((f for f in candidates if all((f / n).is_file() for n in names)), None)  # noqa: E731
    folder = find()
    if folder is None and request.download:
        import torchvision

        target = request.root / "svhn"
        _torchvision_download(request, lambda: [torchvision.datasets.SVHN(str(target), split=s, download=True)
                                                for s in ("train", "test")], target)
        folder = find()
    if folder is None:
        raise files_missing(request, request.root / "svhn")

    def split(name: str) -> TensorImages:
        mat = loadmat(str(folder / name), variable_names=("X", "y"))
        images = np.ascontiguousarray(np.transpose(mat["X"], (3, 2, 0, 1)))  # (H, W, C, N) -> (N, C, H, W)
        labels = mat["y"].astype(np.int64).reshape(-1) % 10  # the digit 0 is stored as 10
        return TensorImages(torch.from_numpy(images), labels)

    train = split(names[0])
    return _catalog_source("svhn", train, train.targets, split(names[1]), [str(d) for d in range(10)])


STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


@registers("stl10")
def load_stl10(request: DataRequest) -> Source:
    """STL-10's labelled splits: `{train,test}_{X,y}.bin` (uint8 images stored column-major, labels 1..10) and
    `class_names.txt` in `ROOT/stl10_binary` (or `--data-dir` itself), downloaded by torchvision when missing."""
    names = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")
    candidates = [request.root / "stl10_binary"] + ([request.data_dir] if request.data_dir else [])
    find = lambda: next((f for f in candidates if all((f / n).is_file() for n in names)), None)  # noqa: E731
    folder = find()
    if folder is None and request.download:
        import torchvision

        _torchvision_download(request, lambda: torchvision.datasets.STL10(str(request.root), split="train",
                                                                          download=True),
                              request.root / "stl10_binary")
        folder = find()
    if folder is None:
        raise files_missing(request, request.root / "stl10_binary")

    def split(prefix: str) -> TensorImages:
        raw = np.fromfile(folder / f"{prefix}_X.bin", dtype=np.uint8).reshape(-1, 3, 96, 96)
        images = np.ascontiguousarray(raw.transpose(0, 1, 3, 2))  # column-major (N, C, W, H) -> (N, C, H, W)
        labels = np.fromfile(folder / f"{prefix}_y.bin", dtype=np.uint8).astype(np.int64) - 1
        return TensorImages(torch.from_numpy(images), labels)

    names_file = folder / "class_names.txt"
    classes = names_file.read_text().split() if names_file.is_file() else STL10_CLASSES
    train = split("train")
    return _catalog_source("stl10", train, train.targets, split("test"), classes)


# ---------------------------------------------------------------- test-only sets (dataset shift)
def _download_files(request: DataRequest, base_url: str, names: Sequence[str], folder: Path) -> None:
    """Download each of `names` missing from `folder` (`base_url` + name), each whole or not at all."""
    from torchvision.datasets.utils import download_url

    def fetch() -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            if not (folder / name).is_file():
                download_url(base_url + name, str(folder), filename=f".{name}.part")
                os.replace(folder / f".{name}.part", folder / name)

    _torchvision_download(request, fetch, folder)


def _read_npy(request: DataRequest, path: Path) -> np.ndarray:
    """A .npy file's array, read without unpickling anything; DataError naming the file when unreadable."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        reason = " ".join(str(exc).split())[:160]
        raise DataError(f"dataset={request.name}: {path} is not a readable .npy array ({reason})") from None


def load_cifar10_1(request: DataRequest) -> TensorImages:
    """CIFAR-10.1 v6, a test-only set in CIFAR-10's classes: `cifar10.1_v6_data.npy` (uint8 (N, 32, 32, 3))
    and `cifar10.1_v6_labels.npy` (ints (N,), CIFAR-10's class indices) in `ROOT/cifar10.1` (or `--data-dir`
    itself), downloaded from the CIFAR-10.1 repository when missing and `request.download` allows it.

    Returns:
        uint8 images (N, 3, 32, 32) with their (N,) labels.

    Raises:
        DataError: files missing (one line naming where they go), or not of that shape, type or label range
            (one line naming the file and the value).
    """
    target = request.root / "cifar10.1"
    candidates = [target] + ([request.data_dir] if request.data_dir else [])

    def find() -> Path | None:
        return next((f for f in candidates if all((f / n).is_file() for n in CIFAR10_1_FILES)), None)

    folder = find()
    if folder is None and request.download:
        _download_files(request, CIFAR10_1_URL, CIFAR10_1_FILES, target)
        folder = find()
    if folder is None:
        raise files_missing(request, target)
    data_path, labels_path = (folder / n for n in CIFAR10_1_FILES)
    images, labels = _read_npy(request, data_path), _read_npy(request, labels_path)
    side = SHIFT_SETS[request.name].native_size
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (side, side, 3):
        raise DataError(f"dataset={request.name}: {data_path} holds {images.dtype} images of shape {images.shape} "
                        f"(expected uint8 (N, {side}, {side}, 3))")
    if labels.dtype.kind not in "iu" or labels.shape != (len(images),):
        raise DataError(f"dataset={request.name}: {labels_path} holds {labels.dtype} labels of shape "
                        f"{labels.shape} (expected integers of shape ({len(images)},), one per image)")
    trained_on = SHIFT_SETS[request.name].trained_on
    num_classes = DATASETS[trained_on].num_classes
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise DataError(f"dataset={request.name}: {labels_path} holds label {int(bad[0])} "
                        f"(expected 0..{num_classes - 1}, the class indices of {trained_on})")
    chw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))  # (N, H, W, C) -> (N, C, H, W)
    return TensorImages(torch.from_numpy(chw), labels.astype(np.int64))


SHIFT_LOADERS: dict[str, Callable[[DataRequest], TensorImages]] = {"cifar10.1": load_cifar10_1}


# ---------------------------------------------------------------- folders of image files
def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


@registers("tiny_imagenet")
def load_tiny_imagenet(request: DataRequest) -> Source:
    """Tiny-ImageNet-200 as distributed: `train/WNID/images/*.JPEG`, `val/images/*.JPEG` with their classes in
    `val/val_annotations.txt` (file, WNID, box); the labelled val split is the test split. Found in
    `--data-dir` itself or `ROOT/tiny-imagenet-200`; never downloaded. Classes are the sorted WNIDs."""
    candidates = [request.data_dir] if request.data_dir else []
    candidates.append(request.root / "tiny-imagenet-200")
    folder = next((f for f in candidates if (f / "train").is_dir() and (f / "val" / "val_annotations.txt").is_file()),
                  None)
    if folder is None:
        raise files_missing(request, candidates[0],
                            hint=f"download {TINY_IMAGENET_URL} and unzip it into {request.root}, "
                                 "or pass --data-dir DIR")
    classes = sorted(d.name for d in (folder / "train").iterdir() if (d / "images").is_dir())
    if not classes:
        raise DataError(f"dataset=tiny_imagenet: {folder / 'train'} has no WNID/images/ folders "
                        f"(expected {DATASETS['tiny_imagenet'].files})")
    index = {wnid: k for k, wnid in enumerate(classes)}
    train = FileImages([(path, k) for wnid, k in index.items()
                        for path in _image_files(folder / "train" / wnid / "images")])
    val = []
    annotations = folder / "val" / "val_annotations.txt"
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        file, wnid = (line.split("\t") + [""])[:2]
        problem = (f"class {wnid!r} has no train/{wnid}/images/" if wnid not in index else
                   f"val/images/{file} is missing" if not (folder / "val" / "images" / file).is_file() else None)
        if problem:
            raise DataError(f"dataset=tiny_imagenet: {annotations} line {number}: {problem}")
        val.append((folder / "val" / "images" / file, index[wnid]))
    return _catalog_source("tiny_imagenet", train, train.targets, FileImages(val), classes)


@registers("imagefolder")
def load_imagefolder(request: DataRequest) -> Source:
    """ImageNet-style folders: DATA_DIR/train/CLASS/* and DATA_DIR/val (or test)/CLASS/*."""
    import torchvision

    data_dir = request.data_dir
    if data_dir is None or not (data_dir / "train").is_dir():
        raise DataError(f"dataset=imagefolder: data_dir={str(data_dir)!r} has no train/ folder "
                        "(expected DATA_DIR/train/CLASS/*.jpg and DATA_DIR/val/CLASS/*.jpg; pass --data-dir DIR)")

    def scan(folder: Path) -> tuple[FileImages, list[str]]:
        found = torchvision.datasets.ImageFolder(str(folder), loader=str)
        return FileImages(found.samples), list(found.classes)

    train, classes = scan(data_dir / "train")
    test_dir = next((data_dir / d for d in ("val", "test") if (data_dir / d).is_dir()), None)
    test = None
    if test_dir is not None:
        test, test_classes = scan(test_dir)
        if test_classes != classes:
            raise DataError(f"dataset=imagefolder: {test_dir} classes differ from train/ classes")
    return _catalog_source("imagefolder", train, train.targets, test, classes)


# ---------------------------------------------------------------- generated sources
@registers("synthetic")
def make_synthetic(request: DataRequest | None = None, num_classes: int = 4, n_train: int = 512, n_test: int = 128,
                   size: int = 32, seed: int = 1234) -> Source:
    """Learnable class patterns: a smooth random template per class plus pixel noise (the registry's loader:
    `request` only names the dataset; the patterns are fixed by the other arguments)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, size=(num_classes, 1, 4, 4))  # (K, 1, 4, 4)
    templates = torch.nn.functional.interpolate(torch.from_numpy(coarse), size=(size, size),
                                                mode="bilinear", align_corners=False)  # (K, 1, S, S)

    def split(n: int) -> TensorImages:
        labels = np.arange(n) % num_classes
        noise = torch.from_numpy(rng.normal(0, 0.15, size=(n, 1, size, size)))
        images = (templates[labels] + noise).clamp(0, 1).mul(255).round().to(torch.uint8)  # (n, 1, S, S)
        return TensorImages(images, labels)

    train = split(n_train)
    return _catalog_source("synthetic", train, train.targets, split(n_test), [f"class{k}" for k in range(num_classes)])


@registers("fractaldb")
def load_fractaldb(request: DataRequest) -> Source:
    """FractalDB pretraining images at `img_size` (no test split: one is carved off)."""
    from lightning_modules.fractaldb import FractalDB

    classes = request.fractal_classes
    per_class = max(1, request.fractal_size // classes)
    data = FractalDB(num_classes=classes, instances_per_class=per_class, img_size=request.img_size,
                     seed=request.fractal_seed)
    info = DATASETS["fractaldb"]
    return Source(data, np.asarray(data.targets, dtype=np.int64), None, [f"ifs{k}" for k in range(classes)],
                  request.img_size, Normalization(info.mean, info.std, "dataset:fractaldb"))


# ---------------------------------------------------------------- any torchvision dataset
_SET_BY_US = ("root", "train", "download", "transform", "target_transform", "transforms")


def _constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword parameters a class's constructor accepts, following `**kwargs` into its bases."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        forwards = False
        for name, parameter in list(inspect.signature(klass.__init__).parameters.items())[1:]:
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                forwards = True
            elif parameter.kind is not inspect.Parameter.VAR_POSITIONAL:
                found.setdefault(name, parameter)
        if not forwards:
            break
    return found


def _torchvision_class(request: DataRequest) -> tuple[type, dict[str, Any], dict[str, inspect.Parameter]]:
    """The class, the user's constructor arguments and the constructor's parameters; DataError when the
    name does not fit the rule."""
    import torchvision.datasets

    class_name, kwargs = parse_torchvision_name(request.name)
    cls = getattr(torchvision.datasets, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Dataset)):
        raise DataError(f"invalid dataset={request.name!r} (allowed: {TORCHVISION_RULE} with CLASS a "
                        "torchvision.datasets class, e.g. torchvision:EMNIST:split=balanced, torchvision:USPS)")
    params = _constructor_parameters(cls)
    selects = "train" if "train" in params else "split" if "split" in params else None
    if "root" not in params or selects is None:
        raise DataError(f"invalid dataset={request.name!r} (allowed: a torchvision.datasets class whose "
                        f"constructor takes root and train= or split=; {class_name} takes {', '.join(params)})")
    choosable = sorted(set(params) - set(_SET_BY_US))
    bad = sorted(set(kwargs) - set(choosable))
    if bad:
        raise DataError(f"invalid dataset={request.name!r}: {class_name} has no argument {bad[0]!r} that can be "
                        f"set here (allowed: {', '.join(choosable) or 'none'})")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n != "root"
               and n not in kwargs and not (n == "split" and selects == "split")]
    if missing:
        raise DataError(f"invalid dataset={request.name!r}: {class_name} needs {missing[0]}= "
                        f"(e.g. torchvision:{class_name}:{missing[0]}=VALUE)")
    return cls, kwargs, params


def load_torchvision(request: DataRequest) -> Source:
    """A `torchvision:CLASS[:KEY=VALUE...]` dataset (see the module docstring for the rule)."""
    cls, kwargs, params = _torchvision_class(request)
    root = request.root

    def construct(choice: dict[str, Any]) -> Dataset:
        """The class on the files under `root`, downloading them when they are missing and that is allowed."""
        args = dict(root=str(root), **kwargs, **choice)
        try:
            return cls(**args, **({"download": False} if "download" in params else {}))
        except (RuntimeError, OSError):
            if not (request.download and "download" in params):
                raise
        return cls(**args, download=True)

    def open_split(choice: dict[str, Any], fallback: dict[str, Any] | None = None) -> Dataset:
        """One split; `fallback` when the class has no split of the first name (no "test": "val")."""
        try:
            return construct(choice)
        except ValueError as exc:
            if fallback is not None and "split" in str(exc):
                return open_split(fallback)
            raise DataError(f"invalid dataset={request.name!r}: {str(exc).splitlines()[0][:200]}") from None
        except Exception as exc:  # noqa: BLE001 - files missing or unreadable, or the download failed
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
            raise DataError(f"dataset={request.name}: files not found or unreadable under {root} (expected the "
                            f"layout torchvision.datasets.{cls.__name__} reads, what its download writes; "
                            f"it said {reason}); put the files there or pass --data-dir DIR") from None

    if "train" in params:
        train_raw = open_split(dict(train=True))
        test_raw = open_split(dict(train=False))
    else:
        default = params["split"].default
        train_raw = open_split(dict(split=kwargs.pop("split", default if isinstance(default, str) else "train")))
        test_raw = open_split(dict(split="test"), fallback=dict(split="val"))
    train, train_targets = _wrap(request.name, train_raw)
    test, _ = _wrap(request.name, test_raw)
    native = max(train[0][0].shape[-2:])
    classes = list(getattr(train_raw, "classes", None) or [])
    n_classes = int(train_targets.max()) + 1
    if len(classes) < n_classes:
        classes = [str(k) for k in range(n_classes)]
    return Source(train, train_targets, test, classes, int(native), measure_normalization(train, request.name))


def _labels(name: str, dataset: Dataset) -> np.ndarray:
    """(N,) int class indices: from the dataset's `targets` / `labels` / `_labels`, else read item by item."""
    for attr in ("targets", "labels", "_labels"):
        values = getattr(dataset, attr, None)
        if values is not None and len(values) == len(dataset):
            break
    else:
        values = [dataset[i][1] for i in range(len(dataset))]
    try:
        labels = np.asarray(values.numpy() if isinstance(values, torch.Tensor) else values).astype(np.int64).reshape(-1)
    except (TypeError, ValueError):
        labels = np.empty(0)
    if len(labels) != len(dataset) or (len(labels) and labels.min() < 0):
        raise DataError(f"invalid dataset={name!r}: its targets are not class indices (a classification dataset "
                        "is needed)")
    return labels


def _wrap(name: str, dataset: Dataset) -> tuple[Dataset, np.ndarray]:
    """A torchvision dataset as uint8 (C, H, W) images: in memory when its `data` array holds exactly the
    images it yields (MNIST-like, CIFAR-like, SVHN-like), else converted item by item."""
    labels = _labels(name, dataset)
    if len(labels) == 0:
        raise DataError(f"dataset={name}: the split is empty")
    lazy = TorchvisionImages(dataset, labels)
    data = getattr(dataset, "data", None)
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if (isinstance(data, torch.Tensor) and data.dtype == torch.uint8 and len(data) == len(labels)
            and data.ndim in (3, 4)):
        first = lazy[0][0]
        candidates = [data.unsqueeze(1)] if data.ndim == 3 else [data.permute(0, 3, 1, 2), data]
        for images in candidates:  # (N, H, W) | (N, H, W, C) | (N, C, H, W)
            if images.shape[1:] == first.shape and torch.equal(images[0], first):
                return TensorImages(images.contiguous(), labels), labels
    return lazy, labels


def measure_normalization(dataset: Dataset, name: str, n_images: int = STATS_IMAGES) -> Normalization:
    """Per-channel mean and std of `n_images` evenly spaced images of `dataset` (uint8 (C, H, W) items);
    grey images count as RGB when any sampled image is RGB."""
    positions = np.unique(np.linspace(0, len(dataset) - 1, min(n_images, len(dataset))).round().astype(np.int64))
    if isinstance(dataset, TensorImages):
        images = [dataset.images[torch.as_tensor(positions)]]  # (n, C, H, W)
    else:
        images = [dataset[int(i)][0].unsqueeze(0) for i in positions]  # each (1, C, H, W)
    chans = max(image.shape[1] for image in images)
    total = torch.zeros(chans, dtype=torch.float64)
    squares = torch.zeros(chans, dtype=torch.float64)
    count = 0
    for image in images:
        pixels = image.expand(-1, chans, -1, -1).to(torch.float64) / 255  # (n, chans, H, W)
        total += pixels.sum(dim=(0, 2, 3))
        squares += pixels.square().sum(dim=(0, 2, 3))
        count += pixels[:, 0].numel()
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt()
    return Normalization(tuple(round(float(m), 4) for m in mean), tuple(round(max(float(s), 1e-3), 4) for s in std),
                         f"measured:{name}")
