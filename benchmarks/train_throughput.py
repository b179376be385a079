"""Training throughput of the registered nets: images/s, step time, peak memory, achieved FLOP/s, MFU.

One optimizer step = forward + backward + AdamW update with the runs'
label-smoothed loss (autocast to bf16 when asked, CNNs channels-last as in
`ImageClassifier`), without Lightning, weight-decay groups or gradient
clipping. Prints one line per net; the measured results live in
benchmarks/RESULTS.md with the command that produced them.

    python benchmarks/train_throughput.py --models vit_tiny_p8 resnet50 --img-size 32 --in-chans 1 --batch 64
    python benchmarks/train_throughput.py --models vit_s16 resnet50 --img-size 224 --batch 128 --peak-tflops 800
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F

from lightning_modules.classifier import prefers_channels_last
from lightning_modules.models import build_model, count_params, flops_per_image


def measure(name: str, img_size: int, in_chans: int, batch: int, steps: int, warmup: int, bf16: bool,
            device: torch.device) -> dict[str, float]:
    """Time `steps` training steps after `warmup` ones; return the figures."""
    net = build_model(name, num_classes=10, in_chans=in_chans, img_size=img_size).to(device)
    flops = flops_per_image(net, in_chans, img_size)
    memory_format = torch.channels_last if prefers_channels_last(net) else torch.contiguous_format
    net = net.to(memory_format=memory_format).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    images = torch.randn(batch, in_chans, img_size, img_size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(0, 10, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(images).float(), labels, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"params_m": count_params(net) / 1e6, "gflops_per_image": flops / 1e9, "step_ms": 1e3 * seconds,
            "images_per_s": batch / seconds, "tflops_per_s": 3 * flops * batch / seconds / 1e12,
            "peak_mem_gib": peak / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["vit_tiny_p8", "resnet50"])
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--in-chans", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the device's peak dense TFLOP/s, for MFU (e.g. 800 for an H100 in bf16)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    what = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {what}; batch {args.batch}, {args.img_size} px, {args.in_chans} channel(s), "
          f"{'fp32' if args.fp32 else 'bf16 autocast'}, torch {torch.__version__}")
    for name in args.models:
        r = measure(name, args.img_size, args.in_chans, args.batch, args.steps, args.warmup, not args.fp32, device)
        mfu = f"  MFU {100 * r['tflops_per_s'] / args.peak_tflops:.1f}%" if args.peak_tflops else ""
        print(f"{name:12s} {r['params_m']:6.2f}M params  {r['gflops_per_image']:7.3f} GFLOPs/img  "
              f"{r['step_ms']:8.1f} ms/step  {r['images_per_s']:8.1f} img/s  "
              f"{r['tflops_per_s']:.4f} TFLOP/s  peak mem {r['peak_mem_gib']:.2f} GiB{mfu}", flush=True)


if __name__ == "__main__":
    main()
