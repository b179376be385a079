"""Which ViT size suits the CPU profile? Train one candidate through the real pipeline and print its result.

Each candidate is `vit_tiny_p8` with architecture overrides in its spec (so
every candidate has its own run_id), trained by `experiments.train.run` with
the cpu profile on the full Fashion-MNIST training split (W&B off), so the
accuracy and speed are those a user would get. Results: benchmarks/RESULTS.md.

    python benchmarks/cpu_vit_size.py p8_d256_L4                      # the cpu profile's budget
    python benchmarks/cpu_vit_size.py resnet50 --augment basic        # the same with random crop + flip
    python benchmarks/cpu_vit_size.py p8_d192_L6 --batch-size 64 --max-steps 560
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from experiments.spec import AUGMENTS, RunSpec
from experiments.train import run

# Architecture overrides of vit_tiny_p8 (RunSpec fields).
CANDIDATES: dict[str, dict[str, Any]] = {
    "p4_d128_L6": dict(patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0),
    "p8_d192_L6": dict(patch_size=8, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0),
    "p7_d192_L6": dict(patch_size=7, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0),  # with --img-size 28
    "p8_d192_L6_avg": dict(patch_size=8, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0, pool="avg"),
    "p8_d256_L4": dict(patch_size=8, embed_dim=256, depth=4, num_heads=4, mlp_ratio=2.0),  # = vit_tiny_p8
    "p8_d256_L4_avg": dict(patch_size=8, embed_dim=256, depth=4, num_heads=4, mlp_ratio=2.0, pool="avg"),
    "p8_d384_L6": dict(patch_size=8, embed_dim=384, depth=6, num_heads=6, mlp_ratio=2.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("candidate", choices=[*CANDIDATES, "resnet50"])
    cpu = RunSpec.create("cpu")
    parser.add_argument("--batch-size", type=int, default=cpu.batch_size)
    parser.add_argument("--max-steps", type=int, default=cpu.max_steps)
    parser.add_argument("--lr", type=float, default=cpu.lr)
    parser.add_argument("--img-size", type=int, default=cpu.img_size)
    parser.add_argument("--augment", choices=AUGMENTS, default=cpu.augment)
    parser.add_argument("--runs-dir", default="runs")
    args = parser.parse_args()
    net = dict(model="resnet50") if args.candidate == "resnet50" else dict(model="vit_tiny_p8",
                                                                           **CANDIDATES[args.candidate])
    spec = RunSpec.create("cpu", **net, wandb="off", sweep="vitsize", batch_size=args.batch_size,
                          max_steps=args.max_steps, lr=args.lr, img_size=args.img_size, augment=args.augment)
    start = time.perf_counter()
    r = run(spec, args.runs_dir)
    print(f"{args.candidate} ({spec.run_id}): batch {args.batch_size} x {r.get('train_steps')} steps, lr {args.lr:g}, "
          f"{args.img_size} px, augment {args.augment}: {r['status']}, test/acc1 {100 * r['metrics']['test/acc1']:.1f} %, "
          f"{r['train_images_per_s']:.0f} train images/s, wall {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
