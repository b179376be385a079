"""Hand-made runs with robustness, calibration and interpretability files, for the analysis tests.

Every record comes from `analysis_fixtures.make_result` (so it passes the
schema); the `.npz` files next to it follow the contract the training side
writes (`robustness.npz`, `predictions.npz`, `explain.npz`), and the metrics
in the record are computed from those arrays, so a run's numbers and its
per-image arrays agree as they do in real runs.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from analysis_fixtures import make_result, write_result

from analysis.robustness_report import expected_calibration_error, per_image_calibration

CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
               "jpeg_compression")
SEVERITIES = (1, 2, 3, 4, 5)
OCCLUSION_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
N_SUBSET = 120  # robustness subset
N_TEST = 200
N_CLASSES = 10
IMAGE_SIDE = 16
PATCH = 4
FRACTION = 0.32


def _rng(*keys: object) -> np.random.Generator:
    digest = hashlib.sha256(json.dumps([str(k) for k in keys]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def robustness_arrays(skill: float, key: tuple, corrupt_errors: np.ndarray | None = None,
                      shuffle_correct: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A robustness.npz: per-image correctness falling with severity and occlusion.

    Args:
        skill: clean accuracy on the subset, roughly.
        key: seeds the draws (model, seed, ...).
        corrupt_errors: (15, 5, n) bool errors to use instead of random ones.
        shuffle_correct: (n,) to use instead of random ones.
    """
    rng = _rng("robustness", *key)
    n = N_SUBSET
    if corrupt_errors is None:
        drop = np.linspace(0.05, 0.35, len(SEVERITIES))  # accuracy lost per severity
        corrupt_errors = rng.random((len(CORRUPTIONS), len(SEVERITIES), n)) > (skill - drop)[None, :, None]
    occlusion = rng.random((len(OCCLUSION_FRACTIONS), n)) > skill - 0.6 * np.array(OCCLUSION_FRACTIONS)[:, None]
    if shuffle_correct is None:
        shuffle_correct = rng.random(n) < skill - 0.3
    return {"subset": np.arange(0, 2 * n, 2, dtype=np.int64), "corruptions": np.array(CORRUPTIONS),
            "corrupt_correct": ~np.asarray(corrupt_errors, dtype=bool),
            "occlusion_fractions": np.array(OCCLUSION_FRACTIONS), "occlusion_correct": ~occlusion,
            "shuffle_correct": np.asarray(shuffle_correct, dtype=bool)}


def predictions_arrays(skill: float, sharpness: float, key: tuple) -> dict[str, np.ndarray]:
    """A predictions.npz: float16 logits whose top-1 is right with probability ~`skill`."""
    rng = _rng("predictions", *key)
    targets = np.arange(N_TEST) % N_CLASSES
    right = rng.random(N_TEST) < skill
    top = np.where(right, targets, (targets + 1 + rng.integers(0, N_CLASSES - 1, N_TEST)) % N_CLASSES)
    logits = rng.normal(0.0, 1.0, (N_TEST, N_CLASSES))
    logits[np.arange(N_TEST), top] += sharpness
    logits = logits.astype(np.float16)
    val = rng.normal(0.0, 1.0, (50, N_CLASSES)).astype(np.float16)
    return {"test_target": targets, "test_pred": logits.argmax(axis=1), "test_logits": logits,
            "val_target": np.arange(50) % N_CLASSES, "val_logits": val}


def metrics_from(rob: dict[str, np.ndarray] | None, pred: dict[str, np.ndarray] | None,
                 temperature: float = 1.5) -> dict[str, float]:
    """The result.json metrics those arrays imply."""
    metrics: dict[str, float] = {}
    if pred is not None:
        metrics["test/acc1"] = float((pred["test_pred"] == pred["test_target"]).mean())
        for suffix, t in (("", 1.0), ("_ts", temperature)):
            confidence, correct, nll = per_image_calibration(pred["test_logits"], pred["test_target"], t)
            metrics[f"test/ece{suffix}"] = expected_calibration_error(confidence, correct)
            metrics[f"test/nll{suffix}"] = float(nll.mean())
        metrics["calib/temperature"] = temperature
    if rob is not None:
        correct = rob["corrupt_correct"]
        for c, name in enumerate(rob["corruptions"]):
            for s in SEVERITIES:
                metrics[f"corrupt/{name}/{s}/acc1"] = float(correct[c, s - 1].mean())
        metrics["corrupt/mean_acc1"] = float(correct.mean())
        for f, fraction in enumerate(rob["occlusion_fractions"]):
            metrics[f"occlusion/{100 * fraction:.6g}/acc1"] = float(rob["occlusion_correct"][f].mean())
        metrics["shuffle/acc1"] = float(rob["shuffle_correct"].mean())
    return metrics


def write_files(runs_dir: Path, record: dict[str, Any], **arrays: dict[str, np.ndarray] | None) -> Path:
    """Write result.json and each given file (name without ".npz": arrays) into the run's folder."""
    path = write_result(runs_dir, record)
    for name, content in arrays.items():
        if content is not None:
            np.savez(path.parent / f"{name}.npz", **content)
    return path.parent


def robust_run(runs_dir: Path, model: str, seed: int = 0, skill: float = 0.85, fraction: float = FRACTION,
               pretraining: str = "none", pretrain_size: int | None = None, with_files: bool = True,
               **rob_kwargs: Any) -> dict[str, Any]:
    """Write one run with robustness.npz and predictions.npz; returns its record."""
    key = (model, seed, fraction, pretraining)
    rob = robustness_arrays(skill, key, **rob_kwargs)
    pred = predictions_arrays(skill, 2.0 + skill, key)
    metrics = metrics_from(rob, pred)
    record = make_result(model, fraction, seed, metrics["test/acc1"], pretraining, pretrain_size, metrics=metrics,
                         n_test=N_TEST, predictions="predictions.npz", robustness="robustness.npz")
    write_files(runs_dir, record, **({"robustness": rob, "predictions": pred} if with_files else {}))
    return record


# ----------------------------------------------------------------- ablations
VIT_BASE = {"img_size": IMAGE_SIDE, "embed_dim": 64, "depth": 4, "num_heads": 2}


def variant_run(runs_dir: Path | None, pos_embed: str = "learn", pool: str = "token", patch_size: int = PATCH,
                seed: int = 0, acc: float = 0.8, metrics: dict[str, float] | None = None,
                class_token: bool | None = None, fraction: float = FRACTION, model: str = "vit_tiny_p8",
                files: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """A ViT run of one architecture variant (written with `files` when `runs_dir` is given)."""
    class_token = pool == "token" if class_token is None else class_token
    architecture = {**VIT_BASE, "patch_size": patch_size, "pos_embed": pos_embed, "pool": pool,
                    "class_token": class_token}
    record = make_result(model, fraction, seed, acc, metrics=metrics, architecture=architecture)
    record["spec"].update(pos_embed=pos_embed, pool=pool, patch_size=patch_size, class_token=class_token)
    record["run_id"] = hashlib.sha256(json.dumps(record["spec"], sort_keys=True).encode()).hexdigest()[:12]
    if runs_dir is not None:
        write_files(runs_dir, record, **(files or {}))
    return record


def variant_run_with_files(runs_dir: Path, pos_embed: str = "learn", pool: str = "token", patch_size: int = PATCH,
                           seed: int = 0, skill: float = 0.8, shuffle_invariant: bool = False) -> dict[str, Any]:
    """A variant's run with predictions.npz and robustness.npz, its metrics computed from them;
    `shuffle_invariant`: shuffling changes no image's correctness."""
    key = (pos_embed, pool, patch_size, seed)
    rob, pred = robustness_arrays(skill, key), predictions_arrays(skill, 3.0, key)
    if shuffle_invariant:
        rob["shuffle_correct"] = rob["occlusion_correct"][0].copy()
    metrics = metrics_from(rob, pred)
    return variant_run(runs_dir, pos_embed, pool, patch_size, seed, metrics["test/acc1"], metrics,
                       files={"robustness": rob, "predictions": pred})


# ----------------------------------------------------------------- explain
N_EXPLAIN = 2


def explain_images(seed: int = 0) -> np.ndarray:
    """(B, 1, H, W) test images, the same for every net of a seed."""
    return _rng("images", seed).normal(size=(N_EXPLAIN, 1, IMAGE_SIDE, IMAGE_SIDE)).astype(np.float32)


def explain_arrays(arch: str, seed: int = 0, images: np.ndarray | None = None, depth: int = 4,
                   heads: int = 2) -> dict[str, np.ndarray]:
    """An explain.npz of a ViT (blocks = `depth`) or a ResNet (5 probed layers)."""
    rng = _rng("explain", arch, seed)
    images = explain_images(seed) if images is None else images
    layers = [f"blocks.{i}" for i in range(depth)] if arch == "vit" else ["stem", "layer1.0", "layer2.0", "layer3.0",
                                                                          "layer4.0"]
    relative = np.arange(1, len(layers) + 1) / len(layers)
    reach = 6.0 if arch == "vit" else 2.0
    arrays = {
        "arch": np.array(arch), "images": images, "predictions": np.arange(N_EXPLAIN, dtype=np.int64),
        "gradcam_targets": np.arange(N_EXPLAIN, dtype=np.int64),
        "gradcam": rng.random((N_EXPLAIN, IMAGE_SIDE, IMAGE_SIDE)).astype(np.float32),
        "gradcam_layer": np.array("encoder.blocks[-1].norm1" if arch == "vit" else "layer2[-1]"),
        "erf_layers": np.array(layers), "erf_relative_depth": relative,
        "erf_mean_distance_px": reach * relative + seed, "erf_width_px": 2 * reach * relative + 1,
        "erf_share": np.array(0.95),
        "erf_maps": rng.random((len(layers), IMAGE_SIDE, IMAGE_SIDE)).astype(np.float32),
    }
    if arch == "vit":
        grid = IMAGE_SIDE // PATCH
        arrays["rollout"] = rng.random((N_EXPLAIN, grid, grid)).astype(np.float32)
        distance = 2.0 + np.arange(depth)[:, None] + np.arange(heads)[None, :] + seed  # (depth, heads)
        arrays["attention_distance_px"] = distance
        arrays["attention_relative_depth"] = np.arange(1, depth + 1) / depth
    return arrays


def explained_run(runs_dir: Path, model: str, seed: int = 0, fraction: float = FRACTION,
                  explain: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """A completed run with only an explain.npz (default: `explain_arrays` of its arch and seed)."""
    record = make_result(model, fraction, seed, 0.8)
    write_files(runs_dir, record, explain=explain if explain is not None else explain_arrays(record["arch"], seed))
    return record

