"""A robustness study: several models, one Monte Carlo sweep each, one set of files and one figure.

Shared by ``evaluate.py`` and the end-of-training ``RobustnessMonitor`` so both write the same
files: ``robustness_rows.csv`` (per chip, resumable), ``robustness_summary.csv``,
``robustness.json`` and ``robustness.png``. With several processes (DDP), each evaluates its
share of the chips (``c = rank, rank + world, ...``) into its own resumable rows file, and rank 0
merges them into exactly the files a single process would have written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
from torch import nn

from cimsim.robustness import (
    ROWS_FILE,
    RobustnessGrid,
    RobustnessResult,
    evaluate_robustness,
    plot_robustness,
    sort_rows,
    summarize,
    write_results,
    write_rows,
)

PLOT_FILE = "robustness.png"


@dataclass
class Subject:
    """One model under test: its label in tables and figures, the analog network, its grid."""

    label: str
    net: nn.Module
    grid: RobustnessGrid
    ckpt: str = ""


@dataclass
class StudyFiles:
    rows: Path
    summary: Path
    json: Path
    plot: Path


@dataclass
class Evaluation:
    """How to run the sweep: data, chip seed, limits, and this process's place among several."""

    test_loader: Iterable
    seed: int = 0
    calib_loader: Iterable | None = None
    max_batches: int | None = None
    calib_batches: int | None = None
    progress: bool = True
    rank: int = 0
    world_size: int = 1


def gather_rows(rows: list[dict], world_size: int) -> list[dict]:
    """All processes' rows (``torch.distributed`` must be initialized when world_size > 1)."""
    if world_size == 1:
        return rows
    parts: list = [None] * world_size
    dist.all_gather_object(parts, rows)
    return [r for part in parts for r in part]


def evaluate_subjects(subjects: Sequence[Subject], ev: Evaluation, out: Path) -> list[dict]:
    """Every subject's rows, this process's share of the chips first, then everyone's, in the
    order a single process produces them (subject by subject, then chip and grid order)."""
    name = (
        ROWS_FILE if ev.world_size == 1 else f"robustness_rows.rank{ev.rank}of{ev.world_size}.csv"
    )
    mine = []
    for s in subjects:
        extra = {"model": s.label, "ckpt": s.ckpt}
        mine += evaluate_robustness(
            s.net,
            ev.test_loader,
            s.grid,
            ev.seed,
            calib_loader=ev.calib_loader,
            rows_path=out / name,
            chip_indices=range(ev.rank, s.grid.chips, ev.world_size),
            progress=ev.progress and ev.rank == 0,
            max_batches=ev.max_batches,
            calib_batches=ev.calib_batches,
            extra=extra,
        ).rows
    everyone = gather_rows(mine, ev.world_size)
    rows = []
    for s in subjects:
        rows += sort_rows(
            [r for r in everyone if (r["model"], r["ckpt"]) == (s.label, s.ckpt)], s.grid
        )
    if ev.world_size > 1 and ev.rank == 0:
        write_rows(out / ROWS_FILE, rows)
    return rows


def run_study(
    subjects: Sequence[Subject],
    ev: Evaluation,
    out_dir: str | os.PathLike,
    x: str,
    title: str | None = None,
) -> tuple[RobustnessResult, StudyFiles | None]:
    """Evaluate every subject with chips from the same seed (common random numbers across
    models), then, on rank 0, write the summary, the JSON and a figure of accuracy against ``x``.

    Rerunning the same study skips the chips already in the rows file(s). Returns the combined
    result (on every rank) and the files written (``None`` on other ranks).
    """
    out = Path(out_dir)
    rows = evaluate_subjects(subjects, ev, out)
    result = RobustnessResult(rows=rows, summary=summarize(rows))
    if ev.rank != 0:
        return result, None
    summary_path, json_path = write_results(result, out)
    plot = plot_robustness(result.summary, x, out / PLOT_FILE, title=title)
    return result, StudyFiles(out / ROWS_FILE, summary_path, json_path, plot)
