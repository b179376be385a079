"""analysis.cli: `python -m analysis collect|tables|plots|report`, exit code 2 without runs, no torch."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from analysis_fixtures import SWEEP, small_sweep, write_runs

from analysis import cli

REPO = Path(__file__).resolve().parents[1]


def folders(root: Path) -> list[str]:
    return ["--runs-dir", str(root / "runs"), "--results-dir", str(root / "results")]


def test_collect_writes_runs_csv(tmp_path, capsys):
    write_runs(tmp_path / "runs", small_sweep())
    assert cli.main(["collect", "--sweep", SWEEP, *folders(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "results" / SWEEP).iterdir()) == ["runs.csv"]
    assert capsys.readouterr().out.startswith(f"{len(small_sweep())} runs -> ")


def test_tables_writes_only_the_tables(tmp_path):
    write_runs(tmp_path / "runs", small_sweep())
    assert cli.main(["tables", "--sweep", SWEEP, *folders(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "results" / SWEEP).iterdir()) == ["tables"]
    assert len(list((tmp_path / "results" / SWEEP / "tables").iterdir())) == 8


@pytest.mark.slow
def test_plots_writes_figures_and_skips_empty_ones(tmp_path, caplog):
    write_runs(tmp_path / "runs", small_sweep())
    with caplog.at_level(logging.INFO, logger="analysis.outputs"):
        assert cli.main(["plots", "--sweep", SWEEP, *folders(tmp_path)]) == 0
    assert sorted(p.name for p in (tmp_path / "results" / SWEEP).iterdir()) == ["figures"]
    names = sorted(p.name for p in (tmp_path / "results" / SWEEP / "figures").iterdir())
    assert names == [f"{stem}.{ext}" for stem in ("fig1_data_efficiency", "fig2_pretraining_effect", "fig5_cost")
                     for ext in ("pdf", "png")]
    assert "figure fig3_pretraining_scale skipped: no pretraining source with >= 2" in caplog.text
    assert "figure fig4_generalization skipped: runs carry no train/acc1" in caplog.text
    assert "figure fig_r1_corruption_severity skipped" in caplog.text  # the generalization figures are tried too


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_no_runs_is_one_line_and_exit_code_2(tmp_path, capsys, command):
    assert cli.main([command, "--sweep", "nothing", *folders(tmp_path)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no runs for sweep 'nothing'") and not captured.out
    assert not (tmp_path / "results").exists()


def test_report_options_belong_to_report_only(capsys):
    assert cli.build_parser().parse_args(["report", "--sweep", "s", "--wandb", "offline"]).wandb == "offline"
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["plots", "--sweep", "s", "--wandb", "offline"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --wandb" in capsys.readouterr().err


def test_analysis_never_imports_torch_or_the_training_code(tmp_path):
    """`python -m analysis` (which imports every analysis module) runs without torch or the training code."""
    write_runs(tmp_path / "runs", small_sweep())
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "analysis", "collect", "--sweep", SWEEP, *folders(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "results" / SWEEP / "runs.csv").is_file()
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    analysis_modules = {f"analysis.{p.stem}" for p in (REPO / "analysis").glob("*.py") if p.stem != "__init__"}
    assert analysis_modules <= imported | {"analysis.__main__"}  # the check covers every module
    assert {"common.schema", "pandas"} <= imported
    bad = sorted(m for m in imported if m.split(".")[0] in ("torch", "experiments", "lightning_modules",
                                                           "lightning", "wandb"))
    assert not bad, bad
