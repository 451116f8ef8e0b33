"""A robustness study: several models, one Monte Carlo sweep each, one set of files and one figure.

Shared by ``evaluate.py`` and the end-of-training ``RobustnessMonitor`` so both write the same
files: ``robustness_rows.csv`` (per chip, resumable; ``cimsim.robustness.rows``), its fingerprints
in ``robustness_rows.fingerprints.json``, per-image outcomes at test sigma 0 when asked for
(``robustness_rows.outcomes.csv``, ``cimsim.robustness.outcomes``), ``robustness_summary.csv``,
``robustness.json`` and ``robustness.png`` (``cimsim.robustness.plots``). Each model's curves are
named by its training recipe and its test chip. With several processes (DDP), each evaluates its
share of the chips (``c = rank, rank + world, ...``) into its own resumable rows file, and rank 0
merges them into exactly the files a single process would have written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from cimsim.chip.config import AnalogConfig
from cimsim.files import file_sha256
from cimsim.robustness.calibration import data_settings
from cimsim.robustness.fingerprints import record_fingerprints
from cimsim.robustness.folders import PLOT_FILE
from cimsim.robustness.grid import EvalSettings, RobustnessGrid, chip_settings
from cimsim.robustness.measure import evaluate_robustness, sort_rows
from cimsim.robustness.outcomes import (
    OUTCOMES_FILE,
    OutcomesFile,
    ordered,
    outcomes_path,
    write_outcomes,
)
from cimsim.robustness.plots import plot_robustness, write_results
from cimsim.robustness.rows import ROWS_FILE, RobustnessResult, Row, RowsFile, write_rows
from cimsim.robustness.summary import summarize


@dataclass
class Subject:
    """One model under test: its label in tables and figures, the analog network, its grid.

    ``ckpt_sha256`` is the SHA-256 of the checkpoint file's bytes (computed from ``ckpt`` when
    left ``None``); without a checkpoint file, the fingerprint hashes the network's weights.
    """

    label: str
    net: nn.Module
    grid: RobustnessGrid
    ckpt: str = ""
    ckpt_sha256: str | None = None
    passes: int | None = None  # training compute: forward-backward passes over all steps


@dataclass
class StudyFiles:
    """The files a study wrote (``run_study``)."""

    rows: Path
    summary: Path
    json: Path
    plot: Path


@dataclass
class Evaluation:
    """How to run the sweeps: the test data, how chips are measured (``settings``; its
    ``chip_indices`` are replaced by this process's share), and this process's place among
    several. ``calib_split`` and ``data_spec`` only describe where the loaders come from, for the
    rows' fingerprints; ``outcomes`` adds the per-image outcomes file and changes no row."""

    test_loader: Iterable
    settings: EvalSettings = field(default_factory=EvalSettings)
    rank: int = 0
    world_size: int = 1
    calib_split: str | None = None
    data_spec: dict | None = None
    outcomes: bool = False  # keep per-image outcomes at test sigma 0 (``outcomes``)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else str(value)


def _differences(settings: dict, default: dict, prefix: str = "") -> list[str]:
    """``key=value`` for every setting that differs from ``default`` (nested: ``pcm.g_max=20``)."""
    parts = []
    for key, value in settings.items():
        if isinstance(value, dict):  # a plug-in device's settings: every one named
            parts += _differences(value, default.get(key) or {}, f"{prefix}{key}.")
        elif key not in default or value != default[key]:
            parts.append(f"{prefix}{key}={_text(value)}")
    return parts


def subject_label(recipe: str, chip: AnalogConfig, grid: RobustnessGrid) -> str:
    """A curve's name: the training ``recipe`` (a recipe label), then every setting of the test
    ``chip`` that differs from ``AnalogConfig``'s defaults, e.g.
    ``train sigma=0.1, L=4 | chip bias=shared``. The grid's axes are the rows' own columns and
    the figure's axes, except one: a single ADC setting other than the training chip's
    ``adc_levels`` is named too, so a label never claims an ADC that its rows do not have. A PCM
    chip reads ``train ..., PCM t_train=3600s | chip device=pcm`` (``t_train`` is the recipe's)."""
    # t_train acts only in training (the recipe names it); a test chip is read at the grid's times.
    # The tiles' ADC levels are the grid's axis in a tile sweep (the rows' adc_levels column).
    axis = ("tile_adc_levels",) if grid.adc_kind == "tile" else ()
    axis += ("faults",) if grid.faulted else ()  # a fault sweep's rows say their faults
    settings = {k: v for k, v in chip_settings(chip).items() if k not in ("t_train", *axis)}
    parts = _differences(settings, chip_settings(AnalogConfig()))
    own = chip.tile_adc_levels if grid.adc_kind == "tile" else chip.adc_levels
    if len(grid.adc_levels) == 1 and grid.adc_levels[0] != own:
        parts.append(f"adc_levels={_text(grid.adc_levels[0])}")
    return f"{recipe} | chip {', '.join(parts)}" if parts else recipe


def _known_settings(subject: Subject, ev: Evaluation) -> dict:
    """What the fingerprint of ``subject``'s rows needs beyond what ``evaluate_robustness``
    knows: the checkpoint file's hash, the data and the calibration split."""
    settings = {"data": data_settings(ev.data_spec), "calib_split": ev.calib_split}
    if subject.ckpt_sha256 is not None:
        settings["ckpt_sha256"] = subject.ckpt_sha256
    elif subject.ckpt and Path(subject.ckpt).is_file():
        settings["ckpt_sha256"] = file_sha256(subject.ckpt)
    return settings


def gather_rows(rows: list[Row], world_size: int) -> list[Row]:
    """All processes' rows (``torch.distributed`` must be initialized when world_size > 1)."""
    if world_size == 1:
        return rows
    parts: list = [None] * world_size
    dist.all_gather_object(parts, rows)
    return [r for part in parts for r in part]


def _share(ev: Evaluation, grid: RobustnessGrid) -> EvalSettings:
    """This process's chips of ``grid``, ``rank, rank + world_size, ...``; rank 0 shows progress."""
    chips = range(ev.rank, grid.chips, ev.world_size)
    return replace(ev.settings, chip_indices=chips, progress=ev.settings.progress and ev.rank == 0)


def evaluate_subjects(subjects: Sequence[Subject], ev: Evaluation, out: Path) -> list[Row]:
    """Every subject's rows, this process's share of the chips first, then everyone's, in the
    order a single process produces them (subject by subject, then chip and grid order)."""
    name = (
        ROWS_FILE if ev.world_size == 1 else f"robustness_rows.rank{ev.rank}of{ev.world_size}.csv"
    )
    mine, fingerprints, images = [], {}, []
    for s in subjects:
        rows_file = RowsFile(out / name, s.label, s.ckpt, known=_known_settings(s, ev))
        outcomes = OutcomesFile(outcomes_path(out / name), rows_file) if ev.outcomes else None
        share = _share(ev, s.grid)
        result = evaluate_robustness(s.net, ev.test_loader, s.grid, share, rows_file, outcomes)
        mine += result.rows
        fingerprints.update(result.fingerprints)
        images += [] if outcomes is None else list(outcomes.entries.values())
    everyone = gather_rows(mine, ev.world_size)
    if ev.outcomes and ev.world_size > 1:  # every rank gathers; rank 0 writes the merge
        merged = gather_rows(images, ev.world_size)
        if ev.rank == 0:
            write_outcomes(
                out / OUTCOMES_FILE,
                [o for s in subjects for o in ordered(_of(merged, s), s.grid)],
            )
    rows = []
    for s in subjects:
        rows += sort_rows(_of(everyone, s), s.grid)
    if ev.world_size > 1 and ev.rank == 0:
        write_rows(out / ROWS_FILE, rows)
        record_fingerprints(out / ROWS_FILE, fingerprints)
    return rows


def _of(items: list, s: Subject) -> list:
    """The rows or outcomes of subject ``s``."""
    return [r for r in items if (r.model, r.ckpt) == (s.label, s.ckpt)]


def run_study(
    subjects: Sequence[Subject],
    ev: Evaluation,
    out_dir: str | os.PathLike,
    x: str,
    title: str | None = None,
) -> tuple[RobustnessResult, StudyFiles | None]:
    """Evaluate every subject with chips from the same seed (common random numbers across
    models), then, on rank 0, write the summary, the JSON and a figure of accuracy against ``x``.

    Rerunning the same study skips the chips already in the rows file(s) (and says how many
    were read back); rows computed with other settings (another checkpoint file at the same
    path, other data, test chip, limits or calibration) are moved to ``robustness_rows.stale.csv``
    and recomputed. One process writes to ``out_dir`` at a time: ``evaluate.py`` holds it
    (``cimsim.robustness.folders.hold_folder``). Returns the combined result (on every rank) and
    the files written (``None`` on other ranks).
    """
    out = Path(out_dir)
    rows = evaluate_subjects(subjects, ev, out)
    result = RobustnessResult(rows=rows, summary=summarize(rows))
    if ev.rank != 0:
        return result, None
    summary_path, json_path = write_results(result, out)
    plot = plot_robustness(result.summary, x, out / PLOT_FILE, title=title)
    return result, StudyFiles(out / ROWS_FILE, summary_path, json_path, plot)
