"""What can be trained: model and dataset names with their static facts.

Plain data, no torch import, so that a spec or a sweep file is validated in
well under a second, before any heavy import or any work starts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning_modules.vit_config import ViTConfig


@dataclass(frozen=True)
class ModelInfo:
    """A registered net.

    Attributes:
        arch: "vit" or "cnn": which side of the comparison the net is on.
        timm_name: the timm architecture whose weights it shares (ImageNet
            pretraining loads these), or None when timm has no such weights.
        vit: the ViT's architecture (vit nets; image size, channels and classes
            are set when the net is built).
        timm_kwargs: extra keyword arguments for `timm.create_model` (cnn nets).
    """

    arch: str
    timm_name: str | None
    vit: ViTConfig | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, ModelInfo] = {
    # Paper-scale pair (224 px, patch 16), same widths as timm / DeiT. ImageNet pretraining is symmetric: every
    # net loads ImageNet-1k weights (DeiT's, Touvron et al. 2021, against ResNet50's resnet50.a1_in1k), which
    # also share one input normalisation (ImageNet's mean/std), so pretrained nets see identical batches.
    "vit_ti16": ModelInfo("vit", "deit_tiny_patch16_224.fb_in1k",
                          ViTConfig(patch_size=16, embed_dim=192, depth=12, num_heads=3)),
    "vit_s16": ModelInfo("vit", "deit_small_patch16_224.fb_in1k",
                         ViTConfig(patch_size=16, embed_dim=384, depth=12, num_heads=6)),
    "vit_b16": ModelInfo("vit", "deit_base_patch16_224.fb_in1k",
                         ViTConfig(patch_size=16, embed_dim=768, depth=12, num_heads=12)),
    # CPU profile: a small ViT for 28 px images (patch 4: 49 tokens), its training FLOPs per image within
    # 0.5-2x of ResNet50's at the same size; width and depth chosen on validation accuracy
    # (benchmarks/RESULTS.md, "Tuning on validation").
    "vit_tiny_p4": ModelInfo("vit", None,
                             ViTConfig(img_size=28, patch_size=4, embed_dim=192, depth=4, num_heads=4, mlp_ratio=4.0)),
    # The CPU ViT of earlier runs (patch 8 at 32 px: 16 tokens; 0.45x ResNet50's FLOPs), kept so they reproduce.
    "vit_tiny_p8": ModelInfo("vit", None,
                             ViTConfig(img_size=32, patch_size=8, embed_dim=256, depth=4, num_heads=4, mlp_ratio=2.0)),
    # CNNs come from timm unchanged.
    "resnet50": ModelInfo("cnn", "resnet50.a1_in1k"),
    "resnet18": ModelInfo("cnn", "resnet18.a1_in1k"),
}


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's static facts (sizes are the standard splits).

    Attributes:
        num_classes: classes (0: read from the files).
        in_chans: channels as stored (1 grey, 3 RGB); the net's by default (`RunSpec.net_in_chans`).
        native_size: side of the stored images (0: read from the first image).
        n_train / n_test: images in the standard splits (None: read from the files).
        mean / std: per-channel pixel statistics of the training split, in [0, 1] (None: measured when loaded).
        files: where the files go and their layout, under the data root (`--data-dir`, default
            `~/.cache/vit-vs-cnn/data`, or `$VIT_VS_CNN_DATA`); "" for generated sources.
    """

    num_classes: int
    in_chans: int
    native_size: int
    n_train: int | None
    n_test: int | None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    files: str = ""


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_IDX = "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"

# One entry per dataset; its loader is `lightning_modules.datasets.LOADERS[name]` (a test checks both ways).
REGISTERED_DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(10, 1, 28, 60_000, 10_000, (0.2860,), (0.3530,),
                                 f"FashionMNIST/raw/{_IDX} (or Debian's /usr/share/datasets/fashion-mnist/)"),
    "mnist": DatasetInfo(10, 1, 28, 60_000, 10_000, (0.1307,), (0.3081,), f"MNIST/raw/{_IDX}"),
    "kmnist": DatasetInfo(10, 1, 28, 60_000, 10_000, (0.1918,), (0.3483,), f"KMNIST/raw/{_IDX}"),
    "svhn": DatasetInfo(10, 3, 32, 73_257, 26_032, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                        "svhn/{train,test}_32x32.mat"),
    # STL-10's labelled splits; its classes are not CIFAR-10's (monkey instead of frog, no automobile: car).
    "stl10": DatasetInfo(10, 3, 96, 5_000, 8_000, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713),
                         "stl10_binary/{train,test}_{X,y}.bin + class_names.txt"),
    "cifar10": DatasetInfo(10, 3, 32, 50_000, 10_000, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}"),
    "cifar100": DatasetInfo(100, 3, 32, 50_000, 10_000, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            "cifar-100-python/{train,test,meta}"),
    # Its labelled val split is the test split (the test split has no labels); validation comes from train.
    "tiny_imagenet": DatasetInfo(200, 3, 64, 100_000, 10_000, (0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262),
                                 "tiny-imagenet-200/{train/WNID/images/*.JPEG, val/images/*.JPEG, "
                                 "val/val_annotations.txt}"),
    # ImageNet-style folders: classes and sizes are read from disk; ImageNet's statistics.
    "imagefolder": DatasetInfo(0, 3, 224, None, None, IMAGENET_MEAN, IMAGENET_STD,
                               "--data-dir DIR with DIR/train/CLASS/* and DIR/val/CLASS/* (or DIR/test/CLASS/*)"),
    # Class-dependent random patterns, generated in memory (tests, smoke runs).
    "synthetic": DatasetInfo(4, 1, 32, 512, 128, (0.5,), (0.25,)),
    # Formula-driven pretraining images (Kataoka et al. 2020); sized by the spec.
    "fractaldb": DatasetInfo(0, 1, 32, None, None, (0.2,), (0.4,)),
}


@dataclass(frozen=True)
class ShiftSetInfo:
    """A test-only dataset: runs are evaluated on it, never trained on it (so it is not in `DATASETS`).

    Attributes:
        trained_on: the training dataset whose classes (label indices) it shares.
        n_test: images.
        native_size: side of the stored images.
        files: where the files go and their layout, under the data root.
    """

    trained_on: str
    n_test: int
    native_size: int
    files: str


# The dataset-shift evaluation's own sets (`lightning_modules.shift`); each is read by a loader of
# `lightning_modules.datasets` (`SHIFT_LOADERS`, a test checks both ways). STL-10, the other shift set, is a
# training dataset too and is in DATASETS.
SHIFT_SETS: dict[str, ShiftSetInfo] = {
    # CIFAR-10.1 v6 (Recht et al. 2018): 2,000 new test images collected as CIFAR-10's were, in its 10 classes.
    "cifar10.1": ShiftSetInfo("cifar10", 2_000, 32, "cifar10.1/cifar10.1_v6_{data,labels}.npy"),
}

TORCHVISION_PREFIX = "torchvision:"
TORCHVISION_RULE = "torchvision:CLASS[:KEY=VALUE...]"
_TORCHVISION_NAME = re.compile(r"torchvision:([A-Z][A-Za-z0-9_]*)((?::[a-z_][a-z0-9_]*=[A-Za-z0-9_.+-]+)*)")


def parse_torchvision_name(name: str) -> tuple[str, dict[str, str | int | bool]] | None:
    """`torchvision:CLASS[:KEY=VALUE...]` -> (CLASS, {KEY: VALUE}); None when `name` does not follow the rule.

    CLASS is a `torchvision.datasets` class; KEY=VALUE pairs are extra constructor arguments (integers and
    true/false are converted), e.g. `torchvision:EMNIST:split=balanced`.
    """
    match = _TORCHVISION_NAME.fullmatch(name)
    if match is None:
        return None
    kwargs: dict[str, str | int | bool] = {}
    for pair in filter(None, match.group(2).split(":")):
        key, text = pair.split("=", 1)
        value: str | int | bool = {"true": True, "false": False}.get(text.lower(), text)
        kwargs[key] = int(text) if text.lstrip("-").isdigit() else value
    return match.group(1), kwargs


class DatasetCatalog(Mapping[str, DatasetInfo]):
    """The registered datasets, plus every torchvision dataset class by name.

    Iterating lists the registered names; lookup (and `in`) also accepts
    `torchvision:CLASS[:KEY=VALUE...]`, whose facts are read when the data is
    loaded: classes and image size from the files, the pixel statistics
    measured on its training images, 3 input channels unless the spec's
    `in_chans` says otherwise (grey images are repeated).
    """

    def __init__(self, registered: dict[str, DatasetInfo]) -> None:
        self._registered = registered

    def __getitem__(self, name: str) -> DatasetInfo:
        if not isinstance(name, str):
            raise KeyError(name)
        if name in self._registered:
            return self._registered[name]
        if parse_torchvision_name(name) is not None:
            return DatasetInfo(0, 3, 0, None, None, files=f"the layout torchvision.datasets.{name.split(':')[1]} "
                                                          "reads (what its download writes)")
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._registered)

    def __len__(self) -> int:
        return len(self._registered)

    def allowed(self, exclude: tuple[str, ...] = ()) -> str:
        """The names a spec may give, for an error message."""
        return " | ".join([name for name in self if name not in exclude] + [TORCHVISION_RULE])


DATASETS = DatasetCatalog(REGISTERED_DATASETS)

PRETRAINING_SOURCES = ("none", "imagenet", "fractaldb")  # or any supervised DATASETS name
