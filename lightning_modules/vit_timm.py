"""timm interop: timm's ViT weights in our `VisionTransformer`, giving the same logits.

This is how ImageNet weights reach the transparent model (`models.build_model`
with `pretrained=True`) and how the model is tested against timm.

- `timm_config(model)`: the `ViTConfig` of a timm ViT (or ValueError naming
  what we cannot reproduce).
- `from_timm(model)`: our model with that config and a copy of its weights.
- `load_timm_state_dict(vit, state_dict)`: load a timm ViT checkpoint into ours.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import Tensor, nn

from lightning_modules.vit import LAYER_NORM_EPS, VisionTransformer
from lightning_modules.vit_config import POOLS, ViTConfig

if TYPE_CHECKING:
    import timm.models.vision_transformer

_TIMM_KEY_PREFIXES = (  # timm name prefix -> ours
    ("patch_embed.proj.", "patch_proj.proj."),
    ("pos_embed", "pos_embed.weight"),
    ("blocks.", "encoder.blocks."),
    ("norm.", "encoder.norm."),
    ("fc_norm.", "head.norm."),
    ("head.", "head.fc."),
)


def from_timm(
    model: timm.models.vision_transformer.VisionTransformer,
    *,
    img_size: int | None = None,
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> VisionTransformer:
    """Builds our ViT with `model`'s architecture and a copy of its weights.

    Supported timm configurations: a plain ViT (`Block`, `Attention`, `Mlp`
    with exact GELU, LayerNorm eps 1e-6, square images and patches) with a
    class token or none, a learned position embedding or none, the class
    token counted in the position embedding (`no_embed_class=False`), and
    `global_pool='token'` (final norm) or `'avg'` (its default `fc_norm`).
    Others (register tokens, `no_embed_class`, `pre_norm`, layer scale,
    qk-norm, other pools or norm placements) raise ValueError.

    Dropout, drop path and patch dropout are training choices, not weights:
    they are not read from `model`; pass the rates wanted.

    Args:
        model: a timm `VisionTransformer`.
        img_size: build for another image size (the position embedding is
            resampled bicubically); default: `model`'s.
        drop_rate: see `ViTConfig`.
        attn_drop_rate: see `ViTConfig`.
        drop_path_rate: see `ViTConfig`.

    Returns:
        A float32 model on the CPU, in training mode.
    """
    config = timm_config(model).replace(
        drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate
    )
    if img_size is not None:
        config = config.replace(img_size=img_size)
    vit = VisionTransformer(config)
    load_timm_state_dict(vit, model.state_dict())
    return vit


def load_timm_state_dict(vit: VisionTransformer, state_dict: Mapping[str, Tensor]) -> None:
    """Loads a timm ViT state dict into `vit`, e.g. a pretrained checkpoint file.

    Keys are renamed (`_timm_key`), the patch embedding's conv weight
    (D, C, P, P) becomes the linear weight (D, C*P*P), and the position
    embedding is resampled (`timm.layers.resample_abs_pos_embed`, bicubic)
    when the checkpoint's patch grid differs from `vit`'s. To fine-tune with
    another number of classes, build with the checkpoint's `num_classes`,
    load, then `vit.reset_classifier`.

    Args:
        vit: our model, built with the checkpoint's architecture.
        state_dict: timm `VisionTransformer` parameter names -> tensors.

    Raises:
        ValueError: a key `vit` lacks, a key missing, or a shape that differs.
    """
    from timm.layers import resample_abs_pos_embed

    num_positions = vit.num_prefix_tokens + vit.grid_size[0] * vit.grid_size[1]
    converted = {}
    for key, value in state_dict.items():
        if key == "patch_embed.proj.weight":
            value = value.reshape(value.shape[0], -1)  # (D, C, P, P) -> (D, C*P*P)
        elif key == "pos_embed" and value.shape[1] != num_positions:
            num_prefix_tokens = 1 if "cls_token" in state_dict else 0
            value = resample_abs_pos_embed(  # (1, prefix + N_ckpt, D) -> (1, prefix + N, D)
                value, new_size=list(vit.grid_size), num_prefix_tokens=num_prefix_tokens
            )
        converted[_timm_key(key)] = value
    own = vit.state_dict()
    unexpected = sorted(converted.keys() - own.keys())
    missing = sorted(own.keys() - converted.keys())
    if unexpected or missing:
        raise ValueError(f"state_dict does not fit: unexpected keys {unexpected}, missing keys {missing}")
    wrong_shapes = [
        f"{key} {tuple(value.shape)} != {tuple(own[key].shape)}"
        for key, value in converted.items()
        if value.shape != own[key].shape
    ]
    if wrong_shapes:
        raise ValueError(f"state_dict shapes do not fit this model: {', '.join(wrong_shapes)}")
    vit.load_state_dict(converted)


def _timm_key(key: str) -> str:
    """Our parameter name for a timm ViT parameter name (cls_token is shared)."""
    for timm_prefix, our_prefix in _TIMM_KEY_PREFIXES:
        if key.startswith(timm_prefix):
            return our_prefix + key[len(timm_prefix) :]
    return key


def timm_config(model: timm.models.vision_transformer.VisionTransformer) -> ViTConfig:
    """The `ViTConfig` of a timm ViT's architecture (dropout rates left at 0).

    Args:
        model: a timm `VisionTransformer`.

    Returns:
        Its img_size, patch_size, in_chans, num_classes, embed_dim, depth,
        num_heads, mlp_ratio, qkv_bias, pos_embed, pool and class_token.

    Raises:
        ValueError: a configuration `from_timm` does not support, named.
    """
    from timm.layers import Mlp as TimmMlp
    from timm.layers import PatchEmbed
    from timm.layers.activations import GELU as TimmGELU
    from timm.models.vision_transformer import Attention as TimmAttention
    from timm.models.vision_transformer import Block as TimmBlock
    from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

    def require(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(f"unsupported timm ViT: {what}")

    require(isinstance(model, TimmVisionTransformer), f"{type(model).__name__}, allowed VisionTransformer")
    patch_embed = model.patch_embed
    require(type(patch_embed) is PatchEmbed, f"patch embedding {type(patch_embed).__name__}, not PatchEmbed")
    (img_h, img_w), (patch_h, patch_w) = patch_embed.img_size, patch_embed.patch_size
    require(img_h == img_w, f"img_size={patch_embed.img_size}, only square images")
    require(patch_h == patch_w, f"patch_size={patch_embed.patch_size}, only square patches")
    require(patch_embed.proj.bias is not None, "pre_norm=True (patch embedding without bias)")
    require(isinstance(patch_embed.norm, nn.Identity), "embed_norm_layer is set")
    require(model.reg_token is None, f"reg_tokens={model.num_reg_tokens}, allowed 0")
    require(model.pos_embed is None or not model.no_embed_class, "no_embed_class=True, allowed False")
    require(isinstance(model.norm_pre, nn.Identity), "pre_norm=True, allowed False")
    pool = model.global_pool
    require(pool in POOLS and model.attn_pool is None, f"global_pool={pool!r}, allowed {POOLS}")
    require(not model.pool_include_prefix, "pool_include_prefix=True, allowed False")
    norm_after_pool = pool == "avg"
    require(
        isinstance(model.norm, nn.LayerNorm) != norm_after_pool
        and isinstance(model.fc_norm, nn.LayerNorm) == norm_after_pool,
        f"final_norm/fc_norm with global_pool={pool!r}: allowed norm for 'token', fc_norm for 'avg'",
    )
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            require(module.eps == LAYER_NORM_EPS, f"{name} eps={module.eps}, allowed {LAYER_NORM_EPS}")
            require(module.weight is not None and module.bias is not None, f"{name} without weight or bias")
    qkv_bias = model.blocks[0].attn.qkv.bias is not None
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        exact_gelu = type(mlp.act) is TimmGELU or (type(mlp.act) is nn.GELU and mlp.act.approximate == "none")
        require(type(block) is TimmBlock, f"blocks.{i} is {type(block).__name__}, allowed Block")
        require(isinstance(block.ls1, nn.Identity), "init_values (layer scale), allowed None")
        require(isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm), "norm_layer")
        require(type(attn) is TimmAttention, f"blocks.{i}.attn is {type(attn).__name__}, allowed Attention")
        require(attn.attn_dim == model.embed_dim, f"attn_head_dim={attn.head_dim}, allowed D/num_heads")
        require(isinstance(attn.q_norm, nn.Identity), "qk_norm=True, allowed False")
        require(isinstance(attn.norm, nn.Identity), "scale_attn_norm=True, allowed False")
        require(getattr(attn, "gate", None) is None, "gated attention")
        require((attn.qkv.bias is not None) == qkv_bias, "qkv_bias differs between blocks")
        require(type(mlp) is TimmMlp and exact_gelu, f"blocks.{i}.mlp is not Mlp with exact GELU")
        require(isinstance(mlp.norm, nn.Identity), "scale_mlp_norm=True, allowed False")
        require(attn.proj.bias is not None and mlp.fc1.bias is not None, "proj_bias=False, allowed True")
    require(isinstance(model.head, nn.Linear | nn.Identity), f"head is {type(model.head).__name__}")
    first = model.blocks[0]
    return ViTConfig(
        img_size=img_h,
        patch_size=patch_h,
        in_chans=patch_embed.proj.in_channels,
        num_classes=model.head.out_features if isinstance(model.head, nn.Linear) else 0,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=first.attn.num_heads,
        mlp_ratio=first.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=qkv_bias,
        pos_embed="none" if model.pos_embed is None else "learn",
        pool=pool,
        class_token=model.cls_token is not None,
    )
