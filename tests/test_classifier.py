"""The one recipe: identical weight-decay rule, schedule and loss for every net."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lightning_modules.classifier import ImageClassifier, warmup_cosine
from lightning_modules.models import build_model

torch.set_num_threads(1)


def decay_by_name(net: torch.nn.Module, weight_decay: float = 0.07) -> dict[str, float]:
    """Parameter name -> the weight decay the classifier's optimizer applies to it."""
    optimizer = ImageClassifier(net, 10, weight_decay=weight_decay).configure_optimizers()["optimizer"]
    by_id = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert len(by_id) == len(list(net.parameters()))  # every parameter, once
    return {name: by_id[id(p)] for name, p in net.named_parameters()}


def test_one_no_weight_decay_rule_for_every_net() -> None:
    """Exempt: exactly the biases, the norm weights, the position embedding and the class token."""
    vit = build_model("vit_tiny_p8", 10, 1, 32)
    decay = decay_by_name(vit)
    exempt = {n for n, wd in decay.items() if wd == 0.0}
    expected = {n for n in decay if n.endswith(".bias") or ".norm" in n or n.startswith("norm.")
                or n in ("pos_embed.weight", "cls_token")}
    assert {"pos_embed.weight", "cls_token", "encoder.blocks.0.attn.qkv.bias"} <= exempt
    assert exempt == expected, exempt ^ expected
    assert {wd for n, wd in decay.items() if n not in exempt} == {0.07}
    resnet = build_model("resnet18", 10, 1, 32)
    decay = decay_by_name(resnet)
    exempt = {n for n, wd in decay.items() if wd == 0.0}
    assert exempt == {n for n in decay if ".bn" in n or n.startswith("bn1.") or "downsample.1" in n
                      or n.endswith(".bias")}
    assert "fc.bias" in exempt and decay["fc.weight"] == decay["conv1.weight"] == 0.07


def test_the_decayed_group_comes_first_as_in_existing_checkpoints() -> None:
    optimizer = ImageClassifier(build_model("vit_tiny_p8", 10, 1, 32), 10, weight_decay=0.05).configure_optimizers()
    assert [g["weight_decay"] for g in optimizer["optimizer"].param_groups] == [0.05, 0.0]


def test_warmup_then_cosine() -> None:
    values = [warmup_cosine(s, total_steps=100, warmup_steps=10, min_ratio=0.01) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0) and values[-1] == pytest.approx(0.01, abs=0.01)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert warmup_cosine(55, 100, 10, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def one_process() -> object:
    """What training_step reads of its trainer when it runs in one process."""
    return SimpleNamespace(world_size=1, global_rank=0, global_step=0)


def test_soft_and_hard_targets_give_the_same_loss() -> None:
    net = build_model("resnet18", 4, 1, 32)
    module = ImageClassifier(net, 4, label_smoothing=0.1)
    module.trainer = one_process()
    module.log = lambda *a, **k: None  # no trainer attached: logging is not under test here
    images, labels = torch.randn(4, 1, 32, 32), torch.tensor([0, 1, 2, 3])
    net.eval()
    hard = module.training_step((images, labels), 0)
    soft = module.training_step((images, torch.nn.functional.one_hot(labels, 4).float()), 0)
    assert torch.allclose(hard, soft, atol=1e-6)


def test_a_non_finite_loss_stops_the_run_naming_the_step() -> None:
    """One process: the step is named, and no rank list (tests/test_ddp.py covers several processes)."""
    module = ImageClassifier(build_model("resnet18", 4, 1, 32), 4)
    module.trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=7)
    images = torch.full((2, 1, 32, 32), float("nan"))
    with pytest.raises(FloatingPointError, match=r"^training loss became non-finite at step 7$"):
        module.training_step((images, torch.tensor([0, 1])), 0)
