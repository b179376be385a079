"""The Vision Transformer (Dosovitskiy et al., 2021), written as the paper's six steps.

1. `Patchify`: cut the image into N = HW/P² patches, each flattened to a P²·C vector.
2. `PatchProjection`: a linear map E of each patch vector to a D-dim token.
3. `PositionEmbedding`: add E_pos, one D-dim vector per position.
4. `prepend_class_token`: put a learned class token at position 0 (Eq. 1).
5. `Encoder`: pre-norm Transformer blocks (attention + MLP), then a LayerNorm.
6. `ClassifierHead`: a linear classifier on the class token's output.

`VisionTransformer.forward_features` runs steps 1-5 in that order and
`forward_head` is step 6. `VisionTransformer.forward_intermediates` returns
what each step produced, attention weights included, from one forward pass.
This file holds the model only; `lightning_modules.vit_timm` copies timm's
weights into it (the same weights give the same logits).

Shapes: B batch, C channels, H x W image, P patch size, N = HW/P² patches,
D embedding dim, T = N + 1 tokens (N without a class token), h heads.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_modules.vit_config import PoolKind, PosEmbedKind, ViTConfig

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
    """Multi-head self-attention.

    Two paths give the same output (up to float rounding):
    - `fused=True` (the default, used for training): one call to
      `F.scaled_dot_product_attention`, which never materialises the weights.
    - `fused=False`: the softmax weights softmax(q kᵀ / √(D/h)) are computed
      explicitly by the `softmax` module, so that a forward hook on it sees
      them (`VisionTransformer.forward_intermediates` does this).

    Attributes:
        fused: which path `forward` takes.
        softmax: the explicit path's softmax over the keys; its output is the
            (B, h, T, T) attention weights, each row summing to 1.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused = True
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.softmax = nn.Softmax(dim=-1)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        """Attends over the tokens: (B, T, D) -> (B, T, D)."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim)  # (B, T, 3, h, D/h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, h, T, D/h)
        if self.fused:
            dropout_p = self.attn_drop.p if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, h, T, D/h)
        else:
            scores = (q * self.scale) @ k.transpose(-2, -1)  # (B, h, T, T)
            weights = self.softmax(scores)  # (B, h, T, T), rows sum to 1
            out = self.attn_drop(weights) @ v  # (B, h, T, D/h)
        out = out.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj_drop(self.proj(out))  # (B, T, D)


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

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        x = x + self.drop_path(self.attn(self.norm1(x)))  # (B, T, D), Eq. 2
        return x + self.drop_path(self.mlp(self.norm2(x)))  # (B, T, D), Eq. 3


class Encoder(nn.Module):
    """Step 5: dropout on the embedded tokens, `depth` pre-norm blocks, a final LayerNorm.

    Stochastic depth grows linearly with depth, from 0 at the first block to
    `drop_path_rate` at the last. With pool="avg" there is no final LayerNorm:
    the head normalises after pooling (see `ClassifierHead`).
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.drop = nn.Dropout(config.drop_rate)
        # Python floats, computed on the CPU so that the model can also be built on the meta device.
        drop_path_rates = torch.linspace(0.0, config.drop_path_rate, config.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList(
            Block(
                config.embed_dim,
                config.num_heads,
                config.mlp_ratio,
                config.qkv_bias,
                config.drop_rate,
                config.attn_drop_rate,
                drop_path,
            )
            for drop_path in drop_path_rates
        )
        final_norm = config.pool == "token"
        self.norm = nn.LayerNorm(config.embed_dim, eps=LAYER_NORM_EPS) if final_norm else nn.Identity()

    def forward(self, tokens: Tensor) -> Tensor:
        """Encodes (B, T, D) embedded tokens to (B, T, D) outputs."""
        x = self.drop(tokens)  # (B, T, D)
        for block in self.blocks:
            x = block(x)  # (B, T, D)
        return self.norm(x)  # (B, T, D)


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
    for the class token, PyTorch's default for the patch projection. Dropout
    (`drop_rate`) acts after the position embedding and after every dense
    layer in the blocks except qkv (the paper's placement; timm's
    `pos_drop_rate` and `proj_drop_rate`), not before the head.

    Args:
        config: the architecture and regularisation; `ViTConfig` validates
            itself, so a bad value fails before anything is built.

    Attributes:
        config: what the model was built from (`num_classes` follows
            `reset_classifier`).
        num_classes, num_features, embed_dim: timm's interface (num_features = embed_dim = D).
        grid_size: (H/P, W/P), the patch grid.
        num_prefix_tokens: 1 with a class token, else 0.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        self.config = config
        self.num_features = self.embed_dim = config.embed_dim
        self.grid_size = (config.img_size // config.patch_size, config.img_size // config.patch_size)
        self.num_prefix_tokens = 1 if config.class_token else 0

        patch_dim = config.in_chans * config.patch_size * config.patch_size
        self.patchify = Patchify(config.patch_size)
        self.patch_proj = PatchProjection(patch_dim, config.embed_dim)
        self.pos_embed = PositionEmbedding(config.pos_embed, self.grid_size, config.embed_dim, self.num_prefix_tokens)
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.embed_dim)) if config.class_token else None
        self.encoder = Encoder(config)
        self.head = ClassifierHead(config.embed_dim, config.num_classes, config.pool, self.num_prefix_tokens)

        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.encoder.modules():
            if isinstance(module, nn.Linear):
                _init_linear(module, zero=False)
        if isinstance(self.head.fc, nn.Linear):
            _init_linear(self.head.fc, zero=config.zero_head)

    @property
    def num_classes(self) -> int:
        """Outputs of the classifier; 0 without one."""
        return self.config.num_classes

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

    def forward_intermediates(self, images: Tensor) -> dict[str, Tensor]:
        """One forward pass that also returns what each step produced.

        Forward hooks record the tensors as `forward` computes them, with every
        `Attention` on its explicit path so that its weights exist; the hooks
        are removed and each `Attention.fused` restored afterwards, also when
        the forward raises. Nothing is detached: gradients flow to and through
        every entry (attention rollout, Grad-CAM); call under `torch.no_grad()`
        when only the values are wanted. (timm's method of the same name
        returns a list of block outputs instead.)

        Args:
            images: (B, C, H, W).

        Returns:
            In the order computed:
            "patches": (B, N, P*P*C), step 1.
            "patch_tokens": (B, N, D), step 2 (before the position embedding).
            "tokens": (B, T, D), the encoder's input z_0 after steps 3-4 (Eq. 1).
            "blocks.{i}": (B, T, D), the output of block i, for i < depth.
            "attention.{i}": (B, h, T, T), block i's softmax attention weights
                (before attention dropout); row t is how token t (0 = the class
                token, if any) attends to every token, and sums to 1.
            "features": (B, T, D), `forward_features`' output.
            "pre_logits": (B, D), the pooled vector the classifier reads.
            "logits": (B, num_classes), `forward`'s output.
        """
        outputs_of: dict[str, nn.Module] = {"patches": self.patchify, "patch_tokens": self.patch_proj}
        for i, block in enumerate(self.encoder.blocks):
            outputs_of[f"blocks.{i}"] = block
            outputs_of[f"attention.{i}"] = block.attn.softmax
        outputs_of["features"] = self.encoder
        inputs_of: dict[str, nn.Module] = {"tokens": self.encoder, "pre_logits": self.head.fc}

        recorded: dict[str, Tensor] = {}

        def record_output(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
            def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
                recorded[name] = output

            return hook

        def record_input(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
            def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
                recorded[name] = args[0]

            return hook

        handles: list[RemovableHandle] = []
        attentions = [block.attn for block in self.encoder.blocks]
        was_fused = [attention.fused for attention in attentions]
        try:
            handles += [module.register_forward_hook(record_output(name)) for name, module in outputs_of.items()]
            handles += [module.register_forward_pre_hook(record_input(name)) for name, module in inputs_of.items()]
            for attention in attentions:
                attention.fused = False
            logits = self(images)  # (B, num_classes)
        finally:
            for handle in handles:
                handle.remove()
            for attention, fused in zip(attentions, was_fused):
                attention.fused = fused
        return {**recorded, "logits": logits}

    def attention_maps(self, images: Tensor) -> list[Tensor]:
        """Each block's (B, h, T, T) softmax attention weights, first block first
        (`forward_intermediates`' "attention.{i}"; differentiable)."""
        intermediates = self.forward_intermediates(images)
        return [intermediates[f"attention.{i}"] for i in range(len(self.encoder.blocks))]

    def get_classifier(self) -> nn.Module:
        """The final linear layer (timm's interface)."""
        return self.head.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the classifier with a fresh one for `num_classes` (0: no classifier)."""
        self.config = self.config.replace(num_classes=num_classes)
        self.head.fc = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head.fc, nn.Linear):
            _init_linear(self.head.fc, zero=self.config.zero_head)
        self.head.fc.to(self.patch_proj.proj.weight.device, self.patch_proj.proj.weight.dtype)

    def no_weight_decay(self) -> set[str]:
        """Names of the position embedding and class token parameters (as timm's
        `no_weight_decay`), as full parameter names; biases and norms are 1-D."""
        names = {name for name, _ in self.named_parameters()}
        return {"pos_embed.weight", "cls_token"} & names


def _init_linear(linear: nn.Linear, zero: bool) -> None:
    """timm's ViT init for a linear layer: trunc-normal(std .02) weight (or zeros), zero bias."""
    if zero:
        nn.init.zeros_(linear.weight)
    else:
        nn.init.trunc_normal_(linear.weight, std=0.02)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
