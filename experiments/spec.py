"""RunSpec: one run, as a frozen, validated, hashable value.

A spec is built from a profile's defaults plus explicit overrides
(`RunSpec.create(profile="cpu", model="vit_tiny_p4", train_fraction=0.1)`),
validated field by field, and identified by `run_id`: the first 12 hex digits
of the SHA-256 of its canonical JSON (placement fields such as the sweep name,
data directory or W&B mode are left out, so the same experiment has the same
id everywhere).

The net is the registry's (`lightning_modules.catalog.MODELS`) unless the
spec overrides its architecture: a ViT through the fields named in
`ARCH_FIELDS` (`patch_size`, `pos_embed`, `pool`, ...; None = the
registry's value), a CNN through `model_kwargs` (keyword arguments for
`timm.create_model`). Each is a sweep parameter and a command-line flag.

This module imports no torch, so a bad spec fails in milliseconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field, fields
from typing import Any

from common.schema import PLACEMENT_FIELDS, RUNTIME_FIELDS
from common.untrusted import brief
from experiments.precision import PRECISIONS
from lightning_modules.catalog import DATASETS, MODELS, PRETRAINING_SOURCES
from lightning_modules.vit_config import ARCH_FIELDS, ConfigError


class SpecError(ValueError):
    """A spec field has a value that is not allowed; str() is one line."""

    def __init__(self, field_name: str, value: Any, allowed: str, where: str = "") -> None:
        self.field_name, self.value, self.allowed = field_name, value, allowed
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}invalid {brief(field_name)}={brief(value, quote=True)} (allowed: {allowed})")


PROFILES: dict[str, dict[str, Any]] = {
    # 2 cores, no GPU, no network: Fashion-MNIST at its native 28 px, a FLOP-matched small ViT vs ResNet50.
    # The protocol: the same step budget at every training size (so size is not tied to compute), the
    # checkpoint chosen among 16 validations, early stopping once validation has not improved for 4 of them
    # (never before half the budget). The budget is what fits the default sweep into its time limit; the
    # recipe (learning rate, augmentation) and the ViT's size were chosen on validation accuracy with the
    # same grid for both nets (benchmarks/RESULTS.md, "Tuning on validation").
    "cpu": dict(
        dataset="fashion_mnist", model="resnet50", img_size=28, batch_size=128,
        epochs=0.0, min_steps=72, max_steps=144, num_evals=16, patience=4,
        lr=2e-3, min_lr_ratio=0.01, weight_decay=0.05, warmup_frac=0.1,
        label_smoothing=0.1, mixup_alpha=0.0, cutmix_alpha=0.0, drop_path=0.0,
        augment="none", val_size=1000, val_fraction=0.1, precision="auto", devices=1,
        pretrain_steps=600, pretrain_size=12800, pretrain_classes=64,
        pretrain_fraction=1.0, grad_clip=1.0, num_workers=0,
        # the fast path as it was before these switches (channels-last CNNs, fused attention); compile and
        # resident data off: neither is measured to help on this 2-core CPU (benchmarks/RESULTS.md)
        channels_last=True, fused_attention=True, compile=False, resident=False,
    ),
    # One GPU: paper-scale nets at 224 px on CIFAR, DeiT-style regularisation, the same protocol (a budget
    # of ~50 epochs of the full training set at every size, best of 40 validations, early stopping from
    # the 8th). Not yet validated on a GPU by this suite.
    "gpu": dict(
        dataset="cifar10", model="vit_s16", img_size=224, batch_size=256,
        epochs=0.0, min_steps=1760, max_steps=8800, num_evals=40, patience=8,
        lr=5e-4, min_lr_ratio=0.01, weight_decay=0.05, warmup_frac=0.05,
        label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0, drop_path=0.1,
        augment="randaug", val_size=5000, val_fraction=0.1, precision="auto", devices=1,
        pretrain_steps=20_000, pretrain_size=100_000, pretrain_classes=1000,
        pretrain_fraction=1.0, grad_clip=1.0, num_workers=8,
        # bf16 comes from precision=auto (native on Ampere and newer). Resident data where the recipe's
        # augmentation runs on the device (in-memory datasets, crop / resized crop / flip; not RandAugment:
        # "auto" then resolves off and the result says why). torch.compile off until measured on a GPU to pay
        # back within a run (benchmarks/gpu_check.sh measures it).
        channels_last=True, fused_attention=True, compile=False, resident="auto",
        # CIFAR-10.1 and STL-10 (shared classes) after training, where their files are in the data root
        shift_eval=True,
    ),
}
# Cluster: the GPU recipe with 4 GPUs per run through DDP (batch_size is global).
PROFILES["cluster"] = {**PROFILES["gpu"], "devices": 4, "batch_size": 1024, "lr": 2e-3, "num_workers": 8,
                       "min_steps": 440, "max_steps": 2200}

AUGMENTS = ("none", "basic", "randaug")
WANDB_MODES = ("auto", "online", "offline", "off")
# Fields added after the first runs, with the defaults that reproduce the behaviour before them: left
# out of run_id at these values, so the ids of earlier runs do not change.
LATER_FIELDS: dict[str, Any] = {"patience": 0, "val_fraction": 0.0, "pretrain_epochs": 0.0, "robust_subset": 0,
                                "explain_images": 0, "shift_eval": False}
# timm.create_model arguments that the spec sets itself (from dataset, in_chans, drop_path, pretraining).
SPEC_SET_KWARGS = ("num_classes", "in_chans", "drop_path_rate", "pretrained", "pretrained_cfg_overlay")


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one training run (see PROFILES for defaults).

    The step budget (`train_steps`): with `epochs` 0 (the profiles' protocol)
    every training size gets the same `max_steps` steps, so the data size is
    not tied to compute; the checkpoint is the best of `num_evals` evenly
    spaced validations, and with `patience` > 0 training stops once
    validation accuracy has not improved for that many evaluations (never
    before `min_steps`). A run that used its whole budget while still
    improving is flagged in its result (`improving_at_end`). With `epochs` > 0
    the budget instead follows the data,
    `clamp(ceil(epochs * n_train / batch_size), min_steps, max_steps)`, the
    rule of runs made before the protocol.

    `data_seed` (subset, split, order and augmentation) follows `seed` unless
    set, so a cell's spread over seeds covers the data as well as the
    initialisation. Fields added after the first runs (`patience`,
    `val_fraction`, `pretrain_epochs`, `robust_subset`, `explain_images`, `shift_eval`, the
    architecture overrides) are left out of `run_id` at their defaults, which reproduce the
    earlier behaviour, so existing run ids stay valid. The fast-path switches
    (`channels_last`, `fused_attention`, `compile`, `resident`; RUNTIME_FIELDS)
    are never in `run_id`: they change how fast a run computes, not what
    (the resident path gives the loader's very batches), so a run is the same
    run whichever path made it; its result's `runtime` says which did.
    """

    # what is compared
    model: str
    dataset: str
    train_fraction: float
    seed: int
    data_seed: int | None  # None: the seed's value
    profile: str
    pretraining: str
    # pretraining (used when pretraining is fractaldb or a dataset)
    pretrain_size: int
    pretrain_classes: int
    pretrain_fraction: float
    pretrain_steps: int
    # the one recipe
    img_size: int
    in_chans: int
    batch_size: int
    epochs: float
    min_steps: int
    max_steps: int
    num_evals: int
    lr: float
    min_lr_ratio: float
    weight_decay: float
    warmup_frac: float
    label_smoothing: float
    mixup_alpha: float
    cutmix_alpha: float
    drop_path: float
    augment: str
    val_size: int
    precision: str
    devices: int
    grad_clip: float
    # the protocol (defaults = the behaviour before these fields existed; see LATER_FIELDS)
    patience: int = 0
    val_fraction: float = 0.0
    pretrain_epochs: float = 0.0
    robust_subset: int = 0
    explain_images: int = 0
    shift_eval: bool = False  # dataset shift after training (runs on cifar10: CIFAR-10.1, STL-10)
    # the fast path (RUNTIME_FIELDS: how fast, not what; left out of run_id; the defaults are the behaviour
    # before these fields existed): channels-last memory for CNNs, fused attention (SDPA) for ViTs,
    # torch.compile of the net, the training subset resident on the device (True | False | "auto": where the
    # data and its augmentation can be)
    channels_last: bool = True
    fused_attention: bool = True
    compile: bool = False
    resident: bool | str = False
    # architecture overrides (None / empty: the registry's net). ViT fields, named as ARCH_FIELDS:
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    pos_embed: str | None = None
    pool: str | None = None
    class_token: bool | None = None
    # CNNs: keyword arguments for timm.create_model (left out of hash(spec), which a dict cannot enter;
    # run_id includes it)
    model_kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    # placement (not part of run_id)
    sweep: str = "adhoc"
    data_dir: str | None = None
    weights_file: str | None = None
    wandb: str = "auto"
    num_workers: int = 0
    # pretraining chain: set on upstream specs only (fine-tuned from nothing)
    role: str = field(default="train")

    # ------------------------------------------------------------------ build
    def __post_init__(self) -> None:
        if self.data_seed is None:  # follows the seed: a seed varies initialisation and data together
            object.__setattr__(self, "data_seed", self.seed)

    @classmethod
    def create(cls, profile: str = "cpu", **overrides: Any) -> "RunSpec":
        """Profile defaults + overrides -> a validated spec (`data_seed` = `seed` unless given).

        Raises:
            SpecError: unknown field, or a value outside what is allowed.
        """
        if not (isinstance(profile, str) and profile in PROFILES):
            raise SpecError("profile", profile, " | ".join(PROFILES))
        known = {f.name for f in fields(cls)}
        for name in overrides:
            if name not in known:
                raise SpecError("field", name, "one of " + ", ".join(sorted(known)))
        values = {**PROFILES[profile], "profile": profile, "seed": 0, "data_seed": None, "in_chans": 0,
                  "train_fraction": 1.0, "pretraining": "none", **overrides}
        spec = cls(**values)
        spec.validate()
        return spec

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunSpec":
        """Inverse of `to_dict` (e.g. a run's spec.json); validated."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SpecError("field", unknown[0], "one of " + ", ".join(sorted(known)))
        required = {f.name for f in fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise SpecError(missing[0], None, "a value (field missing)")
        spec = cls(**data)
        spec.validate()
        return spec

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "RunSpec":
        spec = dataclasses.replace(self, **changes)
        spec.validate()
        return spec

    # --------------------------------------------------------------- identity
    def canonical(self) -> dict[str, Any]:
        """The fields that define the computation (what run_id hashes).

        Architecture overrides that are unset, or equal to the registry's own
        value, are left out: one net has one id, and the ids of runs made
        before overrides existed stay what they were.
        """
        registry = MODELS[self.model].vit
        values = {k: v for k, v in sorted(self.to_dict().items())
                  if k not in PLACEMENT_FIELDS and k not in RUNTIME_FIELDS}
        for name in ARCH_FIELDS:
            if values[name] is None or (registry is not None and values[name] == getattr(registry, name)):
                del values[name]
            elif name == "mlp_ratio":
                values[name] = float(values[name])  # 2 and 2.0 are one net
        if not values["model_kwargs"]:
            del values["model_kwargs"]
        for name, default in LATER_FIELDS.items():
            if values[name] == default:
                del values[name]
        return values

    @property
    def run_id(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def arch(self) -> str:
        return MODELS[self.model].arch

    @property
    def vit_overrides(self) -> dict[str, Any]:
        """The ViT fields (ARCH_FIELDS) this spec sets: {name: value}."""
        return {name: getattr(self, name) for name in ARCH_FIELDS if getattr(self, name) is not None}

    @property
    def net_overrides(self) -> dict[str, Any]:
        """What `build_model(overrides=...)` takes: the set ViT fields for a ViT, `model_kwargs` for a CNN."""
        return self.vit_overrides if self.arch == "vit" else dict(self.model_kwargs)

    @property
    def net_in_chans(self) -> int:
        """Input channels of the net: `in_chans`, or the dataset's own when 0.

        Images are converted to this many channels by the DataModule, so a
        pretraining source and its target feed the same net.
        """
        return self.in_chans or DATASETS[self.dataset].in_chans

    # ------------------------------------------------------------ pretraining
    def upstream(self) -> "RunSpec | None":
        """The pretraining run this run fine-tunes from, or None.

        `none` and `imagenet` have no upstream run (ImageNet weights come from
        timm). `fractaldb` pretrains on `pretrain_classes` x
        (`pretrain_size` / `pretrain_classes`) formula-driven images; a dataset
        name pretrains on `pretrain_fraction` of that dataset. The upstream
        uses the same net, recipe, image size and seed; its budget is
        `pretrain_steps`, or with `pretrain_epochs` that many passes over its
        images (so a larger pretraining set gets a proportionally larger
        budget). With `patience`, it stops once its own validation accuracy
        has plateaued (never before half its budget). It is shared by every
        run that needs it.
        """
        if self.pretraining in ("none", "imagenet"):
            return None
        is_fractal = self.pretraining == "fractaldb"
        budget = self.pretrain_steps
        if self.pretrain_epochs > 0:
            budget = max(self.num_evals, math.ceil(self.pretrain_epochs * self.pretrain_images / self.batch_size))
        early_stopping = dict(epochs=0.0, min_steps=max(1, budget // 2)) if self.patience else dict(min_steps=budget)
        return dataclasses.replace(
            self,
            dataset=self.pretraining,
            train_fraction=1.0 if is_fractal else self.pretrain_fraction,
            pretraining="none",
            in_chans=self.net_in_chans,
            max_steps=budget,
            **early_stopping,
            # the target's augmentation and regularisation, the source's data
            role="pretrain",
            # fields meaningless upstream are normalised so that every target
            # fraction shares one pretraining run
            pretrain_fraction=self.pretrain_fraction if not is_fractal else 1.0,
            pretrain_size=self.pretrain_size if is_fractal else 0,
            pretrain_classes=self.pretrain_classes if is_fractal else 0,
            pretrain_steps=self.pretrain_steps,
            mixup_alpha=0.0,
            cutmix_alpha=0.0,
            robust_subset=0,
            explain_images=0,
            shift_eval=False,
        )

    @property
    def pretrain_images(self) -> int:
        """Images the pretraining run trains on (0 when not known before loading, e.g. an image folder)."""
        if self.pretraining == "fractaldb":
            return self.pretrain_size
        info = DATASETS.get(self.pretraining)
        return round(self.pretrain_fraction * info.n_train) if info is not None and info.n_train else 0

    # ------------------------------------------------------------- budget
    def train_steps(self, n_train: int) -> int:
        """The step budget for `n_train` images (a multiple of num_evals): `max_steps` at every size when
        `epochs` is 0, else `epochs` passes over the data between `min_steps` and `max_steps`."""
        steps = self.max_steps
        if self.epochs > 0:
            steps = min(max(math.ceil(self.epochs * n_train / self.batch_size), self.min_steps), self.max_steps)
        return math.ceil(steps / self.num_evals) * self.num_evals

    @property
    def eval_every(self) -> int:
        """Steps between validations when the budget is `max_steps` (the protocol's fixed budget)."""
        return self.train_steps(0) // self.num_evals if self.epochs == 0 else 0

    # ------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check every field; raise SpecError naming the first bad one."""
        v = self

        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise SpecError(name, getattr(v, name), allowed)

        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x: Any) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        def is_name(x: Any, names: Any) -> bool:  # a str first: a list or a mapping is no name (nor hashable)
            return isinstance(x, str) and x in names

        need(is_name(v.profile, PROFILES), "profile", " | ".join(PROFILES))
        need(is_name(v.model, MODELS), "model", " | ".join(MODELS))
        need(is_name(v.dataset, DATASETS), "dataset", DATASETS.allowed())
        need(v.dataset != "fractaldb" or v.role == "pretrain", "dataset",
             "fractaldb only as pretraining (pretraining: fractaldb)")
        need(is_num(v.train_fraction) and 0 < v.train_fraction <= 1, "train_fraction", "a number in (0, 1]")
        need(is_int(v.seed) and 0 <= v.seed < 2**32, "seed", "an integer in [0, 2**32)")  # what seed_everything takes
        need(is_int(v.data_seed) and v.data_seed >= 0, "data_seed", "an integer >= 0")
        need(is_name(v.pretraining, PRETRAINING_SOURCES) or (is_name(v.pretraining, DATASETS)
                                                            and v.pretraining != "fractaldb"),
             "pretraining", " | ".join(PRETRAINING_SOURCES) + " | " + DATASETS.allowed(exclude=("fractaldb",)))
        need(v.pretraining != v.dataset, "pretraining", "a source other than the target dataset")
        if v.pretraining == "imagenet":
            need(MODELS[v.model].timm_name is not None, "pretraining",
                 "imagenet only for models with timm weights: "
                 + ", ".join(m for m, i in MODELS.items() if i.timm_name))
        need(is_int(v.pretrain_size) and v.pretrain_size >= 0, "pretrain_size", "an integer >= 0 (images)")
        need(is_int(v.pretrain_classes) and v.pretrain_classes >= 0, "pretrain_classes", "an integer >= 0")
        if v.pretraining == "fractaldb":
            need(v.pretrain_classes >= 2, "pretrain_classes", "an integer >= 2 for fractaldb")
            need(v.pretrain_size >= v.pretrain_classes, "pretrain_size",
                 f"an integer >= pretrain_classes ({v.pretrain_classes})")
        need(is_num(v.pretrain_fraction) and 0 < v.pretrain_fraction <= 1, "pretrain_fraction", "a number in (0, 1]")
        need(is_int(v.pretrain_steps) and v.pretrain_steps > 0, "pretrain_steps", "an integer > 0")
        need(is_int(v.img_size) and 8 <= v.img_size <= 1024, "img_size", "an integer in [8, 1024]")
        need(is_int(v.in_chans) and v.in_chans in (0, 1, 3), "in_chans", "0 (the dataset's own) | 1 | 3")
        need(is_int(v.batch_size) and v.batch_size > 0, "batch_size", "an integer > 0")
        need(is_num(v.epochs) and v.epochs >= 0, "epochs",
             "a number >= 0 (0: the same max_steps at every training size)")
        need(is_int(v.min_steps) and v.min_steps > 0, "min_steps", "an integer > 0")
        need(is_int(v.max_steps) and v.max_steps > 0, "max_steps", "an integer > 0")
        need(v.max_steps >= v.min_steps, "max_steps", f"an integer >= min_steps ({v.min_steps})")
        need(is_int(v.num_evals) and v.num_evals > 0, "num_evals", "an integer > 0")
        need(is_num(v.lr) and 0 < v.lr < 1, "lr", "a number in (0, 1)")
        need(is_num(v.min_lr_ratio) and 0 <= v.min_lr_ratio <= 1, "min_lr_ratio", "a number in [0, 1]")
        need(is_num(v.weight_decay) and 0 <= v.weight_decay < 1, "weight_decay", "a number in [0, 1)")
        need(is_num(v.warmup_frac) and 0 <= v.warmup_frac < 1, "warmup_frac", "a number in [0, 1)")
        need(is_num(v.label_smoothing) and 0 <= v.label_smoothing < 1, "label_smoothing", "a number in [0, 1)")
        need(is_num(v.mixup_alpha) and v.mixup_alpha >= 0, "mixup_alpha", "a number >= 0 (0 = off)")
        need(is_num(v.cutmix_alpha) and v.cutmix_alpha >= 0, "cutmix_alpha", "a number >= 0 (0 = off)")
        need(is_num(v.drop_path) and 0 <= v.drop_path < 1, "drop_path", "a number in [0, 1)")
        need(is_name(v.augment, AUGMENTS), "augment", " | ".join(AUGMENTS))
        need(is_int(v.val_size) and v.val_size > 0, "val_size", "an integer > 0")
        need(is_name(v.precision, PRECISIONS), "precision", " | ".join(PRECISIONS))
        need(is_int(v.devices) and v.devices > 0, "devices", "an integer > 0")
        need(v.batch_size % v.devices == 0, "batch_size", f"a multiple of devices ({v.devices})")
        need(is_num(v.grad_clip) and v.grad_clip >= 0, "grad_clip", "a number >= 0 (0 = off)")
        need(is_int(v.patience) and v.patience >= 0, "patience",
             "an integer >= 0 (evaluations without improvement before stopping; 0 = never stop early)")
        need(is_num(v.val_fraction) and 0 <= v.val_fraction < 1, "val_fraction",
             "a number in [0, 1) (0: exactly val_size validation images)")
        need(is_num(v.pretrain_epochs) and v.pretrain_epochs >= 0, "pretrain_epochs",
             "a number >= 0 (0: pretrain_steps steps)")
        if v.pretrain_epochs > 0 and v.pretraining not in ("none", "imagenet"):
            need(v.pretrain_images > 0, "pretrain_epochs",
                 f"0 for pretraining={v.pretraining} (its size is unknown before loading: set pretrain_steps)")
        need(is_int(v.robust_subset) and v.robust_subset >= 0, "robust_subset",
             "an integer >= 0 (test images under corruption and occlusion; 0 = off)")
        need(is_int(v.explain_images) and v.explain_images >= 0, "explain_images",
             "an integer >= 0 (test images for attention maps, receptive fields and Grad-CAM; 0 = off)")
        need(isinstance(v.shift_eval, bool), "shift_eval", "true | false")
        need(isinstance(v.sweep, str) and v.sweep.replace("_", "").replace("-", "").isalnum(), "sweep",
             "letters, digits, '-' and '_'")
        need(v.data_dir is None or isinstance(v.data_dir, str), "data_dir", "a path or null")
        need(v.weights_file is None or isinstance(v.weights_file, str), "weights_file", "a path or null")
        need(is_name(v.wandb, WANDB_MODES), "wandb", " | ".join(WANDB_MODES))
        need(is_int(v.num_workers) and v.num_workers >= 0, "num_workers", "an integer >= 0")
        need(is_name(v.role, ("train", "pretrain")), "role", "train | pretrain")
        for name in ("channels_last", "fused_attention", "compile"):
            need(isinstance(getattr(v, name), bool), name, "true | false")
        need(v.resident is True or v.resident is False or v.resident == "auto", "resident",
             "true | false | auto (the training subset held and augmented on the device)")
        if v.resident is True:
            need(v.augment != "randaug", "resident", "false | auto with augment=randaug (RandAugment runs per "
                                                     "image on the host, not on the device)")
        v.validate_architecture()

    def validate_architecture(self) -> None:
        """Check the architecture overrides against the registry's net (torch-free).

        ViT fields are applied to the registered ViTConfig at this spec's image
        size and channels, so a patch size that does not divide the image, or a
        head count that does not divide the width, fails here. `model_kwargs`
        can only be checked as data here; `experiments.train.preflight` builds
        the net (on no device) to check that timm accepts them.
        """
        registry = MODELS[self.model].vit
        if self.vit_overrides and (registry is None or self.pretraining == "imagenet"):
            name, value = next(iter(self.vit_overrides.items()))
            vits = ", ".join(model for model, info in MODELS.items() if info.vit is not None)
            raise SpecError(name, value, f"null for {self.model} (ViT models only: {vits}; a CNN takes model_kwargs)"
                            if registry is None else
                            "null with pretraining=imagenet (the ImageNet weights fix the architecture)")
        if registry is not None:
            try:
                registry.replace(img_size=self.img_size, in_chans=self.net_in_chans, drop_path_rate=self.drop_path,
                                 **self.vit_overrides)
            except ConfigError as exc:
                raise SpecError(exc.field_name, exc.value, exc.allowed) from None
        kwargs = self.model_kwargs
        if not (isinstance(kwargs, dict) and all(isinstance(k, str) and k.isidentifier() for k in kwargs)):
            raise SpecError("model_kwargs", kwargs, "a mapping of timm.create_model keyword arguments")
        if any(value is None for value in kwargs.values()):
            raise SpecError("model_kwargs", kwargs, "non-null values (timm ignores null ones; in YAML write "
                                                    "'{drop_rate: 0.1}', with a space after the colon)")
        if kwargs and registry is not None:
            raise SpecError("model_kwargs", kwargs, f"{{}} for {self.model} (a ViT takes the fields "
                                                    f"{', '.join(ARCH_FIELDS)})")
        taken = sorted(set(kwargs) & set(SPEC_SET_KWARGS))
        if taken:
            raise SpecError("model_kwargs", kwargs, "keyword arguments other than "
                            f"{', '.join(SPEC_SET_KWARGS)} (the spec sets those)")
        try:
            json.dumps(kwargs, allow_nan=False)
        except (TypeError, ValueError):
            raise SpecError("model_kwargs", kwargs, "JSON values (numbers, strings, booleans, lists, mappings)") \
                from None
