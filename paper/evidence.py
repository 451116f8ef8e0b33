"""The evidence a section reads: each study's rows and checkpoints, the trainings' records.

A report is written from a plan's output folder (``<out>``: checkpoints, rows, markers) and can
be rendered again from its published evidence alone (``paper.publish``: the rows it used, the
markers, the manifest, ``facts.json``; no checkpoint, no data). Whatever a section reads other
than rows, markers and the manifest (a checkpoint's step count or hash, per-layer weight ranges,
per-image outcomes, the test set's size) is a *fact*, and goes through one hook so that both
renderings state the same thing:

    ctx.facts(name, compute, key="")  # -> the fact's value (JSON: dict, list, str, number, None)

* Writing the report (``write_report``, ``Facts(root=<out>)``): ``compute()`` is called once per
  (name, key), its value is kept and published in ``facts.json``.
* Rendering from published evidence (``Facts(stored=...)``): the stored value is returned and
  ``compute`` is never called; a fact the evidence lacks is a ``LookupError`` naming it.

``key`` tells the facts of one name apart, e.g. a checkpoint's path (``r.ckpt``: a path under
``<out>`` is keyed relative to it, as the published rows name it, so the same row finds the same
fact both ways). The value is passed through JSON in both cases, so a section sees the same types
either way (tuples become lists, dict keys strings). Module-level helpers without a context use
``fact(name, key, compute)``, the active report's store (``ckpt_info``, ``identity_shortcuts``);
outside a report it just computes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cimsim.chip.convert import build_network
from cimsim.files import file_sha256
from cimsim.robustness.plots import plot_robustness, write_table
from cimsim.robustness.rows import ROWS_FILE, Row, TimedRow, read_rows
from cimsim.robustness.stats import mean_std, t_ci95
from cimsim.robustness.summary import summarize, summarize_times
from cimsim.training.methods import passes_per_step, training_passes
from cimsim.validation import ConfigError
from paper.configs import planned_training
from paper.plan import RUN, SECTIONS, STUDY, Section, Study, base_of, restricted, seed_name
from paper.publish import ROWS_GZ, STUDY_MARKER, read_rows_gz, relative_text, roots_of


class Facts:
    """The facts of one report (see the module's docstring): computed and kept while a report is
    written from the plan under ``root``, or replayed from a published ``stored`` table."""

    def __init__(self, root: Path | None = None, stored: dict | None = None):
        self.roots = roots_of(root)
        self.replaying = stored is not None
        self.table: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (stored or {}).items()}

    def get(self, name: str, key: Any, compute: Callable[[], Any]) -> Any:
        """The fact ``name`` of ``key``: stored, or computed now and kept (not when replaying)."""
        k = relative_text(str(key), self.roots)
        known = self.table.setdefault(name, {})
        if k not in known:
            if self.replaying:
                why = "render the report from its plan (reproduce.py --report-only) to publish it"
                raise LookupError(f"the published evidence holds no fact {name!r} of {k!r}: {why}")
            known[k] = json.loads(json.dumps(compute()))  # as a replay returns it
        return known[k]

    @contextlib.contextmanager
    def active(self) -> Iterator[Facts]:
        """Make this the store ``fact`` uses while a report is rendered."""
        _ACTIVE.append(self)
        try:
            yield self
        finally:
            _ACTIVE.pop()


_ACTIVE: list[Facts] = []  # the store of the report being rendered (``Facts.active``)


def fact(name: str, key: Any, compute: Callable[[], Any]) -> Any:
    """The fact ``name`` of ``key`` from the active report's store; outside a report, computed."""
    return _ACTIVE[-1].get(name, key, compute) if _ACTIVE else compute()


def run_of(row: Row) -> str:
    """The training folder a row's checkpoint belongs to: ``<out>/train/<run>/checkpoints/x.ckpt``
    (``<run>.s<k>`` for training seed k > 0)."""
    return Path(row.ckpt).parent.parent.name


def model_of(row: Row) -> tuple[str, int]:
    """(the plan's run, the training seed index) of a row."""
    return base_of(run_of(row))


def ci_text(seeds: int, chips: int) -> str:
    """What ``mean ± 95 % CI`` means with ``seeds`` training seeds over ``chips`` chips."""
    if seeds > 1:
        return (
            f"mean ± 95 % CI over {seeds} training seeds (each seed's accuracy is its mean over "
            f"the same {chips} chips; the CI covers training and chip variance)"
        )
    return f"mean ± 95 % CI over {chips} chips (one training seed: chip variance only)"


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}  # {} when there is none


def study_checkpoints(eval_dir: Path, study: Study, manifest: dict) -> dict[str, str]:
    """The checkpoint ``study`` evaluated for each run: as its marker records it, else (an
    older marker) the manifest's best checkpoint, or ``last.ckpt`` beside it."""
    recorded = read_json(eval_dir / study.name / STUDY_MARKER).get("ckpts")
    if recorded:
        return dict(recorded)
    out = {}
    for r in study.runs:  # an older marker: seed 0 only
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
    published = path.with_name(ROWS_GZ)  # published evidence (``paper.publish``)
    if not path.exists() and not published.exists():
        raise FileNotFoundError(f"{path}: run reproduce.py first")
    ckpts = study_checkpoints(eval_dir, study, manifest or {})
    grid = read_json(eval_dir / study.name / STUDY_MARKER).get("grid")
    rows = [
        r
        for r in (read_rows(path) if path.exists() else read_rows_gz(published))
        if ckpts.get(run_of(r)) == r.ckpt and r.chip < chips and _on_grid(r, grid)
    ]
    found: dict[tuple, set[int]] = {}
    for r in rows:
        found.setdefault((run_of(r), *_point(r)), set()).add(r.chip)
    for run in ckpts:  # every training seed of every run the study evaluated
        if not any(key[0] == run for key in found):
            raise ValueError(f"study {study.name}: no rows of run {run} ({ckpts.get(run)})")
    for (run, *point), got in found.items():
        if got != set(range(chips)):
            raise ValueError(
                f"study {study.name}: run {run} at point (model, sigma, mean_shift, adc_levels, "
                f"t, fault_rate) = {tuple(point)} has {len(got)} chips, not {chips}"
            )
    return rows


def ckpt_info(path: str) -> dict:
    """A checkpoint's epochs trained (Lightning's 0-based ``epoch`` + 1), ``global_step``,
    classes and sha256 (``{}`` when it cannot be read); a fact (``fact``)."""
    return fact("ckpt_info", path, lambda: _read_ckpt_info(path))


@functools.lru_cache(maxsize=256)
def _read_ckpt_info(path: str) -> dict:
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


def _seed_title(folder: str) -> str:
    run, k = base_of(folder)
    return RUN[run].title + (f" (training seed {k})" if k else "")


def same_model_text(ckpts: dict[str, str]) -> str:
    groups = same_models(ckpts)
    if not groups:
        return "No two evaluated checkpoints are the same file (sha256)."
    return " ".join(
        "Same model: " + " and ".join(_seed_title(r) for r in g) + " evaluate byte-identical "
        f"checkpoints (sha256 {ckpt_info(ckpts[g[0]])['sha256'][:12]})."
        for g in groups
    )


def identity_shortcuts(ckpt: str) -> int | None:
    """How many identity shortcuts (``nn.Identity``) the checkpoint's network has (None: the
    checkpoint cannot be read); a fact (``fact``)."""
    return fact("identity_shortcuts", ckpt, lambda: _count_identity_shortcuts(ckpt))


def _count_identity_shortcuts(ckpt: str) -> int | None:
    try:
        hparams = torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
        net = build_network(dict(hparams["net"]))
    except (OSError, KeyError, RuntimeError, ConfigError):
        return None
    return sum(isinstance(m, nn.Identity) for m in net.modules())


def accuracy_records(rows: Sequence[Row]) -> list[dict]:
    """The CSV of a figure: per run and grid point, mean, CI and chips over the rows (over
    training seeds when the rows hold two or more: ``seed_summary``)."""
    summary = seed_summary(rows)
    if summary is not None:
        return summary
    summary = summarize(rows)
    label_run = {r.model: run_of(r) for r in rows}
    return [{"run": label_run[s["model"]], **s} for s in summary]


_STATS = ("model", "acc_mean", "acc_std", "acc_ci95", "loss_mean", "chips", "repetitions")
_STATS += ("acc_std_chip", "acc_std_read", "acc_p5")


def seed_summary(rows: Sequence[Row]) -> list[dict] | None:
    """With two or more training seeds in ``rows`` (None otherwise): per plan run and grid
    point, each seed's mean over its chips (``summarize``/``summarize_times``: over read-outs
    first), then the mean, std and Student-t 95 % CI over seeds (``acc_ci95``), ``seeds`` and
    ``chips`` per seed. The label is seed 0's, without evaluate.py's ``(<folder>)`` suffix."""
    if len({model_of(r)[1] for r in rows}) < 2:
        return None
    timed = any(isinstance(r, TimedRow) for r in rows)
    per_seed = summarize_times(rows) if timed else summarize(rows)
    folder = {r.model: run_of(r) for r in rows}
    groups: dict[tuple, dict[int, dict]] = {}
    for e in per_seed:  # a run's test-chip variants (labels) stay apart
        run, k = base_of(folder[e["model"]])
        label = e["model"].removesuffix(f" ({seed_name(run, k)})")
        point = tuple((key, v) for key, v in e.items() if key not in _STATS)
        groups.setdefault((run, label, point), {})[k] = e
    out = []
    for (run, label, point), by_seed in groups.items():
        means = [by_seed[k]["acc_mean"] for k in sorted(by_seed)]
        mean, std = mean_std(means)
        out.append(
            {
                "run": run,
                "model": label,
                **dict(point),
                "acc_mean": mean,
                "acc_std": std,
                "acc_ci95": t_ci95(std, len(means)),
                "loss_mean": math.fsum(e["loss_mean"] for e in by_seed.values()) / len(by_seed),
                "seeds": len(means),
                "chips": min(e["chips"] for e in by_seed.values()),
            }
        )
    return out


@dataclass
class Context:
    """What every section reads: the rows' folder, the report's folder, the chips per point,
    the trainings' manifest entries (``reproduce.py``), the command's record (``meta``), the
    figures' link prefix, the report's facts (``store``; ``facts``), the rows it used."""

    eval_dir: Path
    figures: Path
    chips: int
    manifest: dict
    meta: dict = field(default_factory=dict)
    link: str = "results"
    written: list[Path] = field(default_factory=list)
    store: Facts = field(default_factory=Facts)
    used: dict[str, list[Row]] = field(default_factory=dict)  # study -> its rows, as read
    section: Section | None = None  # the section being rendered (its studies' seeds)

    def rows(self, study: str) -> list[Row]:
        rows = study_rows(self.eval_dir, self.study(study), self.study_chips(study), self.manifest)
        self.used[study] = rows  # what the published evidence holds (``paper.publish``)
        return rows

    def facts(self, name: str, compute: Callable[[], Any], key: Any = "") -> Any:
        """The fact ``name`` (of ``key``): ``compute()`` while the report is written from its
        plan, the published value when it is rendered from published evidence (the module's
        docstring)."""
        return self.store.get(name, key, compute)

    @property
    def sections(self) -> tuple[Section, ...]:
        """The sections this report renders: the command's (``meta["sections"]``), else all,
        their studies cut to the command's ``--models`` (``meta["models"]``)."""
        names = self.meta.get("sections")
        chosen = SECTIONS if not names else tuple(s for s in SECTIONS if s.name in names)
        models = self.meta.get("models")
        return restricted(chosen, None if models is None else tuple(models))

    def study(self, name: str) -> Study:
        """The study ``name`` as this report ran it: its runs cut to ``--models``."""
        ran = {st.name: st for sec in self.sections for st in sec.studies}
        return ran[name] if self.meta.get("models") is not None else ran.get(name, STUDY[name])

    def study_chips(self, study: str) -> int:
        """Chips per point of ``study`` (its marker's record; ``--chips`` at most)."""
        return int(self.marker(study).get("chips") or self.chips)

    @property
    def seeds(self) -> int:
        """Training seeds per model: the command's ``--seeds`` (1 for an older plan), at most
        the cap of the section being rendered (``Study.seeds``)."""
        seeds = int(self.meta.get("seeds") or 1)
        caps = [st.seeds for st in self.section.studies if st.seeds] if self.section else []
        return min([seeds, *caps])

    def ci_text(self, study: str) -> str:
        """What a table's ``mean ± CI`` covers in ``study``."""
        return ci_text(self.seeds, self.study_chips(study))

    def marker(self, study: str) -> dict:
        return read_json(self.eval_dir / study / STUDY_MARKER)

    def figure(self, name: str, rows: Sequence[Row], x: str, title: str) -> str:
        """Draw rows' means and CIs against ``x`` into ``<figures>/<name>.png``, write their
        table as ``<name>.csv``; return the markdown image link."""
        summary = seed_summary(rows)
        if summary is None:
            summary = summarize(rows) if x != "t_inference" else summarize_times(rows)
        self.written.append(plot_robustness(summary, x, self.figures / f"{name}.png", title))
        self.written.append(write_table(self.figures / f"{name}.csv", accuracy_records(rows)))
        link = f"{self.link}/{name}"
        return f"![{title}]({link}.png)\n\n(Table: [`{name}.csv`]({link}.csv).)"

    def run_L(self, run: str) -> int:
        """The run's L as its training recorded it (``manifest.json``), else as the plan's
        composed config says."""
        recorded = self.manifest.get("runs", {}).get(run, {}).get("L")
        return int(recorded) if recorded is not None else planned_training(base_of(run)[0])[0]

    def passes(self, run: str, steps: int) -> int:
        """Forward-backward passes of ``steps`` training steps of ``run`` (the training
        methods' one rule, ``training_passes``)."""
        return training_passes(steps, self.run_L(run), planned_training(base_of(run)[0])[1])

    def compute_per_step(self, run: str) -> float:
        """A training step's compute in forward-backward passes, a teacher's forward a third of
        one (the training methods' ``passes_per_step``)."""
        return passes_per_step(self.run_L(run), planned_training(base_of(run)[0])[1])

    def evaluated(self, study: str, run: str) -> dict:
        """The checkpoint ``study`` evaluated for ``run``: its path, epochs trained, the run's
        max epochs, global step and forward-backward passes."""
        path = study_checkpoints(self.eval_dir, self.study(study), self.manifest)[run]
        info = ckpt_info(path)
        step = info.get("global_step")
        return {
            "path": path,
            "epochs": info.get("epochs"),
            "max_epochs": self.manifest.get("runs", {}).get(run, {}).get("epochs"),
            "global_step": step,
            "passes": None if step is None else self.passes(run, step),
        }
