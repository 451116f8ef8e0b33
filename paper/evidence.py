"""The evidence a section reads: each study's rows and checkpoints, the trainings' records."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cimsim.chip.convert import build_network
from cimsim.files import file_sha256
from cimsim.robustness.plots import plot_robustness, write_table
from cimsim.robustness.rows import ROWS_FILE, Row, TimedRow, read_rows
from cimsim.robustness.summary import summarize, summarize_times
from cimsim.training.methods import passes_per_step, training_passes
from cimsim.validation import ConfigError
from paper.configs import planned_training
from paper.plan import RUN, STUDY, Study

STUDY_MARKER = "done.json"  # a study's record, beside its rows (``reproduce.py``)


def run_of(row: Row) -> str:
    """The training run a row's checkpoint belongs to: ``<out>/train/<run>/checkpoints/x.ckpt``."""
    return Path(row.ckpt).parent.parent.name


def read_json(path: Path) -> dict:
    """A JSON file's object, ``{}`` when there is none."""
    return json.loads(path.read_text()) if path.is_file() else {}


def study_checkpoints(eval_dir: Path, study: Study, manifest: dict) -> dict[str, str]:
    """The checkpoint ``study`` evaluated for each run: as its marker records it, else (an
    older marker) the manifest's best checkpoint, or ``last.ckpt`` beside it."""
    recorded = read_json(eval_dir / study.name / STUDY_MARKER).get("ckpts")
    if recorded:
        return dict(recorded)
    out = {}
    for r in study.runs:
        best = manifest.get("runs", {}).get(r, {}).get("best")
        if best is None:
            raise FileNotFoundError(f"manifest.json has no training {r}: run reproduce.py first")
        out[r] = str(Path(best).parent / "last.ckpt") if study.last else best
    return out


def _on_grid(row: Row, grid: dict | None) -> bool:
    """Whether ``row``'s point is on the study's grid (every point when none is recorded)."""
    if not grid:
        return True

    def among(value, values) -> bool:
        if values is None or any(isinstance(v, str) for v in values):  # "train": per model
            return True
        return any(math.isclose(value, float(v), abs_tol=1e-12) for v in values)

    levels = grid.get("adc_levels")
    if levels is not None and "train" not in levels:
        if row.adc_levels not in [None if n is None else int(n) for n in levels]:
            return False
    times = grid.get("times") if isinstance(row, TimedRow) else None
    return (
        among(row.sigma, grid.get("sigmas"))
        and among(row.mean_shift, grid.get("mean_shifts"))
        and (times is None or among(row.t_inference, times))
    )


def _point(row: Row) -> tuple:
    t, rate = getattr(row, "t_inference", 0), getattr(row, "fault_rate", 0.0)
    return (row.model, row.sigma, row.mean_shift, row.adc_levels, t, rate)


def study_rows(eval_dir: Path, study: Study, chips: int, manifest: dict | None = None) -> list[Row]:
    """The rows of ``study``: each run's rows of the checkpoint the study evaluated for it, at
    the points of the study's grid, chips ``0..chips-1``. Every cell (run and point) must hold
    exactly those ``chips`` chips: a ValueError names the study, run, point and count."""
    path = eval_dir / study.name / ROWS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: run reproduce.py first")
    ckpts = study_checkpoints(eval_dir, study, manifest or {})
    grid = read_json(eval_dir / study.name / STUDY_MARKER).get("grid")
    rows = [
        r
        for r in read_rows(path)
        if ckpts.get(run_of(r)) == r.ckpt and r.chip < chips and _on_grid(r, grid)
    ]
    found: dict[tuple, set[int]] = {}
    for r in rows:
        found.setdefault((run_of(r), *_point(r)), set()).add(r.chip)
    for run in study.runs:
        if not any(key[0] == run for key in found):
            raise ValueError(f"study {study.name}: no rows of run {run} ({ckpts.get(run)})")
    for (run, *point), got in found.items():
        if got != set(range(chips)):
            raise ValueError(
                f"study {study.name}: run {run} at point (model, sigma, mean_shift, adc_levels, "
                f"t, fault_rate) = {tuple(point)} has {len(got)} chips, not {chips}"
            )
    return rows


@functools.lru_cache(maxsize=256)
def ckpt_info(path: str) -> dict:
    """A checkpoint's epochs trained (Lightning's 0-based ``epoch`` + 1), ``global_step``,
    classes and sha256 (``{}`` when it cannot be read)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError):
        return {}
    net = ckpt.get("hyper_parameters", {}).get("net", {})
    return {
        "epochs": int(ckpt.get("epoch", -1)) + 1,
        "global_step": int(ckpt.get("global_step", 0)),
        "num_classes": net.get("num_classes"),
        "sha256": file_sha256(path),
    }


def same_models(ckpts: dict[str, str]) -> list[list[str]]:
    """Groups of runs (2 or more) whose evaluated checkpoints have identical sha256."""
    by: dict[str, list[str]] = {}
    for run, path in ckpts.items():
        sha = ckpt_info(path).get("sha256")
        if sha:
            by.setdefault(sha, []).append(run)
    return [runs for runs in by.values() if len(runs) > 1]


def same_model_text(ckpts: dict[str, str]) -> str:
    groups = same_models(ckpts)
    if not groups:
        return "No two evaluated checkpoints are the same file (sha256)."
    return " ".join(
        "Same model: " + " and ".join(RUN[r].title for r in g) + " evaluate byte-identical "
        f"checkpoints (sha256 {ckpt_info(ckpts[g[0]])['sha256'][:12]})."
        for g in groups
    )


def identity_shortcuts(ckpt: str) -> int | None:
    """How many identity shortcuts (``nn.Identity``) the checkpoint's network has (None: the
    checkpoint cannot be read)."""
    try:
        hparams = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
        net = build_network(dict(hparams["net"]))
    except (OSError, KeyError, RuntimeError, ConfigError):
        return None
    return sum(isinstance(m, nn.Identity) for m in net.modules())


def accuracy_records(rows: Sequence[Row]) -> list[dict]:
    """The CSV of a figure: per run and grid point, mean, CI and chips over the rows."""
    summary = summarize(rows)
    label_run = {r.model: run_of(r) for r in rows}
    return [{"run": label_run[s["model"]], **s} for s in summary]


@dataclass
class Context:
    """What every section reads: the rows' folder, the report's folder, the chips per point,
    the trainings' manifest entries (``reproduce.py``), the command's record (``meta``), the
    figures' link prefix."""

    eval_dir: Path
    figures: Path
    chips: int
    manifest: dict
    meta: dict = field(default_factory=dict)
    link: str = "results"
    written: list[Path] = field(default_factory=list)

    def rows(self, study: str) -> list[Row]:
        return study_rows(self.eval_dir, STUDY[study], self.chips, self.manifest)

    def marker(self, study: str) -> dict:
        return read_json(self.eval_dir / study / STUDY_MARKER)

    def figure(self, name: str, rows: Sequence[Row], x: str, title: str) -> str:
        """Draw rows' means and CIs against ``x`` into ``<figures>/<name>.png``, write their
        table as ``<name>.csv``; return the markdown image link."""
        summary = summarize(rows) if x != "t_inference" else summarize_times(rows)
        self.written.append(plot_robustness(summary, x, self.figures / f"{name}.png", title))
        self.written.append(write_table(self.figures / f"{name}.csv", accuracy_records(rows)))
        link = f"{self.link}/{name}"
        return f"![{title}]({link}.png)\n\n(Table: [`{name}.csv`]({link}.csv).)"

    def run_L(self, run: str) -> int:
        """The run's L as its training recorded it (``manifest.json``), else as the plan's
        composed config says."""
        recorded = self.manifest.get("runs", {}).get(run, {}).get("L")
        return int(recorded) if recorded is not None else planned_training(run)[0]

    def passes(self, run: str, steps: int) -> int:
        """Forward-backward passes of ``steps`` training steps of ``run`` (the training
        methods' one rule, ``training_passes``)."""
        return training_passes(steps, self.run_L(run), planned_training(run)[1])

    def compute_per_step(self, run: str) -> float:
        """A training step's compute in forward-backward passes, a teacher's forward a third of
        one (the training methods' ``passes_per_step``)."""
        return passes_per_step(self.run_L(run), planned_training(run)[1])

    def evaluated(self, study: str, run: str) -> dict:
        """The checkpoint ``study`` evaluated for ``run``: its path, epochs trained, the run's
        max epochs, global step and forward-backward passes."""
        path = study_checkpoints(self.eval_dir, STUDY[study], self.manifest)[run]
        info = ckpt_info(path)
        step = info.get("global_step")
        return {
            "path": path,
            "epochs": info.get("epochs"),
            "max_epochs": self.manifest.get("runs", {}).get(run, {}).get("epochs"),
            "global_step": step,
            "passes": None if step is None else self.passes(run, step),
        }
