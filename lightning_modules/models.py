"""One registry: model names -> nets with one face.

Every net built here exposes timm's interface: `forward_features(x)`,
`forward_head(x, pre_logits=False)`, `num_features`, `reset_classifier(n)`.
ViTs are our transparent `VisionTransformer`; CNNs come from
`timm.create_model` unchanged. ImageNet weights come from timm (a local file,
the Hugging Face cache, or the hub when online) and reach our ViT through
`vit_timm.from_timm`; `check_weights` says before any work whether they can be
had, and `pretrained_normalization` gives the input statistics they expect.

Every checkpoint and weights file is loaded with `weights_only=True` (`load_weights`,
and timm's own loader, whose default it is): a file that pickles anything but
tensors and plain containers (code that unpickling would run) is refused, in one
line naming what it holds.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from lightning_modules import vit_timm
from lightning_modules.catalog import MODELS
from lightning_modules.datasets import Normalization
from lightning_modules.vit import VisionTransformer
from lightning_modules.vit_config import ARCH_FIELDS, ViTConfig


class ModelError(ValueError):
    """A model name or option that the registry does not allow; str() is one line."""


def vit_config(name: str, num_classes: int, in_chans: int, img_size: int, drop_path_rate: float = 0.0,
               overrides: Mapping[str, Any] | None = None) -> ViTConfig:
    """The registered ViT's config for this task, with a run's architecture overrides.

    Raises:
        ConfigError: an override that is not a ViTConfig field, or a value it does not allow.
    """
    return MODELS[name].vit.replace(img_size=img_size, in_chans=in_chans, num_classes=num_classes,
                                    drop_path_rate=drop_path_rate, **dict(overrides or {}))


def architecture(name: str, num_classes: int, in_chans: int, img_size: int, drop_path_rate: float = 0.0,
                 overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The net as it will be built, for result.json: the resolved ViTConfig, or timm's name and kwargs."""
    info = MODELS[name]
    if info.arch == "vit":
        return vit_config(name, num_classes, in_chans, img_size, drop_path_rate, overrides).to_dict()
    return {"timm_name": info.timm_name.split(".")[0], "num_classes": num_classes, "in_chans": in_chans,
            "drop_path_rate": drop_path_rate, **info.timm_kwargs, **dict(overrides or {})}


def build_model(name: str, num_classes: int, in_chans: int, img_size: int, pretrained: bool = False,
                weights_file: str | Path | None = None, drop_path_rate: float = 0.0,
                overrides: Mapping[str, Any] | None = None) -> nn.Module:
    """Build a registered net.

    Args:
        name: a key of `lightning_modules.catalog.MODELS`.
        num_classes: classifier outputs.
        in_chans: input channels (timm adapts pretrained stems to 1 channel by summing).
        img_size: input side (pretrained ViT position embeddings are resampled).
        pretrained: load timm's ImageNet weights (`weights_file`, else the
            Hugging Face cache, else the hub).
        weights_file: a local timm checkpoint (.safetensors / .pth / .bin) to
            use instead of the hub.
        drop_path_rate: stochastic depth.
        overrides: a run's architecture overrides: ViTConfig fields for ViTs
            (`pos_embed`, `pool`, `patch_size`, ...), `timm.create_model`
            keyword arguments for CNNs.

    Returns:
        The net, with `forward_features`, `forward_head`, `num_features`.

    Raises:
        ModelError: an unknown name, pretrained weights that do not exist, or an
            override of a pretrained ViT's architecture.
        ConfigError: a ViT override that is not a ViTConfig field, or a value it does not allow.
    """
    if name not in MODELS:
        raise ModelError(f"invalid model={name!r} (allowed: {' | '.join(MODELS)})")
    info = MODELS[name]
    if pretrained and info.timm_name is None:
        raise ModelError(f"invalid pretrained=True for model={name!r} (no ImageNet weights; allowed for: "
                         + ", ".join(m for m, i in MODELS.items() if i.timm_name) + ")")
    if weights_file is not None and not Path(weights_file).is_file():
        raise ModelError(f"invalid weights_file={str(weights_file)!r} (not a file)")
    timm_kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans)
    if pretrained and weights_file is None:  # a cached download is read directly: no request to the hub
        weights_file = cached_weights(info.timm_name)
    if pretrained and weights_file is not None:
        timm_kwargs["pretrained_cfg_overlay"] = dict(file=str(weights_file))

    if info.arch == "vit":
        config = vit_config(name, num_classes, in_chans, img_size, drop_path_rate, overrides)
        if not pretrained:
            return VisionTransformer(config)
        for field in ARCH_FIELDS:  # the checkpoint fixes the architecture: an override would be ignored
            if getattr(config, field) != getattr(info.vit, field):
                raise ModelError(f"invalid {field}={getattr(config, field)!r} with pretrained=True (allowed: "
                                 f"{getattr(info.vit, field)!r}, the architecture of {info.timm_name})")
        reference = timm.create_model(info.timm_name, pretrained=True, img_size=img_size, **timm_kwargs)
        return vit_timm.from_timm(reference, drop_path_rate=drop_path_rate)
    return timm.create_model(info.timm_name.split(".")[0] if not pretrained else info.timm_name,
                             pretrained=pretrained, drop_path_rate=drop_path_rate, **timm_kwargs,
                             **{**info.timm_kwargs, **dict(overrides or {})})


def pretrained_normalization(name: str) -> Normalization:
    """The input statistics the registered net's ImageNet weights were trained with (timm's pretrained config).

    Raises:
        ModelError: the net has no ImageNet weights.
    """
    timm_name = MODELS[name].timm_name
    if timm_name is None:
        raise ModelError(f"invalid pretraining='imagenet' for model={name!r} (no ImageNet weights)")
    cfg = timm.models.get_pretrained_cfg(timm_name)
    return Normalization(tuple(cfg.mean), tuple(cfg.std), f"weights:{timm_name}")


def _hub_files(timm_name: str) -> tuple[str, str | None, tuple[str, ...]]:
    """(repo id, revision, candidate file names) of a timm model's weights on the Hugging Face hub."""
    cfg = timm.models.get_pretrained_cfg(timm_name)
    repo, _, revision = (cfg.hf_hub_id or f"timm/{timm_name}").partition("@")
    names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors", "pytorch_model.bin")
    return repo, revision or None, names


def cached_weights(timm_name: str) -> Path | None:
    """The weights' file in the Hugging Face cache (where timm's download puts it), or None."""
    from huggingface_hub import constants, try_to_load_from_cache

    repo, revision, names = _hub_files(timm_name)
    for filename in names:
        found = try_to_load_from_cache(repo, filename, cache_dir=constants.HF_HUB_CACHE, revision=revision)
        if isinstance(found, str):
            return Path(found)
    return None


def _hub_unreachable(timm_name: str, timeout_s: float) -> str | None:
    """None when the hub answers for the weights within `timeout_s` seconds, else why it does not.

    The request runs in a daemon thread joined with a deadline, so a resolver or
    a network that hangs costs `timeout_s` at most.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import EntryNotFoundError

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    repo, revision, names = _hub_files(timm_name)
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            get_hf_file_metadata(hf_hub_url(repo, names[0], revision=revision), timeout=timeout_s)
            outcome.append(None)
        except EntryNotFoundError:  # the repository answered; timm tries its other file name
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - any failure means the download would fail too
            outcome.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:120])

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"no answer within {timeout_s:g} s"


def load_refusal(exc: BaseException) -> str:
    """Why a weights-only load failed, in one line: the pickled code the file holds (torch names the first global
    it refused), or the error's first line."""
    text = str(exc)
    # torch names the first global it refused ("GLOBAL posix.system"), timm all of them ("Unsupported globals: ...")
    found = re.search(r"GLOBAL ([\w.]+)|Unsupported globals: ([\w.]*\w(?:, [\w.]*\w)*)", text)
    if found is not None:
        return (f"it holds pickled code, not only tensors ({found.group(1) or found.group(2)}): refused, as "
                f"loading it would run it")
    first = re.sub(r"\x1b\[[0-9;]*m", "", text).strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first}"[:200]


def load_weights(path: str | Path) -> Any:
    """`torch.load(path, weights_only=True)` on the CPU: a checkpoint or weights file of this suite.

    Raises:
        ModelError: one line naming the file, when it does not load (e.g. it holds pickled code).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unreadable, truncated, or pickled objects
        raise ModelError(f"{path} does not load with weights_only ({load_refusal(exc)})") from None


def check_weights(name: str, weights_file: str | Path | None = None, timeout_s: float = 10.0) -> str:
    """Check, before any work, that a net's ImageNet weights can be had, without waiting on a network that
    is not there.

    Args:
        name: a registered net with ImageNet weights.
        weights_file: a local checkpoint (it must load with `weights_only`), or None for timm's weights.
        timeout_s: the longest wait for the hub (when the weights are neither given nor cached).

    Returns:
        Where they will come from: "file:PATH", "cache:PATH" or "hub:REPO".

    Raises:
        ModelError: one line naming `--weights-file`: the file does not load, or the weights are not
            cached and the hub cannot be reached.
    """
    timm_name = MODELS[name].timm_name
    if timm_name is None:
        raise ModelError(f"invalid pretraining='imagenet' for model={name!r} (no ImageNet weights)")
    if weights_file is not None:
        try:
            state = timm.models.load_state_dict(str(Path(weights_file).expanduser()), weights_only=True)
            usable = isinstance(state, Mapping) and state and all(isinstance(v, torch.Tensor) for v in state.values())
            reason = None if usable else "no tensors in it"
        except Exception as exc:  # noqa: BLE001 - missing, not a checkpoint, or pickled objects
            reason = load_refusal(exc)
        if reason:
            raise ModelError(f"invalid --weights-file={str(weights_file)!r} (allowed: a checkpoint of {timm_name} "
                             f"that loads with weights_only: .safetensors, .pth or .bin; it said {reason})")
        return f"file:{weights_file}"
    cached = cached_weights(timm_name)
    if cached is not None:
        return f"cache:{cached}"
    reason = _hub_unreachable(timm_name, timeout_s)
    if reason is not None:
        from huggingface_hub import constants

        raise ModelError(f"pretraining=imagenet: the weights {timm_name} are not in the Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}) and the hub cannot be reached ({reason}); pass "
                         f"--weights-file FILE (a checkpoint of {timm_name}: .safetensors, .pth or .bin)")
    return f"hub:{_hub_files(timm_name)[0]}"


def load_backbone(net: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Copy a pretraining run's weights into `net`, all but the classifier head.

    Args:
        net: a freshly built net (its head sized for the target classes).
        state_dict: the upstream net's state dict (same architecture).

    Returns:
        The names that were not copied (the head's).

    Raises:
        ModelError: a backbone tensor is missing or has another shape.
    """
    own = net.state_dict()
    head = {k for k in own if _is_head(net, k)}
    for key, value in own.items():
        if key in head:
            continue
        if key not in state_dict or state_dict[key].shape != value.shape:
            found = tuple(state_dict[key].shape) if key in state_dict else "missing"
            raise ModelError(f"invalid pretrained weights: {key} is {found}, expected {tuple(value.shape)}")
    net.load_state_dict({k: v for k, v in state_dict.items() if k not in head}, strict=False)
    return sorted(head)


def _is_head(net: nn.Module, key: str) -> bool:
    """True for the classifier's parameters (timm: `get_classifier()`)."""
    classifier = net.get_classifier()
    names = {f"{n}.{p}" for n, m in net.named_modules() if m is classifier for p, _ in m.named_parameters()}
    return key in names


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def flops_per_image(net: nn.Module, in_chans: int, img_size: int) -> int:
    """Forward FLOPs for one image (2 x multiply-adds), counted by torch's FlopCounterMode.

    Attention runs on SDPA's math backend while counting: the fused CPU
    kernels are invisible to the counter and would drop the QK^T and AV
    products (ViT-S/16 would read 4.24 instead of 4.6 GMACs).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    was_training = net.training
    net.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        net(torch.zeros(1, in_chans, img_size, img_size, device=next(net.parameters()).device))
    net.train(was_training)
    return int(counter.get_total_flops())
