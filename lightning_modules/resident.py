"""A resident dataset: the training images held as one uint8 tensor on the training device, batched and
augmented there, so no loader stands between the data and the net.

Fairness: the resident path gives the *same batches* as the loader path
(`data.ImageDataModule.train_dataloader`), not merely the same kind. It walks
the same `SeededShuffle` (so each epoch's order, and each sample's
augmentation seed, are the seeded sampler's for that data seed and epoch),
draws each sample's augmentation parameters with torchvision's own
`make_params` under that sample's seed (so the crop offsets and flips are the
loader's draws), applies them to the whole batch on the device, then the
same deterministic steps (channels, dtype, normalisation) and the same
MixUp / CutMix (`MixCollate.mix_batch`, under the batch's first seed). On
the CPU the batches are bitwise equal to the loader's (tests/test_resident.py);
on a GPU they differ only by the device's floating-point rounding in the
normalisation and, for `RandomResizedCrop`, the resampling.

What runs on the device: in-memory datasets (`TensorImages`: Fashion-MNIST,
CIFAR, synthetic; not image folders) whose training transform is built from
`DEVICE_RANDOM` (reflect-padded `RandomCrop`, `RandomResizedCrop`, horizontal
flip) and `DEVICE_FIXED` steps. RandAugment is not: it is one of 14
per-image operations chosen per image, which has no batched device version
here; `resident_support` says so, and a spec that asks for `resident: true`
with it is refused.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

# Share of the device's memory the resident images may take (the rest is the net's: weights, optimizer state,
# activations). CIFAR-10's 45,000 training images at 224 px are 6.8 GB, 9 % of an 80 GB H100.
MEMORY_SHARE = 0.25
DEVICE_RANDOM = (v2.RandomCrop, v2.RandomResizedCrop, v2.RandomHorizontalFlip)
DEVICE_FIXED = ("ToImage", "Resize", "CenterCrop", "_ToChannels", "ToDtype", "Normalize")


# ------------------------------------------------------------------ batched image operations
def reflect_crop(x: Tensor, padding: int, top: Tensor, left: Tensor, size: int) -> Tensor:
    """Per image, the (size x size) window at (top, left) of the image reflect-padded by `padding` on each
    side, without materialising the padded batch (any dtype: indices only, so exact).

    Args:
        x: (B, C, H, W).
        padding: pixels of reflection on each side.
        top / left: (B,) window corners in padded coordinates, on x's device.
        size: the window's side.
    """
    B, C, H, W = x.shape

    def reflected(start: Tensor, n: int) -> Tensor:  # (B, size) source indices
        i = start[:, None] + torch.arange(size, device=x.device) - padding
        i = torch.where(i < 0, -i, i)
        return torch.where(i >= n, 2 * (n - 1) - i, i)

    rows = reflected(top, H)[:, None, :, None].expand(B, C, size, W)  # (B, C, S, W)
    x = x.gather(2, rows)  # (B, C, S, W)
    cols = reflected(left, W)[:, None, None, :].expand(B, C, size, size)  # (B, C, S, S)
    return x.gather(3, cols)  # (B, C, S, S)


# ------------------------------------------------------------------ what can be resident
def device_steps(transform: v2.Compose) -> tuple[list[Any], str]:
    """The transform's steps, and "" when every one runs batched on the device, else why not."""
    steps = list(transform.transforms)
    for step in steps:
        name = type(step).__name__
        if isinstance(step, v2.RandomCrop) and step.padding_mode != "reflect":
            return steps, f"{name}(padding_mode={step.padding_mode!r}) is not on the device path"
        if not (isinstance(step, DEVICE_RANDOM) or name in DEVICE_FIXED):
            return steps, f"{name} runs per image on the host (device path: crop, resized crop, flip)"
    return steps, ""


def resident_support(datamodule: Any, device: torch.device) -> str:
    """"" when the set-up `datamodule`'s training subset can be resident on `device`, else one line why not
    (image files, an augmentation with no device version, too large for the device)."""
    from lightning_modules.datasets import TensorImages

    base = datamodule.train_set.base
    if not isinstance(base, TensorImages):
        return f"dataset={datamodule.dataset} is read from image files, not held in memory"
    _, why = device_steps(datamodule.train_set.transform)
    if why:
        return f"augment={datamodule.augment}: {why}"
    image_bytes = base.images[0].numel() * base.images.element_size()
    needed = image_bytes * datamodule.n_train
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if needed > MEMORY_SHARE * total:
            return (f"the training subset takes {needed / 2**30:.1f} GiB at {datamodule.img_size} px, more than "
                    f"{MEMORY_SHARE:.0%} of the device's {total / 2**30:.0f} GiB")
    return ""


# ------------------------------------------------------------------ the batches
class ResidentBatches:
    """A `SeededSubset` of in-memory images as batches made on `device`: the loader's batches without a loader.

    Training (`sampler` given): the sampler's order in its whole batches, each sample augmented under its
    seed, MixUp / CutMix under the batch's first seed, exactly as `ImageDataModule.train_dataloader`.
    Evaluation (`sampler` None): the stored order, the last partial batch kept.

    It is resumable like `ResumableDataLoader` (`state_dict` / `load_state_dict`: the sampler's epoch and the
    batches handed out in it), and Lightning finds the sampler's `set_epoch` through `.sampler`.

    Args:
        subset: the images (`subset.base` a `TensorImages`), subset indices and transform.
        batch_size: images per batch (per process under DDP, as the sampler's).
        device: where the images are held and the batches made.
        sampler: a `SeededShuffle`, or None for the stored order.
        mix: the loader's `MixCollate` (None or one without MixUp / CutMix: hard labels).
    """

    def __init__(self, subset: Any, batch_size: int, device: torch.device | str, sampler: Any = None,
                 mix: Any = None) -> None:
        steps, why = device_steps(subset.transform)
        if why:
            raise ValueError(f"invalid resident data ({why})")
        self.steps, self.random = steps, subset.random
        self.device, self.batch_size, self.sampler, self.mix = torch.device(device), batch_size, sampler, mix
        rows = torch.as_tensor(subset.indices, dtype=torch.int64)
        self.images = subset.base.images[rows].to(self.device)  # (N, C, H, W) uint8: the subset only
        self.labels = torch.as_tensor(subset.base.targets[subset.indices], dtype=torch.int64).to(self.device)
        self.probe = tv_tensors.Image(torch.empty(self.images.shape[1:], dtype=torch.uint8, device="meta"))
        self._handed_out = self._skip = 0

    def __len__(self) -> int:
        if self.sampler is None:
            return math.ceil(len(self.labels) / self.batch_size)
        return len(self.sampler) // self.batch_size

    # -- resuming, as ResumableDataLoader
    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(getattr(self.sampler, "epoch", 0)), "batches": self._handed_out}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, batches = state["epoch"], state["batches"]
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        self._skip = batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.sampler is None:
            items = [(i, None) for i in range(len(self.labels))]
        else:
            items = list(self.sampler)  # [(position in the subset, augmentation seed)]
        batches = [items[b * self.batch_size:(b + 1) * self.batch_size] for b in range(len(self))]
        skip, self._skip = self._skip, 0
        self._handed_out = skip
        for batch in itertools.islice(batches, skip, None):
            self._handed_out += 1
            yield self.batch(batch)

    # -- one batch
    def draws(self, seeds: list[int]) -> list[list[dict[str, Any]]]:
        """Per sample, the parameters of each random step, drawn as torchvision draws them under the sample's
        seed (`SeededSubset`): RandomCrop / RandomResizedCrop `make_params`, the flip's `rand(1) < p`."""
        out = []
        with torch.random.fork_rng(devices=[]):
            for seed in seeds:
                torch.default_generator.manual_seed(seed)
                sample = []
                for step in self.steps:
                    if isinstance(step, v2.RandomHorizontalFlip):
                        sample.append({"flip": not bool(torch.rand(1) >= step.p)})
                    elif isinstance(step, (v2.RandomCrop, v2.RandomResizedCrop)):
                        sample.append(step.make_params([self.probe]))
                out.append(sample)
        return out

    def batch(self, items: list[tuple[int, int | None]]) -> tuple[Tensor, Tensor]:
        """(images (B, C', S, S) float, labels (B,) or soft targets (B, K)) for `items` (position, seed)."""
        positions = torch.as_tensor([i for i, _ in items], dtype=torch.int64, device=self.device)
        x: Tensor = self.images[positions]  # (B, C, H, W) uint8
        labels = self.labels[positions]  # (B,)
        seeds = [seed for _, seed in items]
        augment = self.random and seeds[0] is not None
        draws = self.draws(seeds) if augment else []
        k = 0  # index of the random step among the random steps
        for step in self.steps:
            if not isinstance(step, DEVICE_RANDOM):
                x = step(x)  # deterministic: the loader's own step, on the whole batch
                continue
            if not augment:
                continue
            params = [d[k] for d in draws]
            k += 1
            if isinstance(step, v2.RandomHorizontalFlip):
                flip = torch.as_tensor([p["flip"] for p in params], device=self.device)
                x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            elif isinstance(step, v2.RandomCrop):
                size = step.size[0]
                pad = params[0]["padding"][0]
                top = torch.as_tensor([p["top"] for p in params], device=self.device)
                left = torch.as_tensor([p["left"] for p in params], device=self.device)
                x = reflect_crop(x, pad, top, left, size)
            else:  # RandomResizedCrop: a different window per image, resized per image
                x = torch.stack([TF.resized_crop(img, p["top"], p["left"], p["height"], p["width"], step.size,
                                                 interpolation=step.interpolation, antialias=step.antialias)
                                 for img, p in zip(x, params)])
        x = x.as_subclass(Tensor)
        if self.mix is not None and self.mix.mix is not None and seeds[0] is not None:
            return self.mix.mix_batch(x, labels, seeds[0])
        return x, labels


__all__ = ["MEMORY_SHARE", "ResidentBatches", "device_steps", "reflect_crop", "resident_support"]
