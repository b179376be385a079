"""The Vision Transformer (Dosovitskiy et al., 2021), written as the paper's six steps.

1. `Patchify`: cut the image into N = HW/P² patches, each flattened to a P²·C vector.
2. `PatchProjection`: a linear map E of each patch vector to a D-dim token.
3. `PositionEmbedding`: add E_pos, one D-dim vector per position.
4. `prepend_class_token`: put a learned class token at position 0 (Eq. 1).
5. `Encoder`: pre-norm Transformer blocks (attention + MLP), then a LayerNorm.
6. `ClassifierHead`: a linear classifier on the class token's output.

`VisionTransformer.forward_features` runs steps 1-5 in that order and
`forward_head` is step 6. The weights are interchangeable with timm's
`VisionTransformer` (`VisionTransformer.from_timm`, `load_timm_state_dict`):
the same weights give the same logits, which is how ImageNet weights reach
this model and how it is tested.

Shapes: B batch, C channels, H x W image, P patch size, N = HW/P² patches,
D embedding dim, T = N + 1 tokens (N without a class token), h heads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    import timm.models.vision_transformer

PosEmbedKind = Literal["learn", "sincos2d", "none"]
PoolKind = Literal["token", "avg"]
POS_EMBED_KINDS = ("learn", "sincos2d", "none")
POOLS = ("token", "avg")
LAYER_NORM_EPS = 1e-6  # as in big_vision and timm


# Step 1: image -> patches ---------------------------------------------------


class Patchify(nn.Module):
    """Step 1: cut an image into non-overlapping P x P patches, each one flattened.

    Patches are numbered row by row over the (H/P, W/P) grid. Each patch vector
    is laid out as (C, P, P), the layout of a Conv2d weight (D, C, P, P), so
    that step 2 equals timm's patch embedding, a Conv2d with kernel = stride = P.
    """

    def __init__(self, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size

    def forward(self, images: Tensor) -> Tensor:
        """Cuts images into patch vectors.

        Args:
            images: (B, C, H, W), H and W divisible by P.

        Returns:
            (B, N, C*P*P) patch vectors, N = (H/P) * (W/P).
        """
        B, C, H, W = images.shape
        P = self.patch_size
        if H % P or W % P:
            raise ValueError(f"image size {H}x{W} must be divisible by patch_size={P}")
        x = images.reshape(B, C, H // P, P, W // P, P)  # (B, C, H/P, P, W/P, P)
        x = x.permute(0, 2, 4, 1, 3, 5)  # (B, H/P, W/P, C, P, P)
        return x.reshape(B, (H // P) * (W // P), C * P * P)  # (B, N, C*P*P)


def unpatchify(patches: Tensor, patch_size: int, image_size: tuple[int, int]) -> Tensor:
    """The inverse of `Patchify`: reassemble patch vectors into images.

    Args:
        patches: (B, N, C*P*P), as `Patchify` returns them.
        patch_size: P.
        image_size: (H, W) of the original images.

    Returns:
        (B, C, H, W) images.
    """
    H, W = image_size
    P = patch_size
    B, _, patch_dim = patches.shape
    C = patch_dim // (P * P)
    x = patches.reshape(B, H // P, W // P, C, P, P)  # (B, H/P, W/P, C, P, P)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, H/P, P, W/P, P)
    return x.reshape(B, C, H, W)  # (B, C, H, W)


# Step 2: patches -> tokens --------------------------------------------------


class PatchProjection(nn.Module):
    """Step 2: the linear projection E of Eq. 1, patch vector -> D-dim token.

    Equal to `nn.Conv2d(C, D, kernel_size=P, stride=P)` with weight
    `proj.weight.reshape(D, C, P, P)`. It keeps PyTorch's default `nn.Linear`
    init, which is the distribution of the default Conv2d init that timm's
    patch embedding keeps (both draw from the fan-in C*P*P).
    """

    def __init__(self, patch_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(patch_dim, embed_dim)

    def forward(self, patches: Tensor) -> Tensor:
        """Maps (B, N, C*P*P) patch vectors to (B, N, D) tokens."""
        return self.proj(patches)  # (B, N, D)


# Step 3: position embedding -------------------------------------------------


def sincos_2d_table(grid_size: tuple[int, int], dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed 2-D sine-cosine position embedding (MoCo v3, big_vision).

    A quarter of the channels each holds sin(x·ω), cos(x·ω), sin(y·ω), cos(y·ω)
    for the patch's column x and row y, with ω = temperature^(-k / (D/4)).

    Args:
        grid_size: (rows, columns) of the patch grid.
        dim: D, divisible by 4.
        temperature: the longest wavelength.

    Returns:
        (rows * columns, D), one row per patch in `Patchify`'s order.
    """
    rows, cols = grid_size
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")  # (rows, cols) each
    omega = temperature ** -(torch.arange(dim // 4) / (dim // 4))  # (D/4,)
    x = x.reshape(-1, 1) * omega  # (N, D/4)
    y = y.reshape(-1, 1) * omega  # (N, D/4)
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)  # (N, D)


class PositionEmbedding(nn.Module):
    """Step 3: E_pos, one D-dim vector per token position, added to the tokens.

    The table `weight` (1, num_prefix_tokens + N, D) has a row for the class
    token too (row 0, Eq. 1); `forward` adds the patch rows to the patch tokens
    and step 4 adds row 0 to the class token (`class_token_row`).

    Kinds:
        "learn": a learned table, trunc-normal(std .02) init (the paper's choice).
        "sincos2d": the fixed `sincos_2d_table` (a buffer, not trained, not in the
            state dict); the class token's row is zeros.
        "none": no position information; the tokens pass unchanged.
    """

    def __init__(
        self, kind: PosEmbedKind, grid_size: tuple[int, int], embed_dim: int, num_prefix_tokens: int
    ) -> None:
        super().__init__()
        self.kind = kind
        self.num_prefix_tokens = num_prefix_tokens
        self.num_patches = grid_size[0] * grid_size[1]
        self.weight: Tensor | None
        if kind == "learn":
            self.weight = nn.Parameter(torch.empty(1, num_prefix_tokens + self.num_patches, embed_dim))
            nn.init.trunc_normal_(self.weight, std=0.02)
        elif kind == "sincos2d":
            prefix_rows = torch.zeros(num_prefix_tokens, embed_dim)  # (num_prefix_tokens, D)
            table = torch.cat([prefix_rows, sincos_2d_table(grid_size, embed_dim)])  # (T, D)
            self.register_buffer("weight", table[None], persistent=False)  # (1, T, D)
        else:
            self.weight = None

    def class_token_row(self) -> Tensor | None:
        """E_pos[0], the class token's row: (1, 1, D); None for kind "none" or no class token."""
        if self.weight is None or self.num_prefix_tokens == 0:
            return None
        return self.weight[:, :1]  # (1, 1, D)

    def forward(self, patch_tokens: Tensor) -> Tensor:
        """Adds the patch rows of E_pos: (B, N, D) -> (B, N, D)."""
        if self.weight is None:
            return patch_tokens
        if patch_tokens.shape[1] != self.num_patches:
            raise ValueError(
                f"got {patch_tokens.shape[1]} patches but the position embedding has "
                f"{self.num_patches}: the image size must be the model's img_size"
            )
        return patch_tokens + self.weight[:, self.num_prefix_tokens :]  # (B, N, D)


# Step 4: class token --------------------------------------------------------


def prepend_class_token(patch_tokens: Tensor, cls_token: Tensor | None, cls_pos: Tensor | None) -> Tensor:
    """Step 4: prepend the learned class token at position 0.

    As in the paper's Eq. 1, z_0 = [x_class; x_p E] + E_pos: the class token
    sits at position 0 and gets position embedding row 0, so E_pos has N + 1
    rows. Adding row 0 here and rows 1..N in step 3 is that same sum. (big_vision
    and DeiT-III instead add the class token after the position embedding, with
    no position row of its own; timm calls that `no_embed_class=True`.)

    Args:
        patch_tokens: (B, N, D), position embedding already added.
        cls_token: (1, 1, D), the learned x_class, or None for a model without one.
        cls_pos: (1, 1, D), E_pos row 0, or None without a position embedding.

    Returns:
        (B, 1 + N, D) tokens, the class token first; `patch_tokens` unchanged
        when `cls_token` is None.
    """
    if cls_token is None:
        return patch_tokens  # (B, N, D)
    cls = cls_token if cls_pos is None else cls_token + cls_pos  # (1, 1, D)
    return torch.cat([cls.expand(patch_tokens.shape[0], -1, -1), patch_tokens], dim=1)  # (B, T, D)


# Step 5: Transformer encoder ------------------------------------------------


class DropPath(nn.Module):
    """Stochastic depth (Huang et al., 2016): while training, drop a residual
    branch for a random subset of the samples and scale the rest by 1/keep."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """(B, ...) -> (B, ...), unchanged in eval mode."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, ...)
        return x * mask / keep


class Attention(nn.Module):
    """Multi-head self-attention, computed by `F.scaled_dot_product_attention`.

    With `return_attention=True` the softmax weights are computed explicitly
    and returned too (for attention rollout and attention distance); the output
    is the same.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attends over the tokens.

        Args:
            x: (B, T, D) tokens.
            return_attention: also return the attention weights.

        Returns:
            (B, T, D) outputs; with `return_attention`, also the (B, h, T, T)
            softmax weights, each row summing to 1 (before attention dropout).
        """
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, h, D/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, T, D/h)
        if return_attention:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, h, T, T)
            out = self.attn_drop(attn) @ v  # (B, h, T, D/h)
        else:
            dropout_p = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, h, T, D/h)
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        out = self.proj_drop(self.proj(out))  # (B, T, D)
        return (out, attn) if return_attention else out


class Mlp(nn.Module):
    """The block's MLP: Linear -> GELU -> dropout -> Linear -> dropout."""

    def __init__(self, dim: int, hidden_dim: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        x = self.drop(self.act(self.fc1(x)))  # (B, T, hidden)
        return self.drop(self.fc2(x))  # (B, T, D)


class Block(nn.Module):
    """A pre-norm Transformer block (Eqs. 2-3):
    x = x + MSA(LN(x)); x = x + MLP(LN(x)), each branch under stochastic depth."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop: float,
        attn_drop: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """(B, T, D) -> (B, T, D); with `return_attention`, also (B, h, T, T) weights."""
        if return_attention:
            attended, attn = self.attn(self.norm1(x), return_attention=True)  # (B, T, D), (B, h, T, T)
        else:
            attended = self.attn(self.norm1(x))  # (B, T, D)
        x = x + self.drop_path(attended)  # (B, T, D)
        x = x + self.drop_path(self.mlp(self.norm2(x)))  # (B, T, D)
        return (x, attn) if return_attention else x


class Encoder(nn.Module):
    """Step 5: dropout on the embedded tokens, `depth` pre-norm blocks, a final LayerNorm.

    Stochastic depth grows linearly with depth, from 0 at the first block to
    `drop_path_rate` at the last. `final_norm=False` leaves the LayerNorm to
    the head (pooling "avg", see `ClassifierHead`).
    """

    def __init__(
        self,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_rate: float,
        attn_drop_rate: float,
        drop_path_rate: float,
        final_norm: bool,
    ) -> None:
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        drop_path_rates = torch.linspace(0.0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, rate)
            for rate in drop_path_rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS) if final_norm else nn.Identity()

    def forward(self, tokens: Tensor, return_attention: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Runs the blocks.

        Args:
            tokens: (B, T, D) embedded tokens.
            return_attention: also return each block's attention weights.

        Returns:
            (B, T, D) encoded tokens; with `return_attention`, also a list of
            `depth` (B, h, T, T) attention weights, first block first.
        """
        x = self.drop(tokens)  # (B, T, D)
        attention_maps = []
        for block in self.blocks:
            if return_attention:
                x, attn = block(x, return_attention=True)  # (B, T, D), (B, h, T, T)
                attention_maps.append(attn)
            else:
                x = block(x)  # (B, T, D)
        x = self.norm(x)  # (B, T, D)
        return (x, attention_maps) if return_attention else x


# Step 6: classification head ------------------------------------------------


class ClassifierHead(nn.Module):
    """Step 6: pool the encoded tokens to one vector and classify it linearly.

    pool="token": the class token's output z_L^0 (Eq. 4: y = LN(z_L^0), the LN
        being the encoder's final LayerNorm).
    pool="avg": the mean of the patch tokens' outputs (the class token, if any,
        is left out), then a LayerNorm on the mean. The LayerNorm after pooling
        is what timm does for `global_pool='avg'` (its `fc_norm`, from MAE); the
        encoder has no final LayerNorm then.

    The paper pretrains with an MLP head and fine-tunes with one linear layer;
    this is the linear one.
    """

    def __init__(self, embed_dim: int, num_classes: int, pool: PoolKind, num_prefix_tokens: int) -> None:
        super().__init__()
        self.pool = pool
        self.num_prefix_tokens = num_prefix_tokens
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS) if pool == "avg" else nn.Identity()
        self.fc = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Pools and classifies.

        Args:
            features: (B, T, D) encoder outputs.
            pre_logits: return the pooled (B, D) vector instead of logits.

        Returns:
            (B, num_classes) logits, or (B, D) with `pre_logits`.
        """
        if self.pool == "token":
            pooled = features[:, 0]  # (B, D)
        else:
            pooled = features[:, self.num_prefix_tokens :].mean(dim=1)  # (B, D)
        pooled = self.norm(pooled)  # (B, D)
        return pooled if pre_logits else self.fc(pooled)  # (B, num_classes)


# The model ------------------------------------------------------------------


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al., 2021) with timm's interface and timm's weights.

    `forward_features` reads as steps 1-5, `forward_head` is step 6, and
    `forward(x) = forward_head(forward_features(x))`. Weight init follows timm:
    trunc-normal(std .02) for the encoder's and head's linear layers with zero
    biases, trunc-normal(.02) for a learned position embedding, normal(1e-6)
    for the class token, PyTorch's default for the patch projection.

    Args:
        img_size: side of the (square) input image, divisible by `patch_size`.
        patch_size: P.
        in_chans: C.
        num_classes: classes of the head; 0 for no head (`forward` returns (B, D)).
        embed_dim: D, divisible by `num_heads` (and by 4 for "sincos2d").
        depth: number of Transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        qkv_bias: a bias in the query/key/value projection.
        drop_rate: dropout after the position embedding and after every dense
            layer in the blocks except qkv (the paper's placement; timm's
            `pos_drop_rate` and `proj_drop_rate`). No dropout before the head.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth of the last block (0 at the first).
        pos_embed: "learn", "sincos2d" or "none" (see `PositionEmbedding`).
        pool: "token" or "avg" (see `ClassifierHead`).
        class_token: prepend a class token; required by pool="token", optional
            with pool="avg" (timm's default keeps it, unused by the head).
        zero_head: initialise the classifier to zero (big_vision), not trunc-normal.

    Raises:
        ValueError: an invalid combination, named by field, value and what is allowed.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        pos_embed: PosEmbedKind = "learn",
        pool: PoolKind = "token",
        class_token: bool = True,
        zero_head: bool = False,
    ) -> None:
        super().__init__()
        _check_config(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            num_heads=num_heads,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            pos_embed=pos_embed,
            pool=pool,
            class_token=class_token,
        )
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_prefix_tokens = 1 if class_token else 0
        self.zero_head = zero_head

        self.patchify = Patchify(patch_size)
        self.patch_proj = PatchProjection(in_chans * patch_size * patch_size, embed_dim)
        self.pos_embed = PositionEmbedding(pos_embed, self.grid_size, embed_dim, self.num_prefix_tokens)
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim)) if class_token else None
        self.encoder = Encoder(
            embed_dim,
            depth,
            num_heads,
            mlp_ratio,
            qkv_bias,
            drop_rate,
            attn_drop_rate,
            drop_path_rate,
            final_norm=pool == "token",
        )
        self.head = ClassifierHead(embed_dim, num_classes, pool, self.num_prefix_tokens)

        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.encoder.modules():
            if isinstance(module, nn.Linear):
                _init_linear(module, zero=False)
        if isinstance(self.head.fc, nn.Linear):
            _init_linear(self.head.fc, zero=zero_head)

    def forward_features(self, images: Tensor) -> Tensor:
        """Steps 1-5: images -> encoded tokens.

        Args:
            images: (B, C, H, W).

        Returns:
            (B, T, D) encoder outputs (after the final LayerNorm with pool="token";
            with pool="avg" the LayerNorm comes after pooling, as in timm).
        """
        patches = self.patchify(images)  # 1. (B, N, P*P*C)
        patch_tokens = self.patch_proj(patches)  # 2. (B, N, D)
        patch_tokens = self.pos_embed(patch_tokens)  # 3. (B, N, D), + E_pos[1:]
        cls_pos = self.pos_embed.class_token_row()  # (1, 1, D) or None
        tokens = prepend_class_token(patch_tokens, self.cls_token, cls_pos)  # 4. (B, T, D)
        return self.encoder(tokens)  # 5. (B, T, D)

    def forward_head(self, features: Tensor, pre_logits: bool = False) -> Tensor:
        """Step 6: (B, T, D) features -> (B, num_classes) logits, or (B, D) with `pre_logits`."""
        return self.head(features, pre_logits=pre_logits)

    def forward(self, images: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, num_classes) logits."""
        return self.forward_head(self.forward_features(images))

    def attention_maps(self, images: Tensor) -> list[Tensor]:
        """Each block's softmax attention weights, for rollout and attention distance.

        Args:
            images: (B, C, H, W).

        Returns:
            `depth` tensors (B, h, T, T), first block first; row i is how token i
            (0 = the class token, if any) attends to every token. Differentiable;
            call under `torch.no_grad()` when only the values are wanted.
        """
        patch_tokens = self.pos_embed(self.patch_proj(self.patchify(images)))  # 1-3. (B, N, D)
        cls_pos = self.pos_embed.class_token_row()  # (1, 1, D) or None
        tokens = prepend_class_token(patch_tokens, self.cls_token, cls_pos)  # 4. (B, T, D)
        _, attention = self.encoder(tokens, return_attention=True)
        return attention

    def get_classifier(self) -> nn.Module:
        """The final linear layer (timm's interface)."""
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the classifier with a fresh one for `num_classes` (0: no classifier)."""
        self.num_classes = num_classes
        self.head.fc = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head.fc, nn.Linear):
            _init_linear(self.head.fc, zero=self.zero_head)
        self.head.fc.to(self.patch_proj.proj.weight.device, self.patch_proj.proj.weight.dtype)

    def no_weight_decay(self) -> set[str]:
        """Names of the position embedding and class token parameters (as timm's
        `no_weight_decay`), as full parameter names; biases and norms are 1-D."""
        names = {name for name, _ in self.named_parameters()}
        return {"pos_embed.weight", "cls_token"} & names

    # timm interoperability --------------------------------------------------

    @classmethod
    def from_timm(
        cls,
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
            drop_rate: see `VisionTransformer`.
            attn_drop_rate: see `VisionTransformer`.
            drop_path_rate: see `VisionTransformer`.

        Returns:
            A float32 model on the CPU, in training mode.
        """
        config = timm_config(model)
        if img_size is not None:
            config["img_size"] = img_size
        rates = dict(drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
        ours = cls(**config, **rates)
        ours.load_timm_state_dict(model.state_dict())
        return ours

    def load_timm_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Loads a timm ViT state dict, e.g. a pretrained checkpoint file.

        Keys are renamed (`_timm_key`), the patch embedding's conv weight
        (D, C, P, P) becomes the linear weight (D, C*P*P), and the position
        embedding is resampled (`timm.layers.resample_abs_pos_embed`, bicubic)
        when the checkpoint's patch grid differs from this model's. To fine-tune
        with another number of classes, build with the checkpoint's
        `num_classes`, load, then `reset_classifier`.

        Args:
            state_dict: timm `VisionTransformer` parameter names -> tensors.

        Raises:
            ValueError: a key this model lacks, a key missing, or a shape that differs.
        """
        from timm.layers import resample_abs_pos_embed

        num_positions = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        converted = {}
        for key, value in state_dict.items():
            if key == "patch_embed.proj.weight":
                value = value.reshape(value.shape[0], -1)  # (D, C, P, P) -> (D, C*P*P)
            elif key == "pos_embed" and value.shape[1] != num_positions:
                num_prefix_tokens = 1 if "cls_token" in state_dict else 0
                value = resample_abs_pos_embed(  # (1, prefix + N_ckpt, D) -> (1, prefix + N, D)
                    value, new_size=list(self.grid_size), num_prefix_tokens=num_prefix_tokens
                )
            converted[_timm_key(key)] = value
        own = self.state_dict()
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
        self.load_state_dict(converted)


def _init_linear(linear: nn.Linear, zero: bool) -> None:
    """timm's ViT init for a linear layer: trunc-normal(std .02) weight (or zeros), zero bias."""
    if zero:
        nn.init.zeros_(linear.weight)
    else:
        nn.init.trunc_normal_(linear.weight, std=0.02)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def _check_config(
    *,
    img_size: int,
    patch_size: int,
    embed_dim: int,
    num_heads: int,
    drop_rate: float,
    attn_drop_rate: float,
    drop_path_rate: float,
    pos_embed: str,
    pool: str,
    class_token: bool,
) -> None:
    """Raises ValueError, naming the field, its value and what is allowed, for a bad config."""
    if pos_embed not in POS_EMBED_KINDS:
        raise ValueError(f"pos_embed={pos_embed!r} is not one of {POS_EMBED_KINDS}")
    if pool not in POOLS:
        raise ValueError(f"pool={pool!r} is not one of {POOLS}")
    if pool == "token" and not class_token:
        raise ValueError("class_token=False needs pool='avg'; pool='token' reads the class token")
    if patch_size < 1 or img_size % patch_size:
        raise ValueError(f"img_size={img_size} must be divisible by patch_size={patch_size}")
    if num_heads < 1 or embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
    if pos_embed == "sincos2d" and embed_dim % 4:
        raise ValueError(f"embed_dim={embed_dim} must be divisible by 4 for pos_embed='sincos2d'")
    rates = {"drop_rate": drop_rate, "attn_drop_rate": attn_drop_rate, "drop_path_rate": drop_path_rate}
    for name, rate in rates.items():
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{name}={rate} must be in [0, 1)")


_TIMM_KEY_PREFIXES = (  # timm name prefix -> ours
    ("patch_embed.proj.", "patch_proj.proj."),
    ("pos_embed", "pos_embed.weight"),
    ("blocks.", "encoder.blocks."),
    ("norm.", "encoder.norm."),
    ("fc_norm.", "head.norm."),
    ("head.", "head.fc."),
)


def _timm_key(key: str) -> str:
    """Our parameter name for a timm ViT parameter name (cls_token is shared)."""
    for timm_prefix, our_prefix in _TIMM_KEY_PREFIXES:
        if key.startswith(timm_prefix):
            return our_prefix + key[len(timm_prefix) :]
    return key


def timm_config(model: timm.models.vision_transformer.VisionTransformer) -> dict[str, Any]:
    """Our constructor arguments for a timm ViT's architecture.

    Args:
        model: a timm `VisionTransformer`.

    Returns:
        img_size, patch_size, in_chans, num_classes, embed_dim, depth,
        num_heads, mlp_ratio, qkv_bias, pos_embed, pool, class_token.

    Raises:
        ValueError: a configuration `VisionTransformer.from_timm` does not support.
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
    return dict(
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
