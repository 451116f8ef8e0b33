"""The plan is data written once: each study in one section, each section one module of
paper/sections/, every run a study names trained first; a new study renders from fake rows."""

from __future__ import annotations

import importlib
import re
from collections import Counter

from docs_blocks import section_blocks
from paper_fakes import render_new_section

from conftest import ROOT
from paper.plan import RUN, RUNS, SECTIONS, STUDIES, STUDY


def test_each_study_is_listed_once():
    names = [s.name for section in SECTIONS for s in section.studies]
    assert [n for n, k in Counter(names).items() if k > 1] == []
    assert [s.name for s in STUDIES] == names and set(STUDY) == set(names)


def test_every_section_module_is_registered_exactly_once():
    files = {p.stem for p in (ROOT / "paper" / "sections").glob("*.py") if p.stem != "__init__"}
    names = [section.name for section in SECTIONS]
    assert [n for n, k in Counter(names).items() if k > 1] == []
    assert set(names) == files


def test_every_section_the_plan_names_renders():
    for section in SECTIONS:
        module = importlib.import_module(f"paper.sections.{section.name}")
        assert callable(module.render), section.name
        assert module.__doc__ and "\n" not in module.__doc__.strip(), section.name


def test_every_run_a_study_names_is_planned_before_its_students():
    order = [r.name for r in RUNS]
    assert len(set(order)) == len(order)
    assert {r for s in STUDIES for r in s.runs} == set(order)  # no run trained for nothing
    for run in RUNS:
        if run.teacher:
            assert order.index(run.teacher) < order.index(run.name)


def doc_study() -> tuple[str, str]:
    """docs/extending.md's "Add a study": the section file and its plan line, as written."""
    (lang1, section), (lang2, plan_line) = section_blocks(
        ROOT / "docs" / "extending.md", "Add a study"
    )
    assert (lang1, lang2) == ("python", "python")
    return section, plan_line


def test_a_new_study_is_one_section_file_and_one_plan_line(tmp_path, monkeypatch):
    """docs/extending.md's "Add a study", rendered from fake rows of its study."""
    text = render_new_section(*doc_study(), tmp_path, monkeypatch)
    lines = text.splitlines()
    assert lines[0] == "## 8. Small test noise"
    assert lines[2] == f"| test sigma | {RUN['digital'].title} | {RUN['sigma0.1_L4'].title} |"
    assert (
        sum(
            re.fullmatch(r"\| 0\.?\d* \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \|", li) is not None
            for li in lines
        )
        == 3
    )
    assert re.search(r"at sigma 0.05, same chips: [+-]\d+\.\d ± \d+\.\d points \(", text)
