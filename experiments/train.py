"""One run: spec -> data + net + ImageClassifier + Trainer -> runs/SWEEP/RUN_ID/.

    python -m experiments.train --model resnet50 --dataset fashion_mnist \\
        --train-fraction 0.1 --seed 0 [--profile cpu|gpu|cluster] [--max-steps N] \\
        [--wandb auto|online|offline|off] [--pretraining none|imagenet|fractaldb|DATASET] \\
        [--patch-size 4 --depth 6 --pos-embed none ...] [--model-kwargs '{drop_rate: 0.1}'] [-v]
    python -m experiments.train --spec runs/default/3f9c0a1b2d4e/spec.json   # reproduce a run

A run goes preflight (every check on the input; the data loaded once) ->
build (net, module, step budget) -> fit and test -> record (result.json).
`experiments.rundir` owns the run directory's files: `spec.json`,
`metrics.csv`, `checkpoints/` (`best.ckpt` selected on val/acc1, `last.ckpt`
for resuming), `wandb/`, and, written last and atomically, `result.json`
(docs/results.md). Bad input fails before any work with one line and exit
code 2; a run that breaks during training still writes a `failed` result.
It prints its start, one progress bar over its step budget and its result
(`experiments.console`; `-v` adds what the libraries print).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from common import untrusted
from common.files import Busy, atomic_write
from common.schema import SCHEMA_VERSION
from experiments import console, tracking
from experiments.ddp import prepare_once_per_node
from experiments.precision import Choice
from experiments.rundir import RunDir, ddp_rank
from experiments.spec import PROFILES, RunSpec, SpecError
from lightning_modules.catalog import DATASETS, MODELS

if TYPE_CHECKING:
    from lightning_modules.classifier import ImageClassifier
    from lightning_modules.data import ImageDataModule

REPO_ROOT = Path(__file__).resolve().parents[1]


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


# ------------------------------------------------------------------ preflight
@dataclass(frozen=True)
class Prepared:
    """A run that passed every check on its input, with its data.

    Attributes:
        spec: the run.
        datamodule: its data (for the run asked for: loaded and split; for its
            pretraining run: found, split when that run trains).
    """

    spec: RunSpec
    datamodule: ImageDataModule


def build_datamodule(spec: RunSpec) -> ImageDataModule:
    """The spec's ImageDataModule (nothing loaded yet): the per-process batch under DDP; FractalDB sized by the
    pretraining fields and seeded by the run's seed; inputs normalised with the ImageNet weights' own statistics
    when fine-tuning them, else with the dataset's."""
    from lightning_modules.data import ImageDataModule
    from lightning_modules.models import pretrained_normalization

    return ImageDataModule(
        dataset=spec.dataset, img_size=spec.img_size, in_chans=spec.net_in_chans,
        batch_size=spec.batch_size // spec.devices, train_fraction=spec.train_fraction, val_size=spec.val_size,
        val_fraction=spec.val_fraction, data_seed=spec.data_seed, augment=spec.augment, mixup_alpha=spec.mixup_alpha,
        cutmix_alpha=spec.cutmix_alpha, data_dir=spec.data_dir, fractal_classes=spec.pretrain_classes,
        fractal_size=spec.pretrain_size, fractal_seed=spec.seed, num_workers=spec.num_workers,
        normalization=pretrained_normalization(spec.model) if spec.pretraining == "imagenet" else None)


def check_model_kwargs(spec: RunSpec) -> None:
    """Build the net on the meta device (no memory, no weights), so that `model_kwargs` timm rejects fail now.

    Raises:
        SpecError: one line naming model_kwargs and timm's complaint.
    """
    if not spec.model_kwargs:
        return
    import torch

    from lightning_modules.models import build_model

    try:
        with torch.device("meta"):
            build_model(spec.model, DATASETS[spec.dataset].num_classes or 2, spec.net_in_chans, spec.img_size,
                        drop_path_rate=spec.drop_path, overrides=spec.model_kwargs)
    except Exception as exc:  # noqa: BLE001 - the registry's net builds, so the kwargs broke it
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        raise SpecError("model_kwargs", spec.model_kwargs,
                        f"keyword arguments timm.create_model({MODELS[spec.model].timm_name.split('.')[0]!r}) "
                        f"accepts; it said {reason}") from None


def preflight(spec: RunSpec) -> tuple[Prepared, Prepared | None]:
    """Everything that can fail on bad input, before any work: the ImageNet weights (a `--weights-file` that
    loads, the Hugging Face cache, or the hub reachable within seconds), the net's options, the data, and a
    training subset that gives each of the spec's devices at least one image per step.

    The run's data is loaded and split here and handed on to training; the
    pretraining run's data (a dataset, not FractalDB, which is generated) is
    loaded, so a missing pretraining dataset fails now too.

    Returns:
        The run, and the pretraining run it fine-tunes from (None without one).

    Raises:
        SpecError / DataError / ModelError: with one line naming the field and value.
    """
    from lightning_modules.data import DataError, per_process_batch
    from lightning_modules.models import check_weights

    if spec.weights_file is not None and not Path(spec.weights_file).expanduser().is_file():
        raise SpecError("weights_file", spec.weights_file, "an existing timm checkpoint file")
    if spec.weights_file is not None and spec.pretraining != "imagenet":
        raise SpecError("weights_file", spec.weights_file, "only with pretraining=imagenet")
    if spec.pretraining == "imagenet":
        check_weights(spec.model, spec.weights_file)
    check_model_kwargs(spec)
    datamodule = build_datamodule(spec)
    upstream_spec = spec.upstream()
    upstream = Prepared(upstream_spec, build_datamodule(upstream_spec)) if upstream_spec is not None else None
    try:
        prepare_once_per_node(datamodule.prepare_data, spec.dataset)  # a download once per node, not per rank
        datamodule.setup()
        if upstream is not None and upstream_spec.dataset != "fractaldb":
            prepare_once_per_node(upstream.datamodule.prepare_data, upstream_spec.dataset)
    except ValueError as exc:  # DataError, and bad split sizes
        raise SpecError("dataset", spec.dataset, str(exc)) if not isinstance(exc, DataError) else exc
    resolve_resident(spec, datamodule)
    if per_process_batch(datamodule.batch_size, datamodule.n_train, spec.devices) == 0:
        raise SpecError("devices", spec.devices, f"at most {datamodule.n_train}, the training images at "
                        f"train_fraction={spec.train_fraction}: each device needs one image per step")
    return Prepared(spec, datamodule), upstream


def resolve_resident(spec: RunSpec, datamodule: ImageDataModule) -> None:
    """Decide whether the set-up `datamodule` trains from resident batches (`spec.resident`: True, False or
    "auto", on where the data and its augmentation can be on the training device), and why not under "auto"
    (`datamodule.resident_note`). Whichever it picks, the batches are the same (lightning_modules/resident.py).

    Raises:
        SpecError: resident=True where the data cannot be resident, with the reason.
    """
    import torch

    from lightning_modules.resident import resident_support

    datamodule.setup()
    why = ""
    if spec.resident is not False:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        why = resident_support(datamodule, device)
    if spec.resident is True and why:
        raise SpecError("resident", True, f"false | auto here: {why}")
    datamodule.resident = spec.resident is not False and not why
    datamodule.resident_note = why if spec.resident == "auto" else ""


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
        """Seconds spent in training batches and images seen by all processes (excludes validation); under DDP
        every process holds an equal share of each global batch. It also keeps this process's loss of the last
        batch, which a run resumed at its last step (killed while writing its result) would otherwise lack."""

        def __init__(self) -> None:
            self.seconds, self.images, self._t = 0.0, 0, 0.0
            self.loss: Any = float("nan")  # a tensor once a batch has trained (read only when saved: no sync)

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                 batch_idx: int) -> None:
            self._t = time.perf_counter()

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                               batch: Any, batch_idx: int) -> None:
            self.seconds += time.perf_counter() - self._t
            self.images += len(batch[0]) * trainer.world_size
            self.loss = outputs["loss"].detach()

        def state_dict(self) -> dict[str, Any]:
            return {"seconds": self.seconds, "images": self.images, "loss": float(self.loss)}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.seconds, self.images = state["seconds"], state["images"]
            self.loss = state.get("loss", float("nan"))  # checkpoints saved before the clock kept it

    return ValHistory(), TrainClock()


# ------------------------------------------------------------------ one run
def run(spec: RunSpec, runs_dir: Path | str = "runs", blocking: bool = True,
        precision: Choice | None = None) -> dict[str, Any] | None:
    """Train and evaluate one spec; return its result (also in result.json).

    `precision` is what a sweep resolved `spec.precision` to, once for all its
    runs (so both nets share it); None resolves it here, for this machine,
    once for this run and its pretraining run.

    A completed run is not repeated: its result is returned. An interrupted
    run resumes from `checkpoints/last.ckpt`. The run holds a lock while it
    works, so concurrent workers never train it twice (with
    `blocking=False`, None is returned when another process holds it). A
    fine-tuning run first makes sure its pretraining run exists, under that
    run's lock.

    Raises:
        SpecError / DataError / ModelError: bad input, before anything is written.
    """
    rundir = RunDir.of(runs_dir, spec)
    done = rundir.completed_result()
    if done is not None:
        return done
    tracking.mode(spec)  # a bad WANDB_MODE fails here, before anything is written
    prepared, upstream = preflight(spec)  # bad input fails here, before anything is written
    if precision is None:  # settled once, for this run and its pretraining run
        try:
            precision = precision_choice(spec)
        except ValueError as exc:
            raise SpecError(str(exc)) from None
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(rundir.lock(blocking=blocking))
        except Busy:
            return None
        done = rundir.completed_result()  # another worker may have finished it meanwhile
        if done is not None:
            return done
        upstream_dir = ensure_pretrained(upstream, runs_dir, precision) if upstream is not None else None
        del upstream  # its data is not needed while this run trains
        return train(prepared, rundir, upstream_dir, precision)


def ensure_pretrained(upstream: Prepared, runs_dir: Path | str, precision: Choice | None = None) -> RunDir:
    """Run the pretraining run once (under its lock) and return its directory.

    Raises:
        RuntimeError: the pretraining run failed or diverged.
    """
    rundir = RunDir.of(runs_dir, upstream.spec)
    if tracking.under_agent() and tracking.mode(upstream.spec) != "off":
        # `wandb agent` forces its run id on every W&B run of this process: the pretraining run is trained in
        # a process of its own (which takes the run's lock), so that it is a W&B run of its own
        tracking.apart_from_agent(run, upstream.spec, runs_dir, True, precision)
        result = rundir.read_result() or {"status": "failed", "error": "its process ended without a result"}
    else:
        with rundir.lock():
            result = rundir.completed_result() or train(upstream, rundir, None, precision)
    if result.get("status") != "completed":
        raise RuntimeError(f"pretraining run {upstream.spec.run_id} {result.get('status')}: {result.get('error')}")
    return rundir


def precision_choice(spec: RunSpec) -> Choice:
    """`spec.precision` resolved for this machine, and the line saying on what hardware and why (`auto` on a CPU
    with native bf16: settled by timing this run's net in both precisions).

    Raises:
        ValueError: `auto` that timing would settle, for a run of several processes.
    """
    from experiments import eta
    from experiments.precision import TIMED, check_timeable, detect, rule_choice, settled_by_timing, timed_choice

    hardware = detect()
    check_timeable(spec.precision, hardware, spec.devices)
    if settled_by_timing(spec.precision, hardware):
        return timed_choice(hardware, eta.time_precisions([spec], TIMED)[0])
    return rule_choice(spec.precision, hardware)


def train(prepared: Prepared, rundir: RunDir, upstream_dir: RunDir | None,
          precision: Choice | None = None) -> dict[str, Any]:
    """Build, fit and test, then record: the result (status failed or diverged, with one line, when it broke)."""
    spec = prepared.spec
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    if ddp_rank() == 0:  # under DDP, one process writes the run's files
        rundir.remove_partial_writes()  # of an attempt killed mid-write (this process holds the run's lock)
        rundir.write_spec(spec.to_dict())
    record = base_record(spec)
    logger_wandb = None
    try:
        choice = precision or precision_choice(spec)
        record["precision"], record["hardware"] = choice.precision, choice.hardware
        built = build(prepared, upstream_dir)
        record.update(built.facts)
        logger_wandb = tracking.logger(spec, rundir.path)  # None when W&B is off
        record.update(fit_and_test(spec, built, prepared.datamodule, rundir, logger_wandb, record["precision"]))
    except Exception as exc:  # recorded, not hidden: status + one-line error + error.log
        record["status"] = "diverged" if isinstance(exc, FloatingPointError) else "failed"
        record["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        if ddp_rank() == 0:
            rundir.write_error(traceback.format_exc())
    record.update(wall_time_s=time.perf_counter() - t0)
    record = record_result(record, rundir, started, logger_wandb)
    if record["status"] != "failed":  # all processes end it together (a failure may be one process's alone)
        wait_for_rank_zero()
    return record


def wait_for_rank_zero() -> None:
    """Under DDP, hold every process here until all arrive, rank 0 having written the run's files, so that the
    next run of these processes (a fine-tuning run after its pretraining run) finds them."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def base_record(spec: RunSpec) -> dict[str, Any]:
    """What result.json says about a run before it trains (status failed until it completes)."""
    return {
        "schema_version": SCHEMA_VERSION, "run_id": spec.run_id, "sweep": spec.sweep, "status": "failed",
        "error": None, "model": spec.model, "arch": spec.arch, "dataset": spec.dataset,
        "train_fraction": spec.train_fraction, "seed": spec.seed, "data_seed": spec.data_seed,
        "pretraining": spec.pretraining, "pretrain_size": None, "pretrained_from": None,
        "profile": spec.profile, "role": spec.role, "spec": spec.to_dict(),
    }


@dataclass
class Built:
    """A run's module, ready to fit.

    Attributes:
        module: the ImageClassifier around the net.
        steps: the optimizer-step budget.
        flops_per_image: forward FLOPs of one image.
        facts: what result.json records about the data and the net.
    """

    module: ImageClassifier
    steps: int
    flops_per_image: int
    facts: dict[str, Any]


def build(prepared: Prepared, upstream_dir: RunDir | None) -> Built:
    """Seed, split the data, build the net (with the pretraining run's backbone) and the module around it."""
    import lightning.pytorch as pl

    from lightning_modules.classifier import ImageClassifier, set_fused_attention
    from lightning_modules.models import (architecture, build_model, count_params, flops_per_image, load_backbone,
                                          load_weights)

    spec, datamodule = prepared.spec, prepared.datamodule
    datamodule.setup()
    resolve_resident(spec, datamodule)  # the pretraining run's data is set up here, not in preflight
    facts: dict[str, Any] = dict(n_train=datamodule.n_train, n_val=len(datamodule.val_idx),
                                 n_test=len(datamodule.test_set), subset_hash=datamodule.subset_hash)
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    net_args = dict(name=spec.model, num_classes=datamodule.num_classes, in_chans=spec.net_in_chans,
                    img_size=spec.img_size, drop_path_rate=spec.drop_path, overrides=spec.net_overrides)
    net = build_model(**net_args, pretrained=spec.pretraining == "imagenet", weights_file=spec.weights_file)
    if upstream_dir is not None:
        upstream = upstream_dir.read_result()
        load_backbone(net, load_weights(upstream_dir.model_pt))
        facts.update(pretrained_from=upstream["run_id"], pretrain_size=upstream["n_train"],
                     upstream_val_acc1=upstream["selected"]["val/acc1"],
                     upstream_improving_at_end=upstream.get("improving_at_end"))
    flops = flops_per_image(net, spec.net_in_chans, spec.img_size)
    facts.update(architecture={**architecture(**net_args), "normalization": datamodule.normalization.to_dict()},
                 params=count_params(net), flops_per_image=flops)
    steps = spec.train_steps(datamodule.n_train)
    module = ImageClassifier(net, datamodule.num_classes, lr=spec.lr, weight_decay=spec.weight_decay,
                             total_steps=steps, warmup_steps=round(spec.warmup_frac * steps),
                             min_lr_ratio=spec.min_lr_ratio, label_smoothing=spec.label_smoothing,
                             channels_last=spec.channels_last)
    fused = set_fused_attention(net, spec.fused_attention)
    if spec.compile:
        module.net.compile()  # in place: the state dict keeps its names, so checkpoints are unchanged
    facts["runtime"] = dict(channels_last=module.channels_last, fused_attention=fused, compile=spec.compile,
                            resident=bool(datamodule.resident), resident_note=datamodule.resident_note)
    facts["budget_steps"] = steps
    return Built(module, steps, flops, facts)


def fit_and_test(spec: RunSpec, built: Built, datamodule: ImageDataModule, rundir: RunDir,
                 logger_wandb: Any, precision: str) -> dict[str, Any]:
    """Fit (resuming from last.ckpt when there is one), then test the checkpoint selected on validation.

    Returns:
        The result's fields from training: status, selected, metrics, evaluations, how the budget ended,
        steps, images, FLOPs, time; `predictions.npz` (the selected checkpoint's test and validation logits)
        is written to the run directory.

    Raises:
        FloatingPointError: the training loss became non-finite on some process (the run diverged; all
            processes raise it at the same step).
    """
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    from experiments import generalization
    from experiments.preemption import (AtomicCheckpointIO, BestAndLastCheckpoint, SaveOnPreemption,
                                      cluster_plugins)
    from experiments.progressbar import RunProgressBar
    from lightning_modules.models import load_weights

    out: dict[str, Any] = {}
    if rundir.last_ckpt.is_file():
        out["resumed_at_step"] = int(load_weights(rundir.last_ckpt)["global_step"])
    attempt = rundir.start_attempt(out.get("resumed_at_step", 0))
    loggers: list[Any] = [CSVLogger(str(rundir.logs), name="", version=attempt)]
    if logger_wandb is not None:
        loggers.append(logger_wandb)
    checkpoint = BestAndLastCheckpoint(dirpath=rundir.checkpoints, filename="best", monitor="val/acc1", mode="max",
                                       save_last=True, save_top_k=1, enable_version_counter=False)
    history, clock = _callbacks()
    callbacks = [checkpoint, history, clock, LearningRateMonitor(logging_interval="step"),
                 RunProgressBar(f"{spec.role} {console.describe(spec)}")]
    if spec.patience:  # strict improvement, as the checkpoint keeps the first best
        callbacks.append(EarlyStopping(monitor="val/acc1", mode="max", patience=spec.patience,
                                       check_on_train_epoch_end=False))
    preemption = SaveOnPreemption(rundir.last_ckpt)  # last: the step's other callbacks have run when it saves
    callbacks.append(preemption)
    console.quiet_libraries()
    on_cpu = not torch.cuda.is_available()
    steps = built.steps
    trainer = pl.Trainer(
        max_steps=steps, max_epochs=-1, min_steps=min(spec.min_steps, steps) if spec.patience else None,
        val_check_interval=steps // spec.num_evals, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        precision=precision, accelerator="auto", devices=spec.devices,
        strategy="ddp" if spec.devices > 1 else "auto", deterministic=on_cpu, benchmark=not on_cpu,
        gradient_clip_val=spec.grad_clip or None, log_every_n_steps=max(1, min(50, steps // 20)),
        logger=loggers, callbacks=callbacks, enable_model_summary=False, default_root_dir=str(rundir.path),
        plugins=[*cluster_plugins(), AtomicCheckpointIO()])
    resume = rundir.last_ckpt.is_file()
    with preemption:  # SLURM's pre-timeout signal: last.ckpt at the current step, then submitit requeues
        trainer.fit(built.module, datamodule=datamodule, ckpt_path=str(rundir.last_ckpt) if resume else None,
                    weights_only=True if resume else None)
    # the training loss at the last step: under DDP each rank has the loss of its equal share of the last
    # global batch, whose loss is their mean
    last_loss = torch.as_tensor(clock.loss, device=trainer.strategy.root_device)
    train_loss = float(trainer.strategy.reduce(last_loss, reduce_op="mean"))
    seen, train_seconds, steps_done = clock.images, clock.seconds, trainer.global_step
    evaluations = list(history.history)
    out.update(budget_ending(spec, evaluations, steps_done, steps))
    # the test set, a fixed part of the training subset without augmentation (the train-test gap), and the
    # validation split again, whose logits at the selected checkpoint calibrate the temperature
    test, train_eval, _ = trainer.test(
        built.module, dataloaders=[datamodule.test_dataloader(), datamodule.train_eval_dataloader(),
                                   datamodule.val_dataloader()],
        ckpt_path=checkpoint.best_model_path, weights_only=True, verbose=False)
    metrics = {k: float(v) for k, v in sorted(test.items())}
    metrics["train/acc1"] = float(train_eval["train/acc1"])
    metrics["train/loss"] = train_loss
    metrics.update(generalization.calibration(built.module.kept_logits))
    if ddp_rank() == 0:
        write_predictions(rundir, built.module.kept_logits)
        out["predictions"] = rundir.predictions.name
        if spec.robust_subset:
            started = time.perf_counter()
            metrics.update(generalization.robustness(built.module.net, datamodule, spec.robust_subset, precision,
                                                     rundir))
            metrics["time/robustness_s"] = time.perf_counter() - started
            out["robustness"] = rundir.robustness.name
        if spec.explain_images:
            started = time.perf_counter()
            generalization.explain(built.module.net, datamodule, spec.explain_images, rundir)
            metrics["time/explain_s"] = time.perf_counter() - started
        if spec.shift_eval:
            shifted = generalization.dataset_shift(built.module.net, datamodule, generalization.shift_sets(datamodule),
                                                   precision, rundir)
            if shifted:
                metrics.update(shifted)
                out["shift"] = rundir.shift.name
        if spec.role == "pretrain":
            state = built.module.net.state_dict()
            atomic_write(rundir.model_pt, lambda fh: torch.save(state, fh))
    flops = built.flops_per_image
    out.update(status="completed", metrics=metrics, train_steps=steps_done,
               train_images_seen=seen, train_flops=3.0 * flops * seen,
               train_images_per_s=seen / train_seconds if train_seconds else None, train_time_s=train_seconds)
    return out


def budget_ending(spec: RunSpec, evaluations: list[dict[str, float]], steps_done: int,
                  budget: int) -> dict[str, Any]:
    """How the run's budget ended: the selected evaluation, the number of evaluations, whether validation
    stopped the run early, and whether it was still improving when the budget ran out.

    "Still improving" means: the run used its whole budget and its best validation accuracy came within the
    last `patience` evaluations (without early stopping: the last quarter of them, at least 2), i.e. more
    steps would probably have helped. Such cells are flagged and kept out of fits.
    """
    best = max(range(len(evaluations)), key=lambda i: evaluations[i]["val/acc1"])  # first best, as the checkpoint
    stopped_early = steps_done < budget
    window = spec.patience or max(2, spec.num_evals // 4)
    return {"selected": evaluations[best], "n_evals": len(evaluations), "stopped_early": stopped_early,
            "improving_at_end": not stopped_early and best >= len(evaluations) - window}


def write_predictions(rundir: RunDir, kept: dict[str, tuple[Any, Any]]) -> None:
    """predictions.npz: the selected checkpoint's float16 logits and the targets of the test and validation
    splits (`test_logits`, `test_target`, `test_pred`, `val_logits`, `val_target`), for intervals over test
    images (n = 1 seed), McNemar tests and calibration, read by the torch-free analysis."""
    import numpy as np

    from experiments.generalization import save_npz

    arrays: dict[str, np.ndarray] = {}
    for split, (logits, labels) in kept.items():
        arrays[f"{split}_logits"] = logits.float().numpy().astype(np.float16)  # (N, K)
        arrays[f"{split}_target"] = labels.numpy().astype(np.int64)
    arrays["test_pred"] = kept["test"][0].argmax(dim=1).numpy().astype(np.int64)
    save_npz(rundir.predictions, arrays)


def record_result(record: dict[str, Any], rundir: RunDir, started: datetime, logger_wandb: Any) -> dict[str, Any]:
    """Stamp where and when the run ran; on rank 0, merge the metrics, close W&B and write result.json (last);
    a completed run's `last.ckpt` (the state to resume from) is deleted then, its `best.ckpt` kept."""
    record.update(versions=versions(), git_commit=git_commit(), hostname=socket.gethostname(), pid=os.getpid(),
                  started_at=started.isoformat(timespec="seconds"),
                  finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    if ddp_rank() > 0:
        return record
    rundir.merge_metrics()
    tracking.finish(logger_wandb, record, rundir)
    rundir.write_result(record)
    if record["status"] == "completed":  # a completed run is never resumed: its training state is dead weight
        rundir.last_ckpt.unlink(missing_ok=True)
    return record


# ------------------------------------------------------------------ CLI
def _flag_type(field: dataclasses.Field) -> Any:
    """How a flag's text becomes the field's value: int, float, YAML (bools and mappings) or the text itself.

    YAML reads `true`, `False`, `{drop_rate: 0.1}` and W&B's `{'drop_rate': 0.1}` alike.
    """
    kind = str(field.type).split(" ")[0].split("[")[0]
    return {"int": int, "float": float, "bool": _yaml_value, "dict": _yaml_value}.get(kind, str)


def _yaml_value(text: str) -> Any:
    """A flag's text read as YAML (what it means is checked by RunSpec.validate); unreadable text stays a string.

    Raises:
        argparse.ArgumentTypeError: YAML beyond `common.untrusted`'s bounds (an alias bomb, deep nesting).
    """
    try:
        return untrusted.load_yaml(text)
    except yaml.YAMLError:
        return text
    except untrusted.InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """One --flag per RunSpec field (defaults come from the profile)."""
    parser = untrusted.OneLineParser(prog="python -m experiments.train", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", type=Path, help="a spec.json to reproduce (other flags override it)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"), help="root of run directories")
    parser.add_argument("--profile", choices=list(PROFILES), help="defaults: cpu (this machine) or gpu/cluster")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="print everything the libraries print (default: the run's start, progress and result)")
    for f in dataclasses.fields(RunSpec):
        if f.name in ("profile", "role"):
            continue
        flags = ["--" + f.name.replace("_", "-")] + (["--" + f.name] if "_" in f.name else [])  # wandb agent: --a_b
        parser.add_argument(*flags, dest=f.name, type=_flag_type(f), default=None, help=f"({f.type})")
    return parser


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    """The spec the command line names: a spec.json and/or the profile's defaults, with the flags applied."""
    overrides = {k: v for k, v in vars(args).items()
                 if v is not None and k not in ("spec", "runs_dir", "profile", "verbose")}
    if args.spec is not None:
        try:
            data = json.loads(untrusted.decode(untrusted.read_bounded(args.spec)))
            untrusted.check_size(data)
        except (OSError, ValueError, RecursionError) as exc:  # unreadable, not UTF-8, not JSON, too large or deep
            reason = str(exc) if isinstance(exc, untrusted.InputError) else type(exc).__name__
            raise SpecError("spec", str(args.spec), f"a readable spec.json ({reason})") from None
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
    console.configure(args.verbose)
    try:
        spec = spec_from_args(args)
        result = run(spec, args.runs_dir)  # bad data or weights raise here, before anything is written
    except ValueError as exc:  # SpecError, DataError, ModelError: one line each
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rundir = RunDir.of(args.runs_dir, spec)
    if ddp_rank() > 0:
        # rank 0 reports the run; another rank's exit code says only whether it failed, which makes Lightning's
        # launcher end rank 0 (it may wait for this rank in a collective); a divergence, which all ranks decide
        # together, must not, as rank 0 is writing its result
        if result["status"] == "failed":
            print(f"rank {ddp_rank()}: run {spec.run_id} failed: {result['error']}", file=sys.stderr)
        return 1 if result["status"] == "failed" else 0
    if result["status"] != "completed":
        print(f"run {spec.run_id} {result['status']}: {result['error']} (see {rundir.error_log})", file=sys.stderr)
        return 1
    m = result["metrics"]
    print(f"run {spec.run_id} completed in {result['wall_time_s']:.0f} s: test/acc1={m['test/acc1']:.4f} "
          f"test/acc5={m['test/acc5']:.4f} n_train={result['n_train']} -> {rundir.result_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
