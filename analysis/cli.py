"""The analysis command line: one entry point, one subcommand per output.

    python -m analysis collect --sweep NAME [--runs-dir runs] [--results-dir results] [--from-wandb ENTITY/PROJECT]
    python -m analysis tables  --sweep NAME [same options]
    python -m analysis plots   --sweep NAME [same options]
    python -m analysis report  --sweep NAME [same options] [--wandb off|auto|offline|online]
    python -m analysis dashboard --sweep NAME [same options] [--entity E] [--project P] [--dry-run]

`collect` writes `results/SWEEP/runs.csv`, `tables` the tables, `plots` the
figures, `report` all of them and `report.md`; `dashboard` builds a W&B Report
for the sweep's W&B runs (`analysis.dashboard`). A sweep without runs is one
line on stderr and exit code 2, with nothing written. A partly finished sweep
is reported as far as it goes: its `sweep.json` says what is still missing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from analysis import collect, dashboard, plots, report, tables, tuning
from analysis.collect import Collection
from common.wandb_mode import ModeError


def _collect(args: argparse.Namespace, collection: Collection) -> str:
    path = collect.save_runs(collection.runs, args.results_dir, args.sweep)
    return f"{len(collection.runs)} runs -> {path} ({len(collection.skipped)} files skipped)"


def _files_dir(args: argparse.Namespace) -> Path | None:
    """Where the runs' own files (predictions, robustness, explain) are: the runs folder, unless read from W&B."""
    return None if args.from_wandb else Path(args.runs_dir)


def _tables(args: argparse.Namespace, collection: Collection) -> str:
    out_dir = Path(args.results_dir) / args.sweep / tables.FOLDER
    built, skipped = report.write_all_tables(collection, out_dir, _files_dir(args))
    return f"{len(built)} tables -> {out_dir} ({len(skipped)} skipped: {', '.join(skipped) or 'none'})"


def _plots(args: argparse.Namespace, collection: Collection) -> str:
    out_dir = Path(args.results_dir) / args.sweep / plots.FOLDER
    written, skipped = report.write_all_figures(collection, out_dir, _files_dir(args))
    return f"{len(written)} figures -> {out_dir} ({len(skipped)} skipped: {', '.join(skipped) or 'none'})"


def _tuning(args: argparse.Namespace, collection: Collection) -> str:
    path = tuning.write_tuning_table(collection, args.results_dir, args.sweep)
    return tuning.tuning_table(collection) + f"-> {path}"


def _report(args: argparse.Namespace, collection: Collection) -> str:
    path = report.make_report(collection, args.sweep, args.results_dir, args.wandb, _files_dir(args))
    return f"report -> {path}"


def _dashboard(args: argparse.Namespace, collection: Collection) -> str:
    entity, project = dashboard.where(args.entity, args.project, args.from_wandb)
    built = dashboard.build(collection, args.sweep, entity, project)
    if args.dry_run:
        return dashboard.outline(built) + "\ndry run: the report was not saved"
    return f"dashboard -> {dashboard.save(built)}"


# subcommand -> (what it does, the function that does it and returns the line to print)
COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace, Collection], str]]] = {
    "collect": ("Collect the sweep's result.json files into results/SWEEP/runs.csv.", _collect),
    "tables": ("Regenerate the sweep's tables (Markdown and LaTeX).", _tables),
    "plots": ("Regenerate the sweep's figures (PNG and PDF).", _plots),
    "report": ("Collect the sweep and write its tables, figures and report.md.", _report),
    "tuning": ("Write a tuning sweep's validation table (results/SWEEP/tuning.md; no test numbers).", _tuning),
    "dashboard": ("Build a W&B Report (dashboard) of the sweep's W&B runs and save it.", _dashboard),
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of `python -m analysis`: a subcommand, then --sweep and the folder options."""
    parser = argparse.ArgumentParser(prog="python -m analysis",
                                     description="Turn a sweep's result.json files into tables, figures and a report.")
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (description, run) in COMMANDS.items():
        p = subcommands.add_parser(name, help=description, description=description)
        p.set_defaults(run=run)
        p.add_argument("--sweep", required=True, help="sweep name: runs/SWEEP -> results/SWEEP")
        p.add_argument("--runs-dir", default="runs", help="folder holding SWEEP/RUN_ID/result.json (default: runs)")
        p.add_argument("--results-dir", default="results", help="output folder (default: results)")
        p.add_argument("--from-wandb", metavar="ENTITY/PROJECT", default=None,
                       help="read the runs from W&B (group = SWEEP) instead of runs/")
        if name == "report":
            p.add_argument("--wandb", choices=("off", "auto", "offline", "online"), default="off",
                           help="also log tables and figures to one W&B report run (default: off; auto: as the "
                                "runs were logged, WANDB_MODE first)")
        if name == "dashboard":
            p.add_argument("--entity", help="W&B entity of the report (default: --from-wandb's, else WANDB_ENTITY)")
            p.add_argument("--project", help="W&B project (default: --from-wandb's, else WANDB_PROJECT or "
                                             "vit-vs-cnn)")
            p.add_argument("--dry-run", action="store_true", help="print the report's outline; save nothing")
    return parser


def load(args: argparse.Namespace) -> tuple[Collection, str]:
    """The sweep named by `args`, from the runs folder or W&B, and where it was read (for messages)."""
    if args.from_wandb:
        return collect.from_wandb(args.from_wandb, args.sweep), f"W&B {args.from_wandb} (group {args.sweep})"
    return collect.collect(args.runs_dir, args.sweep), f"{args.runs_dir}/{args.sweep}"


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; returns the exit code (2: the sweep has no runs)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    collection, where = load(args)
    if collection.runs.empty:
        print(f"error: no runs for sweep {args.sweep!r} in {where} "
              f"({len(collection.skipped)} unreadable result.json files)", file=sys.stderr)
        return 2
    try:
        print(args.run(args, collection))
    except (ModeError, dashboard.DashboardError) as exc:  # bad input: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except dashboard.SaveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
