"""The interpretability library: rollout and attention distance against hand-computed values,
the effective receptive field of a known convolution, Grad-CAM on both nets, and nets left as found."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: every net here is built from scratch

import numpy as np
import pytest
import timm
import torch
from torch import nn

from lightning_modules.interpret import (
    ProbeLayer,
    attention_rollout,
    effective_receptive_fields,
    erf_profile,
    erf_size,
    explain_batch,
    gradcam_layer,
    gradcam_maps,
    mean_attention_distance,
    patch_distances,
    probe_layers,
    tokens_to_grid,
)
from lightning_modules.vit import VisionTransformer
from lightning_modules.vit_config import ViTConfig

torch.set_num_threads(1)

TINY_VIT = ViTConfig(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=2, num_heads=2)


def tiny_vit(**changes) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(TINY_VIT.replace(**changes))


def resnet18() -> nn.Module:
    """timm zeroes each block's last BatchNorm at init (zero_init_last), which makes every residual
    branch output 0 and the whole net its stem plus strided 1x1 shortcuts; a trained net is not like
    that, so the tests' random net keeps its residual branches."""
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=10, in_chans=1, zero_init_last=False)


def images(batch: int = 2, chans: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(1))


# Attention rollout -----------------------------------------------------------

# Two layers, two heads, a class token and a 1 x 2 patch grid (T = 3). Layer 1's heads
# average to A1 = [[0, .5, .5], [0, 1, 0], [0, 0, 1]], layer 2's to A2 = [[0, 1, 0], [.5, .5, 0], [0, 0, 1]].
LAYER1 = torch.tensor([[[0.0, 1, 0], [0, 1, 0], [0, 0, 1]],
                       [[0.0, 0, 1], [0, 1, 0], [0, 0, 1]]])[None]  # (1, 2, 3, 3)
LAYER2 = torch.tensor([[[0.0, 1, 0], [1, 0, 0], [0, 0, 1]],
                       [[0.0, 1, 0], [0, 1, 0], [0, 0, 1]]])[None]  # (1, 2, 3, 3)


def test_rollout_of_hand_set_attention_equals_the_hand_computed_product() -> None:
    # Â1 = (A1 + I)/2 = [[.5, .25, .25], [0, 1, 0], [0, 0, 1]]; Â2 = [[.5, .5, 0], [.25, .75, 0], [0, 0, 1]].
    # Row 0 of Â2 Â1 = .5 * [.5, .25, .25] + .5 * [0, 1, 0] = [.25, .625, .125]; the patches get [.625, .125].
    rollout = attention_rollout([LAYER1, LAYER2], num_prefix_tokens=1, grid_size=(1, 2))
    torch.testing.assert_close(rollout, torch.tensor([[[0.625, 0.125]]]))


def test_rollout_renormalises_rows_after_max_fusion() -> None:
    # max over heads: layer 1 [[0, 1, 1], ...] -> (A + I)/2 row 0 = [.5, .5, .5] -> [1/3, 1/3, 1/3];
    # layer 2 [[0, 1, 0], [1, 1, 0], ...] -> row 0 [.5, .5, 0]. Row 0 of the product = [1/6, 2/3, 1/6].
    rollout = attention_rollout([LAYER1, LAYER2], num_prefix_tokens=1, grid_size=(1, 2), head_fusion="max")
    torch.testing.assert_close(rollout, torch.tensor([[[2 / 3, 1 / 6]]]))


def test_rollout_without_a_class_token_averages_over_queries() -> None:
    # One layer, no prefix: Â = ([[0, 1], [0, 1]] + I)/2 = [[.5, .5], [0, 1]]; the mean row is [.25, .75].
    attention = torch.tensor([[0.0, 1], [0, 1]])[None, None]  # (1, 1, 2, 2)
    rollout = attention_rollout([attention], num_prefix_tokens=0, grid_size=(1, 2))
    torch.testing.assert_close(rollout, torch.tensor([[[0.25, 0.75]]]))


def test_rollout_of_a_real_vit_is_a_share_of_the_class_tokens_attention() -> None:
    vit = tiny_vit()
    with torch.no_grad():
        attentions = vit.attention_maps(images(3))
    rollout = attention_rollout(attentions, vit.num_prefix_tokens, vit.grid_size)
    assert rollout.shape == (3, 8, 8)
    assert (rollout >= 0).all() and (rollout.sum(dim=(1, 2)) <= 1 + 1e-6).all()


@pytest.mark.parametrize("bad, message", [
    (dict(attentions=[]), "attentions=[]"),
    (dict(attentions=[torch.ones(1, 2, 4, 4)]), "attentions[0]"),
    (dict(head_fusion="median"), "head_fusion='median'"),
])
def test_rollout_rejects_bad_input_in_one_line(bad: dict, message: str) -> None:
    arguments = {**dict(attentions=[LAYER1], num_prefix_tokens=1, grid_size=(1, 2)), **bad}
    with pytest.raises(ValueError, match=r"^invalid .*allowed") as error:
        attention_rollout(**arguments)
    assert message in str(error.value) and "\n" not in str(error.value)


# Mean attention distance --------------------------------------------------------


def with_class_token(patch_weights: torch.Tensor, class_weight: float) -> torch.Tensor:
    """(N, N) patch-to-patch rows -> (1 + N, 1 + N), each patch row giving `class_weight` to the class token."""
    n = patch_weights.shape[0]
    full = torch.zeros(n + 1, n + 1)
    full[0] = 1 / (n + 1)
    full[1:, 0] = class_weight
    full[1:, 1:] = patch_weights * (1 - class_weight)
    return full


def test_attention_distance_is_zero_on_self_and_the_mean_pairwise_distance_when_uniform() -> None:
    # 2 x 2 grid of 4-px patches: from any patch, the others are 4, 4 and 4·√2 px away (itself: 0).
    self_only = with_class_token(torch.eye(4), class_weight=0.7)  # (5, 5)
    uniform = with_class_token(torch.full((4, 4), 0.25), class_weight=0.3)  # (5, 5)
    neighbour_in_row = with_class_token(torch.eye(4)[[1, 0, 3, 2]], class_weight=0.5)  # (5, 5)
    layer1 = torch.stack([self_only, uniform])[None]  # (1, 2, 5, 5): head 0, head 1
    layer2 = torch.stack([neighbour_in_row, self_only])[None]  # (1, 2, 5, 5)
    distances = mean_attention_distance([layer1, layer2], num_prefix_tokens=1, grid_size=(2, 2), patch_size=4)
    expected = torch.tensor([[0.0, (0 + 4 + 4 + 4 * math.sqrt(2)) / 4], [4.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(distances, expected)


def test_patch_distances_are_in_pixels_between_patch_centres() -> None:
    distances = patch_distances((2, 3), patch_size=8)  # patches numbered row by row
    assert distances.shape == (6, 6)
    assert distances[0, 2] == 16 and distances[0, 3] == 8 and distances[0, 5] == pytest.approx(8 * math.sqrt(5))


def test_attention_distance_of_a_real_vit_has_one_value_per_layer_and_head() -> None:
    vit = tiny_vit()
    with torch.no_grad():
        distances = mean_attention_distance(vit.attention_maps(images()), 1, vit.grid_size, vit.config.patch_size)
    assert distances.shape == (2, 2)
    assert ((distances > 0) & (distances < 32 * math.sqrt(2))).all()


# Effective receptive field ------------------------------------------------------


def test_erf_of_one_3x3_convolution_is_3_px_wide_with_the_hand_computed_mean_distance() -> None:
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1, bias=False)
    nn.init.ones_(conv.weight)
    (erf_map,) = effective_receptive_fields(conv, images(4, chans=2, size=9), [ProbeLayer("conv", conv, 1.0)])
    expected = torch.zeros(9, 9)
    expected[3:6, 3:6] = 2 * 3  # d(sum over 3 out-channels)/d(pixel), summed over 2 in-channels
    torch.testing.assert_close(erf_map, expected)
    mean_distance, width = erf_size(erf_map)
    assert width == pytest.approx(3)
    # Uniform over the 3 x 3 square: 4 pixels at 1 px, 4 at √2 px, the centre at 0.
    assert mean_distance == pytest.approx((4 + 4 * math.sqrt(2)) / 9)


def test_erf_width_holds_the_asked_share_of_the_mass() -> None:
    erf_map = torch.zeros(7, 7)
    erf_map[3, 3] = 0.5
    erf_map[3, 4] = erf_map[3, 2] = 0.25  # centred on (3, 3)
    assert erf_size(erf_map, share=0.5) == (0.5, 1)
    assert erf_size(erf_map, share=0.75) == (0.5, 3)
    with pytest.raises(ValueError, match=r"^invalid share=0 "):
        erf_size(erf_map, share=0)


def test_erf_runs_on_both_real_nets_and_the_cnn_looks_further_in_its_last_stage() -> None:
    cnn_rows = erf_profile(resnet18(), images(4))
    assert [row.name for row in cnn_rows][:3] == ["stem", "layer1.0", "layer1.1"] and len(cnn_rows) == 9
    assert cnn_rows[-1].relative_depth == 1 and all(row.erf_map.shape == (32, 32) for row in cnn_rows)
    assert cnn_rows[0].mean_distance_px < cnn_rows[-1].mean_distance_px
    assert cnn_rows[0].width_px < cnn_rows[-1].width_px
    vit_rows = erf_profile(tiny_vit(), images(4))
    assert [(row.name, row.relative_depth) for row in vit_rows] == [("blocks.0", 0.5), ("blocks.1", 1.0)]
    assert all(row.erf_map.shape == (32, 32) and row.mean_distance_px > 0 for row in vit_rows)


def test_erf_is_the_same_for_a_channels_last_net() -> None:
    net = resnet18()
    batch = images(2)
    contiguous = effective_receptive_fields(net, batch, probe_layers(net)[:3])
    net = net.to(memory_format=torch.channels_last)
    channels_last = effective_receptive_fields(
        net, batch.contiguous(memory_format=torch.channels_last), probe_layers(net)[:3])
    torch.testing.assert_close(channels_last, contiguous)


def test_probe_layers_rejects_other_nets() -> None:
    with pytest.raises(ValueError, match=r"^invalid net=Linear \(allowed"):
        probe_layers(nn.Linear(2, 2))


# Grad-CAM ---------------------------------------------------------------------


def test_vit_tokens_go_to_their_grid_cell() -> None:
    batch, rows, cols, dim = 2, 2, 3, 4
    tokens = torch.zeros(batch, 1 + rows * cols, dim)
    for i in range(rows * cols):
        tokens[:, 1 + i] = 10 * i + torch.arange(dim)  # patch token i holds 10·i + channel
    tokens[:, 0] = -1  # the class token must be dropped
    grid = tokens_to_grid(tokens, (rows, cols), num_prefix_tokens=1)
    assert grid.shape == (batch, dim, rows, cols)
    for i in range(rows * cols):
        expected = (10 * i + torch.arange(dim)).expand(batch, -1).float()  # (B, D)
        torch.testing.assert_close(grid[:, :, i // cols, i % cols], expected)


def test_gradcam_on_a_tiny_resnet_uses_a_stage_that_localises_and_gives_image_sized_maps() -> None:
    net, batch = resnet18(), images(3)
    name, layer = gradcam_layer(net, batch)
    assert name == "layer2[-1]" and layer is net.layer2[-1]  # 4 x 4 at 32 px; layer3 is 2 x 2, layer4 1 x 1
    maps = gradcam_maps(net, batch, targets=[0, 1, 2])
    assert maps.shape == (3, 32, 32) and maps.dtype == torch.float32
    # Scaled per image to [0, 1]; a class with no positive evidence (a random net) gives an all-zero map.
    assert maps.min() >= 0 and maps.max() <= 1 and (maps.amax(dim=(1, 2)) > 0.99).any()
    allowed = r"\(allowed: layer1 \| layer2 \| layer3;"
    with pytest.raises(ValueError, match=r"^invalid cnn_stage='layer4' at 32x32 px " + allowed):
        gradcam_maps(net, batch, cnn_stage="layer4")


def test_gradcam_on_our_vit_gives_image_sized_maps() -> None:
    vit, batch = tiny_vit(), images(3)
    assert gradcam_layer(vit, batch) == ("encoder.blocks[-1].norm1", vit.encoder.blocks[-1].norm1)
    maps = gradcam_maps(vit, batch)
    assert maps.shape == (3, 32, 32) and maps.min() >= 0 and maps.max() <= 1


def test_gradcam_rejects_targets_out_of_range() -> None:
    with pytest.raises(ValueError, match=r"^invalid targets=\[0, 10\] \(allowed: 2 class indices in \[0, 10\)\)"):
        gradcam_maps(tiny_vit(), images(2), targets=[0, 10])


# Everything for a batch; nets left as found ----------------------------------------


def hook_count(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in net.modules())


@pytest.mark.parametrize("make_net", [tiny_vit, resnet18], ids=["vit", "resnet18"])
def test_every_function_leaves_the_net_as_it_found_it(make_net) -> None:
    net = make_net().train()
    first_child = next(net.children())
    first_child.eval()  # a mixed state must survive too
    if isinstance(net, VisionTransformer):
        net.encoder.blocks[0].attn.fused = False
    fused = [m.fused for m in net.modules() if hasattr(m, "fused")]
    params = list(net.parameters())
    params[0].grad = sentinel = torch.ones_like(params[0])
    hooks = hook_count(net)
    batch = images(2)
    with torch.no_grad():  # the caller's no_grad must not break the gradients inside
        gradcam_maps(net, batch)
        erf_profile(net, batch)
        explain_batch(net, batch)
    assert net.training and not first_child.training
    assert all(m.training for m in net.modules() if m is not first_child and not _inside(m, first_child))
    assert hook_count(net) == hooks
    assert [m.fused for m in net.modules() if hasattr(m, "fused")] == fused
    assert params[0].grad is sentinel and all(p.grad is None for p in params[1:])


def _inside(module: nn.Module, parent: nn.Module) -> bool:
    return any(module is m for m in parent.modules())


def tiny_vit_avg_pool() -> VisionTransformer:
    return tiny_vit(pool="avg", class_token=False)


@pytest.mark.parametrize("make_net, arch", [(tiny_vit, "vit"), (tiny_vit_avg_pool, "vit"), (resnet18, "cnn")],
                         ids=["vit", "vit-avg-pool", "resnet18"])
def test_explain_batch_returns_plain_arrays_that_save_without_pickle(make_net, arch, tmp_path) -> None:
    result = explain_batch(make_net(), images(2))
    path = tmp_path / "explain.npz"
    np.savez(path, **result)
    loaded = np.load(path, allow_pickle=False)
    assert str(loaded["arch"]) == arch
    assert loaded["gradcam"].shape == (2, 32, 32) and loaded["images"].shape == (2, 1, 32, 32)
    layers = len(loaded["erf_layers"])
    assert loaded["erf_maps"].shape == (layers, 32, 32) and loaded["erf_width_px"].shape == (layers,)
    np.testing.assert_array_equal(loaded["gradcam_targets"], loaded["predictions"])
    if arch == "vit":
        assert loaded["rollout"].shape == (2, 8, 8) and loaded["attention_distance_px"].shape == (2, 2)
        assert str(loaded["gradcam_layer"]) == "encoder.blocks[-1].norm1"
    else:
        assert "rollout" not in loaded and str(loaded["gradcam_layer"]) == "layer2[-1]"


@pytest.mark.slow
def test_resnet50_at_224_px_uses_layer4_and_its_erf_grows_with_depth() -> None:
    torch.manual_seed(0)
    net = timm.create_model("resnet50", num_classes=10, zero_init_last=False)
    batch = images(1, chans=3, size=224)
    assert gradcam_layer(net, batch)[0] == "layer4[-1]"  # 7 x 7, the standard target
    rows = erf_profile(net, batch)
    assert len(rows) == 17 and rows[0].name == "stem" and rows[-1].name == "layer4.2"
    assert rows[0].width_px < rows[8].width_px < rows[-1].width_px
