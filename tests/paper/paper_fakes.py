"""Fake evidence for the report's sections: a study's rows and manifest, with no training."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from dataclasses import asdict
from pathlib import Path

from cimsim.chip.config import AnalogConfig
from cimsim.robustness.grid import RobustnessGrid
from cimsim.robustness.rows import ROWS_FILE, FaultRow, Row, TimedRow, write_rows
from cimsim.robustness.study import subject_label
from paper import plan
from paper.evidence import Context


def write_fake_study(out: Path, study: plan.Study, chips: int, sigmas: list[float]) -> dict:
    """Rows of every run of ``study`` at ``sigmas`` on ``chips`` chips (made-up accuracies) under
    ``<out>/evaluate/<study>/``; returns the manifest entries naming each run's checkpoint."""
    rng = random.Random(study.name)
    runs = {}
    rows = []
    for run in study.runs:
        ckpt = str(out / "train" / run / "checkpoints" / "last.ckpt")  # need not exist
        runs[run] = {"best": ckpt, "L": 4}
        for s in sigmas:
            for c in range(chips):
                acc = round(rng.uniform(0.5, 0.9), 4)
                rows.append(Row(c, c, s, 0.0, None, acc, 1.0, 100, plan.RUN[run].title, ckpt))
    write_rows(out / "evaluate" / study.name / ROWS_FILE, rows)
    return runs


def render_new_section(code: str, plan_line: str, tmp: Path, monkeypatch) -> str:
    """A section written as ``code`` (its ``paper/sections/<name>.py``) with its plan entry
    ``plan_line`` (one ``Section(...)``), rendered from fake rows of its studies."""
    section = eval(plan_line.strip().rstrip(","), vars(plan))  # noqa: S307  (the doc's own line)
    for study in section.studies:
        monkeypatch.setitem(plan.STUDY, study.name, study)
    path = tmp / f"{section.name}.py"
    path.write_text(code)
    spec = importlib.util.spec_from_file_location(f"paper.sections.{section.name}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    runs = {}
    for study in section.studies:
        grid = [o.split("=", 1)[1] for o in study.overrides if o.startswith("robustness.sigmas=")]
        sigmas = json.loads(grid[-1]) if grid else [0.0, 0.05, 0.1]
        runs |= write_fake_study(tmp, study, chips=3, sigmas=sigmas)
    ctx = Context(tmp / "evaluate", tmp / "report" / "results", 3, {"runs": runs})
    return module.render(ctx)


# ------------------------------------------------ the device sections (8a-8d): rows of each kind

FAKE_CHIPS = 6


def _ckpt(out: Path, run: str) -> str:
    return str(out / "train" / run / "checkpoints" / "last.ckpt")  # need not exist


def _label(run: str, grid: RobustnessGrid | None = None, **chip) -> str:
    """The label evaluate.py gives ``run``'s rows on a test chip with ``chip``'s settings."""
    return subject_label(plan.RUN[run].title, AnalogConfig(**chip), grid or RobustnessGrid([0.1]))


def _context(out: Path, study: str, rows: list[Row]) -> Context:
    """``rows`` written as ``study``'s, and a context whose manifest names each run's checkpoint."""
    write_rows(out / "evaluate" / study / ROWS_FILE, rows)
    runs = {r: {"best": _ckpt(out, r), "L": 4} for r in plan.STUDY[study].runs}
    return Context(out / "evaluate", out / "report" / "results", FAKE_CHIPS, {"runs": runs})


def _jitter(rng: random.Random) -> list[float]:
    """Per chip: a zero-mean spread (+-e pairs, so a mean difference is exactly its offset)."""
    half = [rng.uniform(0.005, 0.02) for _ in range(FAKE_CHIPS // 2)]
    return [x for e in half for x in (e, -e)]


def fake_faults(out: Path, holds: bool) -> Context:
    """Fault-sweep rows: the faults model beats HA-SGD by 5 points at the training rate (or
    loses 5 there, ``holds=False``)."""
    rng = random.Random(1)
    d, h, f = plan.STUDY["faults"].runs
    grid = RobustnessGrid([0.1], fault_rates=[0.0, 1e-3, 1e-2, 1e-1])
    rows = []
    for p in grid.fault_rates:
        level = 0.9 - 2 * p
        accs = {d: level - 0.1, h: level, f: level + (0.05 if holds else -0.05) * (p > 0)}
        for run in (d, h, f):
            for c, e in enumerate(_jitter(rng)):
                label, ckpt = _label(run, grid), _ckpt(out, run)
                row = Row(c, c, 0.1, 0.0, None, accs[run] + e, 1.0, 270, label, ckpt)
                rows.append(FaultRow(**asdict(row), fault_rate=p))
    return _context(out, "faults", rows)


def fake_rram(out: Path, holds: bool) -> Context:
    """RRAM time-sweep rows (2 read-outs): the RRAM model 10 points above digital at 1 day (or
    equal to it, ``holds=False``); both fall by 5 points per later time."""
    rng = random.Random(2)
    d, m = plan.STUDY["rram"].runs
    rows = []
    for i, t in enumerate((0.0, 1.0, 86400.0, 172800.0)):
        for run in (d, m):
            acc = 0.9 - 0.05 * i + (0.1 if holds and run == m and t == 86400.0 else 0.0)
            label = _label(run, device="rram")
            for rep in range(2):
                for c, e in enumerate(_jitter(rng)):
                    row = Row(c, c, 0.0, 0.0, None, acc + e, 1.0, 270, label, _ckpt(out, run))
                    rows.append(TimedRow(**asdict(row), t_inference=t, repetition=rep))
    return _context(out, "rram", rows)


def fake_ir_drop(out: Path, holds: bool) -> Context:
    """IR-drop rows: ir_drop 100 costs 30 points with one tile and none with 256 or 64 rows (or
    30 points at every tile size, ``holds=False``); ir_drop 1 costs nothing."""
    rng = random.Random(3)
    (h,) = plan.STUDY["ir_drop"].runs
    rows = []
    for n in plan.IR_TILES:
        for ir in (0.0, 1.0, plan.IR_DROP_STRONG):
            if ir == 1.0 and n is not None:
                continue
            loss = 0.3 if ir == plan.IR_DROP_STRONG and (n is None or not holds) else 0.0
            label = _label(h, tile_rows=n, ir_drop=ir)
            for c, e in enumerate(_jitter(rng)):
                rows.append(
                    Row(c, c, 0.1, 0.0, None, 0.9 - loss + e, 1.0, 270, label, _ckpt(out, h))
                )
    return _context(out, "ir_drop", rows)


def fake_pairs(out: Path, holds: bool) -> Context:
    """Pairs rows: accuracy a smooth function of the weight-error std, so pairs f at sigma 0.1
    equal one pair at the closed form's sigma up to zero-mean noise (or 8 points above it,
    ``holds=False``)."""
    rng = random.Random(4)
    weights_only = {"analog_bn": False, "identity_noise": False, "bias": "digital"}
    rows = []
    for run in plan.STUDY["pairs"].runs:
        for f in plan.PAIRS_F:
            for s in plan.PAIRS_SIGMAS:
                std = s * plan.pairs_factor(f)
                acc = 1.0 - 2 * std + (0.08 if not holds and f != (1.0,) else 0.0)
                label = _label(run, pairs={"f": list(f)}, **weights_only)
                for c, e in enumerate(_jitter(rng)):
                    rows.append(Row(c, c, s, 0.0, None, acc + e, 1.0, 270, label, _ckpt(out, run)))
    return _context(out, "pairs", rows)
