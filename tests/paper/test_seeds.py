"""Training seeds in the plan: every model at seeds SEED0 + k, studies over all of them, and the
report's statistics over seeds (each seed's mean over the common chips, then a t-CI)."""

from __future__ import annotations

import csv
import math
import os

import numpy as np
import pytest
import torch
from scipy import stats

from cimsim import ConfigError
from cimsim.robustness.rows import Row
from cimsim.robustness.stats import paired
from paper.evidence import seed_summary
from paper.markdown import acc_text, cell, seed_cells
from paper.plan import (
    CORE,
    RUN,
    RUNS,
    SECTIONS,
    SEED0,
    STUDIES,
    base_of,
    planned_runs,
    seed_name,
    selected,
    study_seeds,
)
from reproduce import parse, reproduce


def test_every_run_is_trained_at_each_seed_seed_by_seed_teachers_first():
    runs = planned_runs(SECTIONS, 3)
    names = [r.name for r in runs]
    need = {r.name: 0 for r in RUNS}  # the most seeds any study of the run measures
    for study in STUDIES:
        for r in study.runs:
            need[r] = max(need[r], study_seeds(study, 3))
    need["digital"] = max(need["digital"], need["distill"])  # a teacher at its students' seeds
    assert len(names) == len(set(names)) == sum(need.values())
    assert names[: len(RUNS)] == [r.name for r in RUNS]  # seed 0 keeps the plan's names
    for i, run in enumerate(runs):
        base, k = base_of(run.name)
        assert k < need[base] and run.name == seed_name(base, k)
        assert [o for o in run.overrides if o.startswith("seed=")] == [f"seed={SEED0 + k}"]
        assert run.overrides[:-1] == RUN[base].overrides  # the plan's own overrides, then the seed
        if run.teacher:  # a student distils from the teacher of its own seed, trained before it
            assert base_of(run.teacher) == (RUN[base].teacher, k)
            assert names.index(run.teacher) < i
    assert need["sigma0.1_L4"] == 3 and need["sigma0.1_L1"] == 1  # capped only where asked
    assert [k for r in runs if base_of(r.name)[0] == "pcm" for k in [base_of(r.name)[1]]] == [0]


def test_a_folder_name_maps_back_to_its_run_and_seed():
    for run in RUNS:
        for k in range(4):
            assert base_of(seed_name(run.name, k)) == (run.name, k)
    assert base_of("not_a_run.s1") == ("not_a_run.s1", 0)  # only the plan's runs have seeds


def test_sections_select_their_trainings_only():
    fig7 = planned_runs(selected(("fig7",)), 2)
    assert {base_of(r.name)[0] for r in fig7} == set(
        next(s for s in SECTIONS if s.name == "fig7").studies[0].runs
    )
    core = {s.name for s in selected(CORE)}
    assert core == {*CORE, "paper_scale"}
    with pytest.raises(ValueError, match="no such section nope"):
        selected(("fig7", "nope"))


def _rows(accs: dict[str, dict[int, float]]) -> list[Row]:
    """Rows at sigma 0.1 of training folders ``accs`` ({folder: {chip: acc}})."""
    return [
        Row(c, c, 0.1, 0.0, None, a, 1.0, 100, f, f"/o/train/{f}/checkpoints/last.ckpt")
        for f, chips in accs.items()
        for c, a in chips.items()
    ]


def test_with_seeds_the_unit_is_a_seeds_mean_over_its_chips():
    rows = _rows(
        {
            "digital": {0: 0.5, 1: 0.7},
            "digital.s1": {0: 0.6, 1: 0.6},
            "digital.s2": {0: 0.9, 1: 0.5},
            "sigma0.1_L4": {0: 0.8, 1: 0.8},
            "sigma0.1_L4.s1": {0: 0.7, 1: 0.9},
            "sigma0.1_L4.s2": {0: 0.75, 1: 0.75},
        }
    )
    assert seed_cells(rows, "digital")[1] == {0: 0.6, 1: 0.6}
    d, h = cell(rows, "digital"), cell(rows, "sigma0.1_L4")
    assert d == pytest.approx({0: 0.6, 1: 0.6, 2: 0.7}) and h == pytest.approx(
        {0: 0.8, 1: 0.8, 2: 0.75}
    )
    diff = paired(h, d)  # per-seed differences 0.2, 0.2, 0.05: a t-CI with 2 degrees of freedom
    x = np.array([0.2, 0.2, 0.05])
    assert diff.chips == 3 and diff.mean == pytest.approx(x.mean())
    assert diff.ci == pytest.approx(stats.t.ppf(0.975, 2) * x.std(ddof=1) / math.sqrt(3))
    assert acc_text(d) == f"{100 * np.mean([0.6, 0.6, 0.7]):.1f} ± " + (
        f"{100 * stats.t.ppf(0.975, 2) * np.std([0.6, 0.6, 0.7], ddof=1) / math.sqrt(3):.1f}"
    )
    one = _rows({"digital": {0: 0.5, 1: 0.7, 2: 0.6}})  # one seed: the chips are the unit
    assert cell(one, "digital") == {0: 0.5, 1: 0.7, 2: 0.6}


def test_a_seed_override_is_refused_before_training(tmp_path):
    args, overrides = parse(["--tiny", "--out", str(tmp_path), "seed=7"])
    with pytest.raises(ConfigError, match="seed.*--seeds"):
        reproduce(["--tiny", "--out", str(tmp_path), "seed=7"])
    assert not (tmp_path / "train").exists()
    with pytest.raises(ConfigError, match="--sections.*no such section"):
        parse(["--tiny", "--sections", "fig7,nope"])
    with pytest.raises(ConfigError, match="--seeds"):
        parse(["--tiny", "--seeds", "0"])


@pytest.mark.slow
def test_a_two_seed_plan_reports_means_and_cis_over_seeds(tmp_path):
    """``--seeds 2 --sections fig7``: each model trained at seeds 42 and 43 (different
    weights), the study measures both, and a table cell is the mean of the two seeds' chip
    means with a t-CI over the seeds."""
    torch.set_num_threads(1)
    out, docs = tmp_path / "out", tmp_path / "docs"
    argv = ["--tiny", "--seeds", "2", "--sections", "fig7", "--out", str(out)]
    meta = reproduce([*argv, "--report-dir", str(docs)])
    assert meta["seeds"] == 2 and meta["sections"] == ["fig7", "paper_scale"]
    s0 = torch.load(out / "train/digital/checkpoints/last.ckpt", weights_only=True)
    s1 = torch.load(out / "train/digital.s1/checkpoints/last.ckpt", weights_only=True)
    assert s0["run"]["config"]["seed"] == SEED0 and s1["run"]["config"]["seed"] == SEED0 + 1
    w0, w1 = (next(iter(s["state_dict"].values())) for s in (s0, s1))
    assert not torch.equal(w0, w1)
    with open(out / "evaluate" / "fig7" / "robustness_rows.csv") as f:
        rows = [r for r in csv.DictReader(f) if float(r["sigma"]) == 0.2]
    by_seed = {}
    for r in rows:
        folder = r["ckpt"].split(os.sep)[-3]
        if base_of(folder)[0] == "digital":
            by_seed.setdefault(folder, []).append(float(r["acc"]))
    assert sorted(by_seed) == ["digital", "digital.s1"]
    means = [np.mean(v) for v in by_seed.values()]
    ci = stats.t.ppf(0.975, 1) * np.std(means, ddof=1) / math.sqrt(2)
    line = next(
        li for li in (docs / "results.md").read_text().splitlines() if li.startswith("| 0.2 |")
    )
    assert line.split(" | ")[1] == f"{100 * np.mean(means):.1f} ± {100 * ci:.1f}"
    assert "over 2 training seeds" in (docs / "results.md").read_text()


def test_a_figure_over_seeds_keeps_each_test_chip_variant_its_own_curve():
    """Two seeds, two test-chip variants of one run: one curve per variant, each the mean and
    t-CI over the seeds' chip means (evaluate.py's "(<folder>)" label suffix dropped)."""
    rows = []
    for folder, base in (("pcm", 0.5), ("pcm.s1", 0.7)):
        for label, shift in (("pcm | chip compensation=global", 0.2), ("pcm | chip", 0.0)):
            for c, a in enumerate((base + shift, base + shift + 0.1)):
                rows.append(
                    Row(
                        c,
                        c,
                        0.1,
                        0.0,
                        None,
                        a,
                        1.0,
                        100,
                        f"{label} ({folder})",
                        f"/o/train/{folder}/checkpoints/last.ckpt",
                    )
                )
    summary = seed_summary(rows)
    assert sorted(s["model"] for s in summary) == ["pcm | chip", "pcm | chip compensation=global"]
    glob = next(s for s in summary if s["model"].endswith("global"))
    seeds = [0.75, 0.95]  # each seed's mean over its two chips
    assert glob["acc_mean"] == pytest.approx(np.mean(seeds)) and glob["seeds"] == 2
    assert glob["acc_ci95"] == pytest.approx(
        stats.t.ppf(0.975, 1) * np.std(seeds, ddof=1) / math.sqrt(2)
    )
    assert seed_summary(rows[:4]) is None  # one seed: no summary over seeds
