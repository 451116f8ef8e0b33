"""reproduce.py end to end in its tiny mode: the report's tables are the rows' numbers, and a
rerun reuses every finished training and chip."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import torch
from scipy import stats

from cimsim import ConfigError
from cimsim.results import MEAN_SHIFT, RUNS, STUDIES
from reproduce import reproduce


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # a width-1 network gains nothing from a second thread


def tiny_args(tmp) -> list[str]:
    return ["--tiny", "--out", str(tmp / "out"), "--report-dir", str(tmp / "docs")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny report (1 epoch of 2 batches, width 1, 2 chips, 1 test batch)."""
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("reproduce")
    meta = reproduce(tiny_args(tmp))
    return tmp, meta


def rows_of(tmp, study):
    with open(tmp / "out" / "evaluate" / study / "robustness_rows.csv") as f:
        return list(csv.DictReader(f))


def accs(rows, run, **point):
    """{chip: acc} of ``run``'s rows at ``point`` (column -> value as float or text)."""
    out = {}
    for r in rows:
        if r["ckpt"].split(os.sep)[-3] != run:
            continue
        if all(float(r[k]) == v for k, v in point.items()):
            out[int(r["chip"])] = float(r["acc"])
    return out


def mean_ci(values):
    a = np.array(values)
    return a.mean(), stats.sem(a) * stats.t.ppf(0.975, len(a) - 1)


def test_every_training_and_study_ran_and_the_report_links_its_figures(tiny):
    tmp, meta = tiny
    assert meta["trained"] == len(RUNS) and meta["skipped"] == 0
    text = (tmp / "docs" / "results.md").read_text()
    for study in STUDIES:
        assert (tmp / "out" / "evaluate" / study.name / "robustness_rows.csv").stat().st_size
    for name in ("fig7", "fig8", "fig9", "bias", "lstudy", "lstudy_compute", "pcm", "methods"):
        assert (tmp / "docs" / "results" / f"{name}.png").stat().st_size > 1000
        assert f"(results/{name}.png)" in text
    assert text.count("**Verdict:") == 5 and "ESTIMATE" in text


def test_tables_are_computed_from_the_rows(tiny):
    tmp, _ = tiny
    text = (tmp / "docs" / "results.md").read_text()
    rows = rows_of(tmp, "fig7")
    assert len({r["chip"] for r in rows}) == 2
    with open(tmp / "docs" / "results" / "fig7.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 * 3  # models x the tiny grid's sigmas
    for t in table:  # every cell of the figure's table, recomputed with numpy and scipy
        mean, ci = mean_ci(list(accs(rows, t["run"], sigma=float(t["sigma"])).values()))
        assert float(t["acc_mean"]) == pytest.approx(mean, abs=1e-12)
        assert float(t["acc_ci95"]) == pytest.approx(ci, abs=1e-12)
    # a markdown cell: the digital model at sigma 0.2, "mean ± CI" in percent
    mean, ci = mean_ci(list(accs(rows, "digital", sigma=0.2).values()))
    line = next(li for li in text.splitlines() if li.startswith("| 0.2 |"))
    assert line.split(" | ")[1] == f"{100 * mean:.1f} ± {100 * ci:.1f}"
    # a verdict's paired difference: the -mu model minus the mu = 0 model, on the same chips
    rows = rows_of(tmp, "fig8")
    shifted = accs(rows, f"mu_neg{MEAN_SHIFT:g}", mean_shift=-MEAN_SHIFT)
    plain = accs(rows, "sigma0.05_L4", mean_shift=-MEAN_SHIFT)
    mean, ci = mean_ci([shifted[c] - plain[c] for c in sorted(shifted)])
    assert f"mu = 0 model: {100 * mean:+.1f} ± {100 * ci:.1f} points" in text


HEADER = ("* date", "* wall", "* command", "* machine")  # the lines that say when and where


def test_rerun_reuses_every_training_and_chip(tiny):
    tmp, _ = tiny
    out = tmp / "out"
    watched = sorted(out.glob("train/*/checkpoints/*.ckpt")) + sorted(out.glob("train/*/done.json"))
    before = {p: p.stat().st_mtime_ns for p in watched}
    rows = {s.name: rows_of(tmp, s.name) for s in STUDIES}
    report = (tmp / "docs" / "results.md").read_text()
    meta = reproduce(tiny_args(tmp))
    assert meta["trained"] == 0 and meta["skipped"] == len(RUNS)
    assert {p: p.stat().st_mtime_ns for p in watched} == before  # nothing retrained or rewritten
    assert {s.name: rows_of(tmp, s.name) for s in STUDIES} == rows  # no chip measured again
    again = (tmp / "docs" / "results.md").read_text()
    body = [li for li in report.splitlines() if not li.startswith(HEADER)]
    assert [li for li in again.splitlines() if not li.startswith(HEADER)] == body


def test_an_interrupted_training_resumes_from_its_last_checkpoint(tiny):
    tmp, _ = tiny
    run = tmp / "out" / "train" / "sigma0.1_L2"
    record = json.loads((run / "done.json").read_text())
    (run / "done.json").unlink()  # killed after its last epoch's checkpoint, before the marker
    best = (run / "checkpoints").glob("epoch_*.ckpt")
    sizes = {p: p.read_bytes() for p in best}
    meta = reproduce(tiny_args(tmp))
    assert meta["trained"] == 1
    assert json.loads((run / "done.json").read_text())["global_step"] == record["global_step"]
    assert {p: p.read_bytes() for p in sizes} == sizes  # resumed at its end: the same model


def test_a_bad_option_names_itself(tmp_path):
    with pytest.raises(ConfigError, match=r"^--chips=0 is invalid"):
        reproduce([*tiny_args(tmp_path), "--chips", "0"])
    with pytest.raises(ConfigError, match=r"^override='data' is invalid"):
        reproduce([*tiny_args(tmp_path), "data"])
