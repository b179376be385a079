"""How `precision: auto` times bf16 against fp32 on this CPU, and how much that timing varies.

Runs the timing a sweep runs before its first run (`experiments.eta.measure`: training steps and evaluation
batches of each net, in each precision) `--repeats` times, interleaved, and prints each repeat's step times
and the estimate for the sweep in each precision with the choice `auto` makes from it (bf16 only when at
least `BF16_MARGIN` faster). The spread between repeats is the timing's own noise on this machine; the
measured results live in benchmarks/RESULTS.md with the command that produced them.

    python benchmarks/precision_timing.py                               # the default sweep's nets, 3 repeats
    python benchmarks/precision_timing.py --sweep experiments/sweeps/ablations.yaml --repeats 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments import eta
from experiments.precision import BF16_MARGIN, TIMED, cpu_flags, cpuinfo_value, detect, resolve
from experiments.sweep import load_sweep

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", type=Path, default=REPO / "experiments" / "sweeps" / "default.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    hardware = detect()
    specs = list(load_sweep(args.sweep).ordered)
    print(f"# {cpuinfo_value('model name') or hardware.name}; bf16 flags: "
          f"{' '.join(sorted(cpu_flags() & {'avx512_bf16', 'amx_bf16', 'bf16'})) or 'none'}; "
          f"{len(specs)} runs of {args.sweep.name}; bf16 chosen when >= {BF16_MARGIN:.0%} faster")
    print("repeat | net | precision | train s/step | eval ms/image")
    for repeat in range(args.repeats):  # each repeat from scratch, as a sweep times (one discarded warm-up)
        estimated, times = eta.time_precisions(specs, TIMED)
        for key, found in times.items():
            print(f"{repeat} | {eta.net_label(key)} | {key[-1]} | {found.train_step_s:.3f} | "
                  f"{1000 * found.eval_image_s:.2f}")
        ratio = estimated["bf16-mixed"] / estimated["32-true"]
        chosen = resolve("auto", hardware, estimated) if hardware.native_bf16 else "32-true (no native bf16)"
        print(f"{repeat} | sweep estimate | bf16 {estimated['bf16-mixed'] / 60:.1f} min, fp32 "
              f"{estimated['32-true'] / 60:.1f} min (bf16/fp32 {ratio:.2f}) -> auto: {chosen}", flush=True)


if __name__ == "__main__":
    main()
