"""What the robustness evaluation costs per run on this machine, to choose its subset size.

Times, at 32 px with 1 channel (the cpu profile's Fashion-MNIST shape):

1. generating the 15 corruptions x 5 severities of n test images (cold: an
   empty cache; cached: read back), once per dataset, subset and seed, shared
   by every run of a sweep;
2. `evaluate_robustness` on n images for a timm ResNet50 and a small ViT
   (patch 4, width 128, depth 6), per precision: end-to-end images/s and
   seconds per run (clean + 75 corrupted + 8 occluded + 1 shuffled passes),
   beside the forward pass alone (the best of `--repeats` x 5 batches, so
   that other processes on a shared machine show as the gap between the two);

then projects the seconds per run to other subset sizes, and a sweep of
half ResNet50 and half ViT runs to its share of the default sweep's budget
(12 runs in about 20 minutes; robustness may use 25 % of it). The
measured results live in benchmarks/RESULTS.md with the command that
produced them.

    python benchmarks/robustness_cost.py --n 200 --repeats 2
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lightning_modules.classifier import prefers_channels_last
from lightning_modules.corruptions import CORRUPTION_NAMES, SEVERITIES, corrupted_set
from lightning_modules.data import build_transforms, make_synthetic
from lightning_modules.models import build_model
from lightning_modules.robustness import OCCLUSION_FRACTIONS, PRECISIONS, evaluate_robustness
from lightning_modules.vit import VisionTransformer
from lightning_modules.vit_config import ViTConfig

SWEEP_RUNS = 12
SWEEP_SECONDS = 20 * 60
ROBUSTNESS_SHARE = 0.25


def cpu_kind() -> str:
    """The CPU's model name and whether it runs bf16 natively (avx512_bf16 / amx_bf16 in /proc/cpuinfo)."""
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text(errors="ignore") if cpuinfo.is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 platform.processor() or "unknown CPU")
    flags = [flag for flag in ("avx512_bf16", "amx_bf16") if f" {flag}" in text]
    return f"{model}; {', '.join(flags) if flags else 'no native bf16 (AVX2 only)'}"


def nets() -> dict[str, torch.nn.Module]:
    """The two nets timed, randomly initialised, in eval mode."""
    vit = VisionTransformer(ViTConfig(img_size=32, patch_size=4, in_chans=1, num_classes=10, embed_dim=128, depth=6,
                                      num_heads=4))
    return {"resnet50": build_model("resnet50", num_classes=10, in_chans=1, img_size=32).eval(),
            "vit_p4_d128_L6": vit.eval()}


def forward_rate(net: torch.nn.Module, batch: int, precision: str, tries: int) -> float:
    """Images/s of the forward pass alone on random (batch, 1, 32, 32) inputs: the fastest of `tries` batches."""
    x = torch.randn(batch, 1, 32, 32)
    if prefers_channels_last(net):
        x = x.contiguous(memory_format=torch.channels_last)
    dtype = PRECISIONS[precision]
    best = float("inf")
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
        net(x)
        for _ in range(tries):
            start = time.perf_counter()
            net(x)
            best = min(best, time.perf_counter() - start)
    return batch / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="test images actually timed")
    parser.add_argument("--subsets", type=int, nargs="+", default=[150, 200, 250, 500, 1000],
                        help="subset sizes to project")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per net and precision (the fastest counts)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    source = make_synthetic(num_classes=10, n_train=10, n_test=args.n, size=32)
    images, labels = source.test.images, source.test.targets  # (n, 1, 32, 32) uint8, (n,)
    transform = build_transforms("fashion_mnist", 32, 1, "none", False, 32)
    passes = 1 + len(CORRUPTION_NAMES) * len(SEVERITIES) + sum(f > 0 for f in OCCLUSION_FRACTIONS) + 1
    print(f"# {cpu_kind()}; {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(f"# {args.n} images, 32 px, 1 channel; {passes} forward passes per image per run")

    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        per_name = {}
        for name in CORRUPTION_NAMES:
            t = time.perf_counter()
            corrupted_set(images, "bench", name, indices=np.arange(args.n), cache_dir=cache)
            per_name[name] = time.perf_counter() - t
        cold = time.perf_counter() - start
        start = time.perf_counter()
        for name in CORRUPTION_NAMES:
            corrupted_set(images, "bench", name, indices=np.arange(args.n), cache_dir=cache)
        cached = time.perf_counter() - start
        print(f"generation: cold {cold:.1f} s ({1e3 * cold / args.n:.1f} ms/image for all 75), "
              f"cached {cached:.2f} s")
        slowest = sorted(per_name.items(), key=lambda kv: -kv[1])
        print("  slowest: " + ", ".join(f"{name} {1e3 * s / args.n:.2f} ms/image" for name, s in slowest[:5]))

        budget = ROBUSTNESS_SHARE * SWEEP_SECONDS / SWEEP_RUNS
        print(f"budget: {ROBUSTNESS_SHARE:.0%} of {SWEEP_SECONDS / 60:.0f} min over {SWEEP_RUNS} runs = "
              f"{budget:.0f} s per run")
        rates: dict[tuple[str, str], float] = {}
        models = nets()
        for net_name, net in models.items():
            for precision in args.precisions:
                evaluate_robustness(net, images[:8], labels[:8], transform, subset_size=8, names=(),
                                    occlusion_fractions=(), precision=precision)  # warm-up
                seconds = float("inf")
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    evaluate_robustness(net, images, labels, transform, subset_size=args.n, precision=precision,
                                        batch_size=args.batch, dataset="bench", cache_dir=cache)
                    seconds = min(seconds, time.perf_counter() - start)
                rate = rates[net_name, precision] = passes * args.n / seconds
                forward = forward_rate(net, args.batch, precision, 5 * args.repeats)
                projected = "  ".join(f"n={n}: {n * passes / rate:.0f} s ({n * passes / rate / budget:.0%})"
                                      for n in args.subsets)
                print(f"{net_name:15s} {precision:10s} {rate:5.0f} images/s end to end ({forward:5.0f} forward "
                      f"alone)  {seconds:5.1f} s for n={args.n}; per run, of budget: {projected}")
        for precision in args.precisions:
            per_pair = sum(passes / rates[net_name, precision] for net_name in models)  # s per image, one run each
            projected = "  ".join(f"n={n}: {SWEEP_RUNS // 2 * n * per_pair:.0f} s "
                                  f"({SWEEP_RUNS // 2 * n * per_pair / SWEEP_SECONDS:.0%})" for n in args.subsets)
            print(f"sweep of {SWEEP_RUNS // 2} + {SWEEP_RUNS // 2} runs, {precision:10s} "
                  f"of {SWEEP_SECONDS / 60:.0f} min: {projected}")

if __name__ == "__main__":
    main()
