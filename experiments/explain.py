"""Where each net looks and how far each layer looks, for finished runs.

    python -m experiments.explain RUN_DIR [RUN_DIR ...] [--images N] [--force]

For each completed run, the selected checkpoint is run on N fixed test
images (stratified, the same images for every run of a dataset, so a ViT's
and a CNN's maps can be set side by side): attention rollout and mean
attention distance per head and layer (ViTs), the gradient-based effective
receptive field of every block (both nets), and Grad-CAM (both nets, one
library). Everything goes to `RUN_DIR/explain.npz`, which the report's
interpretability figures read (`python -m analysis report`). A run that
already has the file for N images is left as it is unless `--force`.
Exit code 0 when every run was explained or already was, 1 when some could
not be (named, with the reason), 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from experiments.rundir import RunDir
from experiments.spec import SpecError

DEFAULT_IMAGES = 16


def explain_run(rundir: RunDir, n_images: int, force: bool) -> str:
    """Write one run's explain.npz; returns what was done, in a few words."""
    import numpy as np

    from experiments import generalization
    from experiments.evaluate import load_trained

    if rundir.explain.is_file() and not force:
        with np.load(rundir.explain, allow_pickle=False) as saved:
            if len(saved["test_indices"]) == n_images:
                return "already explained"
    with rundir.lock():
        _, _, datamodule, net, _ = load_trained(rundir)
        generalization.explain(net, datamodule, n_images, rundir)
    return f"explained ({n_images} test images) -> {rundir.explain}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.explain", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders (runs/SWEEP/RUN_ID)")
    parser.add_argument("--images", type=int, default=DEFAULT_IMAGES, help=f"test images (default {DEFAULT_IMAGES})")
    parser.add_argument("--force", action="store_true", help="explain again runs that already were")
    args = parser.parse_args(argv)
    if args.images < 1:
        print(f"error: invalid --images={args.images} (allowed: an integer >= 1)", file=sys.stderr)
        return 2
    missing = [d for d in args.run_dirs if not (d / "result.json").is_file()]
    if missing:
        print(f"error: invalid run directory={str(missing[0])!r} (allowed: a folder holding result.json)",
              file=sys.stderr)
        return 2
    failed = 0
    for path in args.run_dirs:
        try:
            print(f"{path}: {explain_run(RunDir(path), args.images, args.force)}", flush=True)
        except (ValueError, SpecError) as exc:
            failed += 1
            print(f"{path}: not explained: {exc}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
