"""analysis.collect: result.json files (and W&B runs) -> one schema-checked DataFrame."""

from __future__ import annotations

import json
import logging
import math
import warnings
from types import SimpleNamespace

import pandas as pd
import pytest
from analysis_fixtures import SWEEP, make_result, runs_of, small_sweep, write_result, write_runs

from analysis import collect, stats
from common import schema


def test_one_row_per_run_with_flattened_sections(tmp_path):
    runs = runs_of(tmp_path, small_sweep())
    assert len(runs) == len(small_sweep())
    assert list(runs.columns[: len(schema.FIELDS) + 2]) == [*schema.FIELDS, "path", "predictions_path"]
    for col in ("test/acc1", "test/acc5", "selected/val/acc1", "selected/step", "architecture/patch_size",
                "architecture/timm_name", "versions/python", "spec/lr", "spec/role"):
        assert col in runs.columns
    assert str(runs["seed"].dtype) == "Int64" and str(runs["pretrain_size"].dtype) == "Int64"
    assert set(runs["role"]) == {"train"}
    first = runs.iloc[0]
    assert first["path"] == f"{SWEEP}/{first['run_id']}/result.json"


def test_sections_follow_the_schema_order(tmp_path):
    runs = runs_of(tmp_path, [{**make_result(), "run_note": "unknown to the schema"}])
    rest = list(runs.columns[len(schema.FIELDS) + 2:])
    assert rest[0] == "run_note"  # an unknown top-level scalar: kept, before the sections
    first_column = {"selected": "selected/epoch", "metrics": "test/acc1", "architecture": "architecture/drop_path_rate",
                    "runtime": "runtime/channels_last", "versions": "versions/python", "spec": "spec/batch_size"}
    positions = [rest.index(first_column[section]) for section in schema.SECTIONS]
    assert positions == sorted(positions)
    assert all(rest[p - 1] < rest[p] for p in range(1, len(rest)) if p not in positions)  # sorted within each


def test_nested_architecture_values_become_json_text(tmp_path):
    arch = {"timm_name": "resnet50", "layers": [3, 4, 6, 3], "block_args": {"attn_layer": None}}
    runs = runs_of(tmp_path, [make_result(architecture=arch)])
    assert runs.loc[0, "architecture/layers"] == "[3, 4, 6, 3]"
    assert runs.loc[0, "architecture/block_args"] == '{"attn_layer": null}'


def test_schema_version_1_files_are_still_read(tmp_path):
    old = make_result(seed=1, dataset="fractaldb", schema_version=1)
    del old["architecture"], old["role"]  # version 1 had no architecture section
    old["spec"]["role"] = "pretrain"  # a record without a top-level role takes its spec's
    runs = runs_of(tmp_path, [old, make_result(seed=2)]).set_index("seed")
    assert list(runs.loc[[1, 2], "schema_version"]) == [1, 2]
    assert list(runs.loc[[1, 2], "role"]) == ["pretrain", "train"]
    assert pd.isna(runs.loc[1, "architecture/timm_name"]) and runs.loc[2, "architecture/timm_name"] == "resnet50"


def test_rows_are_sorted_by_model_condition_fraction_seed(tmp_path):
    runs = runs_of(tmp_path, small_sweep())
    keys = list(zip(runs["model"], runs["pretraining"], runs["train_fraction"], runs["seed"]))
    assert keys == sorted(keys)


def test_missing_metric_is_nan_and_failed_run_is_kept(tmp_path):
    runs = runs_of(tmp_path, small_sweep())
    no_acc = runs[(runs["pretraining"] == "fractaldb") & (runs["train_fraction"] == 0.1)]
    assert len(no_acc) == 1 and math.isnan(no_acc["test/acc1"].iloc[0])
    assert sorted(runs["status"].value_counts().items()) == [("completed", 11), ("diverged", 1), ("failed", 1)]


def _without(record: dict, key: str) -> dict:
    return {k: v for k, v in record.items() if k != key}


BAD = {
    "bad_json": ('{"run_id": "x",', "unreadable"),
    "not_an_object": ("[1, 2, 3]", "not an object"),
    "missing_key": (_without(make_result(seed=7), "arch"), "missing required key 'arch'"),
    "wrong_type": ({**make_result(seed=8), "seed": "8"}, "seed='8' is not an int"),
    "bool_is_not_a_number": ({**make_result(seed=9), "train_fraction": True}, "train_fraction=True"),
    "bad_status": ({**make_result(seed=10), "status": "running"}, "status='running'"),
    "bad_metric": ({**make_result(seed=11), "metrics": {"test/acc1": "high"}}, "metrics['test/acc1']"),
    "bad_fraction": ({**make_result(seed=12), "train_fraction": 1.5}, "not in (0, 1]"),
    "future_schema": ({**make_result(seed=13), "schema_version": max(schema.SCHEMA_VERSIONS) + 1},
                      f"schema_version={max(schema.SCHEMA_VERSIONS) + 1}"),
    "bad_role": ({**make_result(seed=14), "role": "upstream"}, "role='upstream'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_file_is_skipped_with_its_path(tmp_path, caplog, case):
    record, reason = BAD[case]
    write_runs(tmp_path, small_sweep())
    path = write_result(tmp_path, record, run_id="bad000000000")
    with caplog.at_level(logging.WARNING, logger="analysis.collect"):
        collection = collect.collect(tmp_path, SWEEP)
    assert len(collection.runs) == len(small_sweep())
    rel = path.relative_to(tmp_path).as_posix()
    assert [p for p, _ in collection.skipped] == [rel]
    assert reason in collection.skipped[0][1]
    assert rel in caplog.text and reason in caplog.text


def test_duplicate_run_id_keeps_the_first(tmp_path, caplog):
    record = make_result()
    write_result(tmp_path, record)
    write_result(tmp_path, record, run_id="zz_copy")
    with caplog.at_level(logging.WARNING):
        collection = collect.collect(tmp_path, SWEEP)
    assert len(collection.runs) == 1 and "duplicate run_id" in collection.skipped[0][1]


def test_upstream_pretraining_run_gets_role_pretrain(tmp_path):
    upstream = make_result("vit_tiny_p8", 1.0, dataset="fractaldb", acc=0.3)
    target = make_result("vit_tiny_p8", 0.01, pretraining="fractaldb", pretrain_size=12800,
                         pretrained_from=upstream["run_id"])
    runs = runs_of(tmp_path, [upstream, target]).set_index("run_id")
    assert runs.loc[upstream["run_id"], "role"] == "pretrain"
    assert runs.loc[target["run_id"], "role"] == "train"


def test_role_is_read_from_the_result(tmp_path):
    assert sorted(runs_of(tmp_path, [make_result(dataset="fractaldb", role="pretrain"), make_result()])["role"]) \
        == ["pretrain", "train"]


def test_sweep_selects_its_folder(tmp_path):
    write_result(tmp_path, make_result())
    other = tmp_path / "other" / "abc" / "result.json"
    other.parent.mkdir(parents=True)
    other.write_text(json.dumps(make_result(seed=5, sweep="other")))
    assert len(collect.collect(tmp_path, SWEEP).runs) == 1
    assert len(collect.collect(tmp_path).runs) == 2
    assert collect.collect(tmp_path, "missing").runs.empty


def test_save_runs_is_atomic_and_deterministic(tmp_path):
    write_runs(tmp_path / "runs", small_sweep())
    runs = collect.collect(tmp_path / "runs", SWEEP).runs
    path = collect.save_runs(runs, tmp_path / "results", SWEEP)
    first = path.read_bytes()
    collect.save_runs(collect.collect(tmp_path / "runs", SWEEP).runs, tmp_path / "results", SWEEP)
    assert path == tmp_path / "results" / SWEEP / "runs.csv"
    assert path.read_bytes() == first
    assert [p.name for p in path.parent.iterdir()] == ["runs.csv"]  # no temp file left
    assert first.decode().splitlines()[0].startswith("schema_version,run_id,sweep,status")


class FakeApi:
    """Stands in for wandb.Api(): records the query, returns canned runs."""

    def __init__(self, runs):
        self._runs, self.calls = runs, []

    def runs(self, path, filters=None):
        self.calls.append((path, filters))
        return list(self._runs)


def test_from_wandb_reads_result_dicts_and_config_summary(caplog):
    full = make_result("resnet50", 0.01, 0, 0.8)
    spec = make_result("vit_tiny_p8", 0.01, 0)["spec"]
    runs = [
        SimpleNamespace(id="b_full", state="finished", config=spec, summary={"result": full}),
        SimpleNamespace(id="a_cfg", state="finished", config={**spec, "arch": "vit", "sweep": SWEEP},
                        summary={"test/acc1": 0.7, "val/acc1": 0.72, "selected/val/acc1": 0.71,
                                 "params": 1200, "trainer/global_step": 5, "_runtime": 3.0}),
        SimpleNamespace(id="c_running", state="running", config={**spec, "arch": "vit"}, summary={}),
    ]
    api = FakeApi(runs)
    with caplog.at_level(logging.WARNING):
        collection = collect.from_wandb("me/proj", SWEEP, api=api)
    assert api.calls == [("me/proj", {"group": SWEEP})]
    frame = collection.runs.set_index("run_id")
    assert sorted(frame.index) == sorted([full["run_id"], "a_cfg"])
    assert frame.loc["a_cfg", "test/acc1"] == 0.7 and frame.loc["a_cfg", "selected/val/acc1"] == 0.71
    assert frame.loc["a_cfg", "status"] == "completed" and frame.loc["a_cfg", "params"] == 1200
    assert frame["pretrain_size"].isna().all()  # null for scratch, as in result.json
    assert "trainer/global_step" not in frame.columns and frame.loc["a_cfg", "spec/lr"] == 1e-3
    assert frame.loc[full["run_id"], "test/acc1"] == 0.8
    assert collection.skipped == (("wandb:me/proj/c_running", "status='running' is not one of completed, "
                                   "failed, diverged"),)


def test_predictions_path_is_absolute_and_left_out_of_runs_csv(tmp_path):
    from analysis_fixtures import write_predictions
    record = make_result()
    write_predictions(tmp_path / "runs", record, [1, 2, 3], [1, 2, 0])
    write_runs(tmp_path / "runs", [record, make_result(seed=1)])
    runs = collect.collect(tmp_path / "runs", SWEEP).runs.set_index("seed")
    assert runs.loc[0, "predictions_path"] == str((tmp_path / "runs" / SWEEP / record["run_id"] /
                                                   "predictions.npz").resolve())
    assert runs.loc[1, "predictions_path"] is None  # its result names no predictions file
    csv = collect.save_runs(runs.reset_index(), tmp_path / "results", SWEEP).read_text()
    assert "predictions_path" not in csv and ",predictions.npz," in csv


def test_sweep_plan_and_the_state_of_each_expected_run(tmp_path):
    from analysis_fixtures import write_plan
    records = [make_result("resnet50", 0.1, s) for s in (0, 1, 2)]
    records[1] = make_result("resnet50", 0.1, 1, None, status="failed")
    write_plan(tmp_path, records + [make_result("vit_tiny_p8", 0.1, 0, pretraining="none")])
    write_runs(tmp_path, records[:2])
    collection = collect.collect(tmp_path, SWEEP)
    plan = collection.plan
    assert (plan.name, plan.file, plan.swept) == (SWEEP, f"experiments/sweeps/{SWEEP}.yaml",
                                                  ("model", "train_fraction"))
    assert str(plan.runs["seed"].dtype) == "Int64" and plan.runs["pretrain_size"].isna().all()
    state = collect.plan_status(plan, collection.runs)
    assert list(zip(state["model"], state["seed"], state["state"])) == [
        ("resnet50", 0, "completed"), ("resnet50", 1, "failed"), ("resnet50", 2, "missing"),
        ("vit_tiny_p8", 0, "missing")]


@pytest.mark.parametrize("content, reason", [(None, "sweep.json not found: the expected runs are unknown"),
                                             ("{oops", "sweep.json unreadable"),
                                             ('{"runs": [{"run_id": "x"}]}', "runs[0] lacks 'role'")])
def test_a_missing_or_malformed_plan_leaves_the_expected_runs_unknown(tmp_path, content, reason):
    write_runs(tmp_path, [make_result()])
    if content is not None:
        (tmp_path / SWEEP / "sweep.json").write_text(content)
    collection = collect.collect(tmp_path, SWEEP)
    assert collection.plan is None and reason in collection.plan_note and len(collection.runs) == 1


def test_a_partly_finished_pretraining_sweep_has_one_cell_per_condition(tmp_path):
    """The plan asks for 12,800 FractalDB images, the finished runs record the 12,784 their upstream trained on:
    the cells of the runs still missing are the finished runs' cells, not a second "fractaldb 12.8k" column."""
    from analysis_fixtures import write_plan

    from analysis import stats
    upstream = [make_result("resnet50", 1.0, s, 0.99, dataset="fractaldb", role="pretrain", n_train=12_784)
                for s in (0, 1)]
    tuned = [make_result("resnet50", 0.1, s, 0.8, "fractaldb", 12_784, pretrained_from=upstream[s]["run_id"])
             for s in (0, 1)]
    write_plan(tmp_path, upstream + [{**r, "pretrain_size": 12_800} for r in tuned])
    write_runs(tmp_path, [upstream[0], tuned[0]])  # seed 1 and its upstream run have not run yet
    collection = collect.collect(tmp_path, SWEEP)
    assert collection.plan.runs["pretrain_size"].dropna().tolist() == [12_800, 12_800]
    expected = collection.expected_runs
    assert expected.loc[expected["role"] == "train", "pretrain_size"].tolist() == [12_784, 12_784]
    summary = stats.summarize(collection.runs, expected=expected[expected["role"] == "train"])
    assert summary["pretrain_size"].tolist() == [12_784]


def test_many_metric_columns_leave_no_fragmented_frame(tmp_path):
    """A robustness run has ~100 metric columns; the report adds columns to the frame many times over, which
    pandas warns about (PerformanceWarning, once per table) when the frame holds a block per column."""
    metrics = {f"corrupt/c{i}/{s}/acc1": 0.5 for i in range(15) for s in range(1, 6)}
    runs = runs_of(tmp_path, [make_result(seed=s, metrics=dict(metrics)) for s in (0, 1)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.PerformanceWarning)
        stats.cell_flags(runs)
