"""A real run's result.json read by the analysis: the writer and the reader share one contract."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis.collect import collect
from experiments.rundir import RunDir
from experiments.spec import RunSpec
from experiments.train import run

torch.set_num_threads(1)


@pytest.mark.slow
def test_a_tiny_run_is_collected_with_its_architecture(tmp_path: Path) -> None:
    spec = RunSpec.create("cpu", model="vit_tiny_p4", dataset="synthetic", sweep="e2e", wandb="off",
                          precision="32-true", min_steps=4, max_steps=4, num_evals=2, val_size=32, batch_size=32,
                          depth=2, pos_embed="sincos2d", pool="avg")
    result = run(spec, tmp_path)
    assert result["status"] == "completed", result["error"]
    assert result["architecture"]["depth"] == 2 and result["architecture"]["pos_embed"] == "sincos2d"

    collection = collect(tmp_path, "e2e")
    assert collection.skipped == ()
    (row,) = collection.runs.to_dict("records")
    assert row["run_id"] == spec.run_id and row["status"] == "completed" and row["role"] == "train"
    assert row["path"] == RunDir.of(tmp_path, spec).result_json.relative_to(tmp_path).as_posix()
    for name, value in result["metrics"].items():
        assert row[name] == pytest.approx(value), name
    assert row["selected/val/acc1"] == pytest.approx(result["selected"]["val/acc1"])
    assert row["architecture/depth"] == 2 and row["architecture/pool"] == "avg"
    assert row["spec/depth"] == 2 and pd.isna(row["spec/patch_size"])  # the registry's patch size
