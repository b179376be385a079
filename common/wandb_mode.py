"""Which W&B mode a run or a report uses, decided as W&B users expect (torch-free; wandb is not imported).

`auto` follows the environment first: `WANDB_MODE` (online | offline | disabled, and W&B's older spellings
run | dryrun) wins. Without it, `auto` is online when W&B credentials exist (`WANDB_API_KEY`, or a netrc
entry for the W&B host, which `wandb login` writes) and offline otherwise, so nothing ever prompts for a
login or fails for want of one. An explicit mode (`online`, `offline`, `off`) is taken as asked.
Shared by `experiments` (the runs) and `analysis` (the report's W&B run), which must agree.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

DEFAULT_PROJECT = "vit-vs-cnn"
# WANDB_MODE's values -> ours ("off": no W&B at all, not even a disabled run)
ENV_MODES = {"online": "online", "run": "online", "offline": "offline", "dryrun": "offline", "disabled": "off"}


class ModeError(ValueError):
    """WANDB_MODE holds a value W&B does not know; str() is one line."""


def resolve(requested: str) -> str:
    """The mode to use: `requested` (auto | online | offline | off) with `auto` resolved.

    Raises:
        ModeError: `auto` and WANDB_MODE is set to something else than W&B's modes.
    """
    if requested != "auto":
        return requested
    env = os.environ.get("WANDB_MODE", "").strip()
    if env:
        if env not in ENV_MODES:
            raise ModeError(f"invalid WANDB_MODE={env!r} (allowed: online | offline | disabled)")
        return ENV_MODES[env]
    return "online" if has_credentials() else "offline"


def has_credentials() -> bool:
    """Whether W&B can log in without asking: an API key in the environment or in netrc for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    netrc = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        return netrc.is_file() and host in netrc.read_text(errors="ignore")
    except OSError:
        return False


def project() -> str:
    """The W&B project: WANDB_PROJECT, else vit-vs-cnn (the sweep files' `project:`)."""
    return os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
