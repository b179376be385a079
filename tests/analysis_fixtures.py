"""Hand-made result.json files for the analysis tests.

Every record `make_result` builds passes `common.schema.check` and uses only
keys the schema knows, so a change of the contract breaks these fixtures
loudly instead of leaving the tests on an outdated copy of it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis import collect
from common import schema

SWEEP = "toy"
ARCH = {"vit_tiny_p8": "vit", "vit_s16": "vit", "resnet50": "cnn", "resnet18": "cnn"}
ARCHITECTURE = {  # the `architecture` section: the net as built (a ViTConfig, or timm's name and kwargs)
    "vit_tiny_p8": {"img_size": 28, "patch_size": 8, "embed_dim": 192, "depth": 4, "num_heads": 3,
                    "pos_embed": "learn", "pool": "token", "class_token": True},
    "vit_s16": {"img_size": 224, "patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6,
                "pos_embed": "learn", "pool": "token", "class_token": True},
    "resnet50": {"timm_name": "resnet50", "num_classes": 10, "in_chans": 1, "drop_path_rate": 0.0},
    "resnet18": {"timm_name": "resnet18", "num_classes": 10, "in_chans": 1, "drop_path_rate": 0.0},
}
FULL_TRAIN = 54_000  # fashion_mnist training images after carving the validation split


def make_result(
    model: str = "resnet50", train_fraction: float = 0.1, seed: int = 0, acc: float | None = 0.8,
    pretraining: str = "none", pretrain_size: int | None = None, status: str = "completed",
    dataset: str = "fashion_mnist", metrics: dict[str, float] | None = None, **fields: Any,
) -> dict[str, Any]:
    """One result record of the current schema version; `acc` is test/acc1 (None leaves it out).

    `fields` override top-level keys; the result must still pass `common.schema.check`.
    """
    spec = {"model": model, "dataset": dataset, "train_fraction": train_fraction, "seed": seed,
            "data_seed": None, "pretraining": pretraining, "pretrain_size": pretrain_size or 0,
            "lr": 1e-3, "batch_size": 128, "role": "train", "precision": "auto"}
    run_id = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    n_train = round(FULL_TRAIN * train_fraction)
    all_metrics = {"test/acc5": 0.99, "test/nll": 0.4}
    if acc is not None:
        all_metrics["test/acc1"] = acc
    all_metrics.update(metrics or {})
    flops = 1.0e9 if ARCH[model] == "cnn" else 2.0e8
    record = {
        "schema_version": schema.SCHEMA_VERSION, "run_id": run_id, "sweep": SWEEP, "status": status,
        "error": None if status == "completed" else f"{status}: loss is nan",
        "model": model, "arch": ARCH[model], "dataset": dataset, "train_fraction": train_fraction,
        "seed": seed, "data_seed": seed, "pretraining": pretraining, "pretrain_size": pretrain_size,
        "pretrained_from": None, "profile": "cpu", "role": "train", "n_train": n_train, "n_val": 6000, "n_test": 10000,
        "subset_hash": "0123456789abcdef", "spec": spec,
        "selected": {"step": 100, "epoch": 2, "val/acc1": acc, "val/loss": 0.4},
        "metrics": all_metrics if status == "completed" else {},
        "architecture": ARCHITECTURE[model],
        "runtime": {"channels_last": ARCH[model] == "cnn", "fused_attention": ARCH[model] == "vit", "compile": False,
                    "resident": False, "resident_note": ""},
        "params": 23_528_522 if ARCH[model] == "cnn" else 1_200_000,
        "flops_per_image": flops, "train_steps": 100, "train_images_seen": 12_800,
        "train_flops": 3 * flops * 12_800, "train_images_per_s": 300.0 if ARCH[model] == "cnn" else 900.0,
        "train_time_s": 40.0, "wall_time_s": 50.0 * train_fraction * 10,
        "budget_steps": 100, "n_evals": 10, "stopped_early": False, "improving_at_end": False,
        "precision": "32-true", "hardware": "cpu: 2 cores, no native bf16",
        "versions": {"python": "3.11.7", "torch": "2.14.1"}, "git_commit": "abc123",
        "hostname": "box", "started_at": "2026-11-26T22:00:00+00:00", "finished_at": "2026-11-26T22:03:51+00:00",
    }
    record.update(fields)
    schema.check(record)
    unknown = set(record) - set(schema.FIELDS) - set(schema.SECTIONS)
    assert not unknown, f"keys unknown to common.schema: {sorted(unknown)}"
    return record


def write_result(runs_dir: Path, record: dict[str, Any] | str, run_id: str | None = None) -> Path:
    """Write `runs_dir/SWEEP/RUN_ID/result.json`; a str record is written verbatim (malformed files)."""
    run_id = run_id or record["run_id"]
    path = Path(runs_dir) / SWEEP / run_id / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(record if isinstance(record, str) else json.dumps(record, indent=1))
    return path


def write_predictions(runs_dir: Path, record: dict[str, Any], target: np.ndarray, pred: np.ndarray) -> Path:
    """Write the run's `predictions.npz` (test targets and predictions) and name it in `record`.

    `record`'s test/acc1 and n_test are set to match the predictions.
    """
    path = Path(runs_dir) / SWEEP / record["run_id"] / "predictions.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    target, pred = np.asarray(target, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    np.savez(path, test_target=target, test_pred=pred, val_target=target[:4],
             val_logits=np.zeros((4, 10), dtype=np.float16))
    record.update(predictions=path.name, n_test=int(target.size))
    record["metrics"]["test/acc1"] = float(np.mean(target == pred))
    return path


def write_plan(runs_dir: Path, records: list[dict[str, Any]], swept: tuple[str, ...] = ("model", "train_fraction")
               ) -> Path:
    """Write `runs_dir/SWEEP/sweep.json` expecting the runs of `records` (as the sweep runner does at its start)."""
    keys = ("run_id", "role", "model", "arch", "dataset", "train_fraction", "pretraining", "pretrain_size", "seed")
    runs = [{**{k: r[k] for k in keys}, "upstream": r["pretrained_from"], **{k: r["spec"].get(k) for k in swept}}
            for r in records]
    path = Path(runs_dir) / SWEEP / "sweep.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": SWEEP, "file": f"experiments/sweeps/{SWEEP}.yaml", "swept": list(swept),
                                "runs": runs}, indent=1))
    return path


def write_runs(runs_dir: Path, records: list[dict[str, Any]]) -> list[Path]:
    """Write several records."""
    return [write_result(runs_dir, r) for r in records]


def runs_of(runs_dir: Path, records: list[dict[str, Any]]) -> pd.DataFrame:
    """Write `records` under `runs_dir` and collect them back: the runs frame the analysis works on."""
    write_runs(runs_dir, records)
    return collect.collect(runs_dir, SWEEP).runs


def small_sweep() -> list[dict[str, Any]]:
    """The golden sweep: two seeds, one seed, a failed run, a diverged run, a missing metric.

    At fraction 0.01: resnet50 0.80 / 0.84, vit 0.70 / 0.76 (seeds 0, 1);
    at fraction 0.1: resnet50 0.88 (seed 0; seed 1 failed), vit 0.86 (seed 0; seed 1 diverged);
    fractaldb pretraining at 0.01: resnet50 0.82 / 0.86, vit 0.78 / 0.80;
    one completed vit run at 0.1 with pretraining fractaldb lacks test/acc1.
    """
    frac = 0.01
    return [
        make_result("resnet50", frac, 0, 0.80), make_result("resnet50", frac, 1, 0.84),
        make_result("vit_tiny_p8", frac, 0, 0.70), make_result("vit_tiny_p8", frac, 1, 0.76),
        make_result("resnet50", 0.1, 0, 0.88), make_result("resnet50", 0.1, 1, None, status="failed"),
        make_result("vit_tiny_p8", 0.1, 0, 0.86), make_result("vit_tiny_p8", 0.1, 1, None, status="diverged"),
        make_result("resnet50", frac, 0, 0.82, "fractaldb", 12800),
        make_result("resnet50", frac, 1, 0.86, "fractaldb", 12800),
        make_result("vit_tiny_p8", frac, 0, 0.78, "fractaldb", 12800),
        make_result("vit_tiny_p8", frac, 1, 0.80, "fractaldb", 12800),
        make_result("vit_tiny_p8", 0.1, 0, None, "fractaldb", 12800),
    ]


def power_law_sweep(
    vit: tuple[float, float, float] = (8.0, 0.5, 0.02), cnn: tuple[float, float, float] = (1.0, 0.4, 0.08),
    fractions: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0), seeds: tuple[int, ...] = (0, 1),
    noise: float = 0.0,
) -> list[dict[str, Any]]:
    """Runs whose test error follows err = a * n^-b + c exactly (plus +-noise alternating by seed)."""
    records = []
    for model, (a, b, c) in (("vit_tiny_p8", vit), ("resnet50", cnn)):
        for frac in fractions:
            n = round(FULL_TRAIN * frac)
            for seed in seeds:
                err = a * n ** -b + c + noise * (1 if seed % 2 else -1)
                records.append(make_result(model, frac, seed, 1.0 - err))
    return records
