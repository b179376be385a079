"""Behaviour of the transparent ViT: it equals timm's, each step does what the paper says,
and `forward_intermediates` shows what each step produced."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: every model here is built from scratch

import pytest
import torch
from timm.models import vision_transformer as timm_vit
from torch import nn

from lightning_modules.vit import Attention, PatchProjection, Patchify, VisionTransformer
from lightning_modules.vit_config import ConfigError, ViTConfig
from lightning_modules.vit_timm import from_timm, load_timm_state_dict, timm_config

torch.set_num_threads(1)

# Arguments that timm's VisionTransformer and our ViTConfig name alike.
TINY_ARCH = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=48, depth=2, num_heads=3)
TINY = ViTConfig(**TINY_ARCH)


def tiny_vit(**changes) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(TINY.replace(**changes))


def images(batch: int = 2, chans: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, chans, size, size, generator=torch.Generator().manual_seed(1))


def random_timm_vit(**kwargs) -> timm_vit.VisionTransformer:
    """A timm ViT whose every weight is random (not only the ones timm inits randomly),
    so that a wrongly mapped LayerNorm, bias or token shows in the outputs."""
    torch.manual_seed(0)
    model = timm_vit.VisionTransformer(**{**TINY_ARCH, **kwargs}).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def unpatchify(patches: torch.Tensor, patch_size: int, image_size: tuple[int, int]) -> torch.Tensor:
    """The inverse of `Patchify`: (B, N, C*P*P) patch vectors -> (B, C, H, W) images."""
    H, W = image_size
    P = patch_size
    B, _, patch_dim = patches.shape
    C = patch_dim // (P * P)
    x = patches.reshape(B, H // P, W // P, C, P, P)  # (B, H/P, W/P, C, P, P)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, H/P, P, W/P, P)
    return x.reshape(B, C, H, W)  # (B, C, H, W)


# timm equivalence --------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(global_pool="token"),
        dict(global_pool="token", in_chans=1),
        dict(global_pool="avg"),
        dict(global_pool="avg", in_chans=1, class_token=False),
        dict(global_pool="token", pos_embed="none", qkv_bias=False, mlp_ratio=2.0),
        dict(global_pool="token", img_size=28, patch_size=4, in_chans=1, embed_dim=32, num_heads=4),
    ],
    ids=["token", "token-1ch", "avg", "avg-no-cls", "no-pos-no-qkv-bias", "img28-patch4"],
)
def test_from_timm_gives_timms_features_and_logits(kwargs):
    reference = random_timm_vit(**kwargs)
    ours = from_timm(reference).eval()
    x = images(chans=reference.patch_embed.proj.in_channels, size=reference.patch_embed.img_size[0])
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), reference.forward_features(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            ours.forward_head(ours.forward_features(x), pre_logits=True),
            reference.forward_head(reference.forward_features(x), pre_logits=True),
            atol=1e-5,
            rtol=1e-4,
        )
    assert ours.num_features == reference.num_features and ours.num_classes == reference.num_classes


def test_a_saved_timm_state_dict_loads_into_a_model_built_alike(tmp_path):
    reference = random_timm_vit(global_pool="avg")
    torch.save(reference.state_dict(), tmp_path / "vit.pth")
    ours = tiny_vit(pool="avg").eval()
    load_timm_state_dict(ours, torch.load(tmp_path / "vit.pth", weights_only=True))
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=0)


def test_a_state_dict_that_does_not_fit_is_refused_by_name():
    reference = random_timm_vit(global_pool="token")
    with pytest.raises(ValueError, match="head.fc.weight"):
        load_timm_state_dict(tiny_vit(num_classes=5), reference.state_dict())
    with pytest.raises(ValueError, match="pos_embed.weight"):  # sincos2d has no learned table to load into
        load_timm_state_dict(tiny_vit(pos_embed="sincos2d"), reference.state_dict())


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(no_embed_class=True), "no_embed_class"),
        (dict(reg_tokens=2), "reg_tokens"),
        (dict(init_values=1e-5), "init_values"),
        (dict(pre_norm=True), "pre_norm"),
        (dict(qk_norm=True), "qk_norm"),
        (dict(global_pool="max"), "global_pool"),
        (dict(global_pool="avg", fc_norm=False), "fc_norm"),
        (dict(global_pool="token", fc_norm=True), "fc_norm"),
    ],
)
def test_from_timm_refuses_configurations_it_cannot_reproduce(kwargs, named):
    with pytest.raises(ValueError, match=named):
        from_timm(timm_vit.VisionTransformer(**{**TINY_ARCH, **kwargs}))


def test_from_timm_at_another_image_size_resamples_the_position_embedding():
    reference = random_timm_vit()
    ours = from_timm(reference, img_size=64)
    assert ours.pos_embed.weight.shape == (1, 1 + 8 * 8, TINY.embed_dim)
    torch.testing.assert_close(ours.pos_embed.weight[:, 0], reference.pos_embed[:, 0])  # class row kept
    assert ours(images(size=64)).shape == (2, TINY.num_classes)
    same_size = from_timm(reference, img_size=32)
    torch.testing.assert_close(same_size.pos_embed.weight, reference.pos_embed)


def test_timm_config_reads_a_timm_vit_into_our_config():
    assert timm_config(timm_vit.VisionTransformer(**TINY_ARCH)) == TINY
    avg = timm_vit.VisionTransformer(**TINY_ARCH, global_pool="avg", class_token=False, pos_embed="none")
    assert timm_config(avg) == TINY.replace(pool="avg", class_token=False, pos_embed="none")


def test_from_timm_takes_the_training_rates_it_is_given():
    ours = from_timm(random_timm_vit(), drop_rate=0.1, attn_drop_rate=0.2, drop_path_rate=0.3)
    assert (ours.config.drop_rate, ours.config.attn_drop_rate, ours.config.drop_path_rate) == (0.1, 0.2, 0.3)
    assert ours.encoder.blocks[-1].drop_path.p == pytest.approx(0.3)


# Steps 1-2: patches ------------------------------------------------------------


def test_unpatchify_inverts_patchify_exactly():
    x = torch.randn(2, 3, 16, 24)
    patches = Patchify(4)(x)
    assert patches.shape == (2, (16 // 4) * (24 // 4), 3 * 4 * 4)
    assert torch.equal(unpatchify(patches, 4, (16, 24)), x)


def test_patches_run_row_by_row_and_hold_the_pixels_of_their_square():
    x = torch.randn(2, 3, 16, 24)
    patches = Patchify(4)(x)
    assert torch.equal(patches[:, 0], x[:, :, 0:4, 0:4].reshape(2, -1))
    assert torch.equal(patches[:, 1], x[:, :, 0:4, 4:8].reshape(2, -1))  # next along the row
    assert torch.equal(patches[:, 6], x[:, :, 4:8, 0:4].reshape(2, -1))  # start of the second row


def test_patch_projection_is_a_strided_convolution():
    torch.manual_seed(0)
    P, C, D = 4, 3, 16
    conv = nn.Conv2d(C, D, kernel_size=P, stride=P)
    projection = PatchProjection(C * P * P, D)
    with torch.no_grad():
        projection.proj.weight.copy_(conv.weight.reshape(D, -1))
        projection.proj.bias.copy_(conv.bias)
    x = torch.randn(2, C, 16, 24)
    expected = conv(x).flatten(2).transpose(1, 2)  # (B, N, D)
    torch.testing.assert_close(projection(Patchify(P)(x)), expected, atol=1e-6, rtol=0)


def test_a_bad_image_size_is_refused():
    with pytest.raises(ValueError, match="patch_size"):
        Patchify(8)(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="img_size"):
        tiny_vit()(images(size=48))


# Steps 3-4: position embedding and class token ---------------------------------


def encoder_input(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    captured = []
    handle = model.encoder.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    model(x)
    handle.remove()
    return captured[0]


def test_the_class_token_sits_at_position_0_with_position_embedding_0():
    model = tiny_vit()
    with torch.no_grad():
        model.cls_token.normal_()  # away from its ~0 init, so a missing term shows
        x = images()
        tokens = encoder_input(model, x)
        patch_tokens = model.patch_proj(model.patchify(x))
    pos = model.pos_embed.weight  # (1, 1 + N, D)
    assert pos.shape == (1, 1 + 16, TINY.embed_dim)
    torch.testing.assert_close(tokens[:, :1], (model.cls_token + pos[:, :1]).expand(2, -1, -1))
    torch.testing.assert_close(tokens[:, 1:], patch_tokens + pos[:, 1:])


def test_sincos2d_is_fixed_distinct_per_position_and_zero_for_the_class_token():
    model = tiny_vit(pos_embed="sincos2d")
    table = model.pos_embed.weight  # (1, 1 + N, D)
    assert not table.requires_grad
    assert all(param is not table for param in model.parameters())
    assert "pos_embed.weight" not in model.state_dict()
    assert torch.equal(table[0, 0], torch.zeros(TINY.embed_dim))
    patch_rows = table[0, 1:]
    distances = torch.cdist(patch_rows, patch_rows) + torch.eye(len(patch_rows))
    assert distances.min() > 1e-3


def test_without_position_embedding_the_tokens_are_the_patch_projections():
    model = tiny_vit(pos_embed="none", pool="avg", class_token=False)
    assert not any("pos_embed" in name for name, _ in model.named_parameters())
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(encoder_input(model, x), model.patch_proj(model.patchify(x)), atol=0, rtol=0)


def shuffle_patches(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    patches = Patchify(patch_size)(x)
    order = torch.randperm(patches.shape[1], generator=torch.Generator().manual_seed(0))
    return unpatchify(patches[:, order], patch_size, x.shape[-2:])


def test_only_a_position_embedding_makes_the_model_see_where_patches_are():
    x = images()
    shuffled = shuffle_patches(x, TINY.patch_size)
    blind = tiny_vit(pos_embed="none", pool="avg", class_token=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(blind(shuffled), blind(x), atol=1e-5, rtol=0)
        for kind in ("learn", "sincos2d"):
            model = tiny_vit(pos_embed=kind, pool="avg", class_token=False).eval()
            assert not torch.allclose(model(shuffled), model(x), atol=1e-4)


# Step 5: encoder and attention -------------------------------------------------


def test_the_explicit_attention_path_gives_the_fused_output():
    torch.manual_seed(0)
    attention = Attention(dim=48, num_heads=3, qkv_bias=True, attn_drop=0.0, proj_drop=0.0)
    assert attention.fused  # the default, the path training takes
    x = torch.randn(2, 17, 48)
    fused = attention(x)
    attention.fused = False
    torch.testing.assert_close(attention(x), fused, atol=1e-6, rtol=1e-5)


def test_the_whole_model_gives_the_same_logits_on_either_attention_path():
    model = tiny_vit(depth=3).eval()
    x = images()
    with torch.no_grad():
        fused = model(x)
        for block in model.encoder.blocks:
            block.attn.fused = False
        torch.testing.assert_close(model(x), fused, atol=1e-5, rtol=1e-5)


def test_training_takes_the_fused_path_and_materialises_no_attention_weights():
    model = tiny_vit()
    softmax_calls = []
    for block in model.encoder.blocks:
        block.attn.softmax.register_forward_hook(lambda *_: softmax_calls.append(1))
    model(images()).sum().backward()
    assert softmax_calls == []


def test_stochastic_depth_grows_linearly_and_only_acts_in_training():
    model = tiny_vit(depth=3, drop_path_rate=0.2)
    assert [block.drop_path.p for block in model.encoder.blocks] == pytest.approx([0.0, 0.1, 0.2])
    model = tiny_vit(depth=2, drop_path_rate=0.5)
    x = images(batch=8)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(x), model(x))


# Intermediates -------------------------------------------------------------------


def attention_by_hand(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) of `block`'s attention for block input x (B, T, D): (B, h, T, T)."""
    B, T, D = x.shape
    h = block.attn.num_heads
    qkv = block.attn.qkv(block.norm1(x)).reshape(B, T, 3, h, D // h).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]  # (B, h, T, D/h) each
    return (q @ k.transpose(-2, -1) / (D // h) ** 0.5).softmax(dim=-1)


@pytest.mark.parametrize("changes", [dict(), dict(pool="avg", class_token=False, pos_embed="sincos2d")],
                         ids=["token", "avg-no-cls"])
def test_forward_intermediates_are_the_steps_of_one_forward(changes):
    model = tiny_vit(depth=3, **changes).eval()
    x = images()
    forwards = []
    counter = model.patchify.register_forward_hook(lambda *_: forwards.append(1))
    with torch.no_grad():
        out = model.forward_intermediates(x)
    counter.remove()
    assert len(forwards) == 1
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], model(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["features"], model.forward_features(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out["pre_logits"], model.forward_head(out["features"], pre_logits=True))
        assert torch.equal(out["patches"], model.patchify(x))
        assert torch.equal(out["patch_tokens"], model.patch_proj(out["patches"]))
        assert torch.equal(out["tokens"], encoder_input(model, x))
        block_inputs = [out["tokens"]] + [out[f"blocks.{i}"] for i in range(2)]
        for i, (block, block_input) in enumerate(zip(model.encoder.blocks, block_inputs)):
            torch.testing.assert_close(out[f"blocks.{i}"], block(block_input), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(out[f"attention.{i}"], attention_by_hand(block, block_input))
        torch.testing.assert_close(out["features"], model.encoder.norm(out["blocks.2"]))
    assert out.keys() == {"patches", "patch_tokens", "tokens", "features", "pre_logits", "logits"} | {
        f"{kind}.{i}" for kind in ("blocks", "attention") for i in range(3)
    }


def test_attention_rows_are_distributions_over_the_tokens():
    model = tiny_vit().eval()
    with torch.no_grad():
        out = model.forward_intermediates(images())
    tokens = 1 + model.grid_size[0] * model.grid_size[1]
    for i in range(TINY.depth):
        weights = out[f"attention.{i}"]
        assert weights.shape == (2, TINY.num_heads, tokens, tokens)
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, TINY.num_heads, tokens))
    maps = model.attention_maps(images())
    assert len(maps) == TINY.depth and all(torch.equal(a, out[f"attention.{i}"]) for i, a in enumerate(maps))


def test_forward_intermediates_are_differentiable():
    """Grad-CAM and gradient-weighted rollout differentiate a logit by an intermediate."""
    model = tiny_vit().eval()
    out = model.forward_intermediates(images())
    score = out["logits"][:, 3].sum()
    grads = torch.autograd.grad(score, [out["attention.0"], out["blocks.1"], out["patch_tokens"]])
    assert all(grad.abs().sum() > 0 for grad in grads)


def hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_forward_intermediates_leave_no_hooks_and_restore_each_attention_path():
    model = tiny_vit(depth=3)
    model.encoder.blocks[1].attn.fused = False  # a caller's own choice is kept too
    model.forward_intermediates(images())
    assert hooks_left(model) == 0
    assert [block.attn.fused for block in model.encoder.blocks] == [True, False, True]
    with pytest.raises(ValueError, match="img_size"):  # a failing forward cleans up as well
        model.forward_intermediates(images(size=48))
    assert hooks_left(model) == 0
    assert [block.attn.fused for block in model.encoder.blocks] == [True, False, True]


# Step 6: head --------------------------------------------------------------------


def test_token_pooling_reads_only_the_class_token():
    model = tiny_vit().eval()
    with torch.no_grad():
        features = model.forward_features(images())
        scrambled = features.clone()
        scrambled[:, 1:] = torch.randn_like(scrambled[:, 1:])
        torch.testing.assert_close(model.forward_head(scrambled), model.forward_head(features), atol=0, rtol=0)
        torch.testing.assert_close(model.forward_head(features), model.head.fc(features[:, 0]))
        changed = features.clone()
        changed[:, 0] += 1.0
        assert not torch.allclose(model.forward_head(changed), model.forward_head(features))


def test_avg_pooling_ignores_the_class_token():
    model = tiny_vit(pool="avg").eval()
    with torch.no_grad():
        features = model.forward_features(images())
        changed = features.clone()
        changed[:, 0] = torch.randn_like(changed[:, 0])
        torch.testing.assert_close(model.forward_head(changed), model.forward_head(features), atol=0, rtol=0)


def test_pre_logits_reset_classifier_and_no_head():
    model = tiny_vit()
    x = images()
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, model.num_features)
    model.reset_classifier(7)
    assert model(x).shape == (2, 7) and model.num_classes == 7
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features) and model.config.num_classes == 0
    assert torch.equal(tiny_vit(zero_head=True)(x), torch.zeros(2, TINY.num_classes))


# Training ----------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_every_parameter_gets_a_gradient(pool):
    model = tiny_vit(pool=pool)
    loss = nn.functional.cross_entropy(model(images(batch=4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_no_weight_decay_names_the_position_embedding_and_class_token_parameters():
    assert tiny_vit().no_weight_decay() == {"pos_embed.weight", "cls_token"}
    assert tiny_vit(pos_embed="sincos2d").no_weight_decay() == {"cls_token"}
    names = dict(tiny_vit().named_parameters())
    assert all(name in names for name in tiny_vit().no_weight_decay())


@pytest.mark.parametrize(
    "changes, field, value",
    [
        (dict(img_size=30), "patch_size", 8),
        (dict(embed_dim=50), "num_heads", 3),
        (dict(depth=0), "depth", 0),
        (dict(pos_embed="rope"), "pos_embed", "rope"),
        (dict(pool="max"), "pool", "max"),
        (dict(pool="token", class_token=False), "class_token", False),
        (dict(pos_embed="sincos2d", embed_dim=54, num_heads=3), "embed_dim", 54),
        (dict(drop_path_rate=1.0), "drop_path_rate", 1.0),
        (dict(heads=4), "field", "heads"),
    ],
)
def test_a_bad_config_is_refused_in_one_line_naming_field_and_value(changes, field, value):
    with pytest.raises(ConfigError) as error:
        VisionTransformer(TINY.replace(**changes))
    assert (error.value.field_name, error.value.value) == (field, value)
    message = str(error.value)
    assert f"{field}={value!r}" in message and "allowed" in message and "\n" not in message
