"""One LightningModule trains every net with one recipe.

AdamW, linear warmup then cosine decay (per step), cross-entropy with label
smoothing (soft targets when MixUp / CutMix are on), and one weight-decay
rule for every net, timm's `param_groups_weight_decay`: a parameter is exempt
iff it is 1-D or a bias (biases, norm scales and shifts) or the net names it
in `no_weight_decay()` (a ViT's position embedding and class token). Metrics
come from torchmetrics; the learning rate is logged by Lightning's
`LearningRateMonitor` (the trainer's callback).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.utils.data import DataLoader

# What `trainer.test` evaluates, by dataloader index: the test set, then (optionally) images of the
# training subset without augmentation, for the train-test gap (metrics named `<split>/acc1` etc.), and the
# validation split, whose logits at the selected checkpoint calibrate the temperature (kept, not logged: its
# metrics are the selected validation's, already in the validation history).
TEST_SPLITS = ("test", "train", "val")
LOGGED_SPLITS = ("test", "train")
# Splits whose logits `trainer.test` keeps (`ImageClassifier.kept_logits`), for predictions.npz.
KEPT_SPLITS = ("test", "val")


def prefers_channels_last(net: nn.Module) -> bool:
    """Whether `net` has convolutions, which run faster channels-last (a memory layout, not a change of the math)."""
    return any(isinstance(m, nn.Conv2d) for m in net.modules())


def set_fused_attention(net: nn.Module, fused: bool) -> bool:
    """Point every attention module of `net` at the fused kernel (`F.scaled_dot_product_attention`: flash or
    memory-efficient attention where the device has them) or at the explicit softmax path; our ViT's
    `Attention.fused` and timm's `fused_attn` alike. Returns whether fused attention is in effect (False for a
    net without attention)."""
    found = False
    for module in net.modules():
        for name in ("fused", "fused_attn"):
            if isinstance(getattr(module, name, None), bool) and hasattr(module, "qkv"):
                setattr(module, name, fused)
                found = True
    return found and fused


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 0, then cosine from 1 to `min_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ImageClassifier(pl.LightningModule):
    """Trains any net with `forward_features` / `forward_head` under one recipe.

    Args:
        net: the network (its logits have `num_classes` outputs).
        num_classes: classes of the task.
        lr: peak learning rate.
        weight_decay: AdamW decoupled weight decay for the decayed group.
        total_steps: optimizer steps of the whole run (schedule length).
        warmup_steps: linear warmup steps.
        min_lr_ratio: final LR as a share of `lr`.
        label_smoothing: cross-entropy label smoothing.
        betas: AdamW betas.
        channels_last: hold a CNN's weights and inputs channels-last (no effect on a net without convolutions).
    """

    def __init__(self, net: nn.Module, num_classes: int, lr: float = 1e-3, weight_decay: float = 0.05,
                 total_steps: int = 1000, warmup_steps: int = 100, min_lr_ratio: float = 0.01,
                 label_smoothing: float = 0.1, betas: tuple[float, float] = (0.9, 0.999),
                 channels_last: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.channels_last = channels_last and prefers_channels_last(net)
        self.net = net.to(memory_format=torch.channels_last) if self.channels_last else net
        metrics = lambda: torchmetrics.MetricCollection({  # noqa: E731 (one recipe for each split)
            "acc1": torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, top_k=1),
            "acc5": torchmetrics.Accuracy(task="multiclass", num_classes=num_classes, top_k=min(5, num_classes)),
            "ece": torchmetrics.CalibrationError(task="multiclass", num_classes=num_classes, n_bins=15),
        })
        self.val_metrics = metrics().clone(prefix="val/")
        self.val_nll = torchmetrics.MeanMetric()
        self.test_metrics = nn.ModuleList(metrics().clone(prefix=f"{split}/") for split in LOGGED_SPLITS)
        self.test_nll = nn.ModuleList(torchmetrics.MeanMetric() for _ in LOGGED_SPLITS)
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self._kept: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.kept_logits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    # ---------------------------------------------------------------- train
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The batch's loss; raises FloatingPointError on every process when it is non-finite on any.

        Raises:
            FloatingPointError: naming the step and the processes whose loss was NaN or infinite.
        """
        images, targets = batch  # (B, C, H, W); (B,) labels or (B, K) soft targets
        logits = self(images)  # (B, K)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.hparams.label_smoothing)
        self._stop_if_diverged(loss)
        hard = targets if targets.ndim == 1 else targets.argmax(dim=1)
        self.train_acc(logits.detach(), hard)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc1_batch", self.train_acc, prog_bar=False)
        return loss

    def _stop_if_diverged(self, loss: torch.Tensor) -> None:
        """Decide on all processes together whether the loss is finite, and raise on all of them when it is not.

        Under DDP a process that skipped its step alone would leave the others waiting for its gradients: each
        process sets its own slot of a (W,) flag vector, one all-reduce shares them, and every process then
        sees the same vector and takes the same branch at the same step.
        """
        bad = torch.zeros(self.trainer.world_size, device=loss.device)  # (W,) 1 where the loss is non-finite
        bad[self.global_rank] = (~torch.isfinite(loss.detach())).float()
        if self.trainer.world_size > 1:
            torch.distributed.all_reduce(bad)
        if bad.any():
            ranks = ", ".join(str(rank) for rank in bad.nonzero().flatten().tolist())
            where = f" on rank {ranks} of {len(bad)}" if len(bad) > 1 else ""
            raise FloatingPointError(f"training loss became non-finite at step {self.global_step}{where}")

    # ---------------------------------------------------------------- eval
    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], metrics: torchmetrics.MetricCollection,
                  nll: torchmetrics.MeanMetric, prefix: str, loader: DataLoader, batch_idx: int) -> torch.Tensor:
        """Update and log the split's metrics (over the batch's items that are not padding); returns the batch's
        (B, K) float logits."""
        images, labels = batch  # (B, C, H, W), (B,)
        logits = self(images).float()  # (B, K)
        real = self._real_items(len(labels), loader, batch_idx)
        if real:
            metrics.update(logits[:real].softmax(dim=1), labels[:real])
            nll.update(F.cross_entropy(logits[:real], labels[:real], reduction="none"))
        # named by split, not by dataloader index (one trainer.test call evaluates several splits)
        self.log_dict(metrics, on_epoch=True, add_dataloader_idx=False)
        self.log(f"{prefix}/nll", nll, on_epoch=True, add_dataloader_idx=False)
        return logits

    def _real_items(self, n: int, loader: DataLoader, batch_idx: int) -> int:
        """How many of batch `batch_idx`'s `n` items are the dataset's own rather than padding: the first k.

        Under DDP, Lightning's evaluation sampler gives rank r the items r, r + W, r + 2W, ... of the dataset
        padded with its first items to a multiple of W (`on_test_epoch_end` relies on it too), so the rank's
        j-th item, at position r + jW of the padded order, is padding iff that is >= len(dataset), and only the
        rank's last item can be. Left out, the W - 1 or fewer padded items do not count twice: the metrics are
        those of the whole split, once. Plain integers: no device sync.
        """
        world, rank = self.trainer.world_size, self.global_rank
        own = -(-(len(loader.dataset) - rank) // world)  # this rank's real items: ceil((N - r) / W)
        return max(0, min(n, own - batch_idx * loader.batch_size))

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, self.val_nll, "val", self.trainer.val_dataloaders, batch_idx)
        self.log("val/loss", self.val_nll, on_epoch=True, prog_bar=True)  # result.json records it in `selected`

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        """Dataloader `dataloader_idx` holds the split TEST_SPLITS[dataloader_idx]; KEPT_SPLITS keep their logits."""
        split = TEST_SPLITS[dataloader_idx]
        if split in LOGGED_SPLITS:
            logits = self._evaluate(batch, self.test_metrics[dataloader_idx], self.test_nll[dataloader_idx], split,
                                    self.trainer.test_dataloaders[dataloader_idx], batch_idx)
        else:
            logits = self(batch[0]).float()  # (B, K)
        if split in KEPT_SPLITS:
            self._kept.setdefault(split, []).append((logits.detach(), batch[1]))

    def on_test_epoch_start(self) -> None:
        self._kept, self.kept_logits = {}, {}

    def on_test_epoch_end(self) -> None:
        """Gather each kept split's (logits, labels) from every process, in dataset order.

        Lightning's evaluation sampler gives rank r the items r, r + W, r + 2W, ...
        of the dataset padded to a multiple of W, so the gathered (W, n, ...)
        tensors read back in order by position, then the padding is dropped.
        """
        for split, parts in self._kept.items():
            logits = torch.cat([p[0] for p in parts])  # (n, K) on this process
            labels = torch.cat([p[1] for p in parts])  # (n,)
            size = len(self.trainer.test_dataloaders[TEST_SPLITS.index(split)].dataset)
            if self.trainer.world_size > 1:
                logits = self.all_gather(logits).transpose(0, 1).flatten(0, 1)  # (W, n, K) -> (n * W, K)
                labels = self.all_gather(labels).transpose(0, 1).flatten(0, 1)  # (n * W,)
            self.kept_logits[split] = (logits[:size].cpu(), labels[:size].cpu())
        self._kept = {}

    # ---------------------------------------------------------------- optim
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        exempt = self.net.no_weight_decay() if hasattr(self.net, "no_weight_decay") else ()
        groups = param_groups_weight_decay(self.net, hp.weight_decay, no_weight_decay_list=exempt)
        # the decayed group first, as the optimizer's state in existing checkpoints has it
        groups.sort(key=lambda group: group["weight_decay"] == 0)
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=hp.betas)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.total_steps, hp.warmup_steps, hp.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "lr"}}
