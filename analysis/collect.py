"""Collect a sweep's `result.json` files into one tidy DataFrame, one row per run.

The contract is docs/results.md. Each file is schema-checked; a file that is
not JSON, lacks a required key or has a value of the wrong type is skipped
with one warning that names its path and the reason, never a crash.

Columns, in order: the top-level scalar fields (`FIELDS`), `role`
("train", or "pretrain" for an upstream pretraining run) and `path`
(relative to the runs folder), then `selected/<key>`, the metrics under
their own names (`test/acc1`, `corrupt/<name>/<severity>/acc1`, ...),
`versions/<package>` and `spec/<field>` (non-scalar spec values as JSON).

    python -m analysis.collect --sweep default [--runs-dir runs] [--results-dir results]
    python -m analysis.collect --sweep default --from-wandb ENTITY/PROJECT
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from analysis import files

log = logging.getLogger(__name__)

SCHEMA_VERSIONS = (1,)
STATUSES = ("completed", "failed", "diverged")
ARCHS = ("vit", "cnn")
METRIC_PREFIXES = ("train/", "val/", "test/", "corrupt/")

# Top-level scalar fields, in column order: name -> (type, required).
FIELDS: dict[str, tuple[str, bool]] = {
    "schema_version": ("int", True),
    "run_id": ("str", True),
    "sweep": ("str", True),
    "status": ("str", True),
    "error": ("str", False),
    "model": ("str", True),
    "arch": ("str", True),
    "dataset": ("str", True),
    "train_fraction": ("number", True),
    "seed": ("int", True),
    "data_seed": ("int", False),
    "pretraining": ("str", True),
    "pretrain_size": ("int", False),
    "pretrained_from": ("str", False),
    "profile": ("str", False),
    "n_train": ("int", False),
    "n_val": ("int", False),
    "n_test": ("int", False),
    "subset_hash": ("str", False),
    "params": ("int", False),
    "flops_per_image": ("number", False),
    "train_steps": ("int", False),
    "train_images_seen": ("int", False),
    "train_flops": ("number", False),
    "train_images_per_s": ("number", False),
    "train_time_s": ("number", False),
    "wall_time_s": ("number", False),
    "git_commit": ("str", False),
    "hostname": ("str", False),
    "started_at": ("str", False),
    "finished_at": ("str", False),
}
# Nested sections -> column prefix.
SECTIONS = {"selected": "selected/", "metrics": "", "versions": "versions/", "spec": "spec/"}
SORT_KEYS = ["dataset", "model", "pretraining", "pretrain_size", "train_fraction", "seed", "run_id"]


class ResultError(ValueError):
    """A result record breaks the contract; str() is one line."""


@dataclass(frozen=True)
class Collection:
    """What was read: the runs, and the files skipped with their reason.

    Attributes:
        runs: one row per valid result (columns as in the module docstring).
        skipped: (path, reason) for every file that was left out.
    """

    runs: pd.DataFrame
    skipped: tuple[tuple[str, str], ...] = ()


# ----------------------------------------------------------------- validation
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_scalar(name: str, value: Any, kind: str) -> Any:
    """Return `value` if it has type `kind` (int/number/str), else raise."""
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "number" and _is_number(value):
        return value
    if kind == "int" and _is_number(value) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    raise ResultError(f"{name}={value!r} is not {'an' if kind == 'int' else 'a'} {kind}")


def _flatten_section(name: str, value: Any) -> dict[str, Any]:
    """A nested section (metrics, selected, versions, spec) -> prefixed columns."""
    if not isinstance(value, Mapping):
        raise ResultError(f"{name} is {type(value).__name__}, not an object")
    prefix, out = SECTIONS[name], {}
    for key, item in value.items():
        if name == "spec" and isinstance(item, (list, dict)):
            item = json.dumps(item, sort_keys=True)
        elif name == "metrics" and not (item is None or _is_number(item)):
            raise ResultError(f"metrics[{key!r}]={item!r} is not a number")
        elif item is not None and not isinstance(item, (str, int, float)):
            raise ResultError(f"{name}[{key!r}]={item!r} is not a scalar")
        out[prefix + str(key)] = math.nan if item is None else item
    return out


def validate(record: Any) -> dict[str, Any]:
    """Check one parsed result against the contract and flatten it to a row.

    Args:
        record: the parsed JSON of a `result.json`.

    Returns:
        The row: top-level scalars, `role`, then the flattened sections.

    Raises:
        ResultError: naming the first key that is missing or malformed.
    """
    if not isinstance(record, Mapping):
        raise ResultError(f"top level is {type(record).__name__}, not an object")
    row: dict[str, Any] = {}
    for name, (kind, required) in FIELDS.items():
        value = record.get(name)
        if value is None:
            if required:
                raise ResultError(f"missing required key {name!r}")
            row[name] = None
            continue
        row[name] = _check_scalar(name, value, kind)
    for name, allowed in (("schema_version", SCHEMA_VERSIONS), ("status", STATUSES), ("arch", ARCHS)):
        if row[name] not in allowed:
            raise ResultError(f"{name}={row[name]!r} is not one of {', '.join(map(str, allowed))}")
    if not (math.isfinite(row["train_fraction"]) and 0 < row["train_fraction"] <= 1):
        raise ResultError(f"train_fraction={row['train_fraction']!r} is not in (0, 1]")
    spec = record.get("spec") if isinstance(record.get("spec"), Mapping) else {}
    row["role"] = _check_scalar("role", record.get("role") or spec.get("role") or "train", "str")
    extra = {k: v for k, v in record.items() if k not in FIELDS and k not in SECTIONS and k != "role"}
    row.update({k: v for k, v in sorted(extra.items()) if isinstance(v, (str, int, float))})
    for name in SECTIONS:
        if record.get(name) is not None:
            row.update(_flatten_section(name, record[name]))
    return row


# ------------------------------------------------------------------ frames
def _ordered_columns(columns: Iterable[str]) -> list[str]:
    """Fixed fields first, then extras, then each section's columns sorted."""
    fixed = [*FIELDS, "role", "path"]
    rest = sorted(set(columns) - set(fixed))

    def section(col: str) -> int:
        for rank, prefix in enumerate(("selected/", "versions/", "spec/"), start=2):
            if col.startswith(prefix):
                return rank
        return 1 if col.startswith(METRIC_PREFIXES) else 0

    return fixed + sorted(rest, key=lambda c: (section(c), c))


def to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows from `validate` -> the tidy, sorted, typed DataFrame."""
    frame = pd.DataFrame.from_records(rows) if rows else pd.DataFrame()
    columns = _ordered_columns({c for row in rows for c in row})
    frame = frame.reindex(columns=columns)
    for name, (kind, _) in FIELDS.items():
        dtype = {"int": "Int64", "number": "float64", "str": "object"}[kind]
        frame[name] = frame[name].astype(dtype)
    for col in columns:
        if col.startswith(METRIC_PREFIXES) or col.startswith("selected/"):
            frame[col] = pd.to_numeric(frame[col], errors="coerce")
    pretrained_from = set(frame["pretrained_from"].dropna())
    frame.loc[frame["run_id"].isin(pretrained_from), "role"] = "pretrain"
    frame = frame.sort_values(SORT_KEYS, kind="mergesort", na_position="first")
    return frame.reset_index(drop=True)


def read_records(records: Iterable[tuple[str, Any]]) -> Collection:
    """Validate (source, parsed JSON) pairs; skip and log the bad ones.

    Args:
        records: (source name for messages, parsed record) in a stable order;
            a record that is an Exception stands for a file that failed to parse.

    Returns:
        The runs (a duplicate run_id keeps its first occurrence) and what was skipped.
    """
    rows, skipped, seen = [], [], set()
    for source, record in records:
        try:
            if isinstance(record, Exception):
                raise ResultError(f"unreadable: {record}")
            row = validate(record)
            if row["run_id"] in seen:
                raise ResultError(f"duplicate run_id {row['run_id']}")
        except ResultError as err:
            log.warning("skipping %s: %s", source, err)
            skipped.append((source, str(err)))
            continue
        seen.add(row["run_id"])
        rows.append({**row, "path": source})
    return Collection(to_frame(rows), tuple(skipped))


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return ResultError(" ".join(str(err).split()))


def collect(runs_dir: Path | str = "runs", sweep: str | None = None) -> Collection:
    """Read every `result.json` under `runs_dir` (or `runs_dir/sweep`).

    Args:
        runs_dir: the runs folder.
        sweep: a sweep name: only `runs_dir/<sweep>/` is searched.

    Returns:
        The runs and the skipped files (paths relative to `runs_dir`).
    """
    runs_dir = Path(runs_dir)
    root = runs_dir / sweep if sweep else runs_dir
    paths = sorted(root.rglob("result.json")) if root.is_dir() else []
    return read_records((p.relative_to(runs_dir).as_posix(), _load_json(p)) for p in paths)


def collect_runs(runs_dir: Path | str = "runs", sweep: str | None = None) -> pd.DataFrame:
    """Like `collect`, returning only the DataFrame of runs."""
    return collect(runs_dir, sweep).runs


def save_runs(runs: pd.DataFrame, results_dir: Path | str, sweep: str) -> Path:
    """Write `results_dir/<sweep>/runs.csv` atomically; returns its path."""
    text = runs.to_csv(index=False, lineterminator="\n")
    return files.write_text(Path(results_dir) / sweep / "runs.csv", text)


# --------------------------------------------------------------------- W&B
_WANDB_STATES = {"finished": "completed", "failed": "failed", "crashed": "failed", "killed": "failed"}


def _plain(mapping: Any) -> dict[str, Any]:
    """A W&B config/summary object (or a plain dict) -> a plain dict."""
    raw = getattr(mapping, "_json_dict", None)
    return dict(raw if raw is not None else mapping)


def wandb_record(run: Any, sweep: str) -> dict[str, Any]:
    """One W&B run -> a result record (the `result` summary dict when logged).

    Without a full `result` dict, the spec fields come from `run.config`
    (which must hold `arch`, as experiments.train logs it), the metrics and
    scalar result fields from `run.summary`, and the status from
    `summary["status"]` or the run state.
    """
    summary, config = _plain(run.summary), _plain(run.config)
    if isinstance(summary.get("result"), Mapping):
        return dict(summary["result"])
    record = {k: v for k, v in {**config, **summary}.items() if k in FIELDS or k == "role"}
    if record.get("pretraining") in ("none", "imagenet"):
        record["pretrain_size"] = None  # as in result.json; the spec keeps a profile default
    record.setdefault("schema_version", SCHEMA_VERSIONS[-1])
    record.setdefault("run_id", run.id)
    record.setdefault("sweep", sweep)
    record.setdefault("status", _WANDB_STATES.get(getattr(run, "state", ""), getattr(run, "state", None)))
    record["metrics"] = {k: v for k, v in summary.items() if k.startswith(METRIC_PREFIXES) and _is_number(v)}
    record["selected"] = {
        k.removeprefix("selected/"): v for k, v in summary.items() if k.startswith("selected/") and _is_number(v)
    }
    record["spec"] = config
    return record


def from_wandb(path: str, sweep: str, api: Any = None) -> Collection:
    """Read a sweep's runs from W&B: `api.runs(path, filters={"group": sweep})`.

    Args:
        path: "ENTITY/PROJECT".
        sweep: the sweep name (the runs' W&B group).
        api: a `wandb.Api()`-like object; created (importing wandb) when None.

    Returns:
        The same Collection as `collect` would give for the files.
    """
    if api is None:
        import wandb

        api = wandb.Api()
    runs = sorted(api.runs(path, filters={"group": sweep}), key=lambda r: r.id)
    return read_records((f"wandb:{path}/{r.id}", wandb_record(r, sweep)) for r in runs)


def main(argv: list[str] | None = None) -> int:
    """CLI: collect a sweep and write `results/SWEEP/runs.csv`."""
    from analysis import cli

    args = cli.parser("Collect a sweep's result.json files into results/SWEEP/runs.csv.").parse_args(argv)
    collection = cli.load(args)
    path = save_runs(collection.runs, args.results_dir, args.sweep)
    print(f"{len(collection.runs)} runs -> {path} ({len(collection.skipped)} files skipped)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
