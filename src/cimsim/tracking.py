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


def log_robustness(
    summary: list[dict],
    rows: list[dict],
    x: str,
    plot: str | os.PathLike | None,
    prefix: str = "robust",
) -> None:
    """Log a robustness study to the active W&B run: the per-chip rows and the summary as
    tables, one accuracy-vs-``x`` line per model, and the PNG figure (if any). No-op without
    a run."""
    import wandb

    if wandb.run is None:
        return
    lines: dict[str, list[dict]] = {}
    for s in summary:
        if s.get(x) is not None:
            lines.setdefault(str(s.get("model", "model")), []).append(s)
    xs = sorted({s[x] for entries in lines.values() for s in entries})
    ys = [
        [next((s["acc_mean"] for s in entries if s[x] == v), None) for v in xs]
        for entries in lines.values()
    ]
    payload = {f"{prefix}/rows": _table(rows), f"{prefix}/summary": _table(summary)}
    if plot is not None:
        payload[f"{prefix}/figure"] = wandb.Image(str(plot))
    if xs:
        payload[f"{prefix}/acc_vs_{x}"] = wandb.plot.line_series(
            xs=xs, ys=ys, keys=list(lines), title=f"accuracy vs {x}", xname=x
        )
    wandb.log(payload)


def _table(records: list[dict]):
    import wandb

    columns = list(records[0]) if records else []
    return wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in records])
