"""Weights & Biases: offline unless the user is logged in, and logging a robustness study.

``wandb`` is imported where it is used: it takes seconds to import and runs without it
(``logger=csv``, ``wandb.enabled=false``) never need it.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from cimsim.robustness.plots import lines
from cimsim.robustness.rows import Row, row_record


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
    rows: list[Row],
    x: str,
    plot: str | os.PathLike | None,
    prefix: str = "robust",
) -> None:
    """Log a robustness study to the active W&B run: the per-chip rows and the summary as
    tables, the accuracy-vs-``x`` curves grouped as the PNG's lines (``report.lines``), and the
    PNG figure (if any). No-op without a run."""
    import wandb

    if wandb.run is None:
        return
    # "no ADC" has no place on an ADC-levels axis: the PNG draws it as a dashed reference.
    curves = {
        label: sorted((s for s in entries if s[x] is not None), key=lambda s: s[x])
        for label, entries in lines(summary, x).items()
    }
    payload = {
        f"{prefix}/rows": _table([row_record(r) for r in rows]),
        f"{prefix}/summary": _table(summary),
    }
    if plot is not None:
        payload[f"{prefix}/figure"] = wandb.Image(str(plot))
    if any(curves.values()):
        payload[f"{prefix}/acc_vs_{x}"] = wandb.plot.line_series(
            xs=[[s[x] for s in c] for c in curves.values()],
            ys=[[s["acc_mean"] for s in c] for c in curves.values()],
            keys=list(curves),
            title=f"accuracy vs {x}",
            xname=x,
        )
    wandb.log(payload)


def _table(records: list[dict]):
    import wandb

    columns = list(records[0]) if records else []
    return wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in records])
