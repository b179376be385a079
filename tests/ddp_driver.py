"""Runs `python -m experiments.train` with what tests/test_ddp.py needs to see inside each DDP process.

    python tests/ddp_driver.py OUT_DIR --runs-dir RUNS [experiments.train flags...]

Lightning's launcher starts the other ranks by running this same command again, so every rank records, in
OUT_DIR/rank{R}.json: the training items (index, augmentation seed) of each batch it loaded, in order; every
file it created, wrote, moved or removed under RUNS (through Python's audit hooks, which see `open`,
`os.replace` and the like from any library); and its exit code. With DDP_TEST_NAN=RANK:STEP, that rank's
logits are NaN at that training step (a divergence on one rank only).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.rundir import ddp_rank  # noqa: E402
from experiments.train import main  # noqa: E402
from lightning_modules.classifier import ImageClassifier  # noqa: E402
from lightning_modules.data import SeededSubset  # noqa: E402

WRITE_EVENTS = ("os.rename", "os.replace", "os.remove", "os.unlink", "os.rmdir", "os.mkdir", "os.truncate",
                "os.symlink", "os.link", "shutil.rmtree", "shutil.move", "shutil.copyfile")


def record(out_dir: Path, runs_dir: Path) -> dict[str, list]:
    """Start recording this process's training batches and its writes under `runs_dir`."""
    seen: dict[str, list] = {"batches": [], "writes": []}
    runs = str(runs_dir.resolve())

    def audit(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            paths = [path] if writing else []
        else:  # a move's target counts too (checkpoints are written elsewhere, then moved in)
            paths = list(args) if event in WRITE_EVENTS else []
        for path in paths:
            if isinstance(path, (str, bytes, os.PathLike)):
                full = os.path.abspath(os.fsdecode(path))
                if full.startswith(runs):
                    seen["writes"].append([event, os.path.relpath(full, runs)])

    sys.addaudithook(audit)
    original = SeededSubset.__getitems__

    def getitems(self: SeededSubset, items: list) -> list:
        if items and isinstance(items[0], tuple):  # training items: (index, seed)
            seen["batches"].append([list(item) for item in items])
        return original(self, items)

    SeededSubset.__getitems__ = getitems
    return seen


def inject_nan(rank: int, step: int) -> None:
    """Make `rank`'s logits NaN at training step `step`."""
    original = ImageClassifier.forward

    def forward(self: ImageClassifier, images):  # type: ignore[no-untyped-def]
        logits = original(self, images)
        if self.training and self.global_rank == rank and self.global_step == step:
            return logits * float("nan")
        return logits

    ImageClassifier.forward = forward


if __name__ == "__main__":
    out_dir, args = Path(sys.argv[1]), sys.argv[2:]
    seen = record(out_dir, Path(args[args.index("--runs-dir") + 1]))
    if os.environ.get("DDP_TEST_NAN"):
        inject_nan(*(int(x) for x in os.environ["DDP_TEST_NAN"].split(":")))
    code = main(args)
    partial = out_dir / f".rank{ddp_rank()}.json"
    partial.write_text(json.dumps({**seen, "exit_code": code}))
    partial.replace(out_dir / f"rank{ddp_rank()}.json")  # whole, for the test that polls for it
    sys.exit(code)
