"""The tuning table: configurations ranked by validation accuracy, never a test number."""

from __future__ import annotations

from analysis import collect, tuning
from tests.analysis_fixtures import SWEEP, make_result, write_runs


def _record(model: str, lr: float, val: float, test: float) -> dict:
    record = make_result(model, 0.04, 0, test)
    record["spec"] = {**record["spec"], "lr": lr}
    record["run_id"] = f"{model[:6]}{int(lr * 1e4):06d}"
    record["selected"] = {**record["selected"], "val/acc1": val}
    record["metrics"]["train/acc1"] = 0.9
    return record


def test_configurations_are_ranked_by_validation_and_test_never_shows(tmp_path) -> None:
    # the test accuracies are ordered the other way round: a table ranked on them would differ
    write_runs(tmp_path, [_record("resnet50", 1e-3, 0.80, 0.91), _record("resnet50", 2e-3, 0.83, 0.71),
                          _record("vit_tiny_p8", 1e-3, 0.65, 0.99), _record("vit_tiny_p8", 2e-3, 0.70, 0.61)])
    text = tuning.tuning_table(collect.collect(tmp_path, SWEEP))
    rows = [line.split("|")[1:-1] for line in text.splitlines()[2:]]
    assert [(r[0].strip(), r[1].strip(), r[2].strip()) for r in rows] == [
        ("resnet50", "0.002", "83.0"), ("resnet50", "0.001", "80.0"),
        ("vit_tiny_p8", "0.002", "70.0"), ("vit_tiny_p8", "0.001", "65.0")]
    assert "| lr " in text.splitlines()[0] and "test" not in text
    assert not any(f"{v:.1f}" in text for v in (91.0, 71.0, 99.0, 61.0))
