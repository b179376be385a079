"""One run: spec -> data + net + ImageClassifier + Trainer -> runs/SWEEP/RUN_ID/.

    python -m experiments.train --model resnet50 --dataset fashion_mnist \\
        --train-fraction 0.1 --seed 0 [--profile cpu|gpu|cluster] [--max-steps N] \\
        [--wandb auto|online|offline|off] [--pretraining none|imagenet|fractaldb|DATASET]
    python -m experiments.train --spec runs/default/3f9c0a1b2d4e/spec.json   # reproduce a run

The run directory holds `spec.json`, `metrics.csv`, `checkpoints/`
(`best.ckpt` selected on val/acc1, `last.ckpt` for resuming), `wandb/`, and,
written last and atomically, `result.json` (docs/results.md). Bad input
fails before any work with one line and exit code 2; a run that breaks
during training still writes a `failed` result.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from experiments.spec import PROFILES, RunSpec, SpecError

SCHEMA_VERSION = 1
REPO_ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ files
def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to `path` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_result(run_dir: Path) -> dict[str, Any] | None:
    """The run's result.json, or None when the run has not finished."""
    path = run_dir / "result.json"
    if not path.is_file():
        return None
    with open(path) as f:
        return json.load(f)


def completed_result(run_dir: Path) -> dict[str, Any] | None:
    """The run's result when it completed; None when unfinished, failed or diverged."""
    result = read_result(run_dir)
    return result if result is not None and result.get("status") == "completed" else None


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[None]:
    """An exclusive advisory lock (flock) held for the block.

    Raises:
        BlockingIOError: `blocking=False` and another process holds it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_dir_for(spec: RunSpec, runs_dir: Path) -> Path:
    return Path(runs_dir) / spec.sweep / spec.run_id


def git_commit() -> str:
    """HEAD's hash (+ "+dirty" when the tree has changes), or "unknown"."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+dirty" if dirty else "")) if head else "unknown"


def versions() -> dict[str, str]:
    import lightning
    import timm
    import torch
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "lightning": lightning.__version__, "timm": timm.__version__}


# ------------------------------------------------------------------ W&B
def wandb_mode(requested: str) -> str:
    """auto -> online when credentials exist, else offline (never prompts, never fails)."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def wandb_logger(spec: RunSpec, run_dir: Path, mode: str) -> Any:
    """WandbLogger with the spec as config, the sweep as group and filterable tags."""
    from lightning.pytorch.loggers import WandbLogger

    tags = [spec.model, spec.arch, spec.dataset, f"fraction={spec.train_fraction:g}",
            f"pretraining={spec.pretraining}", f"profile={spec.profile}", spec.role]
    name = f"{spec.model}-{spec.dataset}-f{spec.train_fraction:g}-{spec.pretraining}-s{spec.seed}"
    config = {**spec.to_dict(), "run_id": spec.run_id, "arch": spec.arch}
    return WandbLogger(project=os.environ.get("WANDB_PROJECT", "vit-vs-cnn"), group=spec.sweep, name=name,
                       id=f"{spec.sweep}-{spec.run_id}", tags=tags, config=config, save_dir=str(run_dir),
                       mode=mode, resume="allow", job_type=spec.role)


# ------------------------------------------------------------------ preflight
def preflight(spec: RunSpec) -> Any:
    """Everything that can fail on bad input, before any work: the data and the weights file.

    Returns:
        The ImageDataModule, loaded and split.

    Raises:
        SpecError: with one line naming the field and value.
    """
    from lightning_modules.data import DataError, ImageDataModule

    if spec.weights_file is not None and not Path(spec.weights_file).expanduser().is_file():
        raise SpecError("weights_file", spec.weights_file, "an existing timm checkpoint file")
    if spec.weights_file is not None and spec.pretraining != "imagenet":
        raise SpecError("weights_file", spec.weights_file, "only with pretraining=imagenet")
    datamodule = ImageDataModule.from_spec(spec)
    try:
        datamodule.prepare_data()
        datamodule.setup()
        upstream = spec.upstream()
        if upstream is not None and upstream.dataset != "fractaldb":
            ImageDataModule.from_spec(upstream).prepare_data()
    except ValueError as exc:  # DataError, and bad split sizes
        raise SpecError("dataset", spec.dataset, str(exc)) if not isinstance(exc, DataError) else exc
    return datamodule


# ------------------------------------------------------------------ callbacks
def _callbacks() -> tuple[Any, Any]:
    import lightning.pytorch as pl

    class ValHistory(pl.Callback):
        """Every validation's (step, epoch, val/acc1, val/loss); survives resume via state_dict."""

        def __init__(self) -> None:
            self.history: list[dict[str, float]] = []

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.sanity_checking:
                return
            m = trainer.callback_metrics
            self.history.append({"step": trainer.global_step, "epoch": trainer.current_epoch,
                                 "val/acc1": float(m["val/acc1"]), "val/loss": float(m["val/loss"])})

        def state_dict(self) -> dict[str, Any]:
            return {"history": self.history}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.history = list(state["history"])

    class TrainClock(pl.Callback):
        """Seconds spent in training batches and images seen (excludes validation)."""

        def __init__(self) -> None:
            self.seconds, self.images, self._t = 0.0, 0, 0.0

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                 batch_idx: int) -> None:
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                               batch: Any, batch_idx: int) -> None:
            self.seconds += time.perf_counter() - self._t
            self.images += len(batch[0])

        def state_dict(self) -> dict[str, Any]:
            return {"seconds": self.seconds, "images": self.images}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.seconds, self.images = state["seconds"], state["images"]

    return ValHistory(), TrainClock()


# ------------------------------------------------------------------ one run
def ddp_rank() -> int:
    """This process's rank among the DDP processes of one run (0 when it is the only one).

    Read from the variables the launchers set (Lightning's subprocess launcher,
    torchrun, SLURM's srun), as Lightning's own `rank_zero_only` does.
    """
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if os.environ.get(key, "0") != "0":
            return int(os.environ[key])
    return 0


def run_lock(spec: RunSpec, runs_dir: Path, blocking: bool = True) -> Any:
    """The lock that makes a run happen once across processes and runners.

    Rank 0 of a multi-GPU run holds it for all ranks: the others (which would
    otherwise wait for it while rank 0 waits for them) take no lock.
    """
    if ddp_rank() > 0:
        return contextlib.nullcontext()
    return file_lock(Path(runs_dir) / spec.sweep / f".{spec.run_id}.lock", blocking=blocking)


def run(spec: RunSpec, runs_dir: Path | str = "runs", blocking: bool = True) -> dict[str, Any] | None:
    """Train and evaluate one spec; return its result (also in result.json).

    A completed run is not repeated: its result is returned. An interrupted
    run resumes from `checkpoints/last.ckpt`. The run holds a lock while it
    works, so concurrent workers never train it twice (with
    `blocking=False`, None is returned when another process holds it). A
    fine-tuning run first makes sure its pretraining run exists, under that
    run's lock.

    Raises:
        SpecError / DataError / ModelError: bad input, before anything is written.
    """
    runs_dir = Path(runs_dir)
    run_dir = run_dir_for(spec, runs_dir)
    done = completed_result(run_dir)
    if done is not None:
        return done
    datamodule = preflight(spec)  # bad input fails here, before anything is written
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(run_lock(spec, runs_dir, blocking=blocking))
        except BlockingIOError:
            return None
        done = completed_result(run_dir)  # another worker may have finished it meanwhile
        if done is not None:
            return done
        upstream = spec.upstream()
        upstream_dir = ensure_pretrained(upstream, runs_dir) if upstream is not None else None
        return _train(spec, run_dir, datamodule, upstream_dir)


def ensure_pretrained(upstream: RunSpec, runs_dir: Path) -> Path:
    """Run the pretraining spec once (under its lock) and return its directory."""
    up_dir = run_dir_for(upstream, runs_dir)
    with run_lock(upstream, runs_dir):
        result = completed_result(up_dir) or _train(upstream, up_dir, preflight(upstream), None)
    if result.get("status") != "completed":
        raise RuntimeError(f"pretraining run {upstream.run_id} {result.get('status')}: {result.get('error')}")
    return up_dir


def _train(spec: RunSpec, run_dir: Path, datamodule: Any, upstream_dir: Path | None) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from lightning_modules.classifier import ImageClassifier
    from lightning_modules.models import build_model, count_params, flops_per_image, load_backbone

    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    is_main = ddp_rank() == 0  # under DDP, one process writes the run's files
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        write_json_atomic(run_dir / "spec.json", spec.to_dict())
    base: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "run_id": spec.run_id, "sweep": spec.sweep, "status": "failed",
        "error": None, "model": spec.model, "arch": spec.arch, "dataset": spec.dataset,
        "train_fraction": spec.train_fraction, "seed": spec.seed, "data_seed": spec.data_seed,
        "pretraining": spec.pretraining, "pretrain_size": None, "pretrained_from": None,
        "profile": spec.profile, "role": spec.role, "spec": spec.to_dict(),
    }
    logger_wandb = None
    try:
        datamodule.setup()
        base.update(n_train=datamodule.n_train, n_val=len(datamodule.val_idx), n_test=len(datamodule.test_set),
                    subset_hash=datamodule.subset_hash)
        pl.seed_everything(spec.seed, workers=True, verbose=False)
        net = build_model(spec.model, datamodule.num_classes, spec.net_in_chans, spec.img_size,
                          pretrained=spec.pretraining == "imagenet", weights_file=spec.weights_file,
                          drop_path_rate=spec.drop_path)
        if upstream_dir is not None:
            up = read_result(upstream_dir)
            state = torch.load(upstream_dir / "model.pt", map_location="cpu", weights_only=True)
            load_backbone(net, state)
            base.update(pretrained_from=up["run_id"], pretrain_size=up["n_train"])
        params, flops = count_params(net), flops_per_image(net, spec.net_in_chans, spec.img_size)
        steps = spec.train_steps(datamodule.n_train)
        module = ImageClassifier(net, datamodule.num_classes, lr=spec.lr, weight_decay=spec.weight_decay,
                                 total_steps=steps, warmup_steps=round(spec.warmup_frac * steps),
                                 min_lr_ratio=spec.min_lr_ratio, label_smoothing=spec.label_smoothing)
        attempt = len(list((run_dir / "logs").glob("attempt*.json")))  # one per start of this run
        loggers: list[Any] = [CSVLogger(str(run_dir / "logs"), name="", version=f"attempt{attempt}")]
        mode = wandb_mode(spec.wandb)
        if mode != "off":
            logger_wandb = wandb_logger(spec, run_dir, mode)
            loggers.append(logger_wandb)
        checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best", monitor="val/acc1",
                                     mode="max", save_last=True, save_top_k=1, enable_version_counter=False)
        history, clock = _callbacks()
        on_cpu = not torch.cuda.is_available()
        trainer = pl.Trainer(
            max_steps=steps, max_epochs=-1, val_check_interval=steps // spec.num_evals,
            check_val_every_n_epoch=None, num_sanity_val_steps=0, precision=spec.precision,
            accelerator="auto", devices=spec.devices, strategy="ddp" if spec.devices > 1 else "auto",
            deterministic=on_cpu, benchmark=not on_cpu, gradient_clip_val=spec.grad_clip or None,
            log_every_n_steps=max(1, min(50, steps // 20)), logger=loggers,
            callbacks=[checkpoint, history, clock], enable_model_summary=False, default_root_dir=str(run_dir))
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            base["resumed_at_step"] = int(torch.load(last, map_location="cpu", weights_only=True)["global_step"])
        write_json_atomic(run_dir / "logs" / f"attempt{attempt}.json",
                          {"step": base.get("resumed_at_step", 0)})
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None,
                    weights_only=True if last.is_file() else None)
        # read before trainer.test(): it resets callback_metrics and restores callback state from best.ckpt
        train_loss = float(trainer.callback_metrics.get("train/loss", float("nan")))
        seen, train_seconds, steps_done = clock.images, clock.seconds, trainer.global_step
        if module.diverged:
            raise FloatingPointError("training loss became non-finite")
        selected = max(history.history, key=lambda h: h["val/acc1"])  # first best, as ModelCheckpoint keeps
        test = trainer.test(module, datamodule=datamodule, ckpt_path=checkpoint.best_model_path,
                            weights_only=True, verbose=False)[0]
        metrics = {k: float(v) for k, v in sorted(test.items()) if k != "test/loss"}
        metrics["train/acc1"] = _accuracy(module, datamodule.train_eval_dataloader(), spec.precision)
        metrics["train/loss"] = train_loss
        if spec.role == "pretrain" and is_main:
            torch.save(module.net.state_dict(), run_dir / "model.pt")
        base.update(status="completed", selected=selected, metrics=metrics, params=params,
                    flops_per_image=flops, train_steps=steps_done, train_images_seen=seen,
                    train_flops=3.0 * flops * seen, train_images_per_s=seen / train_seconds if train_seconds else None,
                    train_time_s=train_seconds)
    except Exception as exc:  # recorded, not hidden: status + one-line error + error.log
        base["status"] = "diverged" if isinstance(exc, FloatingPointError) else "failed"
        base["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        (run_dir / "error.log").write_text(traceback.format_exc())
    base.update(wall_time_s=time.perf_counter() - t0, versions=versions(), git_commit=git_commit(),
                hostname=socket.gethostname(), pid=os.getpid(), started_at=started.isoformat(timespec="seconds"),
                finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if not is_main:
        return base
    merge_metrics(run_dir)
    if logger_wandb is not None:
        _finish_wandb(logger_wandb, base)
    write_json_atomic(run_dir / "result.json", base)
    return base


def merge_metrics(run_dir: Path) -> None:
    """Join the attempts' CSV logs into run_dir/metrics.csv, one row per logged event.

    A killed attempt may have logged steps past the checkpoint the next one
    resumed from; those rows are dropped, so no step appears twice.
    """
    import csv

    attempts = sorted((run_dir / "logs").glob("attempt*.json"), key=lambda p: int(p.stem[7:]))
    starts = [json.loads(path.read_text())["step"] for path in attempts]
    rows: list[dict[str, str]] = []
    for path, next_start in zip(attempts, starts[1:] + [None]):
        table = path.with_suffix("") / "metrics.csv"
        if table.is_file():
            rows += [r for r in csv.DictReader(open(table, newline=""))
                     if next_start is None or int(r.get("step") or 0) < next_start]
    if not rows:
        return
    header = sorted(set().union(*rows), key=lambda k: (k not in ("epoch", "step"), k))
    tmp = run_dir / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, run_dir / "metrics.csv")


def _accuracy(module: Any, loader: Any, precision: str) -> float:
    """Top-1 accuracy of `module` (eval mode, no augmentation) over `loader`."""
    import torch

    device = next(module.parameters()).device
    module.eval()
    correct = total = 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with torch.no_grad(), autocast:
        for images, labels in loader:
            logits = module(images.to(device))  # (B, K)
            correct += int((logits.argmax(1).cpu() == labels).sum())
            total += len(labels)
    return correct / total


def _finish_wandb(logger: Any, result: dict[str, Any]) -> None:
    """Mirror the result into the W&B run's summary, then close the run."""
    experiment = logger.experiment
    summary = {"status": result["status"], "n_train": result.get("n_train"), "params": result.get("params"),
               "flops_per_image": result.get("flops_per_image"), "wall_time_s": result.get("wall_time_s"),
               "train_images_per_s": result.get("train_images_per_s"), "error": result.get("error")}
    summary.update(result.get("metrics", {}))
    summary.update({f"selected/{k}": v for k, v in result.get("selected", {}).items()})
    summary["result"] = result  # the whole record, so analysis --from-wandb matches result.json
    experiment.summary.update({k: v for k, v in summary.items() if v is not None})
    experiment.finish()


# ------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    """One --flag per RunSpec field (defaults come from the profile)."""
    parser = argparse.ArgumentParser(prog="python -m experiments.train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, help="a spec.json to reproduce (other flags override it)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="root of run directories")
    parser.add_argument("--profile", choices=list(PROFILES), help="defaults: cpu (this machine) or gpu/cluster")
    for f in dataclasses.fields(RunSpec):
        if f.name in ("profile", "role"):
            continue
        kind = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        flags = ["--" + f.name.replace("_", "-")] + (["--" + f.name] if "_" in f.name else [])  # wandb agent: --a_b
        parser.add_argument(*flags, dest=f.name, type=kind, default=None,
                            help=f"({str(f.type)})")
    return parser


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    overrides = {k: v for k, v in vars(args).items()
                 if v is not None and k not in ("spec", "runs_dir", "profile")}
    if args.spec is not None:
        try:
            data = json.loads(args.spec.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SpecError("spec", str(args.spec), f"a readable spec.json ({type(exc).__name__})") from None
        if not isinstance(data, dict):
            raise SpecError("spec", str(args.spec), "a JSON object of RunSpec fields")
        data.update(overrides)
        if args.profile:
            data["profile"] = args.profile
        return RunSpec.from_dict(data)
    if "max_steps" in overrides:  # a cap on the budget: the floor follows it down
        floor = PROFILES[args.profile or "cpu"]["min_steps"]
        overrides.setdefault("min_steps", max(1, min(overrides["max_steps"], floor)))
    return RunSpec.create(args.profile or "cpu", **overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = spec_from_args(args)
        result = run(spec, args.runs_dir)  # bad data or weights raise here, before anything is written
    except ValueError as exc:  # SpecError, DataError, ModelError: one line each
        print(f"error: {exc}", file=sys.stderr)
        return 2
    run_dir = run_dir_for(spec, args.runs_dir)
    if result["status"] != "completed":
        print(f"run {spec.run_id} {result['status']}: {result['error']} (see {run_dir / 'error.log'})",
              file=sys.stderr)
        return 1
    m = result["metrics"]
    print(f"run {spec.run_id} completed in {result['wall_time_s']:.0f} s: test/acc1={m['test/acc1']:.4f} "
          f"test/acc5={m['test/acc5']:.4f} n_train={result['n_train']} -> {run_dir / 'result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
