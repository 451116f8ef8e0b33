"""Fake evidence for the report's sections: a study's rows and manifest, with no training."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

from cimsim.robustness.rows import ROWS_FILE, Row, write_rows
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
