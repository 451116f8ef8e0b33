"""The plan is data written once: each study in one section, each section one module of
paper/sections/, every run a study names trained first; a new study renders from fake rows."""

from __future__ import annotations

import importlib
import re
import sys
from argparse import Namespace
from collections import Counter

import pytest
from docs_blocks import section_blocks
from paper_fakes import render_new_section

from cimsim import ConfigError
from cimsim.chip.devices import registry
from conftest import ROOT
from paper.configs import compose_cfg
from paper.plan import RUN, RUNS, SECTIONS, STUDIES, STUDY, Run, Study
from paper.run import check_study, check_training, split_overrides, study_overrides


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


PLUGIN = """
from dataclasses import dataclass

import cimsim


@dataclass(frozen=True)
class PlanConfig:
    p: float = 0.0


class PlanDevice(cimsim.Device):
    pass


cimsim.register_device("plandev", PlanConfig, PlanDevice)
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A plug-in device module, importable but not imported yet; unregistered afterwards."""
    (tmp_path / "plan_plugin_xyz.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "plan_plugin_xyz"
    sys.modules.pop("plan_plugin_xyz", None)
    registry._REGISTRY.pop("plandev", None)


def test_the_plan_checks_a_training_and_a_study_with_their_plugins(plugin, tmp_path):
    device = ["noise.device=plandev", "+noise.plandev.p=0.5"]
    with pytest.raises(ConfigError, match=r"^noise\.plandev=.* plugins=\[module\]$"):
        check_training(compose_cfg("train", tmp_path, device))  # no plugins: not registered
    check_training(compose_cfg("train", tmp_path, [*device, f"plugins=[{plugin}]"]))
    sys.modules.pop(plugin)
    registry._REGISTRY.pop("plandev")
    chip = ["ckpt=x.ckpt", "chip.device=plandev", "+chip.plandev.p=0.5", f"plugins=[{plugin}]"]
    check_study(compose_cfg("evaluate", tmp_path, chip))


def test_a_study_gets_the_plugins_its_runs_trained_with(monkeypatch, tmp_path):
    over = ["plugins=[mod_a]", "hasgd.L=2", "chip.bias=shared"]
    assert split_overrides(over) == (over[:2], [over[0], over[2]])  # the user's: both
    args = Namespace(tiny=False, epochs=1, chips=2, max_batches=None, seeds=1)
    study = Study("s", ("digital",), ("robustness=sigma_sweep",))

    def plugins(overrides: list[str]) -> list[str]:
        full = study_overrides(study, args, overrides, tmp_path)[1]
        return [o for o in full if o.startswith("plugins=")]

    assert plugins([]) == [] and plugins([over[0]]) == [over[0]]  # the user's, once
    monkeypatch.setitem(RUN, "digital", Run("digital", "d", ("plugins=[mod_b,mod_c.x]",)))
    assert plugins([]) == ["plugins=[mod_b,mod_c.x]"]  # the plan's run's
    assert plugins([over[0]]) == [over[0]]  # the user's replace them, as in the training
