"""The result contract: the keys of `runs/SWEEP/RUN_ID/result.json`, written down once.

`experiments` writes records that `check` accepts; `analysis` validates every
file it reads with the same `check`. docs/results.md explains each key. Old
files stay readable: every version in `SCHEMA_VERSIONS` is accepted, and keys
added later are optional.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 2
SCHEMA_VERSIONS = (1, 2)
STATUSES = ("completed", "failed", "diverged")
ARCHS = ("vit", "cnn")
ROLES = ("train", "pretrain")
METRIC_PREFIXES = ("train/", "val/", "test/", "corrupt/", "occlusion/", "shuffle/", "calib/", "shift/")

# Spec fields that say where or how a run is placed and logged, not what it
# computes: left out of run_id, and out of the report's description of a sweep.
PLACEMENT_FIELDS = ("sweep", "data_dir", "weights_file", "wandb", "num_workers")
# Spec fields that say how fast a run computes, not what: the fast-path switches. None changes the math (the
# resident path gives the loader's batches; the others change floating-point rounding only, as the device and
# library versions do), so they are left out of run_id too; what was in effect is the result's `runtime`.
RUNTIME_FIELDS = ("channels_last", "fused_attention", "compile", "resident")
# The `runtime` section: the switches in effect for the run (a switch with nothing to act on is off: channels
# last for a net without convolutions, fused attention for a net without attention), and for `resident`
# requested as "auto" the reason it resolved off ("" when on).
RUNTIME: dict[str, str] = {"channels_last": "bool", "fused_attention": "bool", "compile": "bool",
                           "resident": "bool", "resident_note": "str"}


@dataclass(frozen=True)
class Field:
    """A top-level scalar key: its type ("int" | "number" | "str" | "bool") and whether every record has it."""

    kind: str
    required: bool = False


# Top-level scalar keys, in column order.
FIELDS: dict[str, Field] = {
    "schema_version": Field("int", True),
    "run_id": Field("str", True),
    "sweep": Field("str", True),
    "status": Field("str", True),
    "error": Field("str"),
    "model": Field("str", True),
    "arch": Field("str", True),
    "dataset": Field("str", True),
    "train_fraction": Field("number", True),
    "seed": Field("int", True),
    "data_seed": Field("int"),
    "pretraining": Field("str", True),
    "pretrain_size": Field("int"),
    "pretrained_from": Field("str"),
    "profile": Field("str"),
    "role": Field("str"),
    "n_train": Field("int"),
    "n_val": Field("int"),
    "n_test": Field("int"),
    "subset_hash": Field("str"),
    "params": Field("int"),
    "flops_per_image": Field("number"),
    "train_steps": Field("int"),
    "train_images_seen": Field("int"),
    "train_flops": Field("number"),
    "train_images_per_s": Field("number"),
    "train_time_s": Field("number"),
    "resumed_at_step": Field("int"),
    # the protocol: how the budget ended and whether the run was still improving then
    "budget_steps": Field("int"),  # the step budget (identical at every training size)
    "n_evals": Field("int"),  # validations done; the checkpoint is the best of them on val/acc1
    "stopped_early": Field("bool"),  # validation stopped improving for `patience` evaluations
    "improving_at_end": Field("bool"),  # used its whole budget with its best validation among the last ones
    "precision": Field("str"),  # resolved (spec.precision holds what was requested, e.g. "auto")
    "hardware": Field("str"),  # the device and why its precision was chosen
    "predictions": Field("str"),  # file in the run directory with val/test logits and targets (predictions.npz)
    "robustness": Field("str"),  # file with per-image correctness under corruption/occlusion (robustness.npz)
    "shift": Field("str"),  # file with per-image correctness on CIFAR-10 and its shifted test sets (shift.npz)
    "upstream_val_acc1": Field("number"),  # the pretraining run's own validation accuracy
    "upstream_improving_at_end": Field("bool"),  # whether the pretraining run was still improving
    "wall_time_s": Field("number"),
    "git_commit": Field("str"),
    "hostname": Field("str"),
    "pid": Field("int"),
    "started_at": Field("str"),
    "finished_at": Field("str"),
}

# Nested objects -> the column prefix their keys get when flattened.
SECTIONS: dict[str, str] = {
    "selected": "selected/",  # the validation evaluation that chose the checkpoint
    "metrics": "",  # metric name -> value, of the selected checkpoint (METRIC_PREFIXES)
    "architecture": "architecture/",  # the net as built: resolved ViT config or timm kwargs
    "runtime": "runtime/",  # the fast-path switches in effect (RUNTIME)
    "versions": "versions/",
    "spec": "spec/",  # every RunSpec field: enough to rerun the run
}


class ResultError(ValueError):
    """A result record breaks the contract; str() is one line naming the key."""


def is_number(value: Any) -> bool:
    """A real number (bool excluded)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_scalar(name: str, value: Any, kind: str) -> Any:
    """`value` if it has type `kind` (ints may arrive as 3.0 and are returned as int); else ResultError."""
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "number" and is_number(value):
        return value
    if kind == "int" and is_number(value) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    raise ResultError(f"{name}={value!r} is not {'an' if kind == 'int' else 'a'} {kind}")


def check(record: Any) -> None:
    """Check one parsed result against the contract.

    Raises:
        ResultError: naming the first key that is missing or malformed.
    """
    if not isinstance(record, Mapping):
        raise ResultError(f"top level is {type(record).__name__}, not an object")
    for name, field in FIELDS.items():
        value = record.get(name)
        if value is None:
            if field.required:
                raise ResultError(f"missing required key {name!r}")
            continue
        check_scalar(name, value, field.kind)
    allowed = {"schema_version": SCHEMA_VERSIONS, "status": STATUSES, "arch": ARCHS, "role": ROLES}
    for name, values in allowed.items():
        if record.get(name) is not None and record[name] not in values:
            raise ResultError(f"{name}={record[name]!r} is not one of {', '.join(map(str, values))}")
    fraction = record["train_fraction"]
    if not (math.isfinite(fraction) and 0 < fraction <= 1):
        raise ResultError(f"train_fraction={fraction!r} is not in (0, 1]")
    for name in SECTIONS:
        section = record.get(name)
        if section is None:
            continue
        if not isinstance(section, Mapping):
            raise ResultError(f"{name} is {type(section).__name__}, not an object")
        if name == "metrics":
            for key, value in section.items():
                if not (value is None or is_number(value)):
                    raise ResultError(f"metrics[{key!r}]={value!r} is not a number")
        if name == "runtime":
            for key, value in section.items():
                if key not in RUNTIME:
                    raise ResultError(f"runtime[{key!r}] is not one of {', '.join(RUNTIME)}")
                check_scalar(f"runtime[{key!r}]", value, RUNTIME[key])
