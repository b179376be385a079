"""Command-line pieces shared by `analysis.collect`, `.tables`, `.plots` and `.report`."""

from __future__ import annotations

import argparse
import logging
import sys

from analysis.collect import Collection, collect, from_wandb


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with --sweep, --runs-dir, --results-dir, --from-wandb."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--sweep", required=True, help="sweep name: runs/SWEEP -> results/SWEEP")
    p.add_argument("--runs-dir", default="runs", help="folder holding SWEEP/RUN_ID/result.json (default: runs)")
    p.add_argument("--results-dir", default="results", help="output folder (default: results)")
    p.add_argument("--from-wandb", metavar="ENTITY/PROJECT", default=None,
                   help="read the runs from W&B (group = SWEEP) instead of runs/")
    return p


def load(args: argparse.Namespace) -> Collection:
    """Collect the sweep named by `args`; exit 2 with one line if it has no runs."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.from_wandb:
        collection = from_wandb(args.from_wandb, args.sweep)
        where = f"W&B {args.from_wandb} (group {args.sweep})"
    else:
        collection = collect(args.runs_dir, args.sweep)
        where = f"{args.runs_dir}/{args.sweep}"
    if collection.runs.empty:
        print(f"error: no runs for sweep {args.sweep!r} in {where} "
              f"({len(collection.skipped)} unreadable result.json files)", file=sys.stderr)
        raise SystemExit(2)
    return collection
