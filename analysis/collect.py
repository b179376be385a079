"""Collect a sweep's `result.json` files into one tidy DataFrame, one row per run.

The contract is `common.schema` (docs/results.md explains it). Each record is
checked with `common.schema.check`; a file that is not JSON or breaks the
contract is skipped with one warning that names its path and the reason,
never a crash. Files of every version in `SCHEMA_VERSIONS` are read.

Columns, in order: the top-level scalar fields (`schema.FIELDS`; `role` is
"train", or "pretrain" for an upstream pretraining run), `path` (relative
to the runs folder) and `predictions_path` (the absolute path of the run's
`predictions.npz` when its result names one and it was read from files; else
empty), then scalar top-level keys the schema does not know,
then each nested section of `schema.SECTIONS` in its order, flattened under
its prefix and sorted: `selected/<key>`, the metrics under their own names
(`test/acc1`, `corrupt/<name>/<severity>/acc1`, ...), `architecture/<key>`,
`versions/<package>`, `spec/<field>`. Lists and objects inside a section
become JSON text.

`read_plan` reads `runs/SWEEP/sweep.json`, which the sweep runner writes when
it starts: the runs the sweep is expected to produce, so that a report on a
partly finished sweep can say what is missing (`plan_status`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from common import files
from common.schema import (FIELDS, METRIC_PREFIXES, SCHEMA_VERSION, SECTIONS, ResultError, check,
                           check_scalar, is_number)

log = logging.getLogger(__name__)

SORT_KEYS = ["dataset", "model", "pretraining", "pretrain_size", "train_fraction", "seed", "run_id"]
_DTYPES = {"int": "Int64", "number": "float64", "str": "object", "bool": "boolean"}
PLAN_FILE = "sweep.json"  # runs/SWEEP/sweep.json, written by the sweep runner when it starts
# The columns of an expected run in sweep.json: (name, type, required).
PLAN_COLUMNS = (("run_id", "str", True), ("role", "str", True), ("model", "str", True), ("arch", "str", True),
                ("dataset", "str", True), ("train_fraction", "number", True), ("pretraining", "str", True),
                ("pretrain_size", "int", False), ("seed", "int", True), ("upstream", "str", False))
# Pretraining sources without a size of their own: their pretrain_size is null in result.json.
UNSIZED_PRETRAINING = ("none", "imagenet")


@dataclass(frozen=True)
class SweepPlan:
    """The runs a sweep expects, from its `sweep.json`.

    Attributes:
        name: the sweep's name.
        file: the sweep file it was expanded from.
        swept: the parameters the sweep varies.
        runs: one row per expected run (`PLAN_COLUMNS`, typed as in the runs frame).
    """

    name: str
    file: str
    swept: tuple[str, ...]
    runs: pd.DataFrame


@dataclass(frozen=True)
class Collection:
    """What was read: the runs, the files skipped with their reason, and the sweep's plan.

    Attributes:
        runs: one row per valid result (columns as in the module docstring).
        skipped: (path, reason) for every file that was left out.
        plan: the expected runs (`sweep.json`), or None when unknown.
        plan_note: why the plan is unknown ("" when it is known).
        source: where the runs were read from, for the report ("result.json files" or "W&B ENTITY/PROJECT").
    """

    runs: pd.DataFrame
    skipped: tuple[tuple[str, str], ...] = ()
    plan: SweepPlan | None = None
    plan_note: str = ""
    source: str = ""

    @property
    def expected_runs(self) -> pd.DataFrame | None:
        """The runs the plan expects (`SweepPlan.runs`) with their pretraining sizes as the runs record them
        (`recorded_sizes`), or None when they are unknown."""
        return None if self.plan is None else recorded_sizes(self.plan.runs, self.runs)


def recorded_sizes(plan: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """`plan` with each fine-tuning run's pretraining size as a finished run records it, so that the cells of a
    partly finished sweep's missing runs are the cells of its finished ones.

    The plan holds the size asked for (a FractalDB spec's `pretrain_size`, none for another dataset); a result
    holds the images its upstream run trained on (that run's `n_train`: FractalDB's per-category split into
    training, validation and test rounds 12,800 asked to 12,784). A planned run takes its upstream's
    `n_train` when that run has finished, else the size that the finished runs planned with the same
    pretraining and size record when they agree on one, else the plan's size.
    """
    if plan.empty or runs.empty:
        return plan
    done = runs[runs["status"] == "completed"]
    upstream_images = {run_id: n for run_id, n, role in zip(done["run_id"], done["n_train"], done["role"])
                       if role == "pretrain" and not pd.isna(n)}

    def asked(pretraining: str, size: Any) -> tuple[str, int | None]:
        return pretraining, None if pd.isna(size) else int(size)

    planned = {run_id: asked(p, size) for run_id, p, size in zip(plan["run_id"], plan["pretraining"],
                                                                  plan["pretrain_size"])}
    agreed: dict[tuple[str, int | None], set[int]] = {}
    for run_id, size in zip(done["run_id"], done["pretrain_size"]):
        if run_id in planned and not pd.isna(size):
            agreed.setdefault(planned[run_id], set()).add(int(size))
    sizes = []
    for pretraining, size, upstream in zip(plan["pretraining"], plan["pretrain_size"], plan["upstream"]):
        if pretraining in UNSIZED_PRETRAINING:
            sizes.append(size)
        elif upstream in upstream_images:
            sizes.append(upstream_images[upstream])
        else:
            recorded = agreed.get(asked(pretraining, size), set())
            sizes.append(next(iter(recorded)) if len(recorded) == 1 else size)
    return plan.assign(pretrain_size=pd.array(sizes, dtype="Int64"))


# ------------------------------------------------------------------ rows
def _is_metric(column: str) -> bool:
    return column.startswith(METRIC_PREFIXES)


def _flatten_section(name: str, section: Mapping[str, Any]) -> dict[str, Any]:
    """A nested section -> {prefix + key: value}; lists and objects as JSON text, null as NaN."""
    out = {}
    for key, value in section.items():
        if isinstance(value, (list, dict)):
            value = json.dumps(value, sort_keys=True)
        out[SECTIONS[name] + str(key)] = float("nan") if value is None else value
    return out


def to_row(record: Any) -> dict[str, Any]:
    """Check one parsed result against the contract and flatten it to a row.

    Args:
        record: the parsed JSON of a `result.json`.

    Returns:
        The row: the schema's scalar fields, unknown scalar keys, then the flattened sections.

    Raises:
        ResultError: naming the first key that is missing or malformed.
    """
    check(record)
    row = {name: None if record.get(name) is None else check_scalar(name, record[name], field.kind)
           for name, field in FIELDS.items()}
    if row["role"] is None:  # a record without a top-level role falls back to its spec's
        spec = record.get("spec") or {}
        row["role"] = check_scalar("spec.role", spec.get("role") or "train", "str")
    unknown = {k: v for k, v in record.items() if k not in FIELDS and k not in SECTIONS}
    row.update({k: v for k, v in sorted(unknown.items()) if isinstance(v, (str, int, float))})
    for name in SECTIONS:
        if record.get(name) is not None:
            row.update(_flatten_section(name, record[name]))
    return row


# ------------------------------------------------------------------ frames
def _section_rank(column: str) -> int:
    """0 for an unknown top-level key, else 1 + the position of the column's section in `SECTIONS`."""
    for rank, prefix in enumerate(SECTIONS.values(), start=1):
        if column.startswith(prefix) if prefix else _is_metric(column):
            return rank
    return 0


def _ordered_columns(columns: Iterable[str]) -> list[str]:
    """The schema's fields, `path` and `predictions_path` first, then unknown keys, then each section sorted."""
    fixed = [*FIELDS, "path", "predictions_path"]
    rest = set(columns) - set(fixed)
    return fixed + sorted(rest, key=lambda c: (_section_rank(c), c))


def to_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows from `to_row` -> the tidy, sorted, typed DataFrame."""
    frame = pd.DataFrame.from_records(rows) if rows else pd.DataFrame()
    columns = _ordered_columns({c for row in rows for c in row})
    frame = frame.reindex(columns=columns)
    for name, field in FIELDS.items():
        frame[name] = frame[name].astype(_DTYPES[field.kind])
    numeric = [col for col in columns if _is_metric(col) or col.startswith(SECTIONS["selected"])]
    frame = frame.assign(**{col: pd.to_numeric(frame[col], errors="coerce") for col in numeric}).copy()  # one block
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
            row = to_row(record)
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
    """The parsed file, or a ResultError (one line) saying why it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return ResultError(" ".join(str(err).split()))


def _predictions_paths(runs: pd.DataFrame, runs_dir: Path) -> pd.Series:
    """The absolute path of each run's predictions file (None where its result names none)."""
    runs_dir = runs_dir.resolve()
    return pd.Series([None if pd.isna(name) else str(runs_dir / Path(path).parent / name)
                      for path, name in zip(runs["path"], runs["predictions"])], index=runs.index, dtype=object)


def collect(runs_dir: Path | str = "runs", sweep: str | None = None) -> Collection:
    """Read every `result.json` under `runs_dir` (or `runs_dir/sweep`, with its `sweep.json`).

    Args:
        runs_dir: the runs folder.
        sweep: a sweep name: only `runs_dir/<sweep>/` is searched, and its plan is read.

    Returns:
        The runs (with `predictions_path`), the skipped files (paths relative to
        `runs_dir`) and, for a sweep, its plan or why it is unknown.
    """
    runs_dir = Path(runs_dir)
    root = runs_dir / sweep if sweep else runs_dir
    paths = sorted(root.rglob("result.json")) if root.is_dir() else []
    collection = read_records((p.relative_to(runs_dir).as_posix(), _load_json(p)) for p in paths)
    runs = collection.runs
    runs["predictions_path"] = _predictions_paths(runs, runs_dir)
    plan, note = None, "no sweep named: the expected runs are unknown"
    if sweep:
        try:
            plan, note = read_plan(root / PLAN_FILE), ""
        except PlanError as err:
            note = str(err)
    return Collection(runs, collection.skipped, plan, note, "result.json files")


def save_runs(runs: pd.DataFrame, results_dir: Path | str, sweep: str) -> Path:
    """Write `results_dir/<sweep>/runs.csv` atomically; returns its path.

    `predictions_path` is left out: an absolute path would make the file depend
    on where the runs live (`path` locates every run's folder).
    """
    text = runs.drop(columns="predictions_path", errors="ignore").to_csv(index=False, lineterminator="\n")
    return files.write_text(Path(results_dir) / sweep / "runs.csv", text)


# -------------------------------------------------------------------- plan
class PlanError(ValueError):
    """`sweep.json` is missing or malformed; str() is one line saying which."""


def _plan_row(entry: Any, index: int) -> dict[str, Any]:
    """One expected run of sweep.json, checked and typed."""
    if not isinstance(entry, Mapping):
        raise PlanError(f"{PLAN_FILE}: runs[{index}] is not an object")
    row = {}
    for name, kind, required in PLAN_COLUMNS:
        value = entry.get(name)
        if value is None:
            if required:
                raise PlanError(f"{PLAN_FILE}: runs[{index}] lacks {name!r}")
            row[name] = None
            continue
        try:
            row[name] = check_scalar(name, value, kind)
        except ResultError as err:
            raise PlanError(f"{PLAN_FILE}: runs[{index}]: {err}") from err
    if row["pretraining"] in UNSIZED_PRETRAINING:
        row["pretrain_size"] = None  # as in result.json
    return row


def read_plan(path: Path | str) -> SweepPlan:
    """Read a sweep's `sweep.json`: the runs it expects.

    Raises:
        PlanError: the file is missing, not JSON, or lacks a required key.
    """
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{PLAN_FILE} not found: the expected runs are unknown")
    data = _load_json(path)
    if isinstance(data, Exception):
        raise PlanError(f"{PLAN_FILE} unreadable: {data}")
    if not isinstance(data, Mapping) or not isinstance(data.get("runs"), list):
        raise PlanError(f"{PLAN_FILE} has no list 'runs'")
    rows = [_plan_row(entry, i) for i, entry in enumerate(data["runs"])]
    kinds = {name: kind for name, kind, _ in PLAN_COLUMNS}
    frame = pd.DataFrame.from_records(rows, columns=list(kinds))
    frame = frame.astype({name: _DTYPES[kind] for name, kind in kinds.items()})
    frame = frame.drop_duplicates("run_id").reset_index(drop=True)
    swept = data.get("swept") or []
    return SweepPlan(str(data.get("name", "")), str(data.get("file", "")), tuple(map(str, swept)), frame)


def plan_status(plan: SweepPlan, runs: pd.DataFrame) -> pd.DataFrame:
    """Each expected run with its state: its result's status, or "missing" when it has no result yet.

    Returns:
        The plan's rows plus a column `state` ("completed" | "failed" | "diverged" | "missing").
    """
    status = dict(zip(runs["run_id"], runs["status"]))
    return plan.runs.assign(state=[status.get(run_id, "missing") for run_id in plan.runs["run_id"]])


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
    record = {k: v for k, v in {**config, **summary}.items() if k in FIELDS}
    if record.get("pretraining") in ("none", "imagenet"):
        record["pretrain_size"] = None  # as in result.json; the spec keeps a profile default
    record.setdefault("schema_version", SCHEMA_VERSION)
    record.setdefault("run_id", run.id)
    record.setdefault("sweep", sweep)
    record.setdefault("status", _WANDB_STATES.get(getattr(run, "state", ""), getattr(run, "state", None)))
    record["metrics"] = {k: v for k, v in summary.items() if _is_metric(k) and is_number(v)}
    selected = SECTIONS["selected"]
    record["selected"] = {k.removeprefix(selected): v for k, v in summary.items()
                          if k.startswith(selected) and is_number(v)}
    record["spec"] = config
    return record


REPORT_JOB_TYPE = "report"  # the W&B run `analysis report --wandb` logs the tables and figures to


def from_wandb(path: str, sweep: str, api: Any = None) -> Collection:
    """Read a sweep's runs from W&B: the runs of group `sweep`, except the report's own (job type "report").

    Args:
        path: "ENTITY/PROJECT".
        sweep: the sweep name (the runs' W&B group).
        api: a `wandb.Api()`-like object; created (importing wandb) when None.

    Returns:
        The same runs as `collect` would give for the files, without predictions
        (they live in the run folders) and without the sweep's plan.
    """
    if api is None:
        import wandb

        api = wandb.Api()
    found = api.runs(path, filters={"group": sweep})
    runs = sorted((r for r in found if getattr(r, "job_type", None) != REPORT_JOB_TYPE), key=lambda r: r.id)
    collection = read_records((f"wandb:{path}/{r.id}", wandb_record(r, sweep)) for r in runs)
    return Collection(collection.runs, collection.skipped, None,
                      f"read from W&B: {PLAN_FILE} is not there, the expected runs are unknown", f"W&B {path}")
