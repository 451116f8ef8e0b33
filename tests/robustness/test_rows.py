"""The resumable rows file (``cimsim.robustness.rows``, ``fingerprints``): resuming after a
kill, other models and seeds in one file, refused formats, stale rows moved aside with what
changed, and fingerprints of in-memory weights."""

from __future__ import annotations

import copy

import pytest
import robustness_fixtures as rf
import torch
from robustness_fixtures import SEED, _counting, _csv_rows, _state, run

from cimsim import AnalogConfig, ConfigError
from cimsim.robustness.fingerprints import read_fingerprints, state_sha256
from cimsim.robustness.grid import RobustnessGrid, chip_seed
from cimsim.robustness.rows import RowsFile, StaleRowsWarning

# the shared fixtures (robustness_fixtures.py): pytest finds fixtures among a module's names
_one_thread, digits, trained_net, model = rf._one_thread, rf.digits, rf.trained_net, rf.model


def test_resume_after_interruption_gives_the_uninterrupted_file(
    model, digits, tmp_path, monkeypatch
):
    grid = RobustnessGrid(sigmas=[0.0, 0.1], chips=5)
    full_path, path = tmp_path / "full.csv", tmp_path / "rows.csv"

    def rows_file(where):  # a comma in the checkpoint name: csv quoting must round-trip
        return RowsFile(where, model="m", ckpt="a,b.ckpt")

    full = run(model, digits[1], grid, rows_file(full_path))
    assert {(r.model, r.ckpt) for r in full.rows} == {("m", "a,b.ckpt")}
    before = _state(model)
    _counting(monkeypatch, fail_on=3)
    with pytest.raises(RuntimeError, match="killed"):
        run(model, digits[1], grid, rows_file(path))
    assert _state(model) == before  # restored despite the exception
    assert len(path.read_text().splitlines()) == 1 + 2 * 2  # header + two complete chips
    with open(path, "a") as f:
        f.write("2,123,0.0,0.0,,0.9")  # torn line of a kill -9 mid-write
    calls = _counting(monkeypatch)
    resumed = run(model, digits[1], grid, rows_file(path))
    assert calls == [chip_seed(SEED, c) for c in (2, 3, 4)]  # done chips were not redone
    assert path.read_bytes() == full_path.read_bytes()
    assert resumed.rows == full.rows and resumed.summary == full.summary
    again = run(model, digits[1], grid, rows_file(path))
    assert calls == [chip_seed(SEED, c) for c in (2, 3, 4)] and again.rows == full.rows


def test_resume_keeps_other_models_and_recomputes_another_seed(
    model, digits, tmp_path, monkeypatch
):
    grid = RobustnessGrid(sigmas=[0.1], chips=2)
    path = tmp_path / "rows.csv"
    calls = _counting(monkeypatch)

    def run_as(label, seed, grid=grid):
        return run(model, digits[1], grid, RowsFile(path, model=label), seed=seed)

    a, b = run_as("a", SEED), run_as("b", SEED)
    assert len(calls) == 4 and a.rows[0].fingerprint == b.rows[0].fingerprint != ""
    with pytest.warns(StaleRowsWarning, match=r"rows of model='a' .*\(seed: 7 -> 8\)"):
        a8 = run_as("a", SEED + 1)  # the same model with another seed: never mixed
    assert calls[4:] == [chip_seed(SEED + 1, c) for c in range(2)]
    rows = _csv_rows(path)
    assert [(r["model"], int(r["chip_seed"])) for r in rows] == [
        ("b", chip_seed(SEED, 0)), ("b", chip_seed(SEED, 1)),
        ("a", chip_seed(SEED + 1, 0)), ("a", chip_seed(SEED + 1, 1)),
    ]  # fmt: skip
    assert [r["model"] for r in _csv_rows(tmp_path / "rows.stale.csv")] == ["a", "a"]
    wider = RobustnessGrid(sigmas=[0.1], chips=3)  # one more chip: only it is evaluated
    a3 = run_as("a", SEED + 1, wider)
    assert calls[6:] == [chip_seed(SEED + 1, 2)]
    assert a3.rows[:2] == a8.rows


def test_a_rows_file_of_another_format_is_refused(model, digits, tmp_path, monkeypatch):
    path = tmp_path / "rows.csv"  # e.g. written by a version without the ckpt column
    path.write_text("chip,chip_seed,sigma,mean_shift,adc_levels,acc,loss,n,model,fingerprint\n")
    calls = _counting(monkeypatch)
    with pytest.raises(ConfigError, match=r"^rows file='.*rows\.csv' is invalid: has columns"):
        run(model, digits[1], RobustnessGrid(sigmas=[0.1], chips=1), RowsFile(path, "m"))
    assert calls == [] and path.read_text().count("\n") == 1  # never mixed, left as it was


def test_changed_settings_move_stale_rows_aside_and_say_what_changed(
    model, digits, tmp_path, monkeypatch
):
    grid = RobustnessGrid(sigmas=[0.0, 0.1], chips=2)
    path = tmp_path / "rows.csv"
    ckpt = {"ckpt_sha256": "ab" * 32, "data": {"seed": 1}}

    def run_as(label="m", max_batches=None, known=ckpt):
        rows_file = RowsFile(path, model=label, ckpt="m.ckpt", known=known)
        return run(model, digits[1], grid, rows_file, max_batches=max_batches)

    quick = run_as(max_batches=1)
    other = run_as(label="other", max_batches=1)
    assert {r.n for r in quick.rows} == {128}
    calls = _counting(monkeypatch)
    with pytest.warns(StaleRowsWarning) as caught:
        full = run_as()
    assert len(caught) == 1
    assert "4 rows of model='m', ckpt='m.ckpt'" in str(caught[0].message)
    assert "(max_batches: 1 -> None)" in str(caught[0].message)
    assert len(calls) == 2  # both chips recomputed
    rows = _csv_rows(path)
    assert [r["model"] for r in rows] == ["other"] * 4 + ["m"] * 4  # the other model stays
    assert {int(r["n"]) for r in rows if r["model"] == "m"} == {397}
    assert [r["n"] for r in _csv_rows(tmp_path / "rows.stale.csv")] == ["128"] * 4
    fp_quick, fp_full = quick.rows[0].fingerprint, full.rows[0].fingerprint
    assert other.rows[0].fingerprint == fp_quick != fp_full
    known = read_fingerprints(path)
    assert known[fp_full] == full.fingerprints[fp_full]
    assert known[fp_quick]["max_batches"] == 1 and known[fp_full]["max_batches"] is None
    swept = ("sigma", "mean_shift", "adc_levels")
    assert known[fp_full]["chip"] == {
        k: v for k, v in AnalogConfig().as_dict().items() if k not in swept
    }  # the test chip of the model's layers
    assert known[fp_full]["seed"] == SEED and known[fp_full]["stream"] == "test"
    retrained = {**ckpt, "ckpt_sha256": "cd" * 32}
    with pytest.warns(StaleRowsWarning, match=r"ckpt_sha256: abababababab\.\.\. -> cdcdcd"):
        run_as(known=retrained)
    with pytest.warns(StaleRowsWarning, match=r"data\.seed: 1 -> 2"):
        run_as(known={**retrained, "data": {"seed": 2}})


def test_in_memory_weights_are_fingerprinted(model, digits, tmp_path, monkeypatch):
    grid = RobustnessGrid(sigmas=[0.1], chips=2)
    path = tmp_path / "rows.csv"
    first = run(model, digits[1], grid, RowsFile(path))
    assert first.fingerprints[first.rows[0].fingerprint]["state_sha256"] == state_sha256(model)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[0].weight[0, 0, 0, 0] += 0.5
    assert state_sha256(changed) != state_sha256(model)
    calls = _counting(monkeypatch)
    with pytest.warns(StaleRowsWarning, match="rows of this model .*state_sha256"):
        run(changed, digits[1], grid, RowsFile(path))
    assert len(calls) == 2
