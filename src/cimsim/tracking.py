"""Weights & Biases: offline unless the user is logged in, and helpers to log results."""

from __future__ import annotations

import netrc
import os
from pathlib import Path


def wandb_logged_in() -> bool:
    """Whether W&B credentials exist (``WANDB_API_KEY`` or a ``wandb login`` netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        hosts = netrc.netrc(path).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


def default_wandb_mode() -> str:
    """Set ``WANDB_MODE=offline`` unless the user set a mode or is logged in; return the mode.

    Offline runs are written under the run directory and can be uploaded later with
    ``wandb sync``; nothing waits on the network.
    """
    if "WANDB_MODE" not in os.environ and not wandb_logged_in():
        os.environ["WANDB_MODE"] = "offline"
    return os.environ.get("WANDB_MODE", "online")


def finish_wandb() -> None:
    """Close the active W&B run, if any, so the next run of the same process (tests, sequential
    Hydra multirun jobs) starts its own instead of reusing it."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
