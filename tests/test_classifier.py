"""The one recipe: identical weight-decay rule, schedule and loss for every net."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.classifier import ImageClassifier, decay_groups, warmup_cosine
from lightning_modules.models import build_model

torch.set_num_threads(1)


def test_one_no_weight_decay_rule_for_every_net() -> None:
    vit = build_model("vit_tiny_p8", 10, 1, 32)
    decayed, exempt = decay_groups(vit)
    assert {"pos_embed.weight", "cls_token"} <= set(exempt)
    assert all(n.endswith(".bias") or "norm" in n or n in ("pos_embed.weight", "cls_token") for n in exempt)
    assert all(p.ndim >= 2 for n, p in vit.named_parameters() if n in decayed)
    resnet = build_model("resnet18", 10, 1, 32)
    decayed, exempt = decay_groups(resnet)
    assert all(dict(resnet.named_parameters())[n].ndim == 1 for n in exempt)  # BN scales/shifts, biases
    assert "fc.bias" in exempt and "fc.weight" in decayed and "conv1.weight" in decayed
    assert all("bn" in n or "downsample.1" in n or n.endswith("bias") for n in exempt)


def test_optimizer_applies_the_rule() -> None:
    net = build_model("vit_tiny_p8", 10, 1, 32)
    module = ImageClassifier(net, 10, weight_decay=0.07)
    optimizer = module.configure_optimizers()["optimizer"]
    by_id = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(net.named_parameters())
    assert by_id[id(params["cls_token"])] == 0.0 and by_id[id(params["pos_embed.weight"])] == 0.0
    assert by_id[id(params["encoder.blocks.0.attn.qkv.weight"])] == 0.07
    assert len(by_id) == len(params)


def test_warmup_then_cosine() -> None:
    values = [warmup_cosine(s, total_steps=100, warmup_steps=10, min_ratio=0.01) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[-1] == pytest.approx(0.01, abs=0.01)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert warmup_cosine(55, 100, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_soft_and_hard_targets_give_the_same_loss() -> None:
    net = build_model("resnet18", 4, 1, 32)
    module = ImageClassifier(net, 4, label_smoothing=0.1)
    module.trainer = type("T", (), {"should_stop": False, "optimizers": [torch.optim.SGD(net.parameters(), 0.1)]})()
    module.log = lambda *a, **k: None  # no trainer attached: logging is not under test here
    images, labels = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])
    net.eval()
    hard = module.training_step((images, labels), 0)
    soft = module.training_step((images, torch.nn.functional.one_hot(labels, 4).float()), 0)
    assert torch.allclose(hard, soft, atol=1e-6)


def test_non_finite_loss_marks_the_run_diverged() -> None:
    net = build_model("resnet18", 4, 1, 32)
    module = ImageClassifier(net, 4)
    trainer = type("T", (), {"should_stop": False, "optimizers": []})()
    module.trainer = trainer
    images = torch.full((2, 1, 32, 32), float("nan"))
    assert module.training_step((images, torch.tensor([0, 1])), 0) is None
    assert module.diverged and trainer.should_stop
