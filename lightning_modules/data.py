"""One DataModule for every net and every dataset.

Fairness lives here: whichever net is trained, a given `data_seed` gives the
same validation split, the same training subset, the same sample order and
the same augmentation draws. Subsets are stratified (each class keeps its
share) and nested (the 1 % subset is inside the 10 % subset), because every
fraction takes a prefix of one fixed per-class permutation.

The datasets themselves (where their files go, how they are read) are in
`lightning_modules.datasets`; this module splits, subsets, transforms and
batches them. Inputs are normalised with the dataset's pixel statistics, or,
when fine-tuning pretrained weights, with the weights' own (`normalization`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterator

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchvision.transforms import v2

from lightning_modules.catalog import DATASETS
from lightning_modules.datasets import DataError, DataRequest, Normalization, Source, TensorImages, load_source
from lightning_modules.resumable import ResumableDataLoader


# ---------------------------------------------------------------- subsets
def _class_orders(targets: np.ndarray, data_seed: int) -> dict[int, np.ndarray]:
    """One fixed random permutation of each class's indices, from data_seed alone."""
    return {int(c): np.random.default_rng([data_seed, int(c)]).permutation(np.flatnonzero(targets == c))
            for c in np.unique(targets)}


def _allocate(counts: dict[int, int], total: int) -> dict[int, int]:
    """Split `total` across classes proportionally (largest remainder)."""
    n = sum(counts.values())
    exact = {c: total * k / n for c, k in counts.items()}
    alloc = {c: int(np.floor(x)) for c, x in exact.items()}
    for c in sorted(exact, key=lambda c: (alloc[c] - exact[c], c))[: total - sum(alloc.values())]:
        alloc[c] += 1
    return alloc


def split_indices(targets: np.ndarray, data_seed: int, train_fraction: float, val_size: int,
                  test_size: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified validation (and optional test) split, then a nested training subset.

    Each class's indices are permuted once (from `data_seed`); the first
    slots go to validation (and test), and the training subset for any
    fraction is a prefix of the rest, so smaller fractions are contained in
    larger ones and no net ever sees a different subset.

    Args:
        targets: (N,) labels of the training split.
        data_seed: seed of the permutation (independent of the model seed).
        train_fraction: share of the remaining pool per class, in (0, 1].
        val_size: images carved for validation (stratified).
        test_size: images carved for a test split (datasets without one).

    Returns:
        (train_idx, val_idx, test_idx), each sorted int64 arrays.
    """
    orders = _class_orders(targets, data_seed)
    counts = {c: len(o) for c, o in orders.items()}
    n_val = _allocate(counts, val_size)
    n_test = _allocate(counts, test_size) if test_size else {c: 0 for c in counts}
    train, val, test = [], [], []
    for c, order in orders.items():
        val.append(order[: n_val[c]])
        test.append(order[n_val[c]: n_val[c] + n_test[c]])
        pool = order[n_val[c] + n_test[c]:]
        train.append(pool[: max(1, round(train_fraction * len(pool)))])
    return tuple(np.sort(np.concatenate(parts)).astype(np.int64) for parts in (train, val, test))


def subset_hash(indices: np.ndarray) -> str:
    """First 16 hex digits of the SHA-256 of the sorted indices."""
    return hashlib.sha256(np.sort(indices).astype(np.int64).tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------- transforms
def build_transforms(normalization: Normalization, img_size: int, in_chans: int, augment: str, train: bool,
                     native_size: int) -> v2.Compose:
    """The same pipeline for every net: channels, size, augmentation, normalisation.

    Args:
        normalization: the input statistics (averaged over channels when their number differs from `in_chans`).
        img_size: the net's input side.
        in_chans: the net's input channels (grey is repeated to 3; RGB is
            converted to grey for 1).
        augment: "none" | "basic" (random crop + flip) | "randaug" (+ RandAugment).
        train: training (augmented) or evaluation pipeline.
        native_size: the dataset's stored side (large images are crop-resized).
    """
    normalization = normalization.for_channels(in_chans)
    steps: list[Callable] = [v2.ToImage()]
    small = native_size <= 64
    if train and augment != "none":
        if small:
            steps += [v2.Resize(img_size, antialias=True)] if native_size != img_size else []
            steps += [v2.RandomCrop(img_size, padding=max(1, img_size // 8), padding_mode="reflect")]
        else:
            steps += [v2.RandomResizedCrop(img_size, antialias=True)]
        steps += [v2.RandomHorizontalFlip()]
        if augment == "randaug":
            steps += [v2.RandAugment(num_ops=2, magnitude=9)]
    elif small:
        steps += [v2.Resize(img_size, antialias=True)] if native_size != img_size else []
    else:
        steps += [v2.Resize(int(round(img_size / 0.875)), antialias=True), v2.CenterCrop(img_size)]
    steps += [_ToChannels(in_chans), v2.ToDtype(torch.float32, scale=True),
              v2.Normalize(normalization.mean, normalization.std)]
    return v2.Compose(steps)


class _ToChannels(torch.nn.Module):
    """uint8 (C, H, W) -> (in_chans, H, W): repeat grey, or average RGB to grey."""

    def __init__(self, in_chans: int) -> None:
        super().__init__()
        self.in_chans = in_chans

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.shape[-3] == self.in_chans:
            return img
        grey = img if img.shape[-3] == 1 else v2.functional.rgb_to_grayscale(img)  # (..., 1, H, W)
        return grey.expand(*grey.shape[:-3], self.in_chans, *grey.shape[-2:]).clone()


class SeededSubset(Dataset):
    """A subset whose transform runs under a seed chosen by the sampler.

    Items are requested as `(index, seed)` pairs, so the augmentation of a
    sample depends on (data_seed, epoch, position) only, never on the model's
    RNG use: two nets trained with one data_seed see identical batches.
    `random=False` declares the transform deterministic (no augmentation).
    """

    def __init__(self, base: Dataset, indices: np.ndarray, transform: Callable, random: bool = False) -> None:
        self.base, self.indices, self.transform, self.random = base, indices, transform, random

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, int, int]:
        """`i` -> (image, label); `(i, seed)` -> (image, label, seed), augmented under `seed`."""
        i, seed = item if isinstance(item, tuple) else (item, None)
        image, label = self.base[int(self.indices[i])]
        if seed is None:
            return self.transform(image), label
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU RNG the transforms draw from
            return self.transform(image), label, seed

    def __getitems__(self, items: list) -> list:
        """A whole batch at once, identical to item by item but faster.

        Augmented items `(i, seed)` share one RNG fork; in-memory images under
        a deterministic transform are transformed as one (B, C, H, W) tensor.
        """
        seeded = any(isinstance(item, tuple) for item in items)
        if isinstance(self.base, TensorImages) and not (seeded and self.random):
            positions = [item[0] for item in items] if seeded else items
            rows = torch.as_tensor(self.indices[np.asarray(positions, dtype=np.int64)])
            images = self.transform(self.base.images[rows])  # deterministic, so batching is exact
            labels = self.base.targets[rows.numpy()].tolist()
            if seeded:
                return [(image, label, seed) for image, label, (_, seed) in zip(images, labels, items)]
            return list(zip(images, labels))
        if not seeded:
            return [self[item] for item in items]
        batch = []
        with torch.random.fork_rng(devices=[]):
            for i, seed in items:
                image, label = self.base[int(self.indices[i])]
                torch.default_generator.manual_seed(seed)
                batch.append((self.transform(image), label, seed))
        return batch


def per_process_batch(batch_size: int, n_train: int, processes: int) -> int:
    """The training batch of each of `processes` processes (DDP ranks) for a subset of `n_train` images.

    `batch_size` (the spec's global batch divided by its devices) when the subset holds at least one global
    batch; else the subset's whole images shared out evenly, `n_train // processes` per process, so the global
    batch shrinks to the largest multiple of `processes` that fits, instead of a rank getting fewer images
    than its batch and no batch at all. One process keeps the rule it always had, `min(batch_size, n_train)`.
    The result depends on the spec and the subset only, so every net sees the same global batches. 0 means the
    subset is too small to give each process one image (refused before any work).
    """
    return min(batch_size, n_train // processes)


class SeededShuffle(DistributedSampler):
    """The seeded order of the training subset in whole global batches, shared out among DDP processes.

    Epoch e's permutation and per-sample augmentation seeds depend only on (data_seed, e). The order is cut
    after its last whole global batch of G = `batch_size * num_replicas` items (the partial one is left out,
    as `drop_last` would), and global batch b, positions [bG, (b + 1)G), goes to the processes in contiguous
    slices: process `rank` takes [bG + rank * batch_size, bG + (rank + 1) * batch_size). The processes'
    batches b, concatenated in rank order, are therefore exactly the batch b of one process with batch G, the
    same samples under the same seeds, and every process gets the same number of whole batches.

    It shards itself, so it is a `DistributedSampler`: Lightning then leaves it in place. Lightning's own
    wrapper for other samplers would reshuffle the order (with the model's seed) before sharding it, so the
    ranks would no longer see the seeded order. Lightning calls `set_epoch` each epoch.
    """

    def __init__(self, n: int, data_seed: int, batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=False)
        self.n, self.data_seed, self.batch_size = n, data_seed, batch_size
        self.num_batches = n // (batch_size * num_replicas)

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rng = np.random.default_rng([self.data_seed, self.epoch, 7])
        order = rng.permutation(self.n)
        seeds = rng.integers(0, 2**62, size=self.n)
        global_batch = self.batch_size * self.num_replicas
        mine = (np.arange(self.num_batches)[:, None] * global_batch + self.rank * self.batch_size
                + np.arange(self.batch_size)).ravel()  # positions in the order, batch by batch
        return iter(zip(order[mine].tolist(), seeds[mine].tolist()))


class MixCollate:
    """Collate (image, label, seed) items; apply torchvision's MixUp / CutMix under the batch's first seed.

    Under DDP each process mixes its own share of the global batch (partners and mixing weight from its first
    seed): the samples and their augmentation are those of one process with the global batch, the mixing
    pairs are not, and are the same for every net run on the same number of devices.
    """

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float) -> None:
        choices = []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mix = v2.RandomChoice(choices) if choices else None

    def __call__(self, batch: list[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([b[0] for b in batch])  # (B, C, H, W)
        labels = torch.tensor([b[1] for b in batch])  # (B,)
        return self.mix_batch(images, labels, batch[0][2])

    def mix_batch(self, images: torch.Tensor, labels: torch.Tensor, first_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """MixUp / CutMix of a stacked batch (B, C, H, W), (B,) under its first sample's seed (any device: the
        draws come from the CPU generator)."""
        if self.mix is None:
            return images, labels
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(first_seed + 1)
            return self.mix(images, labels)  # labels -> (B, K) soft targets


# ---------------------------------------------------------------- datamodule
class ImageDataModule(pl.LightningDataModule):
    """Splits, subsets and loaders for one dataset, identical for every net.

    Args:
        dataset: a name from `lightning_modules.catalog.DATASETS`.
        img_size / in_chans: what the net consumes.
        batch_size: the batch of each process: the spec's global batch divided by its devices (training
            batches shrink with a small subset, `per_process_batch`; evaluation batches are twice as large).
        train_fraction: share of the training pool, in (0, 1] (stratified, nested).
        val_size: validation images carved from the training split (with
            `val_fraction`: the cap).
        val_fraction: when > 0, validation takes this share of the training
            split, capped at `val_size` and at least one image per class, so a
            folder of a few hundred images keeps most of them for training.
        data_seed: seed of split, subset, order and augmentation.
        augment: "none" | "basic" | "randaug".
        mixup_alpha / cutmix_alpha: torchvision MixUp / CutMix (0 = off).
        data_dir: where the files are (None: the data root of `lightning_modules.datasets`).
        download: allow torchvision downloads when files are missing.
        fractal_classes / fractal_size / fractal_seed: FractalDB size (dataset="fractaldb").
        num_workers: DataLoader workers.
        train_eval_size: training images evaluated (no augmentation) for the train-test gap.
        normalization: the input statistics to use instead of the dataset's (a pretrained net's own).
        resident: training batches from `lightning_modules.resident.ResidentBatches` (the subset held on the
            trainer's device, the same batches made there) instead of a DataLoader; check `resident_support`
            after `setup` first.

    After `setup`, `normalization` holds the statistics the inputs are normalised with (per net input
    channel, with their source), for result.json.
    """

    def __init__(self, dataset: str, img_size: int, in_chans: int, batch_size: int,
                 train_fraction: float = 1.0, val_size: int = 2000, val_fraction: float = 0.0,
                 data_seed: int = 0,
                 augment: str = "basic", mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
                 data_dir: str | Path | None = None, download: bool = True,
                 fractal_classes: int = 0, fractal_size: int = 0, fractal_seed: int = 0,
                 num_workers: int = 0, train_eval_size: int = 1024,
                 normalization: Normalization | None = None, resident: bool = False) -> None:
        super().__init__()
        self.resident = resident
        self.resident_note = ""  # why resident data was not possible, when it was asked for as "auto"
        if dataset not in DATASETS:
            raise DataError(f"invalid dataset={dataset!r} (allowed: {DATASETS.allowed()})")
        self.dataset, self.img_size, self.in_chans = dataset, img_size, in_chans
        self.batch_size, self.train_fraction = batch_size, train_fraction
        self.val_size, self.val_fraction = val_size, val_fraction
        self.data_seed, self.augment = data_seed, augment
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.data_dir = Path(data_dir).expanduser() if data_dir else None
        self.download, self.num_workers, self.train_eval_size = download, num_workers, train_eval_size
        self.fractal = (fractal_classes, fractal_size, fractal_seed)
        self.normalization_override = normalization
        self.source: Source | None = None

    # -- loading
    def load_source(self) -> Source:
        """Read (or generate) the dataset; raises DataError with one line when it can't."""
        if self.source is None:
            classes, size, seed = self.fractal  # FractalDB: + a validation and a test split of the same size
            total = size + 2 * self.n_val_for(size, classes) if self.dataset == "fractaldb" else 0
            self.source = load_source(DataRequest(self.dataset, self.data_dir, self.download, self.img_size,
                                                  classes, total, seed))
        return self.source

    def prepare_data(self) -> None:
        self.load_source()

    def n_val_for(self, n_images: int, num_classes: int) -> int:
        """Validation images carved from `n_images`: `val_size`, or with `val_fraction` that share of them,
        capped at `val_size`, at least one per class."""
        if self.val_fraction <= 0:
            return self.val_size
        return min(self.val_size, max(num_classes, round(self.val_fraction * n_images)))

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        src = self.load_source()
        native = src.native_size
        self.num_classes = int(src.train_targets.max()) + 1
        n_images = len(src.train_targets)
        if self.dataset == "fractaldb":  # generated with a validation and a test split on top
            n_images = self.fractal[1]
        n_val = self.n_val_for(n_images, self.num_classes)
        test_size = 0 if src.test is not None else n_val
        if n_val + test_size >= len(src.train_targets):
            raise DataError(f"invalid val_size={n_val} (allowed: < {len(src.train_targets) - test_size}, "
                            f"the {self.dataset} training images; set val_fraction to scale it to the data)")
        self.train_idx, self.val_idx, test_idx = split_indices(
            src.train_targets, self.data_seed, self.train_fraction, n_val, test_size)
        self.classes = src.classes
        in_memory = all(isinstance(part, TensorImages) for part in (src.train, src.test) if part is not None)
        if in_memory and native <= 64 and native != self.img_size:  # resize in memory once, not every epoch
            for part in (src.train, src.test):
                if part is not None:
                    part.images = v2.functional.resize(part.images, [self.img_size] * 2, antialias=True)
            native = self.img_size
        self.normalization = (self.normalization_override or src.normalization).for_channels(self.in_chans)
        train_tf = build_transforms(self.normalization, self.img_size, self.in_chans, self.augment, True, native)
        eval_tf = build_transforms(self.normalization, self.img_size, self.in_chans, "none", False, native)
        self.train_set = SeededSubset(src.train, self.train_idx, train_tf, random=self.augment != "none")
        self.val_set = SeededSubset(src.train, self.val_idx, eval_tf)
        self.test_set = (SeededSubset(src.test, np.arange(len(src.test)), eval_tf) if src.test is not None
                         else SeededSubset(src.train, test_idx, eval_tf))
        # a fixed, class-balanced prefix of the subset for the train-test gap
        k = min(self.train_eval_size, len(self.train_idx))
        eval_positions = np.sort(np.random.default_rng([self.data_seed, 11]).permutation(len(self.train_idx))[:k])
        self.train_eval_set = SeededSubset(src.train, self.train_idx[eval_positions], eval_tf)

    # -- facts for result.json
    @property
    def n_train(self) -> int:
        return len(self.train_idx)

    @property
    def subset_hash(self) -> str:
        return subset_hash(self.train_idx)

    # -- loaders
    def train_dataloader(self) -> DataLoader:
        """Training batches of `per_process_batch` images; under DDP this process's share of each global batch
        (its rank and the number of processes are the trainer's). A run resumed mid-epoch continues with the
        next batch (`ResumableDataLoader`)."""
        processes, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        batch = per_process_batch(self.batch_size, self.n_train, processes)
        sampler = SeededShuffle(self.n_train, self.data_seed, batch, processes, rank)
        mix = MixCollate(self.num_classes, self.mixup_alpha, self.cutmix_alpha)
        if self.resident:
            from lightning_modules.resident import ResidentBatches

            device = self.trainer.strategy.root_device if self.trainer else torch.device("cpu")
            return ResidentBatches(self.train_set, batch, device, sampler=sampler, mix=mix)
        return ResumableDataLoader(self.train_set, batch_size=batch, sampler=sampler, num_workers=self.num_workers,
                                   collate_fn=mix, persistent_workers=self.num_workers > 0)

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size * 2, shuffle=False, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def train_eval_dataloader(self) -> DataLoader:
        return self._eval_loader(self.train_eval_set)
