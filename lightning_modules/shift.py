"""Dataset shift of a net trained on CIFAR-10: the same net on new test sets of the same classes.

Two comparisons, each of a shifted set against CIFAR-10's own test set under the same rule:

- `cifar10` vs `cifar10.1`: CIFAR-10's test set against CIFAR-10.1 v6 (Recht et al. 2018, new images
  collected as CIFAR-10's were); the prediction is the argmax over all 10 classes;
- `cifar10_shared` vs `stl10_shared`: the 9 classes CIFAR-10 and STL-10 share (STL's car is CIFAR's
  automobile). STL's monkey has no CIFAR class: its images are left out. CIFAR's frog has no STL class: the
  prediction is the argmax over the 9 shared classes only, the frog logit masked, on STL-10's test images and
  on CIFAR-10's test images of the shared classes alike, so the drop compares like with like.

Every image takes the run's own test path: resized to the net's side as the data module resizes a small test
set in memory (STL-10's 96 px images too), then the run's eval transform (its channels, its normalisation).

Metric names: `shift/<set>/acc1` and `shift/<set>/n` for each evaluated set of `SETS`; a comparison whose
shifted set is not available records nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

from lightning_modules.classifier import prefers_channels_last
from lightning_modules.robustness import PRECISIONS

# shifted set (as loaded) -> (CIFAR-10's set under the same rule, the shifted set), as metric names
COMPARISONS: dict[str, tuple[str, str]] = {"cifar10.1": ("cifar10", "cifar10.1"),
                                           "stl10": ("cifar10_shared", "stl10_shared")}
SETS = tuple(name for pair in COMPARISONS.values() for name in pair)
ALIASES = {"car": "automobile"}  # STL-10's class name -> CIFAR-10's

Logits = Callable[[Tensor], Tensor]  # uint8 images (N, C, H, W) -> (N, K) logits


@dataclass(frozen=True)
class Labelled:
    """A test set as stored.

    Attributes:
        images: uint8 (N, C, H, W).
        labels: (N,) int class indices into `classes`.
        classes: the set's class names.
    """

    images: Tensor
    labels: np.ndarray
    classes: Sequence[str]


@dataclass
class ShiftResult:
    """Per-image outcomes of each evaluated set.

    Attributes:
        correct: {set: (n,) bool} whether the net's prediction was right.
        targets: {set: (n,) int} the labels, as CIFAR-10 class indices.
        rows: {set: (n,) int} the images' positions in the stored test split.
    """

    correct: dict[str, np.ndarray] = field(default_factory=dict)
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    rows: dict[str, np.ndarray] = field(default_factory=dict)

    def record(self, name: str, correct: np.ndarray, targets: np.ndarray, rows: np.ndarray) -> None:
        self.correct[name], self.targets[name], self.rows[name] = correct, targets, rows

    @property
    def metrics(self) -> dict[str, float]:
        """`shift/<set>/acc1` and `shift/<set>/n` of every evaluated set."""
        out: dict[str, float] = {}
        for name, correct in self.correct.items():
            out[f"shift/{name}/acc1"] = float(correct.mean())
            out[f"shift/{name}/n"] = float(correct.size)
        return out


def class_map(source: Sequence[str], target: Sequence[str], aliases: dict[str, str] = ALIASES) -> np.ndarray:
    """(K_source,) int64: the index in `target` of each `source` class (by name, through `aliases`), -1 where
    `target` has no such class."""
    index = {name: k for k, name in enumerate(target)}
    return np.array([index.get(aliases.get(name, name), -1) for name in source], dtype=np.int64)


def masked_argmax(logits: Tensor, allowed: np.ndarray) -> np.ndarray:
    """(N,) the best class among `allowed` ((K,) bool) for each row of `logits` (N, K): the others' logits
    count as -inf."""
    keep = torch.as_tensor(allowed, dtype=torch.bool, device=logits.device)
    return logits.float().masked_fill(~keep, float("-inf")).argmax(dim=1).cpu().numpy()


@torch.no_grad()
def predict_logits(net: nn.Module, images: Tensor, transform: Callable[[Tensor], Tensor], img_size: int,
                   precision: str, batch_size: int = 256) -> Tensor:
    """(N, K) float32 logits of `net` (in eval mode) on uint8 images (N, C, H, W) of any side.

    Each batch is resized to `img_size` (antialiased, as the data module resizes its in-memory test set) and
    goes through `transform`, the run's eval pipeline, on the net's device under `precision`'s autocast.
    """
    device = next(net.parameters()).device
    dtype = PRECISIONS.get(precision)
    channels_last = prefers_channels_last(net)
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]  # (B, C, H, W) uint8
        if batch.shape[-2:] != (img_size, img_size):
            batch = TF.resize(batch, [img_size, img_size], antialias=True)
        x = transform(batch).as_subclass(Tensor).to(device)  # (B, C', S, S) float
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out.append(net(x).float().cpu())  # (B, K)
    return torch.cat(out)


def evaluate_shift(logits_of: Logits, cifar10: Labelled, shifted: dict[str, Labelled]) -> ShiftResult:
    """Per-image correctness on CIFAR-10's test set and on each shifted set (keys of `COMPARISONS`).

    Args:
        logits_of: uint8 images (N, C, H, W) -> (N, 10) logits over CIFAR-10's classes.
        cifar10: CIFAR-10's test set (the run's own).
        shifted: the shifted sets found: "cifar10.1" (CIFAR-10's labels) and/or "stl10" (STL-10's labels).

    Returns:
        The sets of each comparison whose shifted set is in `shifted`, named as in `COMPARISONS`.
    """
    result = ShiftResult()
    if not shifted:
        return result
    everything = np.ones(len(cifar10.classes), dtype=bool)
    cifar_logits = logits_of(cifar10.images)  # (N, 10)
    all_rows = np.arange(len(cifar10.labels))
    if "cifar10.1" in shifted:
        new = shifted["cifar10.1"]
        result.record("cifar10", masked_argmax(cifar_logits, everything) == cifar10.labels, cifar10.labels, all_rows)
        result.record("cifar10.1", masked_argmax(logits_of(new.images), everything) == new.labels, new.labels,
                      np.arange(len(new.labels)))
    if "stl10" in shifted:
        stl = shifted["stl10"]
        to_cifar = class_map(stl.classes, cifar10.classes)  # (10,): -1 for monkey
        shared = np.zeros(len(cifar10.classes), dtype=bool)
        shared[to_cifar[to_cifar >= 0]] = True  # (10,): every CIFAR class but frog
        rows = np.flatnonzero(shared[cifar10.labels])
        result.record("cifar10_shared", masked_argmax(cifar_logits[rows], shared) == cifar10.labels[rows],
                      cifar10.labels[rows], rows)
        stl_targets = to_cifar[stl.labels]  # (N_stl,) CIFAR indices, -1 for monkey
        rows = np.flatnonzero(stl_targets >= 0)
        logits = logits_of(stl.images[torch.as_tensor(rows)])
        result.record("stl10_shared", masked_argmax(logits, shared) == stl_targets[rows], stl_targets[rows], rows)
    return result
