"""How long a sweep will take, from step times measured on this machine before it starts.

For each distinct net of a sweep (model, the architecture choices that change
its compute, image size, channels, batch, precision) a few training steps of
the runs' recipe (forward, loss, backward, AdamW; channels-last for CNNs, as
`ImageClassifier` does) are timed after warm-up on random images, and a few
evaluation batches; a run's estimate is its step budget times the step time
plus its evaluations (validations, the test set, the training subset, the
robustness conditions) times the per-image evaluation time. With early
stopping (`patience`) a run may stop sooner, so the estimate is an upper bound
for those runs.

The same timings settle `precision: auto` on a CPU with native bf16
(`time_precisions`): the runs' estimate in bf16 and in fp32, compared by
`experiments.precision.resolve`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from experiments.spec import RunSpec
from lightning_modules.catalog import DATASETS

WARMUP_STEPS = 3
TIMED_STEPS = 4
TIMED_EVAL_BATCHES = 3  # one evaluation batch alone varied 2x between repeats on a 2-core VM
TRAIN_EVAL_IMAGES = 1024  # the training subset evaluated for the train-test gap (ImageDataModule.train_eval_size)


@dataclass(frozen=True)
class StepTimes:
    """Seconds per training step (one batch) and per evaluated image, for one net on this machine."""

    train_step_s: float
    eval_image_s: float


# ViT choices that leave its compute as it is, to within the class token (one token of 50 at patch 4 on 28 px):
# the ablations sweep's position-embedding and pooling variants share one timing
SAME_COMPUTE = frozenset({"pos_embed", "pool", "class_token"})


def net_key(spec: RunSpec, precision: str) -> tuple:
    """What determines a run's speed: the net with the overrides that change its compute (patch size, width,
    depth...; not `SAME_COMPUTE`), its input, the batch and the precision."""
    shape = tuple(sorted((name, value) for name, value in spec.net_overrides.items() if name not in SAME_COMPUTE))
    return spec.model, shape, spec.img_size, spec.net_in_chans, spec.batch_size // spec.devices, precision


def net_label(key: tuple) -> str:
    """A `net_key` as the sweep prints it: the model with the overrides that change its compute, e.g.
    `vit_tiny_p4(patch_size=7)`."""
    model, overrides = key[0], key[1]
    return f"{model}({', '.join(f'{name}={value}' for name, value in overrides)})" if overrides else model


def measure(spec: RunSpec, precision: str) -> StepTimes:
    """Time `TIMED_STEPS` training steps (after `WARMUP_STEPS`) and `TIMED_EVAL_BATCHES` evaluation batches (after
    one) of `spec`'s net."""
    import torch
    import torch.nn.functional as F

    from lightning_modules.classifier import prefers_channels_last
    from lightning_modules.models import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    classes = DATASETS[spec.dataset].num_classes or 10
    net = build_model(spec.model, classes, spec.net_in_chans, spec.img_size, overrides=spec.net_overrides)
    layout = torch.channels_last if prefers_channels_last(net) else torch.contiguous_format
    net = net.to(device=device, memory_format=layout).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    batch = spec.batch_size // spec.devices
    images = torch.randn(batch, spec.net_in_chans, spec.img_size, spec.img_size, device=device)
    images = images.contiguous(memory_format=layout)
    labels = torch.randint(0, classes, (batch,), device=device)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
    for step in range(WARMUP_STEPS + TIMED_STEPS):
        if step == WARMUP_STEPS:
            start = now()
        with autocast:
            loss = F.cross_entropy(net(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    train_step_s = (now() - start) / TIMED_STEPS
    net.eval()
    with torch.no_grad(), autocast:
        net(images)  # warm-up
        start = now()
        for _ in range(TIMED_EVAL_BATCHES):
            net(images)
        eval_image_s = (now() - start) / (TIMED_EVAL_BATCHES * batch)
    return StepTimes(train_step_s, eval_image_s)


def evaluated_images(spec: RunSpec) -> int:
    """Images a run evaluates: every validation, the test set, the training subset and validation once more,
    and with `robust_subset` each subset image under every corruption and severity, occlusion and the shuffle."""
    from lightning_modules.corruptions import CORRUPTION_NAMES, SEVERITIES
    from lightning_modules.robustness import OCCLUSION_FRACTIONS

    info = DATASETS[spec.dataset]
    n_images = spec.pretrain_size if spec.dataset == "fractaldb" else (info.n_train or 0)
    n_val = spec.val_size if spec.val_fraction <= 0 else min(spec.val_size, round(spec.val_fraction * n_images))
    n_test = info.n_test or n_val
    conditions = len(CORRUPTION_NAMES) * len(SEVERITIES) + len(OCCLUSION_FRACTIONS) + 1  # + 1: patch shuffle
    return (spec.num_evals + 1) * n_val + n_test + TRAIN_EVAL_IMAGES + min(spec.robust_subset, n_test) * conditions


def estimate_seconds(spec: RunSpec, times: StepTimes) -> float:
    """A run's estimated duration: its step budget plus its evaluations (an upper bound with early stopping)."""
    info = DATASETS[spec.dataset]
    n_train = round(spec.train_fraction * (info.n_train or 0)) if info.n_train else spec.pretrain_size
    return spec.train_steps(n_train) * times.train_step_s + evaluated_images(spec) * times.eval_image_s


def measure_all(specs: Iterable[RunSpec], precisions: Iterable[str],
                times: dict[tuple, StepTimes] | None = None) -> dict[tuple, StepTimes]:
    """Step times of every distinct net of `specs` in each of `precisions` (`net_key` -> times), adding to
    `times` those it does not already hold; the first measurement pays the libraries' set-up and is discarded."""
    times = {} if times is None else times
    wanted = {net_key(spec, p): (spec, p) for spec in specs for p in precisions}
    missing = [(spec, p) for key, (spec, p) in wanted.items() if key not in times]
    if missing and not times:
        measure(*missing[0])  # discarded: one-time set-up (thread pools, oneDNN kernels)
    for spec, precision in missing:
        times[net_key(spec, precision)] = measure(spec, precision)
    return times


def time_precisions(specs: Iterable[RunSpec], precisions: Iterable[str],
                    times: dict[tuple, StepTimes] | None = None) -> tuple[dict[str, float], dict[tuple, StepTimes]]:
    """The estimated seconds of all `specs` in each of `precisions`, from step times measured here, and the step
    times (`net_key` -> times, `times` extended)."""
    specs, precisions = list(specs), list(precisions)
    times = measure_all(specs, precisions, times)
    return {p: sum(estimate_seconds(spec, times[net_key(spec, p)]) for spec in specs) for p in precisions}, times
