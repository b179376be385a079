"""A DDP process of an srun launch for `test_slurm` (torch-free, so that spawned processes start fast)."""

from __future__ import annotations

import os
import time
from pathlib import Path

from common import files
from experiments import ddp


def srun_rank(rank: int, folder: str, launch: dict[str, str], delay: float) -> None:
    """Local rank `rank` of `launch`: after `delay` s, prepares a fake dataset (a 'download' when its file is
    missing), logging to `folder`/downloads and `folder`/loaded."""
    os.environ.update(launch, SLURM_LOCALID=str(rank), TMPDIR=folder)
    time.sleep(delay)
    data = Path(folder) / "data.bin"

    def prepare() -> None:
        if not data.exists():
            with open(Path(folder) / "downloads", "a") as log:
                log.write(f"{rank}\n")
            time.sleep(0.5)
            files.write_text(data, "images")
        with open(Path(folder) / "loaded", "a") as log:
            log.write(f"{rank} {data.read_text()}\n")

    ddp.prepare_once_per_node(prepare, "fake", poll_s=0.05, wait_s=60)
