"""Shared test setup: never touch the network, keep W&B offline, use little CPU."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
# Tiny nets gain nothing from a second thread, and OpenMP threads that spin while another process holds the
# cores slow everything many times over: the tests (and the processes they start) use one thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
