"""Fake evidence for the report's sections: a study's rows and manifest, with no training; each
fake writes one training seed (the default) or several (folders ``<run>.s<k>``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from cimsim.chip.config import AnalogConfig
from cimsim.robustness.grid import RobustnessGrid
from cimsim.robustness.rows import ROWS_FILE, FaultRow, Row, TimedRow, read_rows, write_rows
from cimsim.robustness.study import subject_label
from paper import plan
from paper.evidence import STUDY_MARKER, Context, model_of, run_of


def write_fake_study(
    out: Path, study: plan.Study, chips: int, sigmas: list[float], seeds: int = 1
) -> dict:
    """Rows of every run of ``study`` at each of ``seeds`` training seeds, at ``sigmas`` on
    ``chips`` chips (made-up accuracies) under ``<out>/evaluate/<study>/``, and its marker naming
    the checkpoints; returns the manifest entries naming each training folder's checkpoint."""
    rng = random.Random(study.name)
    runs = {}
    rows = []
    for k in range(seeds):
        for run in study.runs:
            folder = plan.seed_name(run, k)
            ckpt = _ckpt(out, folder)
            runs[folder] = {"best": ckpt, "L": 4}
            for s in sigmas:
                for c in range(chips):
                    acc = round(rng.uniform(0.5, 0.9), 4)
                    rows.append(Row(c, c, s, 0.0, None, acc, 1.0, 100, plan.RUN[run].title, ckpt))
    _write_study(out, study.name, rows, chips, seeds)
    return runs


def render_new_section(code: str, plan_line: str, tmp: Path, monkeypatch, seeds: int = 1) -> str:
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
        runs |= write_fake_study(tmp, study, chips=3, sigmas=sigmas, seeds=seeds)
    ctx = Context(tmp / "evaluate", tmp / "report" / "results", 3, {"runs": runs})
    ctx.meta["seeds"] = seeds
    return module.render(ctx)


# ---------------------------------------------------------- rows of each kind, at training seeds

FAKE_CHIPS = 6


def _ckpt(out: Path, folder: str) -> str:
    return str(out / "train" / folder / "checkpoints" / "last.ckpt")  # need not exist


def _label(run: str, grid: RobustnessGrid | None = None, **chip) -> str:
    """The label evaluate.py gives ``run``'s rows on a test chip with ``chip``'s settings."""
    return subject_label(plan.RUN[run].title, AnalogConfig(**chip), grid or RobustnessGrid([0.1]))


def _write_study(out: Path, study: str, rows: list[Row], chips: int, seeds: int) -> None:
    """``rows`` as ``study``'s, with the marker reproduce.py writes: each training folder's
    checkpoint and the chips per point. With several training seeds, each label ends in
    `` (<training folder>)``, as evaluate.py tells checkpoints of one recipe apart."""
    if seeds > 1:
        rows = [dataclasses.replace(r, model=f"{r.model} ({run_of(r)})") for r in rows]
    write_rows(out / "evaluate" / study / ROWS_FILE, rows)
    ckpts = {run_of(r): r.ckpt for r in rows}
    marker = {"ckpts": ckpts, "chips": chips}
    (out / "evaluate" / study / STUDY_MARKER).write_text(json.dumps(marker))


def _context(out: Path, rows: dict[str, list[Row]], seeds: int) -> Context:
    """Each study's ``rows`` written, and a context whose manifest names each training folder's
    checkpoint and whose command record has ``seeds``."""
    runs = {}
    for study, got in rows.items():
        _write_study(out, study, got, FAKE_CHIPS, seeds)
        runs |= {run_of(r): {"best": r.ckpt, "L": 4, "epochs": 10} for r in got}
    ctx = Context(out / "evaluate", out / "report" / "results", FAKE_CHIPS, {"runs": runs})
    ctx.meta["seeds"] = seeds
    return ctx


def _jitter(rng: random.Random) -> list[float]:
    """Per chip: a zero-mean spread (+-e pairs, so a mean difference is exactly its offset)."""
    half = [rng.uniform(0.005, 0.02) for _ in range(FAKE_CHIPS // 2)]
    return [x for e in half for x in (e, -e)]


def seed_offset(k: int, *key) -> float:
    """A training seed's own offset of a model's accuracy at a point (``key``): 0 at seed 0 (so
    its rows are the one-seed fakes'), else a fixed draw in +-0.002 (so seeds differ a little)."""
    return 0.0 if k == 0 else random.Random(f"{k}:{key}").uniform(-0.002, 0.002)


def _seeded(seed: int, seeds: int, rows_of: Callable[[int, random.Random], list[Row]]):
    """Rows of every training seed k < ``seeds``: ``rows_of(k, rng)``, the chips' jitter drawn
    from generator ``seed + 100 k`` (seed 0: the one-seed fakes' generator)."""
    return [row for k in range(seeds) for row in rows_of(k, random.Random(seed + 100 * k))]


def fake_faults(out: Path, holds: bool, seeds: int = 1) -> Context:
    """Fault-sweep rows: the faults model beats HA-SGD by 5 points at the training rate (or
    loses 5 there, ``holds=False``)."""
    d, h, f = plan.STUDY["faults"].runs
    grid = RobustnessGrid([0.1], fault_rates=[0.0, 1e-3, 1e-2, 1e-1])

    def rows_of(k: int, rng: random.Random) -> list[Row]:
        rows = []
        for p in grid.fault_rates:
            level = 0.9 - 2 * p
            accs = {d: level - 0.1, h: level, f: level + (0.05 if holds else -0.05) * (p > 0)}
            for run in (d, h, f):
                acc = accs[run] + seed_offset(k, run, p)
                for c, e in enumerate(_jitter(rng)):
                    label, ckpt = _label(run, grid), _ckpt(out, plan.seed_name(run, k))
                    row = Row(c, c, 0.1, 0.0, None, acc + e, 1.0, 270, label, ckpt)
                    rows.append(FaultRow(**asdict(row), fault_rate=p))
        return rows

    return _context(out, {"faults": _seeded(1, seeds, rows_of)}, seeds)


def fake_rram(out: Path, holds: bool, seeds: int = 1) -> Context:
    """RRAM time-sweep rows (2 read-outs): the RRAM model 10 points above digital at 1 day (or
    equal to it, ``holds=False``); both fall by 5 points per later time."""
    d, m = plan.STUDY["rram"].runs

    def rows_of(k: int, rng: random.Random) -> list[Row]:
        rows = []
        for i, t in enumerate((0.0, 1.0, 86400.0, 172800.0)):
            for run in (d, m):
                acc = 0.9 - 0.05 * i + (0.1 if holds and run == m and t == 86400.0 else 0.0)
                acc += seed_offset(k, run, t)
                label, ckpt = _label(run, device="rram"), _ckpt(out, plan.seed_name(run, k))
                for rep in range(2):
                    for c, e in enumerate(_jitter(rng)):
                        row = Row(c, c, 0.0, 0.0, None, acc + e, 1.0, 270, label, ckpt)
                        rows.append(TimedRow(**asdict(row), t_inference=t, repetition=rep))
        return rows

    return _context(out, {"rram": _seeded(2, seeds, rows_of)}, seeds)


def fake_ir_drop(out: Path, holds: bool, seeds: int = 1) -> Context:
    """IR-drop rows: ir_drop 100 costs 30 points with one tile and none with 256 or 64 rows (or
    30 points at every tile size, ``holds=False``); ir_drop 1 costs nothing."""
    (h,) = plan.STUDY["ir_drop"].runs

    def rows_of(k: int, rng: random.Random) -> list[Row]:
        rows = []
        for n in plan.IR_TILES:
            for ir in (0.0, 1.0, plan.IR_DROP_STRONG):
                if ir == 1.0 and n is not None:
                    continue
                loss = 0.3 if ir == plan.IR_DROP_STRONG and (n is None or not holds) else 0.0
                acc = 0.9 - loss + seed_offset(k, n, ir)
                label, ckpt = _label(h, tile_rows=n, ir_drop=ir), _ckpt(out, plan.seed_name(h, k))
                for c, e in enumerate(_jitter(rng)):
                    rows.append(Row(c, c, 0.1, 0.0, None, acc + e, 1.0, 270, label, ckpt))
        return rows

    return _context(out, {"ir_drop": _seeded(3, seeds, rows_of)}, seeds)


def fake_pairs(out: Path, holds: bool, seeds: int = 1) -> Context:
    """Pairs rows: accuracy a smooth function of the weight-error std, so pairs f at sigma 0.1
    equal one pair at the closed form's sigma up to zero-mean noise (or 8 points above it,
    ``holds=False``)."""
    weights_only = {"analog_bn": False, "identity_noise": False, "bias": "digital"}

    def rows_of(k: int, rng: random.Random) -> list[Row]:
        rows = []
        for run in plan.STUDY["pairs"].runs:
            ckpt = _ckpt(out, plan.seed_name(run, k))
            for f in plan.PAIRS_F:
                for s in plan.PAIRS_SIGMAS:
                    std = s * plan.pairs_factor(f)
                    acc = 1.0 - 2 * std + (0.08 if not holds and f != (1.0,) else 0.0)
                    acc += seed_offset(k, run, f, s)
                    label = _label(run, pairs={"f": list(f)}, **weights_only)
                    for c, e in enumerate(_jitter(rng)):
                        rows.append(Row(c, c, s, 0.0, None, acc + e, 1.0, 270, label, ckpt))
        return rows

    return _context(out, {"pairs": _seeded(4, seeds, rows_of)}, seeds)


# ------------------------------------------------ sections 5, 7a, 7b: what hurts, PCM, methods

HURT_STEPS = ("hurt_weights", "hurt_bn", "hurt_identity", "hurt_adc")
HURT_COSTS = {  # per model: each step's cost in points (the same at sigma 0.1 and 0.2)
    "digital": {"hurt_bn": 0.06, "hurt_identity": 0.0, "hurt_adc": 0.12},
    "sigma0.1_L4": {"hurt_bn": 0.01, "hurt_identity": 0.0, "hurt_adc": 0.03},
}


def fake_hurts(out: Path, seeds: int = 1) -> Context:
    """Rows of section 5's four studies at sigma 0.1 and 0.2: each step costs ``HURT_COSTS``
    (the ADC the most, then the analog BN, the identity noise nothing), 10 points more at 0.2."""

    def rows_of(study: str) -> Callable[[int, random.Random], list[Row]]:
        def rows(k: int, rng: random.Random) -> list[Row]:
            out_rows = []
            for run, costs in HURT_COSTS.items():
                cost = sum(costs.get(s, 0.0) for s in HURT_STEPS[: HURT_STEPS.index(study) + 1])
                ckpt = _ckpt(out, plan.seed_name(run, k))
                for s in (0.1, 0.2):
                    acc = 0.95 - cost - (0.1 if s == 0.2 else 0.0) + seed_offset(k, study, run, s)
                    for c, e in enumerate(_jitter(rng)):
                        out_rows.append(Row(c, c, s, 0.0, None, acc + e, 1.0, 270, run, ckpt))
            return out_rows

        return rows

    rows = {s: _seeded(10 + i, seeds, rows_of(s)) for i, s in enumerate(HURT_STEPS)}
    return _context(out, rows, seeds)


def fake_pcm(out: Path, seeds: int = 1) -> Context:
    """PCM time-sweep rows (2 read-outs), with and without drift compensation: 1 point lost per
    later time with it, 40 without."""
    comp = _label("pcm", device="pcm")
    none = _label("pcm", device="pcm", pcm={"drift_compensation": "none"})

    def rows_of(k: int, rng: random.Random) -> list[Row]:
        rows = []
        ckpt = _ckpt(out, plan.seed_name("pcm", k))
        for i, t in enumerate((0.0, 3600.0, 31536000.0)):
            for label, fall in ((comp, 0.01), (none, 0.4)):
                acc = 0.95 - fall * i + seed_offset(k, label, t)
                for rep in range(2):
                    for c, e in enumerate(_jitter(rng)):
                        row = Row(c, c, 0.0, 0.0, None, acc + e, 1.0, 270, label, ckpt)
                        rows.append(TimedRow(**asdict(row), t_inference=t, repetition=rep))
        return rows

    return _context(out, {"pcm": _seeded(5, seeds, rows_of)}, seeds)


METHOD_GAINS = {  # each method's accuracy at test sigma 0.1 minus HA-SGD's (sigma 0.1, L = 4)
    "digital": -0.3,
    "sigma0.1_L1": -0.02,
    "sigma0.1_L4": 0.0,
    "antithetic": 0.0,
    "ramp": 0.01,
    "overscaled": -0.05,
    "distill": 0.03,
    "sam": 0.0,
}


def fake_methods(out: Path, seeds: int = 1) -> Context:
    """Rows of section 7b at test sigma 0, 0.1 and 0.2 (HA-SGD 90 % at 0.1, each method
    ``METHOD_GAINS`` from it), and checkpoint files that say epoch ``5 + k`` and step
    ``100 (5 + k)`` at seed k; at seed 1, SAM's file is a copy of distillation's."""
    runs = plan.STUDY["methods"].runs
    assert set(runs) == set(METHOD_GAINS)

    def rows_of(k: int, rng: random.Random) -> list[Row]:
        rows = []
        for run in runs:
            ckpt = _ckpt(out, plan.seed_name(run, k))
            Path(ckpt).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"epoch": 4 + k, "global_step": 100 * (5 + k), "run": run}, ckpt)
            for s in (0.0, 0.1, 0.2):
                acc = 0.95 - s / 2 + METHOD_GAINS[run] * (s > 0) + seed_offset(k, run, s)
                for c, e in enumerate(_jitter(rng)):
                    rows.append(Row(c, c, s, 0.0, None, acc + e, 1.0, 270, run, ckpt))
        if k == 1:
            shutil.copy(_ckpt(out, "distill.s1"), _ckpt(out, "sam.s1"))
        return rows

    return _context(out, {"methods": _seeded(6, seeds, rows_of)}, seeds)


def shift_seed(
    ctx: Context, study: str, folder: str, delta: float, keep: Callable[[Row], bool]
) -> None:
    """Add ``delta`` to the accuracy of ``study``'s rows of training folder ``folder`` that
    ``keep`` holds, in its rows file (a mutation of one training seed's rows)."""
    path = ctx.eval_dir / study / ROWS_FILE
    rows = [
        dataclasses.replace(r, acc=r.acc + delta) if run_of(r) == folder and keep(r) else r
        for r in read_rows(path)
    ]
    assert any(run_of(r) == folder for r in rows), folder
    write_rows(path, rows)


def seed_means(rows: list[Row], run: str, keep: Callable[[Row], bool]) -> list[float]:
    """Per training seed of the plan's ``run``, in seed order: the mean accuracy of its rows
    that ``keep`` holds (over chips and read-outs alike), computed here independently."""
    by: dict[int, list[float]] = {}
    for r in rows:
        base, k = model_of(r)
        if base == run and keep(r):
            by.setdefault(k, []).append(r.acc)
    return [sum(v) / len(v) for _, v in sorted(by.items())]
