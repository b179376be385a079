"""Shared test setup: never touch the network, keep W&B offline, use little CPU."""

from __future__ import annotations

import os
from collections.abc import Iterator

os.environ["HF_HUB_OFFLINE"] = "1"
# Tiny nets gain nothing from a second thread, and OpenMP threads that spin while another process holds the
# cores slow everything many times over: the tests (and the processes they start) use one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)

import pytest  # noqa: E402 - after the environment above, which torch reads at import
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _restore_deterministic_mode() -> Iterator[None]:
    """A Trainer with deterministic=True (every CPU run) leaves torch's deterministic mode on: undo it, so that
    no test depends on which tests ran before it."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)
