"""Where each net looks and how far each layer looks: the evidence for *why*.

- `attention_rollout` (Abnar & Zuidema 2020): which patches the ViT's class
  token draws on, through all layers.
- `mean_attention_distance` (the ViT paper's Fig. 7): how far, in pixels, each
  head of each layer attends.
- `erf_profile` (Luo et al. 2016): a gradient-based effective receptive field
  per layer, one method for both nets, so that "global vs local" is measured
  the same way on the ViT and the CNN.
- `gradcam_maps`: Grad-CAM from the `grad-cam` library for both nets.
- `explain_batch`: all of the above for a batch, as numpy arrays ready to save.

Every function that runs a net runs it in eval mode with gradients enabled
(also when called under `torch.no_grad()`), and leaves it as it found it: the
train/eval mode of every module, no hooks left, `Attention.fused` and the
parameters' `.grad` unchanged.

Shapes: B batch, C channels, H x W image, h heads, T tokens, N patches,
(gh, gw) the ViT's patch grid, L layers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from timm.models.resnet import ResNet
from torch import Tensor, nn

from lightning_modules.vit import VisionTransformer

HeadFusion = Literal["mean", "max", "min"]
HEAD_FUSIONS: tuple[str, ...] = get_args(HeadFusion)
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
# Grad-CAM's map has the target layer's resolution; below 4 x 4 it is one blob
# (a 1 x 1 map is constant, so the library's min-max scaling returns all zeros).
MIN_GRADCAM_SIDE = 4


# Leaving the net as it was --------------------------------------------------


@contextmanager
def _inspecting(net: nn.Module) -> Iterator[None]:
    """Eval mode and gradients on inside; every module's mode and every
    parameter's `.grad` restored on exit, also when the body raises."""
    modes = [(module, module.training) for module in net.modules()]
    grads = [(param, param.grad) for param in net.parameters()]
    net.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training
        for param, grad in grads:
            param.grad = grad


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"invalid images={shape} (allowed: a float tensor of shape (B, C, H, W))")


# ViT tokens on the patch grid -----------------------------------------------


def tokens_to_grid(tokens: Tensor, grid_size: tuple[int, int], num_prefix_tokens: int) -> Tensor:
    """Drops the prefix tokens and lays the patch tokens out on the patch grid.

    Patch token i (counted after the prefix, row by row as `Patchify` numbers
    the patches) goes to grid cell (i // gw, i % gw). This is Grad-CAM's
    `reshape_transform` for the ViT and how the ERF reads a ViT block.

    Args:
        tokens: (B, num_prefix_tokens + gh*gw, D).
        grid_size: (gh, gw).
        num_prefix_tokens: tokens before the patches (1 for a class token).

    Returns:
        (B, D, gh, gw).
    """
    rows, cols = grid_size
    if tokens.ndim != 3 or tokens.shape[1] != num_prefix_tokens + rows * cols:
        raise ValueError(f"invalid tokens={tuple(tokens.shape)} (allowed: (B, {num_prefix_tokens} + {rows}*{cols}, D) "
                         f"for grid_size={grid_size}, num_prefix_tokens={num_prefix_tokens})")
    patch_tokens = tokens[:, num_prefix_tokens:]  # (B, N, D)
    grid = patch_tokens.reshape(tokens.shape[0], rows, cols, tokens.shape[2])  # (B, gh, gw, D)
    return grid.permute(0, 3, 1, 2)  # (B, D, gh, gw)


# Attention rollout and attention distance -----------------------------------


def _check_attentions(attentions: Sequence[Tensor], num_prefix_tokens: int, grid_size: tuple[int, int]) -> None:
    tokens = num_prefix_tokens + grid_size[0] * grid_size[1]
    if len(attentions) == 0:
        raise ValueError("invalid attentions=[] (allowed: one (B, h, T, T) tensor per layer)")
    for i, weights in enumerate(attentions):
        if weights.ndim != 4 or weights.shape[-2:] != (tokens, tokens) or weights.shape != attentions[0].shape:
            raise ValueError(f"invalid attentions[{i}]={tuple(weights.shape)} (allowed: (B, h, {tokens}, {tokens}), "
                             f"the same for every layer, T = {num_prefix_tokens} prefix + {grid_size} patches)")


def attention_rollout(attentions: Sequence[Tensor], num_prefix_tokens: int, grid_size: tuple[int, int],
                      head_fusion: HeadFusion = "mean") -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020): how much of each patch reaches the output.

    Per layer the heads are fused (mean, or max/min over heads), the residual
    connection is accounted for as Â = (A + I) / 2, and the rows are
    renormalised to sum to 1 (needed after max/min fusion); then
    R = Â_L ⋯ Â_1. The map is the class token's row R[0, prefix:] (the share
    of its rolled-out attention that reaches each patch; the rest stays on
    the prefix tokens), or, without prefix tokens (pool="avg"), the mean of
    R's rows over all query tokens.

    Args:
        attentions: L tensors (B, h, T, T), first layer first, rows summing to 1
            (`VisionTransformer.attention_maps`).
        num_prefix_tokens: 1 with a class token (at position 0), else 0.
        grid_size: (gh, gw), T = num_prefix_tokens + gh*gw.
        head_fusion: "mean" | "max" | "min" over heads.

    Returns:
        (B, gh, gw), non-negative, summing to at most 1 per image.
    """
    _check_attentions(attentions, num_prefix_tokens, grid_size)
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"invalid head_fusion={head_fusion!r} (allowed: {' | '.join(HEAD_FUSIONS)})")
    batch, _, tokens, _ = attentions[0].shape
    identity = torch.eye(tokens, dtype=attentions[0].dtype, device=attentions[0].device)  # (T, T)
    rollout = identity.expand(batch, tokens, tokens)  # (B, T, T)
    for weights in attentions:
        if head_fusion == "mean":
            fused = weights.mean(dim=1)  # (B, T, T)
        elif head_fusion == "max":
            fused = weights.amax(dim=1)  # (B, T, T)
        else:
            fused = weights.amin(dim=1)  # (B, T, T)
        residual = (fused + identity) / 2  # (B, T, T)
        residual = residual / residual.sum(dim=-1, keepdim=True)  # (B, T, T), rows sum to 1
        rollout = residual @ rollout  # (B, T, T)
    if num_prefix_tokens > 0:
        patch_share = rollout[:, 0, num_prefix_tokens:]  # (B, N)
    else:
        patch_share = rollout.mean(dim=1)  # (B, N)
    return patch_share.reshape(batch, *grid_size)  # (B, gh, gw)


def patch_distances(grid_size: tuple[int, int], patch_size: int) -> Tensor:
    """Euclidean distances in pixels between patch centres.

    Args:
        grid_size: (gh, gw).
        patch_size: P, the side of a patch in pixels.

    Returns:
        (N, N), N = gh*gw in `Patchify`'s order; entry (i, j) = P x the grid
        distance between patches i and j.
    """
    rows, cols = torch.meshgrid(torch.arange(grid_size[0]), torch.arange(grid_size[1]), indexing="ij")  # (gh, gw)
    centres = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1).double() * patch_size  # (N, 2)
    return torch.cdist(centres, centres)  # (N, N)


def mean_attention_distance(attentions: Sequence[Tensor], num_prefix_tokens: int, grid_size: tuple[int, int],
                            patch_size: int) -> Tensor:
    """Mean attention distance per layer and head, in pixels (the ViT paper's Fig. 7).

    For query patch i, Σ_j a_ij · dist(p_i, p_j), with dist the pixel distance
    between patch centres, averaged over query patches and images. The prefix
    (class) token is left out as query and as key: each query's weights on the
    patches are renormalised to sum to 1, so the value is where a patch looks
    among the patches, whatever it also gives the class token. (A query whose
    patch weights underflow to all zeros counts as distance 0.)

    Args:
        attentions: L tensors (B, h, T, T), first layer first.
        num_prefix_tokens: 1 with a class token (at position 0), else 0.
        grid_size: (gh, gw), T = num_prefix_tokens + gh*gw.
        patch_size: P in pixels.

    Returns:
        (L, h) float64 distances in pixels.
    """
    _check_attentions(attentions, num_prefix_tokens, grid_size)
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"invalid patch_size={patch_size!r} (allowed: an integer >= 1)")
    distances = patch_distances(grid_size, patch_size).to(attentions[0].device)  # (N, N)
    per_layer = []
    for weights in attentions:
        between_patches = weights[:, :, num_prefix_tokens:, num_prefix_tokens:].double()  # (B, h, N, N)
        row_sums = between_patches.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        between_patches = between_patches / row_sums  # (B, h, N, N), rows sum to 1
        per_query = (between_patches * distances).sum(dim=-1)  # (B, h, N)
        per_layer.append(per_query.mean(dim=(0, 2)))  # (h,)
    return torch.stack(per_layer)  # (L, h)


# Effective receptive field --------------------------------------------------


@dataclass(frozen=True)
class ProbeLayer:
    """A layer whose output feature map the effective receptive field probes.

    Attributes:
        name: a readable name ("stem", "layer3.2", "blocks.4").
        module: the module whose output is probed (a forward hook reads it).
        relative_depth: position in the net's list of probed layers / its
            length, in (0, 1].
        to_grid: maps the module's output to (B, C, h, w); None when it already is.
    """

    name: str
    module: nn.Module
    relative_depth: float
    to_grid: Callable[[Tensor], Tensor] | None = None


@dataclass(frozen=True)
class ErfRow:
    """One layer's effective receptive field.

    Attributes:
        name, relative_depth: as in `ProbeLayer`.
        mean_distance_px: the |grad|-weighted mean distance from the ERF's centre.
        width_px: side of the smallest square about the centre holding `share` of the |grad| mass.
        erf_map: (H, W) mean |grad| over images, summed over input channels.
    """

    name: str
    relative_depth: float
    mean_distance_px: float
    width_px: float
    erf_map: Tensor


def probe_layers(net: nn.Module) -> list[ProbeLayer]:
    """The layers whose receptive fields `erf_profile` measures by default.

    ResNet (timm): the stem's output (after the max pool), then every residual
    block of layer1..layer4. Our ViT: every block's output tokens, the patch
    tokens laid out on the patch grid (`tokens_to_grid`). Relative depth is a
    layer's 1-based position in this list over its length.

    Returns:
        The layers, shallowest first.
    """
    if isinstance(net, VisionTransformer):
        to_grid = functools.partial(tokens_to_grid, grid_size=net.grid_size,
                                    num_prefix_tokens=net.num_prefix_tokens)
        named: list[tuple[str, nn.Module]] = [(f"blocks.{i}", block) for i, block in enumerate(net.encoder.blocks)]
    elif isinstance(net, ResNet):
        to_grid = None
        named = [("stem", net.maxpool)]
        named += [(f"{stage}.{i}", block) for stage in RESNET_STAGES for i, block in enumerate(getattr(net, stage))]
    else:
        raise ValueError(f"invalid net={type(net).__name__} (allowed: VisionTransformer | timm ResNet)")
    return [ProbeLayer(name, module, (i + 1) / len(named), to_grid) for i, (name, module) in enumerate(named)]


def effective_receptive_fields(net: nn.Module, images: Tensor, layers: Sequence[ProbeLayer]) -> Tensor:
    """Gradient-based effective receptive fields (Luo et al. 2016) of several layers, one forward pass.

    For each layer: the centre unit of its feature map (position (h // 2, w // 2),
    summed over channels; for the ViT the centre patch token), its gradient with
    respect to the input, |grad| summed over input channels and averaged over
    images. Each image's unit depends on that image only (eval mode), so one
    backward pass per layer serves the whole batch. Works on channels-last and
    contiguous nets and inputs alike.

    Args:
        net: the net, any mode (run in eval mode, restored afterwards).
        images: (B, C, H, W).
        layers: the layers to probe (`probe_layers(net)`).

    Returns:
        (L, H, W) float32 maps, one per layer, in `layers`' order.
    """
    _check_images(images)
    if len(layers) == 0:
        raise ValueError("invalid layers=[] (allowed: one or more ProbeLayer)")
    outputs: dict[str, Tensor] = {}

    def record(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            outputs[name] = output

        return hook

    inputs = images.detach().clone().requires_grad_(True)  # (B, C, H, W), the caller's memory format
    maps = []
    with _inspecting(net):
        handles = [layer.module.register_forward_hook(record(layer.name)) for layer in layers]
        try:
            net(inputs)
        finally:
            for handle in handles:
                handle.remove()
        for layer in layers:
            feature_map = outputs[layer.name] if layer.to_grid is None else layer.to_grid(outputs[layer.name])
            if feature_map.ndim != 4:
                raise ValueError(f"invalid layer {layer.name!r} output {tuple(feature_map.shape)} "
                                 "(allowed: (B, C, h, w), or a to_grid that makes it so)")
            rows, cols = feature_map.shape[-2:]
            centre_unit = feature_map[:, :, rows // 2, cols // 2].sum()  # scalar, over images and channels
            (grad,) = torch.autograd.grad(centre_unit, inputs, retain_graph=True)  # (B, C, H, W)
            maps.append(grad.abs().sum(dim=1).mean(dim=0).float())  # (H, W)
    return torch.stack(maps)  # (L, H, W)


def erf_size(erf_map: Tensor, share: float = 0.95) -> tuple[float, float]:
    """How far an effective receptive field reaches, in pixels.

    The centre is the |grad|-weighted centroid of the map, not a fixed pixel:
    where a feature-map unit sits in the image depends on padding conventions
    (PyTorch's padded convolutions put unit j at j·stride, a ViT patch token at
    (j + ½)·P − ½), so a fixed pixel would add an offset of up to (stride − 1)/2
    in each direction; the centroid is the same rule for both nets. For a
    symmetric field it is the unit's own centre.

    Args:
        erf_map: (H, W) non-negative gradient mass (`effective_receptive_fields`).
        share: the share of the mass the width must hold, in (0, 1].

    Returns:
        (mean_distance_px, width_px): the mass-weighted mean Euclidean distance
        from the centre; the side of the smallest square about the centre whose
        pixels hold `share` of the mass (a pixel belongs to the square when its
        centre does; it spans ±½ px, so a single 3 x 3 convolution is 3 px wide).
        Note the ERF is measured at the centre unit, while the ViT's attention
        distance averages over all query positions: a field uniform over the
        image has a mean distance from the centre well below the mean pairwise
        distance of a uniform attention head.
    """
    if not (isinstance(share, (int, float)) and 0 < share <= 1):
        raise ValueError(f"invalid share={share!r} (allowed: a number in (0, 1])")
    if erf_map.ndim != 2 or bool((erf_map < 0).any()) or float(erf_map.sum()) <= 0:
        raise ValueError(f"invalid erf_map of shape {tuple(erf_map.shape)} "
                         "(allowed: an (H, W) map, non-negative, with some mass)")
    mass = erf_map.detach().double().cpu()  # (H, W)
    mass = mass / mass.sum()
    rows, cols = torch.meshgrid(torch.arange(mass.shape[0]), torch.arange(mass.shape[1]), indexing="ij")  # (H, W)
    centre_row, centre_col = (mass * rows).sum(), (mass * cols).sum()
    row_offset, col_offset = rows - centre_row, cols - centre_col  # (H, W) each
    mean_distance = (mass * torch.sqrt(row_offset**2 + col_offset**2)).sum()
    half_side = torch.maximum(row_offset.abs(), col_offset.abs()).reshape(-1)  # (H*W,) Chebyshev distance
    order = torch.argsort(half_side)
    cumulative = torch.cumsum(mass.reshape(-1)[order], dim=0)  # (H*W,)
    first_enough = int(torch.searchsorted(cumulative, share * cumulative[-1] * (1 - 1e-12)))
    return float(mean_distance), float(2 * half_side[order][first_enough] + 1)


def erf_profile(net: nn.Module, images: Tensor, layers: Sequence[ProbeLayer] | None = None,
                share: float = 0.95) -> list[ErfRow]:
    """How far each layer looks: the effective receptive field of every probed layer.

    Measure trained nets: an untrained timm ResNet has each block's last
    BatchNorm at zero (`zero_init_last`), so every residual branch outputs 0
    and deep layers only see the stem through the strided shortcuts.

    Args:
        net: our `VisionTransformer` or a timm ResNet; any net when `layers` is given.
        images: (B, C, H, W), e.g. test images (the ERF depends on the input).
        layers: the layers to probe; default `probe_layers(net)`.
        share: the mass share that defines the width (`erf_size`).

    Returns:
        One `ErfRow` per layer, shallowest first.
    """
    layers = probe_layers(net) if layers is None else list(layers)
    maps = effective_receptive_fields(net, images, layers)  # (L, H, W)
    rows = []
    for layer, erf_map in zip(layers, maps):
        mean_distance, width = erf_size(erf_map, share)
        rows.append(ErfRow(layer.name, layer.relative_depth, mean_distance, width, erf_map))
    return rows


# Grad-CAM -------------------------------------------------------------------


def _resnet_stage_sides(net: ResNet, images: Tensor) -> dict[str, int]:
    """The smaller side of each stage's feature map at this input size (one image, no gradients)."""
    sides: dict[str, int] = {}
    handles = [getattr(net, stage).register_forward_hook(
        lambda module, args, output, stage=stage: sides.__setitem__(stage, min(output.shape[-2:])))
        for stage in RESNET_STAGES]
    try:
        with _inspecting(net), torch.no_grad():
            net(images[:1])
    finally:
        for handle in handles:
            handle.remove()
    return sides


def gradcam_layer(net: nn.Module, images: Tensor, cnn_stage: str | None = None) -> tuple[str, nn.Module]:
    """The layer Grad-CAM reads, by net type.

    Our ViT: `encoder.blocks[-1].norm1`, as in the grad-cam tutorials (with
    pool="token" only the class token of the last block's output reaches the
    logits, so its patch tokens carry no gradient). A timm ResNet: the last block of a stage,
    `layer4[-1]` as is standard when its map is at least
    `MIN_GRADCAM_SIDE` x `MIN_GRADCAM_SIDE`; on smaller images (layer4 is 1 x 1
    at 32 px, which Grad-CAM cannot localise on) the deepest stage whose map is.
    At 32 px that is layer2 (4 x 4), the resolution of a patch-8 ViT's grid.

    Args:
        net: our `VisionTransformer` or a timm ResNet.
        images: (B, C, H, W), for the ResNet's feature-map sizes.
        cnn_stage: "layer1".."layer4" to choose the ResNet stage; None: as above.

    Returns:
        (name, module), e.g. ("layer2[-1]", net.layer2[-1]).
    """
    _check_images(images)
    if isinstance(net, VisionTransformer):
        if cnn_stage is not None:
            raise ValueError(f"invalid cnn_stage={cnn_stage!r} for a VisionTransformer (allowed: None)")
        return "encoder.blocks[-1].norm1", net.encoder.blocks[-1].norm1
    if not isinstance(net, ResNet):
        raise ValueError(f"invalid net={type(net).__name__} (allowed: VisionTransformer | timm ResNet)")
    sides = _resnet_stage_sides(net, images)
    localising = [stage for stage in RESNET_STAGES if sides[stage] > 1]
    if cnn_stage is None:
        large_enough = [stage for stage in RESNET_STAGES if sides[stage] >= MIN_GRADCAM_SIDE]
        cnn_stage = (large_enough or RESNET_STAGES[:1])[-1]
    elif cnn_stage not in localising:
        size = "x".join(map(str, images.shape[-2:]))
        raise ValueError(f"invalid cnn_stage={cnn_stage!r} at {size} px (allowed: "
                         f"{' | '.join(localising) or 'none: every map is 1 x 1'}; a 1 x 1 map cannot localise)")
    return f"{cnn_stage}[-1]", getattr(net, cnn_stage)[-1]


def gradcam_maps(net: nn.Module, images: Tensor, targets: Tensor | Sequence[int] | None = None,
                 cnn_stage: str | None = None) -> Tensor:
    """Grad-CAM (`pytorch_grad_cam.GradCAM`) for our ViT or a timm ResNet, one method for both.

    The target layer is `gradcam_layer`'s; for the ViT the library reads the
    tokens through `tokens_to_grid` (the prefix tokens dropped). Each map is
    the library's: ReLU of the gradient-weighted activations, min-max scaled
    per image and resized (bilinear) to the image; an all-zero map means no
    positive evidence at that layer. Works on 1-channel images.

    Args:
        net: our `VisionTransformer` or a timm ResNet, any mode (run in eval
            mode, restored afterwards).
        images: (B, C, H, W).
        targets: (B,) the class to explain per image; None: the predicted class.
        cnn_stage: the ResNet stage (see `gradcam_layer`); None: chosen by size.

    Returns:
        (B, H, W) float32 maps in [0, 1].
    """
    _check_images(images)
    layer_name, layer = gradcam_layer(net, images, cnn_stage)
    target_list = None
    if targets is not None:
        classes = torch.as_tensor(targets).reshape(-1).tolist()
        num_classes = net.num_classes
        if len(classes) != images.shape[0] or any(not 0 <= c < num_classes for c in classes):
            raise ValueError(f"invalid targets={classes} "
                             f"(allowed: {images.shape[0]} class indices in [0, {num_classes}))")
        target_list = [ClassifierOutputTarget(c) for c in classes]
    reshape = None
    if isinstance(net, VisionTransformer):
        reshape = functools.partial(tokens_to_grid, grid_size=net.grid_size, num_prefix_tokens=net.num_prefix_tokens)
    with _inspecting(net):
        cam = GradCAM(model=net, target_layers=[layer], reshape_transform=reshape)
        try:  # not `with cam:`, whose __exit__ swallows IndexError
            maps = cam(input_tensor=images, targets=target_list)  # (B, H, W) numpy
        finally:
            cam.activations_and_grads.release()
    return torch.from_numpy(maps)  # (B, H, W)


# Everything for one batch ---------------------------------------------------


def explain_batch(net: nn.Module, images: Tensor, targets: Tensor | Sequence[int] | None = None,
                  cnn_stage: str | None = None, head_fusion: HeadFusion = "mean",
                  share: float = 0.95) -> dict[str, np.ndarray]:
    """All interpretability measurements of one net on a batch, as numpy arrays.

    Every value is a numpy array (names as string arrays), so
    `np.savez(path, **explain_batch(...))` writes it and
    `np.load(path, allow_pickle=False)` reads it back without torch.

    Args:
        net: our `VisionTransformer` or a timm ResNet.
        images: (B, C, H, W) on the net's device.
        targets: (B,) classes Grad-CAM explains; None: the predicted ones.
        cnn_stage: the ResNet stage for Grad-CAM (`gradcam_layer`).
        head_fusion: for the rollout (`attention_rollout`).
        share: the mass share of the ERF width (`erf_size`).

    Returns:
        "arch": () "vit" | "cnn".
        "images": (B, C, H, W) float32, the inputs.
        "predictions": (B,) int64 predicted classes.
        "gradcam_targets": (B,) int64 the classes Grad-CAM explains.
        "gradcam": (B, H, W) float32 in [0, 1].
        "gradcam_layer": () the layer Grad-CAM read, e.g. "layer2[-1]".
        "erf_layers": (L,) layer names; "erf_relative_depth": (L,);
        "erf_mean_distance_px": (L,); "erf_width_px": (L,); "erf_share": ();
        "erf_maps": (L, H, W) float32 mean |grad|.
        ViT only:
        "rollout": (B, gh, gw) float32 (`attention_rollout`).
        "attention_distance_px": (depth, h) (`mean_attention_distance`).
        "attention_relative_depth": (depth,) (i + 1) / depth.
    """
    _check_images(images)
    is_vit = isinstance(net, VisionTransformer)
    with _inspecting(net), torch.no_grad():
        if is_vit:
            intermediates = net.forward_intermediates(images)
            logits = intermediates["logits"]  # (B, num_classes)
            attentions = [intermediates[f"attention.{i}"] for i in range(len(net.encoder.blocks))]
        else:
            logits = net(images)  # (B, num_classes)
    predictions = logits.argmax(dim=1)  # (B,)
    chosen = predictions if targets is None else torch.as_tensor(targets).reshape(-1)  # (B,)
    layer_name, _ = gradcam_layer(net, images, cnn_stage)
    rows = erf_profile(net, images, share=share)
    result = {
        "arch": np.array("vit" if is_vit else "cnn"),
        "images": images.detach().float().cpu().numpy(),
        "predictions": predictions.cpu().numpy().astype(np.int64),
        "gradcam_targets": chosen.cpu().numpy().astype(np.int64),
        "gradcam": gradcam_maps(net, images, chosen, cnn_stage).numpy(),
        "gradcam_layer": np.array(layer_name),
        "erf_layers": np.array([row.name for row in rows]),
        "erf_relative_depth": np.array([row.relative_depth for row in rows]),
        "erf_mean_distance_px": np.array([row.mean_distance_px for row in rows]),
        "erf_width_px": np.array([row.width_px for row in rows]),
        "erf_share": np.array(float(share)),
        "erf_maps": torch.stack([row.erf_map for row in rows]).cpu().numpy(),
    }
    if is_vit:
        depth = len(attentions)
        rollout = attention_rollout(attentions, net.num_prefix_tokens, net.grid_size, head_fusion)  # (B, gh, gw)
        distances = mean_attention_distance(attentions, net.num_prefix_tokens, net.grid_size, net.config.patch_size)
        result["rollout"] = rollout.float().cpu().numpy()
        result["attention_distance_px"] = distances.cpu().numpy()
        result["attention_relative_depth"] = np.arange(1, depth + 1) / depth
    return result
