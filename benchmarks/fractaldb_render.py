"""Benchmark of FractalDB: category-search time and rendering images/s.

Runs on one thread with memoisation off, in a fresh temporary cache, so both
numbers are cold. Usage:

    python benchmarks/fractaldb_render.py [--img-size 32] [--num-classes 100] [--images 2000]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from lightning_modules.fractaldb import FractalDB, search_categories


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--images", type=int, default=2000, help="images to render")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        search_categories(args.num_classes, img_size=args.img_size, cache_dir=cache_dir)
        search_s = time.perf_counter() - start
        instances = -(-args.images // args.num_classes)
        ds = FractalDB(args.num_classes, instances, img_size=args.img_size, cache_dir=cache_dir, memo_bytes=0)
        step = max(1, len(ds) // args.images)
        indices = range(0, len(ds), step)[: args.images]  # spread over classes
        start = time.perf_counter()
        for i in indices:
            ds[i]
        render_s = time.perf_counter() - start
    print(f"img_size={args.img_size} points/image={ds.num_points}")
    print(f"category search: {args.num_classes} classes in {search_s:.2f} s")
    print(f"rendering: {len(indices) / render_s:.0f} images/s ({len(indices)} images, 1 thread)")


if __name__ == "__main__":
    main()
