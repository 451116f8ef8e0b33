"""reproduce.py end to end in its tiny mode: the report's tables are the rows' numbers, and a
rerun reuses every finished training and chip."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from cimsim import ConfigError
from cimsim.robustness.summary import format_time
from conftest import ROOT
from paper.evidence import study_rows
from paper.plan import MEAN_SHIFT, RUN, RUNS, STUDIES, STUDY
from paper.report import write_report
from paper.run import Progress, split_overrides, train_run
from reproduce import main, parse, reproduce

pytestmark = pytest.mark.slow  # end-to-end: reproduce.py trains and evaluates the plan


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # a width-1 network gains nothing from a second thread


def tiny_args(tmp) -> list[str]:
    """The whole plan at one training seed (tests/paper/test_seeds.py trains two)."""
    return ["--tiny", "--seeds", "1", "--out", str(tmp / "out"), "--report-dir", str(tmp / "docs")]


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
    figures = ("fig7", "fig8", "fig9", "bias", "lstudy", "lstudy_compute", "pcm", "methods")
    for name in (*figures, "faults", "rram"):
        assert (tmp / "docs" / "results" / f"{name}.png").stat().st_size > 1000
        assert f"(results/{name}.png)" in text
    assert text.count("**Verdict:") == 9 and "ESTIMATE" in text


def test_tables_are_computed_from_the_rows(tiny):
    tmp, _ = tiny
    text = (tmp / "docs" / "results.md").read_text()
    rows = rows_of(tmp, "fig7")
    assert len({r["chip"] for r in rows}) == 2
    with open(tmp / "docs" / "results" / "fig7.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(STUDY["fig7"].runs) * 3  # models x the tiny grid's sigmas
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


def test_report_only_renders_the_report_again_from_the_rows(tiny):
    """--report-only trains and measures nothing: the same report from the rows on disk, with
    the provenance of the command that measured them (report.json)."""
    tmp, _ = tiny
    report = (tmp / "docs" / "results.md").read_text()
    meta = reproduce([*tiny_args(tmp), "--report-only"])
    assert meta == json.loads((tmp / "out" / "report.json").read_text())
    assert (tmp / "docs" / "results.md").read_text() == report
    with pytest.raises(ConfigError, match=r"^--report-only=.* takes no Hydra overrides"):
        reproduce([*tiny_args(tmp), "--report-only", "data=digits"])


def fmt(values):
    """A markdown cell: mean ± 95 % CI in percent, recomputed with numpy and scipy."""
    mean, ci = mean_ci(values)
    return f"{100 * mean:.1f} ± {100 * ci:.1f}"


def tables(text, first=None):
    """{section number: (header, body rows)} of the report's first table in each section (with
    ``first``: {number: header's first cell}, of the first table with that first cell)."""
    out = {}
    for part in text.split("\n## ")[1:]:
        number, found = part.split(".")[0], []
        for block in part.split("\n\n"):
            lines = [li for li in block.splitlines() if li.startswith("| ")]
            if lines:
                cells = [[c.strip() for c in li.strip("|").split(" | ")] for li in lines]
                found.append((cells[0], cells[2:]))
        want = (first or {}).get(number)
        out[number] = next(t for t in found if want is None or t[0][0] == want)
    return out


def copy_out(tmp, new):
    """The tiny run's studies and manifest in ``new`` (the checkpoints stay where they are)."""
    shutil.copytree(tmp / "out" / "evaluate", new / "evaluate")
    shutil.copy(tmp / "out" / "manifest.json", new / "manifest.json")
    return new


def mutate(path, run, f):
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        if r["ckpt"].split(os.sep)[-3] == run:
            r["acc"] = repr(f(float(r["acc"])))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def test_every_table_cell_follows_mutated_rows(tiny, tmp_path):
    """acc -> 1 - acc for each study's first run: every table cell of every section equals
    an independent recomputation from the mutated rows."""
    tmp, meta = tiny
    out = copy_out(tmp, tmp_path / "out")
    for study in STUDIES:
        mutate(
            out / "evaluate" / study.name / "robustness_rows.csv", study.runs[0], lambda a: 1 - a
        )
    write_report(out, tmp_path / "docs", meta)
    text = (tmp_path / "docs" / "results.md").read_text()
    t = tables(text, {"2": "test mu"})
    rows = {s.name: rows_of(tmp_path, s.name) for s in STUDIES}
    name = {r.title: r.name for r in RUNS}
    checked = 0

    def check(got, study, run, **point):
        nonlocal checked
        assert got == fmt(list(accs(rows[study], run, **point).values())), (study, run, point)
        checked += 1

    for number, study, key in (("1", "fig7", "sigma"), ("2", "fig8", "mean_shift")):
        head, body = t[number]
        for line in body:
            for title, got in zip(head[1:], line[1:], strict=True):
                check(got, study, name[title], **{key: float(line[0])})
    head, body = t["3"]  # Fig. 9's first table: test sigma 0, rows ADC levels ("2 (floor)")
    sigma = float(head[0].split("test sigma ")[1].rstrip(")"))
    for line in body:
        level = line[0].split(" ")[0]
        for title, got in zip(head[1:], line[1:], strict=True):
            point = {"sigma": sigma}
            if level != "none":
                point["adc_levels"] = float(level)
            got_rows = [r for r in rows["fig9"] if (r["adc_levels"] == "") == (level == "none")]
            assert got == fmt(list(accs(got_rows, name[title], **point).values()))
            checked += 1
    # section 4's tables: tests/paper/test_bias_section.py recomputes them by hand
    head, body = t["5"]  # what hurts: one row per model and chip step
    variants = list(dict.fromkeys(line[1] for line in body))
    steps = ("hurt_weights", "hurt_bn", "hurt_identity", "hurt_adc")
    for line in body:
        study = steps[variants.index(line[1])]
        for col, got in zip(head[2:], line[2:], strict=True):
            check(got, study, name[line[0]], sigma=float(col.split()[1]))
    for number, study in (("6", "lstudy"), ("7b", "methods")):
        head, body = t[number]
        for line in body:
            for col, got in zip(head, line, strict=True):
                if col.startswith("sigma "):
                    check(got, study, name[line[0]], sigma=float(col.split()[1]))
    head, body = t["7a"]  # PCM: per chip setting and time, the mean over chips and read-outs
    expected = {}
    for r in rows["pcm"]:
        key = (r["model"].split("| chip ")[-1], format_time(float(r["t_inference"])))
        expected.setdefault(key, []).append(float(r["acc"]))
    assert sorted((line[0], line[1], line[2]) for line in body) == sorted(
        (*k, f"{100 * np.mean(v):.1f}") for k, v in expected.items()
    )
    head, body = t["8a"]  # faults: rows fault rates ("0" or "p %"), columns the models
    for line in body:
        rate = 0.0 if line[0] == "0" else float(line[0].split()[0]) / 100
        for title, got in zip(head[1:], line[1:], strict=True):
            check(got, "faults", name[title], fault_rate=rate)
    assert checked > 100
    # and the mutation shows: fig7's digital column is 1 - the original's
    original = rows_of(tmp, "fig7")
    flipped = [1 - a for a in accs(original, "digital", sigma=0.2).values()]
    assert fmt(flipped) == t["1"][1][-1][1]


def test_a_stale_checkpoint_or_off_grid_row_is_left_out(tiny, tmp_path):
    tmp, meta = tiny
    out = copy_out(tmp, tmp_path / "out")
    path = out / "evaluate" / "fig7" / "robustness_rows.csv"
    rows = rows_of(tmp, "fig7")
    stale = dict(rows[0], acc="0.0")
    stale["ckpt"] = os.path.join(os.path.dirname(rows[0]["ckpt"]), "epoch_099.ckpt")
    off_grid = dict(rows[0], sigma="0.33", acc="0.0")
    with open(path, "a", newline="") as fh:
        csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n").writerows(
            [stale, off_grid]
        )
    manifest = json.loads((out / "manifest.json").read_text())
    kept = study_rows(out / "evaluate", STUDY["fig7"], 2, manifest)
    assert len(kept) == len(rows)
    assert all(r.ckpt != stale["ckpt"] and r.sigma != 0.33 for r in kept)
    write_report(out, tmp_path / "docs", meta)
    mine = tables((tmp_path / "docs" / "results.md").read_text())["1"]
    assert mine == tables((tmp / "docs" / "results.md").read_text())["1"]
    # a missing chip is an error naming the study, run and count
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows[1:])
    with pytest.raises(ValueError, match=r"study fig7: run digital at .* has 1 chips, not 2"):
        study_rows(out / "evaluate", STUDY["fig7"], 2, manifest)


def single(tmp, out):
    args, overrides = parse(["--tiny", "--out", str(out)])
    return args, split_overrides(overrides)[0]


def test_an_interrupted_training_resumes_from_its_last_checkpoint(tiny):
    tmp, _ = tiny
    run = tmp / "out" / "train" / "cos_L2"
    record = json.loads((run / "done.json").read_text())
    (run / "done.json").unlink()  # killed after its last epoch's checkpoint, before the marker
    best = (run / "checkpoints").glob("epoch_*.ckpt")
    sizes = {p: p.read_bytes() for p in best}
    args, over = single(tmp, tmp / "out")
    again = train_run(RUN["cos_L2"].seeded(0), args, over, (tmp / "out").resolve(), Progress(1))
    assert not again["reused"] and again["resumed"]
    assert json.loads((run / "done.json").read_text())["global_step"] == record["global_step"]
    assert {p: p.read_bytes() for p in sizes} == sizes  # resumed at its end: the same model


def test_an_interrupted_training_with_other_overrides_is_refused(tiny, tmp_path):
    tmp, _ = tiny
    run = tmp_path / "out" / "train" / "cos_L8"
    shutil.copytree(tmp / "out" / "train" / "cos_L8", run)
    (run / "done.json").unlink()
    started = json.loads((run / "started.json").read_text())
    started["overrides"] = [*started["overrides"], "hasgd.optimizer.lr=0.5"]
    (run / "started.json").write_text(json.dumps(started))
    args, over = single(tmp, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"^--out=.*only there: \['hasgd.optimizer.lr=0.5'\]"):
        train_run(RUN["cos_L8"].seeded(0), args, over, (tmp_path / "out").resolve(), Progress(1))


def test_a_bad_option_names_itself(tmp_path):
    with pytest.raises(ConfigError, match=r"^--chips=0 is invalid"):
        reproduce([*tiny_args(tmp_path), "--chips", "0"])
    with pytest.raises(ConfigError, match=r"^override='data' is invalid"):
        reproduce([*tiny_args(tmp_path), "data"])


def test_tiny_writes_outside_docs_unless_forced(tmp_path, monkeypatch):
    """A smoke run never replaces the committed report: its defaults lie under outputs/, and
    docs/ as its report folder is refused unless --force; the full plan writes docs/."""
    docs = ROOT / "docs"
    args, _ = parse(["--tiny"])
    assert args.out == Path("outputs/reproduce-tiny")
    assert args.report_dir == Path("outputs/reproduce-tiny/report")
    assert parse(["--tiny", "--out", str(tmp_path)])[0].report_dir == tmp_path / "report"
    full, _ = parse([])
    assert (full.out, full.report_dir) == (Path("outputs/reproduce"), docs)
    monkeypatch.chdir(ROOT)  # "docs" as typed in the repository
    for report_dir in ("docs", str(docs), str(docs / "results")):
        with pytest.raises(ConfigError, match=r"^--report-dir=.* is invalid: .*--force"):
            parse(["--tiny", "--report-dir", report_dir])
    assert parse(["--tiny", "--report-dir", "docs", "--force"])[0].report_dir == Path("docs")


@pytest.mark.parametrize(
    ("extra", "first_line"),
    [
        (["noise.sigmaa=1"], "config error: noise.sigmaa='1' is invalid: no such key in conf/"),
        (["data=nosuch"], "config error: data='nosuch' is invalid: no such data config; allowed"),
        (["robustness.chipz=3"], "config error: robustness.chipz='3' is invalid: no such key"),
        (["--epochs", "-1"], "config error: --epochs=-1 is invalid: must be an integer >= 1"),
        (["--epochs", "abc"], "config error: argument --epochs: invalid int value: 'abc'"),
        (["--chips", "0"], "config error: --chips=0 is invalid: must be an integer >= 1"),
    ],
)
def test_a_bad_input_fails_in_one_line_before_any_training(
    extra, first_line, tmp_path, monkeypatch, capsys
):
    """The user sees one line naming the bad key and exit status 2, not Hydra's tracebacks, and
    nothing is trained first (an evaluation key is checked before the first training too)."""
    monkeypatch.setattr(sys, "argv", ["reproduce.py", *tiny_args(tmp_path), *extra])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(first_line) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()
