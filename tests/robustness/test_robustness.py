"""Monte Carlo robustness evaluation (``cimsim.robustness.measure``) and its files
(``cimsim.robustness.rows``):
seeding, chip streams, common random numbers, statistics, resuming and fingerprints, ADC sweeps
and calibration, plots and user errors, on a tiny convnet trained for a few steps on sklearn
digits. Values are checked against independent computations: a chip programmed and measured by
hand, statistics recomputed with numpy and scipy.

Over 350 lines: one test per property of the measurement and of its resumable files.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import struct

import matplotlib.image
import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.datasets import load_digits
from torch import nn

import cimsim.robustness.measure as rb
from cimsim import (
    ADC,
    AnalogConfig,
    ConfigError,
    analog_layers,
    calibrate_adc,
    convert_to_analog,
    program_chip,
    set_adc,
    set_noise,
)
from cimsim.chip.adc import adcs
from cimsim.robustness.measure import (
    EvalSettings,
    RobustnessGrid,
    Row,
    chip_seed,
    evaluate_robustness,
    format_summary,
    summarize,
)
from cimsim.robustness.rows import (
    RowsFile,
    StaleRowsWarning,
    lines,
    plot_robustness,
    read_fingerprints,
    state_sha256,
    write_results,
)

SEED = 7


def run(model, test, grid, rows_file=None, **settings):
    """``evaluate_robustness`` with seed SEED, no progress bar, and ``settings`` overriding."""
    settings = EvalSettings(**{"seed": SEED, "progress": False, **settings})
    return evaluate_robustness(model, test, grid, settings, rows_file)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny ops: threading overhead dominates on a shared CPU (runs after conftest's setting).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    """(train batches, test batches) of 8x8 digit images (B, 1, 8, 8), fixed order."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    train = [(x[i : i + 128], y[i : i + 128]) for i in range(0, 1400, 128)]
    test = [(x[i : i + 128], y[i : i + 128]) for i in range(1400, len(x), 128)]
    return train, test


@pytest.fixture(scope="module")
def trained_net(digits):
    """A digital convnet with an ADC point before the classifier, ~94 % test accuracy."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        ADC(),
        nn.Flatten(),
        nn.Linear(8 * 64, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    train, _ = digits
    for _ in range(8):
        for x, y in train:
            loss = nn.functional.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@pytest.fixture
def model(trained_net):
    return convert_to_analog(trained_net, AnalogConfig())


def _state(model):
    """Everything evaluate_robustness must leave as it found it."""
    layers = [(n, layer.config, layer.chip_seed) for n, layer in analog_layers(model)]
    converters = [(a.levels, a.calibrated) for a in adcs(model, active_only=False)]
    return layers, converters, [m.training for m in model.modules()]


@torch.no_grad()
def _by_hand(model, test, seed, sigma, mean_shift=0.0, levels=None, calib=None, momentum=0.01):
    """(accuracy, loss, n) of one chip, programmed and measured without evaluate_robustness:
    a copy of the model, the chip seed, the noise level, ADC calibration with torch's CPU
    generator seeded by the chip seed, then the whole test set."""
    chip = copy.deepcopy(model)
    program_chip(chip, seed)
    set_noise(chip, sigma=sigma, mean_shift=mean_shift)
    set_adc(chip, levels)
    chip.eval()
    if levels is not None:
        torch.manual_seed(seed)
        calibrate_adc(chip, calib, momentum=momentum)
    correct, loss, n = 0, 0.0, 0
    for x, y in test:
        logits = chip(x)
        correct += (logits.argmax(1) == y).sum().item()
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        n += len(y)
    return correct / n, loss / n, n


def _csv_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- the grid


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"sigmas": []}, "sigmas"),
        ({"sigmas": [0.1, -0.1]}, "sigmas"),
        ({"sigmas": [0.1], "mean_shifts": []}, "mean_shifts"),
        ({"sigmas": [0.1], "adc_levels": [1]}, "adc_levels"),
        ({"sigmas": [0.1], "adc_levels": [None, 2.5]}, "adc_levels"),
        ({"sigmas": [0.1], "chips": 0}, "chips"),
    ],
)
def test_grid_rejects_bad_values_naming_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        RobustnessGrid(**kwargs)
    assert err.value.key == key
    assert key in str(err.value)


def test_grid_points_are_the_product_in_order():
    grid = RobustnessGrid(sigmas=[0, 0.1], mean_shifts=[0.0, -0.02], adc_levels=[None, 4], chips=3)
    assert grid.sigmas == (0.0, 0.1) and isinstance(grid.sigmas[0], float)
    assert list(grid.points()) == [
        (0.0, 0.0, None), (0.0, 0.0, 4), (0.0, -0.02, None), (0.0, -0.02, 4),
        (0.1, 0.0, None), (0.1, 0.0, 4), (0.1, -0.02, None), (0.1, -0.02, 4),
    ]  # fmt: skip


def test_adc_levels_without_calibration_data_fail_before_any_work(model, digits, monkeypatch):
    monkeypatch.setattr(rb, "program_chip", lambda *a: pytest.fail("programmed a chip"))
    grid = RobustnessGrid(sigmas=[0.05], adc_levels=[None, 4], chips=2)
    with pytest.raises(ConfigError, match="calib_loader"):
        run(model, digits[1], grid)
    with pytest.raises(ConfigError, match="chip_indices"):
        run(model, digits[1], RobustnessGrid(sigmas=[0.1], chips=2), chip_indices=[2])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stream": "validation"}, "^stream='validation'"),
        ({"seed": 0.5}, "^seed=0.5"),
        ({"max_batches": 0}, "^max_batches=0"),
        ({"calib_batches": 0}, "^calib_batches=0"),
        ({"calib_momentum": 0}, "^calib_momentum=0"),
        ({"calib_momentum": 1.5}, "^calib_momentum=1.5"),
    ],
)
def test_eval_settings_reject_bad_values_naming_the_key(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EvalSettings(**kwargs)


def test_grid_train_tokens_resolve_per_model_and_fail_unresolved(model, digits):
    grid = RobustnessGrid(sigmas=[0.0, "train"], adc_levels=[None, "train"], chips=2)
    trained = grid.for_chip(AnalogConfig(sigma=0.1, adc_levels=4))
    assert (trained.sigmas, trained.adc_levels) == ((0.0, 0.1), (None, 4))
    clean = grid.for_chip(AnalogConfig())  # train sigma 0, no ADC: repeats are kept once
    assert (clean.sigmas, clean.adc_levels, clean.chips) == ((0.0,), (None,), 2)
    with pytest.raises(ConfigError, match="^sigmas='train'"):
        run(model, digits[1], grid)


def test_chip_seed_depends_only_on_seed_chip_and_stream():
    assert chip_seed(0, 0) == chip_seed(0, 0) == 5699566862254019512  # pinned: reproducibility
    assert chip_seed(0, 0, "test") == chip_seed(0, 0)  # the reported chips did not change
    seeds = {chip_seed(s, c) for s in range(10) for c in range(10)}
    assert len(seeds) == 100  # (0, 1) and (1, 0) are different chips
    assert all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ConfigError, match="^stream='train'"):
        chip_seed(0, 0, "train")


def test_validation_chips_never_coincide_with_test_chips():
    """Checkpoint selection (val stream) never sees a chip of a reported curve (test stream)."""
    test = {chip_seed(s, c, "test") for s in range(5) for c in range(1000)}
    val = {chip_seed(s, c, "val") for s in range(5) for c in range(1000)}
    assert len(test) == len(val) == 5000
    assert not test & val
    assert all(0 <= s < 2**63 for s in val)


def test_val_stream_programs_val_chips(model, digits, monkeypatch):
    calls = _counting(monkeypatch)
    grid = RobustnessGrid(sigmas=[0.1], chips=3)
    result = run(model, digits[1], grid, stream="val")
    val = [chip_seed(SEED, c, "val") for c in range(3)]
    assert calls == val and [r.chip_seed for r in result.rows] == val
    assert result.rows[1].acc == _by_hand(model, digits[1], val[1], 0.1)[0]


# ----------------------------------------------------------------------------- seeding


def test_same_seed_same_rows_different_seed_different_rows(model, digits):
    grid = RobustnessGrid(sigmas=[0.0, 0.1], mean_shifts=[0.0, 0.02], chips=3)
    model.train()  # a mode to restore
    before = _state(model)
    a = run(model, digits[1], grid)
    assert _state(model) == before
    b = run(model, digits[1], grid)
    c = run(model, digits[1], grid, seed=SEED + 1)
    assert a.rows == b.rows
    assert len(a.rows) == 3 * 4
    first = a.rows[0]
    assert (first.chip, first.chip_seed, first.sigma, first.adc_levels, first.n) == (
        0, chip_seed(SEED, 0), 0.0, None, 397,
    )  # fmt: skip
    assert (first.model, first.ckpt, first.fingerprint) == ("", "", "")  # no rows file
    clean = [r.acc for r in a.rows if r.sigma == 0 and r.mean_shift == 0]
    assert len(set(clean)) == 1 and clean[0] > 0.85  # no noise: every chip is the digital net
    noisy = [(r.acc, r.loss) for r in a.rows if r.sigma == 0.1]
    assert len(set(noisy)) > 1  # ...with noise, the chips differ
    for r in a.rows:  # every row is exactly what its chip gives when measured by hand
        acc, loss, n = _by_hand(model, digits[1], r.chip_seed, r.sigma, r.mean_shift)
        assert (r.acc, r.n) == (acc, n)
        assert r.loss == pytest.approx(loss, rel=1e-6)
    assert [r.loss for r in a.rows if r.sigma > 0] != [r.loss for r in c.rows if r.sigma > 0]


def test_chip_indices_evaluate_a_subset_with_the_same_rows(model, digits):
    grid = RobustnessGrid(sigmas=[0.1], chips=4)
    full = run(model, digits[1], grid)
    part = run(model, digits[1], grid, chip_indices=[3, 1])
    assert part.rows == [full.rows[1], full.rows[3]]


def test_common_random_numbers_across_sigma(model, digits):
    """One chip keeps its draws across the sweep: W_noisy - W scales exactly with sigma."""
    conv = model[0]
    nu = {}

    def record(layer, inputs):
        key = (layer.chip_seed, layer.config.sigma)
        if key not in nu:
            w, _ = layer._noisy_weight_bias(layer.weight, layer.bias)
            nu[key] = (w - layer.weight).detach().clone()

    handle = conv.register_forward_pre_hook(record)
    try:
        run(model, digits[1], RobustnessGrid(sigmas=[0.02, 0.05, 0.0, 0.1], chips=2))
    finally:
        handle.remove()
    seeds = [chip_seed(SEED, c) for c in range(2)]
    assert {s for s, _ in nu} == set(seeds)
    # W_noisy - W is a float32 difference: exact up to rounding of W_noisy, ~1e-7 of max|W|.
    atol = 1e-6 * conv.weight.abs().max().item()
    for s in seeds:
        base = nu[(s, 0.02)]
        assert base.abs().max() > 100 * atol
        torch.testing.assert_close(nu[(s, 0.05)], base * 2.5, rtol=1e-5, atol=atol)
        torch.testing.assert_close(nu[(s, 0.1)], base * 5.0, rtol=1e-5, atol=atol)
        assert torch.equal(nu[(s, 0.0)], torch.zeros_like(base))
    assert not torch.allclose(nu[(seeds[0], 0.1)], nu[(seeds[1], 0.1)])


# ----------------------------------------------------------------------------- statistics


def test_summary_uses_student_t_and_matches_the_rows(model, digits):
    result = run(model, digits[1], RobustnessGrid(sigmas=[0.05, 0.15], chips=5))
    assert [(s["sigma"], s["chips"]) for s in result.summary] == [(0.05, 5), (0.15, 5)]
    assert "model" not in result.summary[0]  # rows without a model: no model column
    for s in result.summary:
        acc = np.array([r.acc for r in result.rows if r.sigma == s["sigma"]])
        loss = np.array([r.loss for r in result.rows if r.sigma == s["sigma"]])
        low, high = stats.t.interval(0.95, df=4, loc=acc.mean(), scale=stats.sem(acc))
        assert s["acc_mean"] == pytest.approx(acc.mean(), rel=1e-12)
        assert s["acc_std"] == pytest.approx(acc.std(ddof=1), rel=1e-12)
        assert s["acc_ci95"] == pytest.approx((high - low) / 2, rel=1e-9)
        assert s["loss_mean"] == pytest.approx(loss.mean(), rel=1e-12)
        assert s["acc_std"] > 0
    assert result.summary[1]["acc_mean"] < result.summary[0]["acc_mean"]  # more noise, worse
    assert summarize(result.rows) == result.summary


def test_summary_known_values_models_and_single_chip():
    def row(chip, acc, model):
        return Row(chip, 0, 0.1, 0.0, None, acc=acc, loss=1.0, n=10, model=model)

    rows = [row(c, a, "hasgd") for c, a in enumerate([0.5, 0.6, 0.7, 0.8, 0.9])]
    rows += [row(0, 0.3, "sgd")]
    hasgd, sgd = summarize(rows)
    assert hasgd["model"] == "hasgd" and hasgd["chips"] == 5
    assert hasgd["acc_mean"] == pytest.approx(0.7)
    assert hasgd["acc_std"] == pytest.approx(0.158113883)
    assert hasgd["acc_ci95"] == pytest.approx(2.776445 * 0.158113883 / math.sqrt(5), rel=1e-6)
    assert sgd["chips"] == 1 and math.isnan(sgd["acc_std"]) and math.isnan(sgd["acc_ci95"])
    table = format_summary([hasgd, sgd]).splitlines()
    assert len(table) == 3 and table[0].split()[0] == "model" and "70.00" in table[1]


# ----------------------------------------------------------------------------- resuming


def _counting(monkeypatch, fail_on: int | None = None) -> list[int]:
    """Count program_chip calls (one per chip); raise on call ``fail_on`` like a killed run."""
    calls, real = [], rb.program_chip

    def program(model, seed):
        calls.append(seed)
        if fail_on is not None and len(calls) == fail_on:
            raise RuntimeError("killed")
        return real(model, seed)

    monkeypatch.setattr(rb, "program_chip", program)
    return calls


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
        k: v for k, v in dataclasses.asdict(AnalogConfig()).items() if k not in swept
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


# ----------------------------------------------------------------------------- ADC


def test_adc_sweep_two_levels_hurt_eighteen_do_not(model, digits):
    train, test = digits
    grid = RobustnessGrid(sigmas=[0.0], adc_levels=[None, 2, 18], chips=1)
    result = run(model, test, grid, calib_loader=train, calib_batches=4)
    acc = {s["adc_levels"]: s["acc_mean"] for s in result.summary}
    assert acc[None] > 0.85
    assert acc[2] < acc[None] - 0.05
    assert abs(acc[18] - acc[None]) < 0.02
    assert all(a.levels is None for a in adcs(model))  # the model's own setting is back


class _Augmented:
    """Calibration batches that draw from torch's RNG, like random crops of training images."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        for x, y in self.batches:
            yield x + 0.3 * torch.randn_like(x), y


def test_adc_calibration_is_seeded_by_the_chip_and_uses_the_momentum(model, digits, monkeypatch):
    train, test = digits
    calib = _Augmented(train)
    grid = RobustnessGrid(sigmas=[0.1], adc_levels=[3], chips=2)
    seen = []
    real = rb.calibrate_adc

    def spy(*args, **kwargs):
        seen.append((kwargs["max_batches"], kwargs["momentum"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(rb, "calibrate_adc", spy)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = run(model, test, grid, calib_loader=calib, calib_momentum=0.2)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched
    torch.manual_seed(2)  # another global state: the same rows
    b = run(model, test, grid, calib_loader=calib, calib_momentum=0.2)
    assert a.rows == b.rows and seen == [(None, 0.2)] * 4
    for r in a.rows:
        by_hand = _by_hand(model, test, r.chip_seed, 0.1, levels=3, calib=calib, momentum=0.2)
        assert (r.acc, r.n) == by_hand[::2]
    slow = run(model, test, grid, calib_loader=calib, calib_momentum=0.01)
    assert [r.loss for r in slow.rows] != [r.loss for r in a.rows]


# ----------------------------------------------------------------------------- outputs


def _png_ok(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 0 and height > 0
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (height, width)


def test_plots_and_result_files(model, digits, tmp_path):
    train, test = digits
    grid = RobustnessGrid(sigmas=[0.0, 0.1], adc_levels=[None, 3, 8], chips=2)
    rows = []
    for label in ("sgd", "hasgd"):
        result = run(model, test, grid, calib_loader=train, calib_batches=2)
        rows += [dataclasses.replace(r, model=label) for r in result.rows]
    summary = summarize(rows)
    assert len(summary) == 2 * 2 * 3
    for x in ("sigma", "adc_levels"):
        path = plot_robustness(summary, x, tmp_path / f"{x}.png", title=x)
        assert path == tmp_path / f"{x}.png"
        _png_ok(path)
    with pytest.raises(ConfigError, match="x="):
        plot_robustness(summary, "chips", tmp_path / "bad.png")

    single = run(model, test, RobustnessGrid(sigmas=[0.1], chips=1))
    csv_path, json_path = write_results(single, tmp_path / "out")
    doc = json.loads(json_path.read_text())
    assert doc["rows"] == [dataclasses.asdict(r) for r in single.rows]
    assert doc["summary"][0]["acc_ci95"] is None  # NaN (one chip) as valid JSON null
    (written,) = _csv_rows(csv_path)
    assert list(written) == list(single.summary[0])  # sigma, mean_shift, adc_levels, acc_mean..
    assert float(written["acc_mean"]) == single.rows[0].acc  # one chip: its accuracy
    assert float(written["loss_mean"]) == single.rows[0].loss
    assert written["adc_levels"] == "" and math.isnan(float(written["acc_std"]))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temps
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "robustness.json",
        "robustness_summary.csv",
    ]


def test_lines_are_one_per_model_and_other_varying_sweep():
    def entry(model, sigma, levels):
        return {"model": model, "sigma": sigma, "mean_shift": 0.0, "adc_levels": levels}

    summary = [entry(m, s, n) for m in ("a", "b") for s in (0.0, 0.1) for n in (None, 4, 8)]
    by_levels = lines(summary, "adc_levels")  # sigma varies too: a line per (model, sigma)
    assert list(by_levels) == ["a, sigma=0.0", "a, sigma=0.1", "b, sigma=0.0", "b, sigma=0.1"]
    assert [{(e["model"], e["sigma"]) for e in v} for v in by_levels.values()] == [
        {("a", 0.0)}, {("a", 0.1)}, {("b", 0.0)}, {("b", 0.1)},
    ]  # fmt: skip
    assert [len(v) for v in by_levels.values()] == [3] * 4
    by_sigma = lines(summary, "sigma")  # ADC levels vary: a line per (model, levels)
    assert list(by_sigma)[:3] == ["a, adc_levels=none", "a, adc_levels=4", "a, adc_levels=8"]
    alone = [{k: v for k, v in e.items() if k != "model"} for e in summary[:3]]  # a, sigma 0
    assert list(lines(alone, "adc_levels")) == ["accuracy"]  # nothing to tell apart


def test_a_sweep_says_what_it_will_cost_after_its_first_chip(capsys):
    model = convert_to_analog(nn.Sequential(nn.Linear(4, 3)), AnalogConfig())
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    grid = RobustnessGrid(sigmas=[0.0, 0.1], chips=3)
    evaluate_robustness(model, data, grid, EvalSettings(progress=True))
    out = capsys.readouterr()
    assert "sweep: 3 chips x 2 points; the first chip took" in out.out + out.err
    evaluate_robustness(model, data, grid, EvalSettings(progress=False))
    out = capsys.readouterr()
    assert "sweep:" not in out.out + out.err
