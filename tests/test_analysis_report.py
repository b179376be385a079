"""analysis.report: the end-to-end report (through `python -m analysis report`), its determinism, W&B hook."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
from analysis_fixtures import (SWEEP, make_result, power_law_sweep, runs_of, small_sweep, write_plan,
                               write_predictions, write_result, write_runs)
from test_analysis_intervals import hand_built

from analysis import cli, collect, report, stats, tables


def make_sweep(root: Path) -> list[str]:
    """The golden sweep, one malformed file, and a plan that also expects a 30% size not run yet.

    Returns the arguments of `python -m analysis`.
    """
    write_plan(root / "runs", small_sweep() + [make_result(m, 0.3, 0) for m in ("resnet50", "vit_tiny_p8")])
    write_runs(root / "runs", small_sweep())
    write_result(root / "runs", "{not json", run_id="broken000000")
    return ["report", "--sweep", SWEEP, "--runs-dir", str(root / "runs"), "--results-dir", str(root / "results")]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """One report run, and a snapshot of everything it wrote."""
    root = tmp_path_factory.mktemp("report")
    assert cli.main(make_sweep(root)) == 0
    out = root / "results" / SWEEP
    return out, snapshot(out)


DIRECTION = re.compile(r"\b(leads?|ahead|behind)\b")


def sentences(text: str) -> list[str]:
    """The report's sentences: split at a full stop followed by a space and a capital or a line break."""
    return [s for line in text.splitlines() for s in re.split(r"(?<=\.)\s+(?=[A-Z])", line) if s.strip()]


def assert_every_direction_has_n_and_interval(text: str) -> int:
    """Every sentence stating who is ahead carries its n and a 95% interval; returns how many were checked."""
    stated = [s for s in sentences(text) if DIRECTION.search(s)]
    for sentence in stated:
        assert re.search(r"\bn=\d+", sentence) and re.search(r"95% CI [−+]?\d", sentence), sentence
    return len(stated)


def test_report_writes_every_artefact(built):
    out, files = built
    assert {"report.md", "runs.csv"} <= set(files)
    assert {f"tables/table{i}_{n}.{e}" for i, n in enumerate(
        ["data_efficiency", "pretraining", "generalization", "cost"], 1) for e in ("md", "tex")} <= set(files)
    assert {"figures/fig1_data_efficiency.png", "figures/fig1_data_efficiency.pdf"} <= set(files)
    assert not any(name.endswith(".tmp") or "/." in name for name in files)


@pytest.mark.slow
def test_report_is_byte_identical_when_run_twice(built, tmp_path):
    out, first = built
    assert cli.main(make_sweep(tmp_path)) == 0
    second = snapshot(tmp_path / "results" / SWEEP)
    assert second.keys() == first.keys()
    for name in first:  # md, csv, tex, and the PNG/PDF figures too
        assert second[name] == first[name], name


def test_report_contents(built):
    text = built[1]["report.md"].decode()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == ["## Setup", "## Protocol", "## Completeness", "## Findings", "## Tables", "## Figures"]
    assert "- Runs: 13 (11 completed, 1 failed, 1 diverged); 0 upstream pretraining runs; 1 unreadable" in text
    assert "- Models: resnet50 (cnn), vit_tiny_p8 (vit)" in text and "- Seeds: 0, 1" in text
    assert "`toy/broken000000/result.json`: unreadable" in text
    assert ("- At 1% (540 images), scratch: resnet50 is ahead of vit_tiny_p8 by 9.0 points (ViT − CNN −9.0 "
            "points, 95% CI −21.7 to +3.7, t over n=2 seeds); the interval includes 0, so the order is not "
            "established.") in text
    assert ("- At 10% (5,400 images), scratch: ViT − CNN −2.0 points, n=1 seed, no interval: no predictions file "
            "(not recorded, or read from W&B); with no interval, no direction is stated.") in text
    assert "- At 10%, fractaldb 12.8k: no completed vit_tiny_p8/resnet50 pair with the same seed yet" in text
    assert ("resnet50 changes by +2.0 points over scratch (95% CI +2.0 to +2.0, t over n=2 seeds); the interval "
            "excludes 0.") in text
    assert "- Fit resnet50 · scratch: not identified (a·n^(−b): 2 distinct sizes − 2 parameters = 0 residual" in text
    assert "Crossover vit_tiny_p8 vs resnet50 (scratch): not estimated, the fit of vit_tiny_p8 and resnet50" in text
    assert ("- `sweep.json` (experiments/sweeps/toy.yaml) expects 15 runs (15 fine-tuning, 0 upstream pretraining): "
            "11 completed, 1 failed, 1 diverged, 2 missing.") in text
    assert "| train | fashion_mnist | resnet50 | scratch | 30% | 0 | – | – |" in text
    assert "- At 30%, scratch: no completed vit_tiny_p8/resnet50 pair with the same seed yet" in text
    assert re.search(r"\| 1% \(540\) +\| +82\.0 \[56\.6, 100\.0\] n=2 \|", text)  # Table 1 inlined
    assert "![Figure 1. Data efficiency: test accuracy vs training images" in text
    assert "- Figure `fig3_pretraining_scale` skipped: no pretraining source with >= 2 pretraining-set sizes." in text
    assert str(built[0].parents[1]) not in text  # relative links only
    assert assert_every_direction_has_n_and_interval(text) == 2


def test_protocol_is_stated_from_the_runs_fields(built):
    text = built[1]["report.md"].decode()
    protocol = text.split("## Protocol")[1].split("## Completeness")[0]
    for piece in ("**Same step budget at every training size**: 100 steps of batch 128, in all 13 runs",
                  "among 10 evaluations per run; 0 of 11 completed runs stopped early",
                  "(`data_seed` = `seed` in all 13 runs)", "95% Student-t intervals over seeds for n ≥ 2",
                  stats.TEST_SAMPLING, "exact McNemar test", "no parameter sits on a bound",
                  "exceed its parameters by at least 2", "**No extrapolation**",
                  "requested auto; resolved 32-true", "Hardware: cpu: 2 cores, no native bf16",
                  "Dosovitskiy et al. 2021", "DeiT, Touvron et al. 2021", "AugReg, Steiner et al. 2022",
                  "Kaplan et al. 2020", "every recipe field of the spec is identical"):
        assert piece in protocol, piece
    assert all(line.startswith("- **") and "Why: " in line for line in protocol.strip().splitlines()[1:])


def test_partial_sweep_lists_what_is_missing(tmp_path):
    """sweep.json expects 3 seeds of 2 sizes; seed 2 never ran, one run failed, the 30% size has not started."""
    expected = [make_result(m, f, s, 0.8 + 0.01 * s - (0.05 if m == "vit_tiny_p8" else 0))
                for f in (0.1, 0.3) for s in (0, 1, 2) for m in ("resnet50", "vit_tiny_p8")]
    failed = make_result("vit_tiny_p8", 0.1, 1, None, status="failed")
    finished = [r for r in expected if r["train_fraction"] == 0.1 and r["seed"] < 2 and
                not (r["model"] == "vit_tiny_p8" and r["seed"] == 1)] + [failed]
    write_plan(tmp_path, expected)
    write_runs(tmp_path, finished)
    collection = collect.collect(tmp_path, SWEEP)
    text = "\n".join(report.completeness_section(collection)
                     + report.findings_section(collection.runs, collection.plan.runs))
    assert ("`sweep.json` (experiments/sweeps/toy.yaml) expects 12 runs (12 fine-tuning, 0 upstream pretraining): "
            "3 completed, 1 failed, 0 diverged, 8 missing.") in text
    assert "| train | fashion_mnist | resnet50 | scratch | 10% | 2 | – | – |" in text
    assert "| train | fashion_mnist | vit_tiny_p8 | scratch | 10% | 2 | 1 | – |" in text
    assert "| train | fashion_mnist | resnet50 | scratch | 30% | 0, 1, 2 | – | – |" in text
    assert "- At 30%, scratch: no completed vit_tiny_p8/resnet50 pair with the same seed yet" in text
    table = tables.data_efficiency_table(collection.runs, expected=collection.plan.runs).to_markdown()
    assert re.search(r"\| 30% +\| +missing \| +missing \| +missing \|", table)
    assert_every_direction_has_n_and_interval(text)


def single_seed_sweep(root: Path) -> list[dict]:
    """ViT and CNN at one size, one seed, with predictions: the ViT alone right on 30 images, the CNN on 10."""
    target, vit_pred, cnn_pred = hand_built()
    vit, cnn = make_result("vit_tiny_p8", 0.1, 0), make_result("resnet50", 0.1, 0, precision="bf16-mixed")
    write_predictions(root, vit, target, vit_pred)
    write_predictions(root, cnn, target, cnn_pred)
    return [vit, cnn]


def test_single_seed_comparison_is_labelled_test_sampling_only(tmp_path):
    runs = runs_of(tmp_path, single_seed_sweep(tmp_path))
    lines = report.findings_section(runs)
    line = next(s for s in lines if s.startswith("- At 10%"))
    assert ("vit_tiny_p8 is ahead of resnet50 by 20.0 points (ViT − CNN +20.0 points, 95% CI +" in line
            and f"{stats.TEST_SAMPLING}; McNemar p = 0.0022)" in line)
    assert "with one seed the variation between seeds is not measured" in line
    assert_every_direction_has_n_and_interval("\n".join(lines))
    collection = collect.Collection(runs, source="result.json files")
    protocol = "\n".join(report.protocol_section(collection))
    assert "**Warning, fairness violation**: 1 paired run differ in resolved precision: vit_tiny_p8 32-true vs " \
           "resnet50 bf16-mixed (scratch, 10%, seed 0)" in protocol
    assert "A predictions file is recorded for 2 of the 2 runs with a test accuracy" in protocol


def test_flagged_cells_upstream_runs_and_crossovers(tmp_path):
    records = power_law_sweep(noise=0.002, seeds=(0, 1, 2), fractions=(0.01, 0.03, 0.1, 0.3, 0.6, 1.0))
    for r in records:
        r["improving_at_end"] = r["model"] == "resnet50" and r["train_fraction"] == 1.0
    up = make_result("vit_tiny_p8", 1.0, 0, None, dataset="fractaldb", role="pretrain", improving_at_end=True)
    up["selected"]["val/acc1"] = 0.31
    tuned = make_result("vit_tiny_p8", 0.1, 0, 0.7, "fractaldb", 12800, pretrained_from=up["run_id"])
    runs = runs_of(tmp_path, records + [up, tuned])
    text = "\n".join(report.findings_section(runs) + report.protocol_section(collect.Collection(runs)))
    assert "**Cells still improving when their budget ended**: 1 of 13 (resnet50 · scratch · 100%)" in text
    assert "1 flagged size kept out" in text
    assert (f"Upstream vit_tiny_p8 on fractaldb 12.8k (run `{up['run_id']}`): its own validation accuracy 31.0% "
            "after 100 of 100 steps (7.68 TFLOPs of training, not counted in its fine-tuning runs' FLOPs); "
            "it was still improving when its budget ended") in text
    crossing = next(s for s in sentences(text) if s.startswith("- Crossover vit_tiny_p8 vs resnet50 (scratch)"))
    assert "cross at ≈ 8," in crossing and "inside the measured range (540–32,400 images)" in crossing
    assert "measured: at 5,400 images ViT − CNN" in crossing and "t over n=3 seeds" in crossing
    assert assert_every_direction_has_n_and_interval(text) >= 6


def test_no_crossover_is_claimed_outside_the_measured_range(tmp_path):
    runs = runs_of(tmp_path, power_law_sweep(fractions=(0.004, 0.008, 0.015, 0.03, 0.06), seeds=(0, 1, 2)))
    lines = report.findings_section(runs)
    crossing = next(line for line in lines if line.startswith("- Crossover"))
    assert "no crossover in the measured range (216–3,240 images)" in crossing and "t over n=3" in crossing
    runs = runs_of(tmp_path / "reversed", power_law_sweep(vit=(1.0, 0.4, 0.08), cnn=(8.0, 0.5, 0.02)))
    crossing = next(line for line in report.findings_section(runs) if line.startswith("- Crossover"))
    assert "reversed, the ViT's fitted error is lower at 540 images and the CNN's falls below it at ≈ 8,491" in crossing


def test_report_from_wandb_says_what_is_unavailable(tmp_path):
    full = make_result("resnet50", 0.01, 0, 0.8)
    vit = make_result("vit_tiny_p8", 0.01, 0, 0.7)
    wandb_runs = [SimpleNamespace(id=r["run_id"], state="finished", config=r["spec"], summary={"result": r})
                  for r in (full, vit)]
    api = SimpleNamespace(runs=lambda path, filters=None: wandb_runs)
    collection = collect.from_wandb("me/proj", SWEEP, api=api)
    text = "\n".join(report.protocol_section(collection) + report.completeness_section(collection)
                     + report.findings_section(collection.runs))
    assert "read from W&B: the predictions files stay in the run folders, so n = 1 differences have no interval" in text
    assert "- read from W&B: sweep.json is not there, the expected runs are unknown." in text
    assert "no interval: no predictions file (not recorded, or read from W&B)" in text


def test_schema_v1_runs_still_make_a_report(tmp_path):
    old = []
    for model, acc in (("resnet50", 0.8), ("vit_tiny_p8", 0.7)):
        record = make_result(model, 0.1, 0, acc, schema_version=1, data_seed=0)
        for key in ("improving_at_end", "budget_steps", "n_evals", "stopped_early", "precision", "hardware", "role",
                    "architecture"):
            del record[key]
        old.append(record)
    runs = runs_of(tmp_path, old)
    text = "\n".join(report.protocol_section(collect.Collection(runs)) + report.findings_section(runs))
    assert "**Step budget**: not recorded by these runs" in text
    assert "**Cells still improving when their budget ended**: not recorded by these runs" in text
    assert "no interval: no predictions file" in text


@pytest.mark.slow
def test_wandb_logging_uses_one_report_run(tmp_path, monkeypatch):
    calls = {}

    class FakeRun:
        def log(self, payload):
            calls["log"] = payload

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    fake = types.SimpleNamespace(
        init=init,
        Table=lambda columns, data: ("table", columns, data),
        Image=lambda path: ("image", path),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert cli.main([*make_sweep(tmp_path), "--wandb", "offline"]) == 0
    init = calls["init"]
    assert (init["job_type"], init["group"], init["name"], init["mode"]) == ("report", SWEEP, f"{SWEEP}-report",
                                                                            "offline")
    logged = calls["log"]
    assert logged["table1_data_efficiency"][0] == "table"
    assert logged["table1_data_efficiency"][2][0][1] == "82.0 [56.6, 100.0] n=2"
    assert logged["fig1_data_efficiency"] == ("image", str(tmp_path / "results" / SWEEP / "figures" /
                                                           "fig1_data_efficiency.png"))
    assert calls["finished"]
