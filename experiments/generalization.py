"""Generalization and interpretability of a trained run: calibration, robustness, and where the net looks.

The same functions serve a run as it finishes (`experiments.train`) and a
finished run later (`python -m experiments.evaluate RUN_DIR...`,
`python -m experiments.explain RUN_DIR...`), so both give identical numbers:

- calibration: temperature scaling fitted on the validation split's logits of
  the selected checkpoint; ECE and NLL of the test logits before and after;
- robustness (`robust_subset` > 0): the 15 corruptions x 5 severities,
  occlusion of 0-80 % of a grid's cells and patch shuffle, on a fixed
  stratified subset of the test set that is the same for every run of a
  dataset (seed 0), so both nets see identical inputs; per-image correctness
  goes to `robustness.npz`, for intervals over images;
- interpretability (`explain_images` > 0, or the explain command): attention
  rollout, attention distance, effective receptive fields and Grad-CAM on the
  same fixed test images, to `explain.npz`;
- dataset shift (`shift_eval`, runs trained on cifar10): CIFAR-10 test vs
  CIFAR-10.1 and vs STL-10 on their shared classes (`lightning_modules.shift`),
  for the shifted sets whose files are in the data root; a missing one is
  skipped with one line saying what would enable it, and never downloaded
  unless asked. Per-image correctness goes to `shift.npz`.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from common.files import atomic_write
from experiments.rundir import RunDir

if TYPE_CHECKING:
    from lightning_modules.data import ImageDataModule
    from lightning_modules.shift import Labelled

EVALUATION_SEED = 0  # one subset, one set of corruptions, masks and permutations for every run
SHIFT_TRAINED_ON = "cifar10"


def evaluation_grid(img_size: int) -> int:
    """Cells per side of the occlusion and patch-shuffle grid: 4 px cells for small images (the CPU ViT's
    patches), 16 px for large ones (ViT-B/16's), so a ViT's patches are whole cells; the same grid for every net
    of a comparison, since it depends on the image size only."""
    target = 16 if img_size >= 112 else 4
    cell = next(c for c in range(target, 0, -1) if img_size % c == 0)  # the nearest cell that tiles the image
    return img_size // cell


def save_npz(path: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """Write numpy arrays as a compressed .npz, atomically."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write(path, lambda fh: fh.write(buffer.getvalue()))


def calibration(kept_logits: Mapping[str, tuple[Tensor, Tensor]]) -> dict[str, float]:
    """`calib/temperature`, `calib/val_nll(_ts)`, `test/ece(_ts)`, `test/nll(_ts)` from the selected checkpoint's
    validation and test logits ({split: ((N, K) logits, (N,) labels)})."""
    from lightning_modules.robustness import calibrate

    (val_logits, val_labels), (test_logits, test_labels) = kept_logits["val"], kept_logits["test"]
    return calibrate(val_logits.float().numpy(), val_labels.numpy(), test_logits.float().numpy(),
                     test_labels.numpy()).metrics


def test_images(datamodule: ImageDataModule) -> tuple[Tensor, np.ndarray]:
    """The test split as stored, uint8 (N, C, H, W) at the net's side, and its (N,) labels.

    Raises:
        ValueError: the test split is not held in memory (image files: decode a subset instead).
    """
    from lightning_modules.data import TensorImages

    base = datamodule.test_set.base
    if not isinstance(base, TensorImages):
        raise ValueError(f"invalid dataset={datamodule.dataset!r} for the robustness evaluation (allowed: datasets "
                         "held in memory; image folders are not yet supported)")
    rows = datamodule.test_set.indices
    return base.images[rows], np.asarray(base.targets)[rows]


def robustness(net: nn.Module, datamodule: ImageDataModule, subset_size: int, precision: str,
               rundir: RunDir) -> dict[str, float]:
    """Evaluate corruption, occlusion and patch-shuffle accuracy; write `robustness.npz`; return the metrics."""
    from lightning_modules.corruptions import CORRUPTION_NAMES, SEVERITIES
    from lightning_modules.robustness import OCCLUSION_FRACTIONS, evaluate_robustness

    images, labels = test_images(datamodule)
    grid = evaluation_grid(images.shape[-1])
    transform = datamodule.test_set.transform
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        result = evaluate_robustness(net, images, labels, transform, subset_size=subset_size, seed=EVALUATION_SEED,
                                     precision=precision, dataset=datamodule.dataset, occlusion_grid=grid,
                                     shuffle_grid=grid, device=device)
    finally:
        net.train(was_training)
    correct = result.correct
    occluded = {round(float(k.split("/")[1]) / 100, 6): v for k, v in correct.items() if k.startswith("occlusion/")}
    save_npz(rundir.robustness, {
        "subset": result.indices.astype(np.int64),
        "corruptions": np.asarray(CORRUPTION_NAMES),
        "corrupt_correct": np.stack([np.stack([correct[f"corrupt/{name}/{s}/acc1"] for s in SEVERITIES])
                                     for name in CORRUPTION_NAMES]),  # (15, 5, n)
        "occlusion_fractions": np.asarray(OCCLUSION_FRACTIONS, dtype=np.float64),
        "occlusion_correct": np.stack([occluded[round(f, 6)] for f in OCCLUSION_FRACTIONS]),  # (F, n)
        "shuffle_correct": correct["shuffle/acc1"],  # (n,)
        "grid": np.asarray(grid),
    })
    return {k: float(v) for k, v in result.metrics.items()}


def explain(net: nn.Module, datamodule: ImageDataModule, n_images: int, rundir: RunDir) -> None:
    """Attention rollout and distance (ViTs), effective receptive fields and Grad-CAM on `n_images` fixed test
    images (stratified, the same for every run of a dataset); written to `explain.npz`."""
    from lightning_modules.interpret import explain_batch
    from lightning_modules.robustness import stratified_subset

    images, labels = test_images(datamodule)
    rows = np.sort(stratified_subset(labels, min(n_images, len(labels)), EVALUATION_SEED))
    device = next(net.parameters()).device
    inputs = datamodule.test_set.transform(images[torch.as_tensor(rows)]).to(device)  # (B, C, H, W)
    arrays = explain_batch(net, inputs)
    save_npz(rundir.explain, {**arrays, "test_indices": rows.astype(np.int64), "labels": labels[rows].astype(np.int64)})


def _stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _load_shifted(name: str, data_dir: Path | None, download: bool, cifar_classes: list[str]) -> Labelled:
    """One shifted test set as stored: "cifar10.1" (CIFAR-10's classes) or "stl10" (its test split).

    Raises:
        DataError: files missing or malformed (one line).
    """
    from lightning_modules.datasets import SHIFT_LOADERS, DataRequest, load_source
    from lightning_modules.shift import Labelled

    request = DataRequest(name, data_dir, download)
    if name in SHIFT_LOADERS:
        found = SHIFT_LOADERS[name](request)
        return Labelled(found.images, found.targets, cifar_classes)
    source = load_source(request)
    return Labelled(source.test.images, source.test.targets, source.classes)


def shift_sets(datamodule: ImageDataModule, download: bool = False,
               say: Callable[[str], None] = _stderr_line) -> dict[str, Labelled]:
    """The shifted test sets found for a run trained on cifar10, by `lightning_modules.shift.COMPARISONS` key
    ({} for a run on any other dataset: shift does not apply). Looked for where the run's data is (its
    `--data-dir`, else the data root); one that cannot be read (files missing, or malformed) is skipped with one
    line through `say` naming the set, the reason and what would enable it. Downloads only with `download`."""
    from lightning_modules.datasets import DataError
    from lightning_modules.shift import COMPARISONS

    if datamodule.dataset != SHIFT_TRAINED_ON:
        return {}
    found = {}
    for name in COMPARISONS:
        try:
            found[name] = _load_shifted(name, datamodule.data_dir, download, list(datamodule.classes))
        except DataError as exc:
            how = "" if download else " (the download: python -m experiments.evaluate RUN_DIR --download-shift)"
            say(f"dataset shift: {name} skipped ({exc}{how})")
    return found


def dataset_shift(net: nn.Module, datamodule: ImageDataModule, sets: Mapping[str, Labelled], precision: str,
                  rundir: RunDir) -> dict[str, float]:
    """Evaluate the net on CIFAR-10's test set and the shifted `sets` (`shift_sets`), through the run's own test
    transform; write `shift.npz` (per set: `<set>_correct`, `<set>_target`, `<set>_index`); return the
    `shift/*` metrics ({} and no file when `sets` is empty)."""
    from lightning_modules.shift import Labelled, evaluate_shift, predict_logits

    if not sets:
        return {}
    images, labels = test_images(datamodule)
    cifar10 = Labelled(images, labels, datamodule.classes)
    was_training = net.training
    net.eval()
    try:
        result = evaluate_shift(lambda x: predict_logits(net, x, datamodule.test_set.transform, datamodule.img_size,
                                                         precision, datamodule.batch_size * 2), cifar10, dict(sets))
    finally:
        net.train(was_training)
    arrays = {"sets": np.asarray(list(result.correct))}
    for name in result.correct:
        arrays.update({f"{name}_correct": result.correct[name], f"{name}_target": result.targets[name].astype(np.int64),
                       f"{name}_index": result.rows[name].astype(np.int64)})
    save_npz(rundir.shift, arrays)
    return result.metrics
