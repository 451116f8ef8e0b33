"""evaluate.py's output folder: one evaluation per folder, one process at a time, and a rows
file that is read back honestly (duplicates once, a bad value named, resuming said aloud)."""

from __future__ import annotations

import csv
import fcntl
import json
import os
import re
import subprocess
import sys

import pytest

import cimsim.robustness.measure
from cimsim import ConfigError
from cimsim.cli.evaluate import evaluate
from cimsim.cli.train import train
from cimsim.robustness.rows import DuplicateRowsWarning
from conftest import FAST, ROOT, compose_cfg

SMALL = ["robustness.chips=2", "robustness.sigmas=[0.0,0.1]", "progress=false"]
HESSIAN = ["hessian=true", "hessian_probes=2", "hessian_batches=1"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A digits model, one short epoch of HA-SGD at sigma 0.1."""
    out = tmp_path_factory.mktemp("model")
    recipe = ["noise.sigma=0.1", "logger=none", "test=false", "callbacks.robustness=null"]
    train(compose_cfg("train", out, FAST + recipe))
    return out / "checkpoints" / "last.ckpt"


def run(out, ckpt, *overrides):
    """evaluate.py in this process, into ``out``; a later override of a key wins."""
    merged = {o.split("=")[0]: o for o in [f"ckpt={ckpt}", *SMALL, "wandb.enabled=false"]}
    merged.update({o.split("=")[0]: o for o in overrides})
    return evaluate(compose_cfg("evaluate", out, list(merged.values())))


def contents(folder) -> dict:
    """Every file under ``folder`` (but the lock) and its bytes."""
    return {
        p.relative_to(folder): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.fixture
def programmed(monkeypatch):
    """The chip seeds programmed from now on."""
    seeds, real = [], cimsim.robustness.measure.program_chip
    monkeypatch.setattr(
        cimsim.robustness.measure, "program_chip", lambda m, s: seeds.append(s) or real(m, s)
    )
    return seeds


# ----------------------------------------------------------------------------- one evaluation


def test_another_call_is_refused_and_overwrite_replaces_it(ckpt, tmp_path, programmed):
    """A sweep with hessian=true, then the same sweep without: the second call may not replace
    the first's figure and leave its hessian.csv behind."""
    run(tmp_path, ckpt, *HESSIAN)
    assert (tmp_path / "hessian.csv").exists()
    before = contents(tmp_path)
    seeds = len(programmed)
    message = (
        f"output folder='{tmp_path}' is invalid: it holds another evaluation (evaluation.json:"
        " hessian.batches: 1 -> unset, hessian.probes: 2 -> unset): pass run_name=NAME to write"
        " to another folder, or overwrite=true to delete its files and run this one"
    )
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        run(tmp_path, ckpt)
    assert contents(tmp_path) == before and len(programmed) == seeds  # nothing touched
    run(tmp_path, ckpt, "overwrite=true")
    names = {p.name for p in tmp_path.iterdir()}
    assert not names & {"hessian.csv", "robustness_loss_prediction.png"}  # no stale outputs
    assert "hessian" not in json.loads((tmp_path / "evaluation.json").read_text())["call"]
    assert len(programmed) == seeds + 2  # every chip again
    rows = (tmp_path / "robustness_rows.csv").read_bytes()
    run(tmp_path, ckpt, "overwrite=true")  # the same call resumes, overwrite or not
    assert len(programmed) == seeds + 2
    assert (tmp_path / "robustness_rows.csv").read_bytes() == rows


def test_files_of_an_unrecorded_call_are_refused(ckpt, tmp_path):
    (tmp_path / "hessian.csv").write_text("model,weighted\nold,1.0\n")  # an earlier call's
    with pytest.raises(ConfigError, match=r"it holds files of an evaluation \(hessian.csv\) but"):
        run(tmp_path, ckpt)
    assert not (tmp_path / "robustness_rows.csv").exists()
    run(tmp_path, ckpt, "overwrite=true")
    assert not (tmp_path / "hessian.csv").exists()
    assert (tmp_path / "robustness_rows.csv").exists()


@pytest.mark.slow  # end-to-end: a subprocess of an entry script
def test_a_second_process_is_refused_while_the_folder_is_held(ckpt, tmp_path):
    """The test process holds the folder's lock as a running evaluate.py does; the CLI on that
    folder stops at once with one line, and writes nothing."""
    tmp_path.joinpath(".lock").write_text(f"pid {os.getpid()}\n")
    with open(tmp_path / ".lock", "r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        proc = subprocess.run(
            [sys.executable, "evaluate.py", f"ckpt={ckpt}", *SMALL, "wandb.enabled=false",
             f"hydra.run.dir={tmp_path}"],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"config error: output folder='{tmp_path}' is invalid: another evaluation"
        f" (pid {os.getpid()}) is writing to it: wait for it to end, or pass run_name=NAME to"
        " write to another folder"
    ]
    assert not (tmp_path / "robustness_rows.csv").exists()
    run(tmp_path, ckpt)  # the lock went with its holder
    assert (tmp_path / "robustness_rows.csv").exists()


# ----------------------------------------------------------------------------- reading rows back


def test_a_row_written_twice_is_kept_once(ckpt, tmp_path, programmed):
    """Two evaluations that appended the same chips (before the lock): each row counts once."""
    run(tmp_path, ckpt)
    path = tmp_path / "robustness_rows.csv"
    once = path.read_bytes()
    header, *rows = once.decode().splitlines(keepends=True)
    path.write_text(header + "".join(rows + rows))
    seeds = len(programmed)
    with pytest.warns(DuplicateRowsWarning, match=r"4 rows of model=.* more than once"):
        result = run(tmp_path, ckpt)
    assert len(programmed) == seeds  # nothing recomputed
    assert path.read_bytes() == once
    assert [s["chips"] for s in result.summary] == [2, 2]
    with open(tmp_path / "robustness_summary.csv") as f:
        assert [int(s["chips"]) for s in csv.DictReader(f)] == [2, 2]


@pytest.mark.parametrize(
    "line, why",
    [
        ("garbage", r"line 3, column 'acc' holds 'garbage', not a number: correct that line"),
        ("fields", r"line 3 has no value in column 'n' \(too few fields\): correct that line"),
    ],
)
def test_a_bad_value_names_the_file_line_and_column(ckpt, tmp_path, line, why):
    run(tmp_path, ckpt)
    path = tmp_path / "robustness_rows.csv"
    with open(path, newline="") as f:
        header, *records = list(csv.reader(f))
    if line == "garbage":
        records[1][header.index("acc")] = "garbage"
    else:  # cut before the n column: a line written by hand
        records[1] = records[1][: header.index("n")]
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows([header, *records])
    match = rf"^rows file='{re.escape(str(path))}' is invalid: {why}"
    with pytest.raises(ConfigError, match=match):
        run(tmp_path, ckpt)


def test_a_resumed_run_says_what_it_read_back(ckpt, tmp_path, capsys, programmed):
    run(tmp_path, ckpt)
    assert "read back" not in capsys.readouterr().out  # nothing to resume from
    path = tmp_path / "robustness_rows.csv"
    whole = path.read_bytes()
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:4]))  # chip 0, half of 1
    seeds = len(programmed)
    run(tmp_path, ckpt)
    said = f"{path}: resuming model='train sigma=0.1, L=1', ckpt='{ckpt}': 1 of 2 chips read"
    said += " back (3 of 4 rows), 1 to compute"
    assert said in capsys.readouterr().out.splitlines()
    assert len(programmed) == seeds + 1 and path.read_bytes() == whole
