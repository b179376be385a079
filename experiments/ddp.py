"""The processes of one multi-GPU run before DDP starts: data prepared once per node.

Every DDP process runs the run's preflight, which prepares the data (and
downloads what is missing). Under srun (submitit's SLURM jobs) the processes
of a node start together, so each would download into the same folder at
once. `prepare_once_per_node` gives Lightning's `prepare_data_per_node`
semantics before there is a process group: local rank 0 prepares first and
leaves a stamp for this launch in the node's temporary folder; the node's
other ranks wait for the stamp, then prepare too (the files are there: they
only load them, all at once). When rank 0 fails, the stamp says so and the
others fail with its reason instead of waiting.

Without srun there is nothing to wait for: a single process prepares alone,
and Lightning's own launcher starts ranks 1.. after rank 0 has prepared.

Torch-free.
"""

from __future__ import annotations

import getpass
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common import files

WAIT_S = 3600.0  # how long ranks > 0 wait for local rank 0 (a download), before giving up


def local_rank() -> int:
    """This process's rank among the run's processes on this node (srun: SLURM_LOCALID; torchrun and
    Lightning's launcher: LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or 0)


def launch_id() -> str | None:
    """What every process of this srun launch shares and no other launch has: the job, the step and the
    requeue count; None outside an srun launch."""
    job, step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID")
    if job is None or step is None:
        return None
    return f"{job}.{step}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"


def stamp_path(launch: str, what: str) -> Path:
    """Where local rank 0 of `launch` records how preparing `what` went (node-local, per user)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (some containers)
        user = str(os.getuid()) if hasattr(os, "getuid") else "user"
    name = re.sub(r"[^\w.-]", "_", f"prepared-{launch}-{what}")
    return Path(tempfile.gettempdir()) / f"vit-vs-cnn-{user}" / f"{name}.json"


def prepare_once_per_node(prepare: Callable[[], None], what: str, poll_s: float = 1.0,
                          wait_s: float = WAIT_S) -> None:
    """Run `prepare` (which downloads what is missing, then loads) on local rank 0 first, then on the others.

    Args:
        prepare: the data's preparation; idempotent once the files are there.
        what: names the data (a stamp per dataset of the launch).
        poll_s / wait_s: how often and how long ranks > 0 look for rank 0's stamp.

    Raises:
        ValueError: on a rank > 0, when local rank 0 failed to prepare (its one-line reason) or never
            finished within `wait_s`.
    """
    launch = launch_id()
    if launch is None:
        prepare()
        return
    stamp = stamp_path(launch, what)
    if local_rank() == 0:
        try:
            prepare()
        except Exception as exc:
            files.write_json(stamp, {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__})
            raise
        files.write_json(stamp, {"error": None})
        return
    deadline = time.monotonic() + wait_s
    while (state := files.read_json(stamp)) is None:
        if time.monotonic() > deadline:
            raise ValueError(f"data {what}: local rank 0 did not prepare it within {wait_s:.0f} s")
        time.sleep(poll_s)
    if state["error"] is not None:
        raise ValueError(f"data {what}: local rank 0 failed to prepare it: {state['error']}")
    prepare()
