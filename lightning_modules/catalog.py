"""What can be trained: model and dataset names with their static facts.

Plain data, no torch import, so that a spec or a sweep file is validated in
well under a second, before any heavy import or any work starts.
"""

from __future__ import annotations

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
    # Paper-scale pair (224 px, patch 16), same widths as timm / DeiT.
    "vit_ti16": ModelInfo("vit", "vit_tiny_patch16_224.augreg_in21k_ft_in1k",
                          ViTConfig(patch_size=16, embed_dim=192, depth=12, num_heads=3)),
    "vit_s16": ModelInfo("vit", "vit_small_patch16_224.augreg_in21k_ft_in1k",
                         ViTConfig(patch_size=16, embed_dim=384, depth=12, num_heads=6)),
    "vit_b16": ModelInfo("vit", "vit_base_patch16_224.augreg_in21k_ft_in1k",
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
    """A dataset's static facts (sizes are the standard splits)."""

    num_classes: int
    in_chans: int
    native_size: int
    n_train: int | None
    n_test: int | None


DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo(10, 1, 28, 60_000, 10_000),
    "cifar10": DatasetInfo(10, 3, 32, 50_000, 10_000),
    "cifar100": DatasetInfo(100, 3, 32, 50_000, 10_000),
    # ImageNet-style folders: classes and sizes are read from disk.
    "imagefolder": DatasetInfo(0, 3, 224, None, None),
    # Class-dependent random patterns, generated in memory (tests, smoke runs).
    "synthetic": DatasetInfo(4, 1, 32, 512, 128),
    # Formula-driven pretraining images (Kataoka et al. 2020); sized by the spec.
    "fractaldb": DatasetInfo(0, 1, 32, None, None),
}

PRETRAINING_SOURCES = ("none", "imagenet", "fractaldb")  # or any supervised DATASETS name
