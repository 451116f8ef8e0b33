"""A robustness study: several models, one Monte Carlo sweep each, one set of files and one figure.

Shared by ``evaluate.py`` and the end-of-training ``RobustnessMonitor`` so both write the same
files: ``robustness_rows.csv`` (per chip, resumable), ``robustness_summary.csv``,
``robustness.json`` and ``robustness.png``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from cimsim.robustness import (
    ROWS_FILE,
    RobustnessGrid,
    RobustnessResult,
    evaluate_robustness,
    plot_robustness,
    summarize,
    write_results,
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


def run_study(
    subjects: Sequence[Subject],
    test_loader: Iterable,
    out_dir: str | os.PathLike,
    seed: int,
    x: str,
    calib_loader: Iterable | None = None,
    progress: bool = True,
    max_batches: int | None = None,
    calib_batches: int | None = None,
    title: str | None = None,
) -> tuple[RobustnessResult, StudyFiles]:
    """Evaluate every subject with chips from the same ``seed`` (common random numbers across
    models), then write the summary, the JSON and a figure of accuracy against ``x``.

    Rows go to ``out_dir/robustness_rows.csv`` as each chip finishes; rerunning the same study
    skips the chips already there. Returns the combined result and the files written.
    """
    out = Path(out_dir)
    rows = []
    for subject in subjects:
        result = evaluate_robustness(
            subject.net,
            test_loader,
            subject.grid,
            seed,
            calib_loader=calib_loader,
            rows_path=out / ROWS_FILE,
            progress=progress,
            max_batches=max_batches,
            calib_batches=calib_batches,
            extra={"model": subject.label, "ckpt": subject.ckpt},
        )
        rows += result.rows
    result = RobustnessResult(rows=rows, summary=summarize(rows))
    summary_path, json_path = write_results(result, out)
    plot = plot_robustness(result.summary, x, out / PLOT_FILE, title=title)
    return result, StudyFiles(out / ROWS_FILE, summary_path, json_path, plot)
