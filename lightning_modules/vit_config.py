"""The ViT's constructor arguments, listed once (torch-free).

`VisionTransformer(config)` builds from it, the model registry
(`lightning_modules.catalog`) names nets by it, `vit_timm.timm_config` reads a
timm ViT into it, and a run spec's architecture overrides are checked
against it before any work starts (no torch import).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, get_args

PosEmbedKind = Literal["learn", "sincos2d", "none"]
PoolKind = Literal["token", "avg"]
POS_EMBED_KINDS: tuple[str, ...] = get_args(PosEmbedKind)
POOLS: tuple[str, ...] = get_args(PoolKind)
# The fields a run spec may override: the choices the ViT paper's ablations vary.
ARCH_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "pos_embed", "pool", "class_token")


class ConfigError(ValueError):
    """A config field has a value that is not allowed; str() is one line naming field, value and what is allowed."""

    def __init__(self, field_name: str, value: Any, allowed: str) -> None:
        self.field_name, self.value, self.allowed = field_name, value, allowed
        super().__init__(f"invalid {field_name}={value!r} (allowed: {allowed})")


@dataclass(frozen=True)
class ViTConfig:
    """A Vision Transformer's architecture and regularisation (see `VisionTransformer`).

    Attributes:
        img_size: side of the (square) input image, divisible by `patch_size`.
        patch_size: P.
        in_chans: C.
        num_classes: classes of the head; 0 for no head.
        embed_dim: D, divisible by `num_heads` (and by 4 for "sincos2d").
        depth: number of Transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        qkv_bias: a bias in the query/key/value projection.
        drop_rate: dropout after the position embedding and the blocks' dense layers.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth of the last block (0 at the first).
        pos_embed: "learn" | "sincos2d" | "none".
        pool: "token" (the class token's output) | "avg" (mean of the patch tokens).
        class_token: prepend a class token (required by pool="token").
        zero_head: initialise the classifier to zero (big_vision) instead of trunc-normal.

    Raises:
        ConfigError: on construction, for the first field with a value that is not allowed.
    """

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    pos_embed: PosEmbedKind = "learn"
    pool: PoolKind = "token"
    class_token: bool = True
    zero_head: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def replace(self, **changes: Any) -> "ViTConfig":
        """A copy with `changes` (validated); an unknown name is a ConfigError."""
        known = {f.name for f in dataclasses.fields(self)}
        for name in changes:
            if name not in known:
                raise ConfigError("field", name, "one of " + ", ".join(sorted(known)))
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for result.json)."""
        return dataclasses.asdict(self)

    @property
    def num_patches(self) -> int:
        """N = (img_size / patch_size)²."""
        return (self.img_size // self.patch_size) ** 2

    def validate(self) -> None:
        """Raise ConfigError for the first field whose value is not allowed."""

        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(name, getattr(self, name), allowed)

        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads"):
            need(is_int(getattr(self, name)) and getattr(self, name) >= 1, name, "an integer >= 1")
        need(is_int(self.in_chans) and self.in_chans >= 1, "in_chans", "an integer >= 1")
        need(is_int(self.num_classes) and self.num_classes >= 0, "num_classes", "an integer >= 0 (0: no head)")
        need(self.img_size % self.patch_size == 0, "patch_size", f"a divisor of img_size={self.img_size}")
        need(self.embed_dim % self.num_heads == 0, "num_heads", f"a divisor of embed_dim={self.embed_dim}")
        need(isinstance(self.mlp_ratio, (int, float)) and not isinstance(self.mlp_ratio, bool)
             and self.mlp_ratio > 0, "mlp_ratio", "a number > 0")
        need(isinstance(self.qkv_bias, bool), "qkv_bias", "true | false")
        for name in ("drop_rate", "attn_drop_rate", "drop_path_rate"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1,
                 name, "a number in [0, 1)")
        need(self.pos_embed in POS_EMBED_KINDS, "pos_embed", " | ".join(POS_EMBED_KINDS))
        need(self.pos_embed != "sincos2d" or self.embed_dim % 4 == 0, "embed_dim",
             "a multiple of 4 with pos_embed=sincos2d")
        need(self.pool in POOLS, "pool", " | ".join(POOLS))
        need(isinstance(self.class_token, bool), "class_token", "true | false")
        need(self.pool != "token" or self.class_token, "class_token", "true with pool=token (it reads the class token)")
        need(isinstance(self.zero_head, bool), "zero_head", "true | false")
