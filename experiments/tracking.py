"""W&B for the suite: one W&B run per run directory, its artifacts and lineage, how it ends, and syncing.

    python -m experiments.tracking sync [--runs-dir runs] [--results-dir results] [--sweep NAME]
        [--entity E] [--project P] [--include-synced] [--dry-run]

A run logs through Lightning's WandbLogger (config: the spec; group: the sweep; job type: its role) in the
mode `common.wandb_mode.resolve` picks: `--wandb off|online|offline` as asked, and for `auto` the
environment's WANDB_MODE, else online with credentials, else offline. When the run ends, its W&B run gets
the result as summary, the selected checkpoint as an artifact (`checkpoint-SWEEP-RUN_ID`, type model), a
pretraining run also the weights fine-tuning loads (`pretrained-SWEEP-RUN_ID`), and a fine-tuning run
declares the pretrained artifact it used, so W&B's lineage graph shows pretraining -> fine-tuning. A run
that failed or diverged ends its W&B run with exit code 1: W&B shows it as failed.

Under `wandb agent`, every `wandb.init` in the process gets the agent's run id (W&B ignores any other).
A pretraining run that an agent's run needs is therefore trained in a fresh process without the agent's
variables (`apart_from_agent`), so that it is a W&B run of its own.

Offline W&B runs live in `runs/SWEEP/RUN_ID/wandb/offline-run-*` (the report's in
`results/SWEEP/wandb/offline-run-*`). `sync` uploads those not synced yet with `wandb sync`, then declares
the lineage that offline runs cannot (W&B refuses `use_artifact` offline) through W&B's public API.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from common import files, wandb_mode
from experiments.rundir import RunDir

if TYPE_CHECKING:
    from experiments.spec import RunSpec

# What `wandb agent` sets for the process it starts: the sweep, the run id it forces, the run's parameters.
AGENT_VARIABLES = ("WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH")
EXIT_FAILED = 1


# ------------------------------------------------------------------ one run
def mode(spec: RunSpec) -> str:
    """The run's W&B mode: online | offline | off (`common.wandb_mode.resolve` of `spec.wandb`).

    Raises:
        common.wandb_mode.ModeError: WANDB_MODE holds a value W&B does not know.
    """
    return wandb_mode.resolve(spec.wandb)


def under_agent() -> bool:
    """Whether this process was started by `wandb agent`, which forces its run id on every wandb.init here."""
    return bool(os.environ.get("WANDB_SWEEP_ID"))


def run_name(spec: RunSpec) -> str:
    """`vit_tiny_p4-fashion_mnist-f0.04-none-s0`: what the run is, at a glance in W&B's tables."""
    return f"{spec.model}-{spec.dataset}-f{spec.train_fraction:g}-{spec.pretraining}-s{spec.seed}"


def logger(spec: RunSpec, run_dir: Path) -> Any:
    """A WandbLogger for the run (None when W&B is off): the spec as config, the sweep as group, the role as
    job type, filterable tags; its files in `run_dir/wandb/`.

    Its W&B run id is `SWEEP-RUN_ID` (a resumed run continues it), except under `wandb agent`, which
    chooses the id itself.
    """
    run_mode = mode(spec)
    if run_mode == "off":
        return None
    from lightning.pytorch.loggers import WandbLogger

    tags = [spec.model, spec.arch, spec.dataset, f"fraction={spec.train_fraction:g}",
            f"pretraining={spec.pretraining}", f"profile={spec.profile}", spec.role]
    config = {**spec.to_dict(), "run_id": spec.run_id, "arch": spec.arch}
    identity = {} if under_agent() else {"id": f"{spec.sweep}-{spec.run_id}", "resume": "allow"}
    logger = WandbLogger(project=wandb_mode.project(), group=spec.sweep, name=run_name(spec), tags=tags,
                         config=config, save_dir=str(run_dir), mode=run_mode, job_type=spec.role, **identity)
    # Lightning 2.6 always passes `anonymous=None` to wandb.init, which W&B >= 0.22 answers with a deprecation
    # warning in every run's output; the setting does nothing, so it is not passed.
    if getattr(logger, "_wandb_init", {}).get("anonymous", False) is None:
        del logger._wandb_init["anonymous"]
    return logger


def apart_from_agent(target: Callable[..., Any], *args: Any) -> int | None:
    """Call `target(*args)` in a fresh process without the agent's variables, so that the W&B run it starts
    is its own, not the agent's; return the process's exit code.

    `target` must be importable by name (a module-level function): the process is spawned, not forked.
    """
    process = multiprocessing.get_context("spawn").Process(target=_without_agent, args=(target, *args),
                                                           name="apart-from-wandb-agent")
    process.start()
    process.join()
    return process.exitcode


def _without_agent(target: Callable[..., Any], *args: Any) -> None:
    for key in AGENT_VARIABLES:
        os.environ.pop(key, None)
    target(*args)


def checkpoint_name(sweep: str, run_id: str) -> str:
    """The artifact of a run's selected checkpoint (`best.ckpt`)."""
    return f"checkpoint-{sweep}-{run_id}"


def pretrained_name(sweep: str, run_id: str) -> str:
    """The artifact of a pretraining run's weights (`model.pt`), which fine-tuning runs load."""
    return f"pretrained-{sweep}-{run_id}"


def artifact(name: str, path: Path, metadata: dict[str, Any]) -> Any:
    """A model artifact holding one file under its own name.

    The file is referenced, not copied (it is final once the run has ended) and not cached: a checkpoint
    can be large. Two artifacts of one name and the same file have one digest, so W&B keeps one version.
    """
    import wandb

    item = wandb.Artifact(name, type="model", metadata=metadata)
    item.add_file(str(path), name=path.name, policy="immutable", skip_cache=True)
    return item


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """The W&B run's summary: the result's scalar fields, its metrics under their own names (`test/acc1`),
    `selected/<key>`, and the whole record as `result` (so `analysis --from-wandb` reads what result.json
    says)."""
    out: dict[str, Any] = {k: v for k, v in result.items() if isinstance(v, (bool, int, float, str))}
    out.update(result.get("metrics") or {})
    out.update({f"selected/{k}": v for k, v in (result.get("selected") or {}).items()})
    out["result"] = result
    return out


def finish(wandb_logger: Any, result: dict[str, Any], rundir: RunDir) -> None:
    """Mirror the result into the W&B run, log its artifacts and lineage, and end it: exit code 0 when the run
    completed, 1 (W&B: failed) when it failed or diverged.

    A W&B error is a warning: the run's result.json, written next, must not be lost to it.
    """
    if wandb_logger is None:
        return
    run = wandb_logger.experiment
    completed = result["status"] == "completed"
    try:
        run.summary.update(summary(result))
        if completed:
            log_outputs(run, result, rundir)
        upstream = result.get("pretrained_from")
        upstream_weights = RunDir(rundir.path.parent / upstream).model_pt if upstream else None
        if upstream_weights is not None and upstream_weights.is_file() and not run.offline:
            # offline runs cannot declare inputs: `sync` declares them once the runs are uploaded
            run.use_artifact(artifact(pretrained_name(result["sweep"], upstream), upstream_weights,
                                      {"run_id": upstream, "sweep": result["sweep"]}))
    except Exception as exc:  # noqa: BLE001 - W&B only mirrors the result
        warnings.warn(f"W&B: {type(exc).__name__}: {exc}".splitlines()[0], RuntimeWarning, stacklevel=2)
    run.finish(exit_code=0 if completed else 1)


def log_outputs(run: Any, result: dict[str, Any], rundir: RunDir) -> None:
    """Log a completed run's selected checkpoint and, for a pretraining run, its weights as artifacts."""
    about = {k: result.get(k) for k in ("run_id", "sweep", "model", "arch", "dataset", "train_fraction",
                                         "pretraining", "seed", "role", "n_train")}
    run.log_artifact(artifact(checkpoint_name(result["sweep"], result["run_id"]), rundir.best_ckpt,
                              {**about, "selected": result.get("selected")}), aliases=["selected"])
    if result.get("role") == "pretrain" and rundir.model_pt.is_file():
        run.log_artifact(artifact(pretrained_name(result["sweep"], result["run_id"]), rundir.model_pt, about))


# ------------------------------------------------------------------ offline runs and sync
@dataclass(frozen=True)
class OfflineRun:
    """An offline W&B run on disk.

    Attributes:
        path: its `offline-run-*` folder.
        run_id: its W&B run id.
        uses: the pretrained artifact a fine-tuning run loaded (declared after the upload), else None.
    """

    path: Path
    run_id: str
    uses: str | None = None


def offline_runs(runs_dir: Path | str = "runs", results_dir: Path | str = "results", sweep: str | None = None,
                 include_synced: bool = False) -> list[OfflineRun]:
    """The offline W&B runs of the runs (`runs_dir/SWEEP/RUN_ID/wandb/offline-run-*`) and of the reports
    (`results_dir/SWEEP/wandb/offline-run-*`), oldest first (a pretraining run before the runs that use it),
    leaving out those `wandb sync` has marked synced unless `include_synced`."""
    pattern = sweep or "*"
    folders = [*Path(runs_dir).glob(f"{pattern}/*/wandb/offline-run-*"),
               *Path(results_dir).glob(f"{pattern}/wandb/offline-run-*")]
    found = []
    for folder in sorted(folders, key=lambda p: (p.name, str(p))):  # the name starts with the start time
        logs = sorted(folder.glob("run-*.wandb"))
        if not logs or (not include_synced and all(log.with_suffix(".wandb.synced").exists() for log in logs)):
            continue
        found.append(OfflineRun(folder, logs[0].stem.removeprefix("run-"), _uses(folder.parent.parent)))
    return found


def _uses(run_path: Path) -> str | None:
    """The pretrained artifact the run in `run_path` fine-tuned from, from its result.json (None without)."""
    try:
        result = files.read_json(run_path / "result.json")
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or not result.get("pretrained_from") or not result.get("sweep"):
        return None
    return pretrained_name(result["sweep"], result["pretrained_from"])


def sync(runs: list[OfflineRun], entity: str | None = None, project: str | None = None, dry_run: bool = False,
         out: TextIO = sys.stdout, call: Callable[[list[str]], int] = subprocess.call, api: Any = None) -> int:
    """Upload `runs` with `wandb sync`, then declare the pretrained artifact each fine-tuning run used.

    Args:
        entity, project: where the runs go (default: where they were logged; for the lineage, WANDB_ENTITY or
            the API key's default entity, and WANDB_PROJECT or vit-vs-cnn).
        dry_run: list what would be done; upload nothing.
        call: runs a command, returns its exit code (subprocess.call).
        api: a `wandb.Api()`-like object for the lineage (created when None and needed).

    Returns:
        0, or 1 when `wandb sync` failed or a lineage could not be declared.
    """
    if not runs:
        print("no offline W&B runs to sync", file=out)
        return 0
    for run in runs:
        print(f"{run.path}{f'  (uses {run.uses})' if run.uses else ''}", file=out)
    if dry_run:
        print(f"dry run: would sync {len(runs)} offline W&B runs", file=out)
        return 0
    where = [*(["--entity", entity] if entity else []), *(["--project", project] if project else [])]
    if call([sys.executable, "-m", "wandb", "sync", *where, *(str(run.path) for run in runs)]) != 0:
        print("error: wandb sync failed (see its output above)", file=out)
        return EXIT_FAILED
    links = [run for run in runs if run.uses]
    if not links:
        return 0
    if api is None:
        import wandb

        api = wandb.Api()
    entity = entity or os.environ.get("WANDB_ENTITY") or api.default_entity
    project = project or wandb_mode.project()
    failed = 0
    for run in links:
        try:
            used = api.artifact(f"{entity}/{project}/{run.uses}:latest", type="model")
            api.run(f"{entity}/{project}/{run.run_id}").use_artifact(used)
        except Exception as exc:  # noqa: BLE001 - one missing upstream must not stop the others
            failed += 1
            print(f"warning: {run.run_id}: lineage to {run.uses} not declared: "
                  f"{type(exc).__name__}: {exc}".splitlines()[0], file=out)
    print(f"lineage: {len(links) - failed} of {len(links)} fine-tuning runs linked to their pretrained weights",
          file=out)
    return EXIT_FAILED if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.tracking", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("sync", help="upload the offline W&B runs (runs/ and results/), then their lineage")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--results-dir", type=Path, default=Path("results"))
    p.add_argument("--sweep", help="only this sweep (default: every sweep)")
    p.add_argument("--entity", help="W&B entity (default: where the runs were logged)")
    p.add_argument("--project", help="W&B project (default: where the runs were logged)")
    p.add_argument("--include-synced", action="store_true", help="sync runs already synced again")
    p.add_argument("--dry-run", action="store_true", help="list the runs and lineage; upload nothing")
    return parser


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = build_parser().parse_args(argv)
    runs = offline_runs(args.runs_dir, args.results_dir, args.sweep, args.include_synced)
    return sync(runs, args.entity, args.project, args.dry_run, out)


if __name__ == "__main__":
    sys.exit(main())
