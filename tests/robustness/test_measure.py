"""Monte Carlo robustness measurement (``cimsim.robustness.measure``, ``grid``, ``summary``):
the grid and settings, seeding and chip streams, common random numbers, the statistics, ADC
sweeps and calibration, on a tiny convnet trained for a few steps on sklearn digits. Values are
checked against independent computations: a chip programmed and measured by hand, statistics
recomputed with numpy and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import robustness_fixtures as rf
import torch
from robustness_fixtures import SEED, _by_hand, _counting, _state, run
from scipy import stats
from torch import nn

import cimsim
import cimsim.robustness.measure as rb
from cimsim import AnalogConfig, ConfigError, convert_to_analog
from cimsim.chip.adc import adcs
from cimsim.robustness.grid import EvalSettings, RobustnessGrid, chip_seed
from cimsim.robustness.measure import evaluate_robustness
from cimsim.robustness.rows import Row
from cimsim.robustness.summary import format_summary, summarize

# the shared fixtures (robustness_fixtures.py): pytest finds fixtures among a module's names
_one_thread, digits, trained_net, model = rf._one_thread, rf.digits, rf.trained_net, rf.model


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
    assert torch.equal(nu[(seeds[0], 0.0)], torch.zeros_like(base))
    assert (seeds[1], 0.0) not in nu  # sigma 0 is the same network on every chip: measured once
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


def test_a_point_every_chip_shares_is_measured_once(model, digits, monkeypatch):
    """At sigma 0 every chip is the same network: the first chip measures each such point, the
    others reuse it (with fixed calibration batches, calibrated points too). The rows are those
    of measuring and calibrating every chip, and chip 2's reused row is what measuring it by
    hand gives."""
    train, test = digits
    grid = RobustnessGrid(sigmas=[0.0, 0.1], adc_levels=[None, 3], chips=3)
    measured, calibrated = [], []
    real_measure, real_calibrate = rb._measure, rb.calibrate_adc
    monkeypatch.setattr(rb, "_measure", lambda *a, **k: measured.append(1) or real_measure(*a, **k))
    monkeypatch.setattr(
        rb, "calibrate_adc", lambda *a, **k: calibrated.append(1) or real_calibrate(*a, **k)
    )
    counts = {}
    with monkeypatch.context() as m:  # nothing shared: every chip at every point
        m.setattr(rb, "_same_on_every_chip", lambda *a: False)
        every = run(model, test, grid, calib_loader=train, calib_fixed=True)
        counts["every"] = (len(measured), len(calibrated))
    for fixed in (False, True):
        measured.clear(), calibrated.clear()
        rows = run(model, test, grid, calib_loader=train, calib_fixed=fixed).rows
        counts[fixed] = (len(measured), len(calibrated))
        assert rows == every.rows
    # (measured, calibrated): 3 chips x 4 points, 2 of them calibrated; without fixed batches
    # only the sigma-0 point without an ADC (nothing to calibrate) is shared; with them, both
    assert counts == {"every": (12, 6), False: (1 + 3 * 3, 3 * 2), True: (2 + 3 * 2, 1 + 3)}
    last = next(r for r in every.rows if (r.chip, r.sigma, r.adc_levels) == (2, 0.0, 3))
    by_hand = _by_hand(model, test, last.chip_seed, 0.0, levels=3, calib=train)
    assert (last.acc, last.n) == by_hand[::2]


def test_only_a_noise_free_chip_with_fixed_calibration_counts_as_the_same_on_every_chip(model):
    """``_same_on_every_chip``: relative noise, a mean shift, per-read output noise or a device
    with its own state make chips differ; so does calibrating from seed-dependent batches."""
    fixed, loose = EvalSettings(calib_fixed=True), EvalSettings()
    cimsim.program_chip(model, 0)
    assert rb._same_on_every_chip(model, fixed) and rb._same_on_every_chip(model, loose)
    cimsim.set_noise(model, sigma=0.1)
    assert not rb._same_on_every_chip(model, fixed)
    cimsim.set_noise(model, sigma=0.0, mean_shift=0.01)
    assert not rb._same_on_every_chip(model, fixed)
    cimsim.set_noise(model, sigma=0.0, mean_shift=0.0)
    cimsim.set_adc(model, 3)  # ranges to calibrate: from fixed batches only
    assert rb._same_on_every_chip(model, fixed) and not rb._same_on_every_chip(model, loose)
    net = nn.Sequential(nn.Linear(4, 3))
    for config in (AnalogConfig(device="pcm"), AnalogConfig(out_noise=0.04, tile_rows=2)):
        chip = cimsim.program_chip(convert_to_analog(net, config).eval(), 0)
        assert not rb._same_on_every_chip(chip, loose)
