"""Correct under DDP: whole batches on every rank, the seeded data order across ranks, divergence decided by all
ranks together, and a 2-process run on CPU (gloo) that matches a 1-process run with the same global batch."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.trainer.connectors.data_connector import _DataConnector
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from torch.utils.data import DistributedSampler

from common import schema
from experiments.rundir import RunDir
from experiments.spec import RunSpec
from experiments.train import main, run
from lightning_modules.classifier import ImageClassifier
from lightning_modules.data import ImageDataModule, SeededShuffle, per_process_batch, split_indices

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ whole batches at every size
@pytest.mark.parametrize("fraction, per_rank", [(0.01, 112), (0.02, 225), (0.1, 256), (1.0, 256)])
def test_the_cluster_profile_gives_every_rank_whole_batches_at_every_size(fraction: float, per_rank: int) -> None:
    """4 GPUs, global batch 1024: at 1 % of CIFAR-10 (450 images) a rank's 256 would be more than its 113
    images, so no batch at all; the global batch shrinks to 448 (112 a rank), at 2 % to 900 (225 a rank)."""
    spec = RunSpec.create("cluster", dataset="cifar10", train_fraction=fraction)
    n_val = min(spec.val_size, round(spec.val_fraction * 50_000))  # the data module's rule for 50,000 images
    n_train = len(split_indices(np.repeat(np.arange(10), 5000), spec.data_seed, fraction, n_val)[0])
    batch = per_process_batch(spec.batch_size // spec.devices, n_train, spec.devices)
    assert batch == per_rank and batch * spec.devices <= min(spec.batch_size, n_train)
    lengths = {len(SeededShuffle(n_train, spec.data_seed, batch, spec.devices, rank)) for rank in range(4)}
    assert len(lengths) == 1 and lengths.pop() == (n_train // (batch * spec.devices)) * batch > 0


def test_one_process_keeps_its_batch_rule() -> None:
    assert per_process_batch(128, 50, 1) == 50 and per_process_batch(128, 5000, 1) == 128
    assert per_process_batch(8, 3, 4) == 0  # fewer images than processes: refused before any work


def test_a_subset_smaller_than_the_devices_is_refused_before_any_work(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    """Synthetic data at the smallest fraction keeps one image per class, 4: too few for 8 devices."""
    code = main(["--dataset", "synthetic", "--model", "vit_tiny_p8", "--img-size", "32", "--devices", "8",
                 "--batch-size", "16", "--train-fraction", "0.001", "--val-size", "32", "--wandb", "off",
                 "--runs-dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: invalid devices=8 (allowed: at most 4, the training images at "
                          "train_fraction=0.001"), err
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ the data order across ranks
@pytest.mark.parametrize("n, batch, world", [(97, 8, 2), (450, 112, 4), (10, 5, 2), (64, 4, 3)])
def test_the_ranks_together_see_the_seeded_order_of_one_process(n: int, batch: int, world: int) -> None:
    """Per epoch, the ranks' batches b in rank order are one process's batch b with the global batch: the same
    (index, seed) items in the same order; nothing repeats; only the last partial global batch is left out;
    epochs differ."""
    epochs = []
    for epoch in (0, 1):
        one = SeededShuffle(n, data_seed=3, batch_size=batch * world)
        ranks = [SeededShuffle(n, 3, batch, world, rank) for rank in range(world)]
        for sampler in (one, *ranks):
            sampler.set_epoch(epoch)
        single, shards = list(one), [list(sampler) for sampler in ranks]
        steps = n // (batch * world)
        for b in range(steps):
            assert sum((shard[b * batch:(b + 1) * batch] for shard in shards), []) == \
                single[b * batch * world:(b + 1) * batch * world]
        assert all(len(shard) == steps * batch for shard in shards)
        indices = [i for shard in shards for i, _ in shard]
        assert len(set(indices)) == len(indices) == n - n % (batch * world)
        epochs.append(single)
    assert epochs[0] != epochs[1] and {s for _, s in epochs[0]}.isdisjoint(s for _, s in epochs[1])


class _Trainer(SimpleNamespace):
    """The parts of a DDP Trainer that the data module and Lightning's data connector read, for one rank."""

    def __init__(self, world: int, rank: int) -> None:
        super().__init__(world_size=world, global_rank=rank, overfit_batches=0,
                         distributed_sampler_kwargs={"num_replicas": world, "rank": rank},
                         state=SimpleNamespace(fn=TrainerFn.FITTING),
                         _accelerator_connector=SimpleNamespace(use_distributed_sampler=True, is_distributed=True))


@pytest.mark.parametrize("fraction, n_train, per_rank", [(0.2, 96, 8), (0.02, 8, 4)])
def test_lightning_keeps_the_seeded_sampler_and_the_ranks_batches_are_one_process_batches(
        fraction: float, n_train: int, per_rank: int) -> None:
    """Through Lightning's own loader preparation: the training sampler is left in place (it shards itself), and
    the ranks' augmented batches, concatenated, are bit for bit those of one process with the global batch, also
    when the subset is smaller than one global batch of 2 x 8; evaluation loaders get the sampler the metrics
    and the gathered logits rely on (rank r: r, r + W, ...)."""
    world, args = 2, dict(dataset="synthetic", img_size=32, in_chans=1, train_fraction=fraction, val_size=33,
                          data_seed=5, augment="randaug")
    one = ImageDataModule(batch_size=per_rank * world, **args)
    one.setup()
    assert one.n_train == n_train
    ranks = []
    for rank in range(world):
        dm = ImageDataModule(batch_size=8, **args)
        dm.setup()
        dm.trainer = _Trainer(world, rank)
        loader = dm.train_dataloader()
        assert loader.batch_size == per_rank and len(loader) == n_train // (per_rank * world) > 0
        assert _DataConnector(dm.trainer)._prepare_dataloader(loader, shuffle=True,
                                                             mode=RunningStage.TRAINING) is loader
        val = _DataConnector(dm.trainer)._prepare_dataloader(dm.val_dataloader(), shuffle=False,
                                                            mode=RunningStage.VALIDATING)
        assert isinstance(val.sampler, DistributedSampler) and list(val.sampler) == \
            [p % 33 for p in range(rank, 34, world)]  # 33 images padded to 34 with the first one
        ranks.append(loader)
    single = one.train_dataloader()
    for epoch in (0, 1):
        for loader in (single, *ranks):
            _set_sampler_epoch(loader, epoch)  # what Lightning's fit loop calls each epoch
        for whole, *parts in zip(single, *ranks, strict=True):
            assert torch.equal(whole[0], torch.cat([p[0] for p in parts]))
            assert torch.equal(whole[1], torch.cat([p[1] for p in parts]))


@pytest.mark.parametrize("n, world, batch", [(33, 2, 5), (7, 3, 1), (7, 4, 2), (128, 2, 16)])
def test_evaluation_metrics_count_every_item_once_despite_the_samplers_padding(n: int, world: int,
                                                                               batch: int) -> None:
    """Lightning's evaluation sampler pads the split to a multiple of W; the classifier leaves the padding out."""
    counted = []
    for rank in range(world):
        module = ImageClassifier(torch.nn.Linear(1, 2), 2)
        module.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        loader = SimpleNamespace(batch_size=batch, dataset=range(n))
        order = list(DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False))
        for b in range(0, len(order), batch):
            counted += order[b:b + module._real_items(len(order[b:b + batch]), loader, b // batch)]
    assert sorted(counted) == list(range(n))


# ------------------------------------------------------------------ divergence, one process
def test_a_run_whose_loss_becomes_nan_is_diverged_with_its_step(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    original = ImageClassifier.forward

    def forward(self: ImageClassifier, images: torch.Tensor) -> torch.Tensor:
        logits = original(self, images)
        return logits * float("nan") if self.training and self.global_step == 2 else logits

    monkeypatch.setattr(ImageClassifier, "forward", forward)
    spec = RunSpec.create("cpu", model="vit_tiny_p8", dataset="synthetic", img_size=32, min_steps=4, max_steps=4,
                          num_evals=2, val_size=32, batch_size=16, precision="32-true", wandb="off")
    result = run(spec, tmp_path)
    assert result["status"] == "diverged"
    assert result["error"] == "FloatingPointError: training loss became non-finite at step 2"
    assert RunDir.of(tmp_path, spec).read_result()["status"] == "diverged"


# ------------------------------------------------------------------ 2 processes (gloo) against 1
FLAGS = ["--model", "vit_tiny_p8", "--dataset", "synthetic", "--img-size", "32", "--train-fraction", "0.2",
         "--val-size", "33", "--batch-size", "16", "--max-steps", "16", "--min-steps", "16", "--num-evals", "4",
         "--precision", "32-true", "--wandb", "offline", "--seed", "0"]


def _drive(out: Path, devices: int, nan_at: str = "") -> tuple[subprocess.CompletedProcess, list[dict], Path]:
    """Run tests/ddp_driver.py (experiments.train, recorded in every rank) on `devices` CPU processes."""
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DDP_TEST_NAN": nan_at}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "ddp_driver.py"), str(out), "--runs-dir",
                           str(out / "runs"), "--devices", str(devices), *FLAGS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    files = [out / f"rank{rank}.json" for rank in range(devices)]
    deadline = time.monotonic() + 60  # the launcher does not wait for the other ranks to exit
    while not all(f.is_file() for f in files) and time.monotonic() < deadline:
        time.sleep(0.2)
    ranks = [json.loads(f.read_text()) for f in files]
    return proc, ranks, next(p for p in (out / "runs" / "adhoc").iterdir() if p.is_dir())  # not the lock file


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory: pytest.TempPathFactory) -> tuple[tuple, tuple]:
    root = tmp_path_factory.mktemp("ddp")
    return _drive(root / "one", 1), _drive(root / "two", 2)


@pytest.mark.slow
def test_a_two_process_run_completes_and_only_rank_zero_writes(one_and_two: tuple[tuple, tuple]) -> None:
    _, (proc, ranks, rundir) = one_and_two
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["exit_code"] for r in ranks] == [0, 0]
    assert ranks[1]["writes"] == []
    written = {path for _, path in ranks[0]["writes"]}  # the audit hook sees rank 0's files, so it would see 1's
    assert {f"adhoc/{rundir.name}/{name}" for name in ("result.json", "predictions.npz", "metrics.csv",
                                                      "checkpoints/best.ckpt", "checkpoints/last.ckpt")} <= written
    files = sorted(str(p.relative_to(rundir)) for p in rundir.rglob("*") if p.is_file() and "wandb" not in p.parts)
    assert files == ["checkpoints/best.ckpt", "logs/attempt0.json",  # last.ckpt deleted once completed
                     "logs/attempt0/hparams.yaml", "logs/attempt0/metrics.csv", "metrics.csv", "predictions.npz",
                     "result.json", "spec.json"]  # one of each, no temporary files left
    assert len(list((rundir / "wandb").glob("offline-run-*"))) == 1  # W&B writes from its own process: one run
    result = json.loads((rundir / "result.json").read_text())
    schema.check(result)
    assert result["status"] == "completed" and result["spec"]["devices"] == 2
    with open(rundir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for metric in set(rows[0]) - {"epoch", "step"}:  # each metric once per step: one writer, no row twice
        steps = [row["step"] for row in rows if row[metric]]
        assert len(steps) == len(set(steps)), metric
    assert [row["step"] for row in rows if row["train/loss"]] == [str(step) for step in range(16)]


@pytest.mark.slow
def test_two_processes_see_the_data_of_one_and_end_with_its_metrics(one_and_two: tuple[tuple, tuple]) -> None:
    """Identical data order (every step's samples and augmentation seeds); the same selected checkpoint and
    accuracies; losses, NLL, ECE and logits equal up to float rounding (DDP sums gradients in another order)."""
    (proc1, (single,), dir1), (proc2, ranks, dir2) = one_and_two
    assert proc1.returncode == proc2.returncode == 0, proc2.stderr[-3000:]
    assert len(single["batches"]) == 16 and [len(b) for b in ranks[0]["batches"]] == [8] * 16
    assert [a + b for a, b in zip(ranks[0]["batches"], ranks[1]["batches"], strict=True)] == single["batches"]
    epochs = [single["batches"][i:i + 6] for i in (0, 6)]  # 96 images, global batch 16: 6 steps an epoch
    assert epochs[0] != epochs[1] and all(len({i for b in e for i, _ in b}) == 96 for e in epochs)
    one, two = (json.loads((d / "result.json").read_text()) for d in (dir1, dir2))
    assert one["selected"]["step"] == two["selected"]["step"] and one["n_evals"] == two["n_evals"]
    assert one["train_images_seen"] == two["train_images_seen"] == 16 * 16
    for key in ("test/acc1", "test/acc5", "train/acc1"):
        assert one["metrics"][key] == two["metrics"][key], key
    assert one["selected"]["val/acc1"] == two["selected"]["val/acc1"]
    for key in ("test/nll", "test/ece", "train/loss"):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-3), key
    assert two["selected"]["val/loss"] == pytest.approx(one["selected"]["val/loss"], rel=1e-3)
    with np.load(dir1 / "predictions.npz") as a, np.load(dir2 / "predictions.npz") as b:
        assert a.files == b.files
        for split, n in (("test", 128), ("val", 33)):  # the whole split once, in order, gathered from both ranks
            assert np.array_equal(a[f"{split}_target"], b[f"{split}_target"]) and len(b[f"{split}_target"]) == n
            assert np.allclose(a[f"{split}_logits"], b[f"{split}_logits"], atol=1e-2)


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_both_as_diverged_without_a_hang(tmp_path: Path) -> None:
    proc, ranks, rundir = _drive(tmp_path / "nan", 2, nan_at="1:5")
    result = json.loads((rundir / "result.json").read_text())
    assert result["status"] == "diverged", proc.stderr[-3000:]
    assert result["error"] == "FloatingPointError: training loss became non-finite at step 5 on rank 1 of 2"
    assert [len(r["batches"]) for r in ranks] == [6, 6]  # both stopped at the same step
    assert proc.returncode == 1 and [r["exit_code"] for r in ranks] == [1, 0]  # rank 1 leaves the report to 0
    assert ranks[1]["writes"] == [] and (rundir / "error.log").is_file()
