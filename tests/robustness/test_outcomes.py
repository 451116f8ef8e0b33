"""Per-image outcomes at test sigma 0 (``cimsim.robustness.outcomes``) and the exact McNemar test
they feed (``cimsim.robustness.stats.mcnemar``): each image's result recorded at the noise-free
points only, rows unchanged by the switch, kept in step with the rows on resume, and left out of
the output folder's call."""

from __future__ import annotations

import copy

import pytest
import robustness_fixtures as rf
import torch
from robustness_fixtures import SEED, _counting
from scipy import stats

from cimsim import ConfigError, calibrate_adc, program_chip, set_adc, set_noise
from cimsim.cli import evaluate as evaluate_cli
from cimsim.robustness.grid import EvalSettings, RobustnessGrid, chip_seed
from cimsim.robustness.measure import evaluate_robustness
from cimsim.robustness.outcomes import OutcomesFile, read_outcomes
from cimsim.robustness.rows import RowsFile
from cimsim.robustness.stats import mcnemar
from paper.configs import compose_cfg

_one_thread, digits, trained_net, model = rf._one_thread, rf.digits, rf.trained_net, rf.model

GRID = RobustnessGrid(sigmas=[0.0, 0.1], adc_levels=[None, 3], chips=3)


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_images():
    # by hand: 1 of 6 discordant images each way -> 2 * (C(6,0) + C(6,1)) / 2^6 = 14 / 64
    assert mcnemar(1, 5) == mcnemar(5, 1) == 14 / 64
    assert mcnemar(0, 6) == 2 / 64 and mcnemar(0, 1) == 1.0
    assert mcnemar(3, 3) == mcnemar(0, 0) == 1.0
    for b, c in [(0, 5), (2, 9), (7, 8), (13, 30), (100, 140), (4, 0)]:
        want = stats.binomtest(min(b, c), b + c, 0.5).pvalue
        assert mcnemar(b, c) == pytest.approx(want, rel=1e-12, abs=1e-300)
    with pytest.raises(ValueError):
        mcnemar(-1, 3)


@torch.no_grad()
def _bits_by_hand(model, test, seed, levels, calib) -> str:
    """Which images chip ``seed`` classifies right at sigma 0, programmed and calibrated as
    ``evaluate_robustness`` does, without it."""
    chip = copy.deepcopy(model)
    program_chip(chip, seed)
    set_noise(chip, sigma=0.0, mean_shift=0.0)
    set_adc(chip, levels)
    chip.eval()
    if levels is not None:
        torch.manual_seed(seed)
        calibrate_adc(chip, calib, momentum=0.01)
    right = torch.cat([chip(x).argmax(1) == y for x, y in test])
    return "".join("1" if r else "0" for r in right.tolist())


def _run(model, digits, folder, outcomes: bool, grid=GRID):
    rows_file = RowsFile(folder / "rows.csv", model="m", ckpt="a.ckpt")
    kept = OutcomesFile(folder / "rows.outcomes.csv", rows_file) if outcomes else None
    return evaluate_robustness(
        model,
        digits[1],
        grid,
        EvalSettings(seed=SEED, progress=False, calib_loader=digits[0]),
        rows_file,
        kept,
    )


def test_outcomes_are_each_test_images_result_at_sigma_0_and_change_no_row(model, digits, tmp_path):
    (tmp_path / "on").mkdir()
    (tmp_path / "off").mkdir()
    result = _run(model, digits, tmp_path / "on", outcomes=True)
    _run(model, digits, tmp_path / "off", outcomes=False)
    rows_on, rows_off = (tmp_path / d / "rows.csv" for d in ("on", "off"))
    assert rows_on.read_bytes() == rows_off.read_bytes()  # same rows, same fingerprints
    assert not (tmp_path / "off" / "rows.outcomes.csv").exists()
    got = read_outcomes(tmp_path / "on" / "rows.outcomes.csv")
    # chips x ADC levels at sigma 0, in chip then grid order; nothing at sigma 0.1
    assert [(o.chip, o.adc_levels) for o in got] == [(c, n) for c in range(3) for n in (None, 3)]
    assert {o.sigma for o in got} == {0.0}
    rows = {(r.chip, r.point): r for r in result.rows}
    for o in got:
        seed = chip_seed(SEED, o.chip)
        assert o.chip_seed == seed and (o.model, o.ckpt) == ("m", "a.ckpt")
        assert o.correct == _bits_by_hand(model, digits[1], seed, o.adc_levels, digits[0])
        row = rows[(o.chip, o.point)]
        assert o.fingerprint == row.fingerprint and len(o.correct) == row.n == 397
        assert o.correct.count("1") == round(row.acc * row.n)
    # 3 levels lose images: not every image right, and not the no-ADC chip's outcomes
    assert got[0].correct != got[1].correct


def test_switching_outcomes_on_later_measures_only_sigma_0_again(
    model, digits, tmp_path, monkeypatch
):
    (tmp_path / "full").mkdir()
    _run(model, digits, tmp_path / "full", outcomes=True)
    _run(model, digits, tmp_path, outcomes=False)
    rows = (tmp_path / "rows.csv").read_bytes()
    calls = _counting(monkeypatch)
    _run(model, digits, tmp_path, outcomes=True)
    assert calls == [chip_seed(SEED, c) for c in range(3)]  # each chip once, for its outcomes
    assert (tmp_path / "rows.csv").read_bytes() == rows  # no row appended twice
    want = (tmp_path / "full" / "rows.outcomes.csv").read_bytes()
    assert (tmp_path / "rows.outcomes.csv").read_bytes() == want
    _run(model, digits, tmp_path, outcomes=True)
    assert len(calls) == 3  # all there: nothing measured


def test_a_killed_run_resumes_to_the_uninterrupted_outcomes(model, digits, tmp_path, monkeypatch):
    (tmp_path / "full").mkdir()
    _run(model, digits, tmp_path / "full", outcomes=True)
    want = (tmp_path / "full" / "rows.outcomes.csv").read_bytes()
    _counting(monkeypatch, fail_on=3)
    with pytest.raises(RuntimeError, match="killed"):
        _run(model, digits, tmp_path, outcomes=True)
    path = tmp_path / "rows.outcomes.csv"
    assert len(read_outcomes(path)) == 2 * 2  # two chips done
    # another subject's outcomes stay; one of this subject's disagrees with its row: redone
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:-1] + ("0" if lines[1][-1] == "1" else "1")
    path.write_text("\n".join([*lines, "other,b.ckpt,fp,0,9,0.0,0.0,,01"]) + "\n")
    with open(path, "a") as f:
        f.write("m,a.ckpt,abc,2,1,0.0,0.0,,0110")  # a torn last line
    calls = _counting(monkeypatch)
    _run(model, digits, tmp_path, outcomes=True)
    assert calls == [chip_seed(SEED, c) for c in (0, 2)]  # chip 0 for its bad line, chip 2
    assert path.read_bytes() == b"".join(
        [want.splitlines(keepends=True)[0], b"other,b.ckpt,fp,0,9,0.0,0.0,,01\n"]
        + want.splitlines(keepends=True)[1:]
    )
    assert (tmp_path / "rows.csv").read_bytes() == (tmp_path / "full" / "rows.csv").read_bytes()


def test_outcomes_need_a_rows_file(model, digits, tmp_path):
    kept = OutcomesFile(tmp_path / "o.csv", RowsFile(tmp_path / "r.csv"))
    with pytest.raises(ValueError, match="rows_file"):
        evaluate_robustness(
            model, digits[1], RobustnessGrid(sigmas=[0.0], chips=1), None, None, kept
        )


def test_the_switch_is_checked_and_left_out_of_the_folders_call(tmp_path):
    cfg = compose_cfg("evaluate", tmp_path, ["robustness=adc_sweep", "robustness.outcomes=true"])
    assert cfg.robustness.outcomes is True and cfg.robustness.chips == 20
    assert "outcomes" not in evaluate_cli.evaluation_call(cfg, [], {})["robustness"]
    off = compose_cfg("evaluate", tmp_path, ["robustness=adc_sweep"])
    assert evaluate_cli.evaluation_call(off, [], {}) == evaluate_cli.evaluation_call(cfg, [], {})
    bad = compose_cfg("evaluate", tmp_path, ["robustness=adc_sweep", "robustness.outcomes=yes"])
    with pytest.raises(ConfigError, match="outcomes"):
        evaluate_cli.check_settings(bad)
