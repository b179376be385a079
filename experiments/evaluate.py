"""Add generalization metrics to finished runs, without retraining.

    python -m experiments.evaluate RUN_DIR [RUN_DIR ...] [--robust-subset N] [--download-shift] [--force]
    python -m experiments.evaluate runs/default/*          # every run of a sweep

For each completed run, the selected checkpoint (`checkpoints/best.ckpt`,
loaded with `weights_only=True`) is evaluated on the run's own data split:
calibration (temperature scaling on the validation split; ECE and NLL before
and after) and, with a subset size (`--robust-subset`, else the run's own
`robust_subset`, else 200), the 15 corruptions x 5 severities, occlusion and
patch shuffle on the same fixed test subset every run gets. A run trained on
cifar10 also gets the dataset shift (CIFAR-10 test vs CIFAR-10.1, and vs
STL-10 on their 9 shared classes; `experiments.generalization.dataset_shift`)
for each shifted set whose files are in the run's data root: a missing one is
skipped with one line, and downloaded only with `--download-shift`. The
metrics are merged into `result.json` (under the run's lock, atomically) and
per-image correctness goes to `robustness.npz` and `shift.npz`. What a run
already has is left as it is (`--force` evaluates again), so rerunning the
command changes nothing.
Exit code 0 when every run was evaluated or already was, 1 when some could
not be (named, with the reason), 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from experiments.rundir import RunDir
from experiments.spec import RunSpec, SpecError

DEFAULT_SUBSET = 200


def load_trained(rundir: RunDir) -> tuple[RunSpec, dict[str, Any], Any, Any, str]:
    """A completed run's spec, result, data module (split as in training) and net with the selected weights.

    Raises:
        ValueError: the directory holds no completed run, or its checkpoint is missing.
    """
    import torch

    from experiments.train import build_datamodule, precision_choice
    from lightning_modules.models import build_model, load_weights

    result = rundir.completed_result()
    if result is None:
        raise ValueError(f"invalid run directory={str(rundir.path)!r} (allowed: a completed run's folder, with "
                         "result.json status completed)")
    if not rundir.best_ckpt.is_file():
        raise ValueError(f"invalid run directory={str(rundir.path)!r} (allowed: a run with checkpoints/best.ckpt)")
    spec = RunSpec.from_dict(result["spec"])
    datamodule = build_datamodule(spec)
    datamodule.setup()
    net = build_model(spec.model, datamodule.num_classes, spec.net_in_chans, spec.img_size,
                      drop_path_rate=spec.drop_path, overrides=spec.net_overrides)
    state = load_weights(rundir.best_ckpt)["state_dict"]
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chosen = result.get("precision") or precision_choice(spec).precision
    return spec, result, datamodule, net.to(device).eval(), chosen


def logits_of(net: Any, loader: Any, precision: str) -> tuple[Any, Any]:
    """(N, K) float32 logits and (N,) labels of `net` over an evaluation loader."""
    import torch

    device = next(net.parameters()).device
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    logits, labels = [], []
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        for images, targets in loader:
            logits.append(net(images.to(device)).float().cpu())
            labels.append(targets)
    return torch.cat(logits), torch.cat(labels)


def _robustness_done(result: dict[str, Any], rundir: RunDir, subset: int) -> bool:
    metrics = result.get("metrics", {})
    return ("calib/temperature" in metrics and result.get("robustness") == rundir.robustness.name
            and metrics.get("corrupt/n") == subset)


def _shift_done(result: dict[str, Any], found: Iterable[str]) -> bool:
    """Whether the result already has both sets of every comparison whose shifted set is `found`."""
    from lightning_modules.shift import COMPARISONS

    metrics = result.get("metrics", {})
    return all(f"shift/{name}/acc1" in metrics for key in found for name in COMPARISONS[key])


def evaluate_run(rundir: RunDir, robust_subset: int | None, force: bool, download_shift: bool = False) -> str:
    """Evaluate one run and merge its metrics into result.json; returns what was done, in a few words."""
    from experiments import generalization
    from lightning_modules.shift import COMPARISONS

    with rundir.lock():
        spec, result, datamodule, net, precision = load_trained(rundir)
        subset = robust_subset or spec.robust_subset or DEFAULT_SUBSET
        record, done = {**result, "metrics": dict(result.get("metrics", {}))}, []
        if force or not _robustness_done(result, rundir, subset):
            kept = {"val": logits_of(net, datamodule.val_dataloader(), precision),
                    "test": logits_of(net, datamodule.test_dataloader(), precision)}
            record["metrics"].update({**generalization.calibration(kept),
                                      **generalization.robustness(net, datamodule, subset, precision, rundir)})
            record["robustness"] = rundir.robustness.name
            done.append(f"{subset} test images under corruption, occlusion and shuffle")
        complete = not force and _shift_done(result, COMPARISONS)  # every set there: nothing to load or add
        found = {} if complete else generalization.shift_sets(datamodule, download_shift)
        if found and (force or not _shift_done(result, found)):
            shifted = generalization.dataset_shift(net, datamodule, found, precision, rundir)
            record["metrics"] = {**{k: v for k, v in record["metrics"].items() if not k.startswith("shift/")},
                                 **shifted}
            record["shift"] = rundir.shift.name
            done.append(f"dataset shift on {' and '.join(found)}")
        if not done:
            return "already evaluated"
        rundir.write_result(record)
    return f"evaluated ({'; '.join(done)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run folders (runs/SWEEP/RUN_ID)")
    parser.add_argument("--robust-subset", type=int, default=None,
                        help=f"test images under corruption (default: the run's robust_subset, else {DEFAULT_SUBSET})")
    parser.add_argument("--download-shift", action="store_true",
                        help="download CIFAR-10.1 and STL-10 for the dataset shift of cifar10 runs when missing")
    parser.add_argument("--force", action="store_true", help="evaluate again runs that already were")
    args = parser.parse_args(argv)
    if args.robust_subset is not None and args.robust_subset < 1:
        print(f"error: invalid --robust-subset={args.robust_subset} (allowed: an integer >= 1)", file=sys.stderr)
        return 2
    missing = [d for d in args.run_dirs if not (d / "result.json").is_file()]
    if missing:
        print(f"error: invalid run directory={str(missing[0])!r} (allowed: a folder holding result.json)",
              file=sys.stderr)
        return 2
    failed = 0
    for path in args.run_dirs:
        try:
            done = evaluate_run(RunDir(path), args.robust_subset, args.force, args.download_shift)
            print(f"{path}: {done}", flush=True)
        except (ValueError, SpecError) as exc:  # not completed, no checkpoint, data gone: named, the rest goes on
            failed += 1
            print(f"{path}: not evaluated: {exc}", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
