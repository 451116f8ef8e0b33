"""Monte Carlo robustness evaluation: seeding, common random numbers, statistics, resuming,
ADC sweeps, plots and user errors, on a tiny convnet trained for a few steps on sklearn digits."""

from __future__ import annotations

import json
import math
import struct

import matplotlib.image
import pytest
import torch
from scipy import stats
from sklearn.datasets import load_digits
from torch import nn

import cimsim.robustness as rb
from cimsim import ADC, AnalogConfig, ConfigError, analog_layers, convert_to_analog
from cimsim.adc import adcs
from cimsim.robustness import (
    RobustnessGrid,
    chip_seed,
    evaluate_robustness,
    format_summary,
    plot_robustness,
    summarize,
    write_results,
)

SEED = 7


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
        evaluate_robustness(model, digits[1], grid, SEED, progress=False)
    with pytest.raises(ConfigError, match="chip_indices"):
        evaluate_robustness(
            model,
            digits[1],
            RobustnessGrid(sigmas=[0.1], chips=2),
            SEED,
            chip_indices=[2],
            progress=False,
        )


def test_chip_seed_depends_only_on_seed_and_chip():
    assert chip_seed(0, 0) == chip_seed(0, 0) == 5699566862254019512  # pinned: reproducibility
    seeds = {chip_seed(s, c) for s in range(10) for c in range(10)}
    assert len(seeds) == 100  # (0, 1) and (1, 0) are different chips
    assert all(0 <= s < 2**63 for s in seeds)


# ----------------------------------------------------------------------------- seeding


def test_same_seed_same_rows_different_seed_different_rows(model, digits):
    grid = RobustnessGrid(sigmas=[0.0, 0.1], mean_shifts=[0.0, 0.02], chips=3)
    model.train()  # a mode to restore
    before = _state(model)
    a = evaluate_robustness(model, digits[1], grid, SEED, progress=False, extra={"model": "m"})
    assert _state(model) == before
    b = evaluate_robustness(model, digits[1], grid, SEED, progress=False, extra={"model": "m"})
    c = evaluate_robustness(model, digits[1], grid, SEED + 1, progress=False, extra={"model": "m"})
    assert a.rows == b.rows
    assert len(a.rows) == 3 * 4
    assert a.rows[0] == {
        **a.rows[0],
        "chip": 0,
        "chip_seed": chip_seed(SEED, 0),
        "sigma": 0.0,
        "adc_levels": None,
        "n": 397,
        "model": "m",
    }
    clean = [r["acc"] for r in a.rows if r["sigma"] == 0 and r["mean_shift"] == 0]
    assert len(set(clean)) == 1 and clean[0] > 0.85  # no noise: every chip is the digital net
    noisy = [(r["acc"], r["loss"]) for r in a.rows if r["sigma"] == 0.1]
    assert len(set(noisy)) > 1  # ...with noise, the chips differ
    assert [r["loss"] for r in a.rows if r["sigma"] > 0] != [
        r["loss"] for r in c.rows if r["sigma"] > 0
    ]


def test_chip_indices_evaluate_a_subset_with_the_same_rows(model, digits):
    grid = RobustnessGrid(sigmas=[0.1], chips=4)
    full = evaluate_robustness(model, digits[1], grid, SEED, progress=False)
    part = evaluate_robustness(model, digits[1], grid, SEED, chip_indices=[3, 1], progress=False)
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
        grid = RobustnessGrid(sigmas=[0.02, 0.05, 0.0, 0.1], chips=2)
        evaluate_robustness(model, digits[1], grid, SEED, progress=False)
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
    grid = RobustnessGrid(sigmas=[0.05, 0.15], chips=5)
    result = evaluate_robustness(model, digits[1], grid, SEED, progress=False)
    t = stats.t.ppf(0.975, 4)
    assert abs(t - 2.776) < 1e-3
    assert [(s["sigma"], s["chips"]) for s in result.summary] == [(0.05, 5), (0.15, 5)]
    for s in result.summary:
        acc = torch.tensor(
            [r["acc"] for r in result.rows if r["sigma"] == s["sigma"]], dtype=torch.float64
        )
        loss = [r["loss"] for r in result.rows if r["sigma"] == s["sigma"]]
        assert s["acc_mean"] == pytest.approx(acc.mean().item(), rel=1e-12)
        assert s["acc_std"] == pytest.approx(acc.std(correction=1).item(), rel=1e-12)
        assert s["acc_ci95"] == pytest.approx(t * acc.std(correction=1).item() / math.sqrt(5))
        assert s["loss_mean"] == pytest.approx(sum(loss) / 5)
        assert s["acc_std"] > 0
    assert result.summary[1]["acc_mean"] < result.summary[0]["acc_mean"]  # more noise, worse
    assert summarize(result.rows) == result.summary


def test_summary_known_values_models_and_single_chip():
    row = {"mean_shift": 0.0, "adc_levels": None, "loss": 1.0}
    rows = [
        {**row, "chip": c, "sigma": 0.1, "acc": a, "model": "hasgd"}
        for c, a in enumerate([0.5, 0.6, 0.7, 0.8, 0.9])
    ]
    rows += [{**row, "chip": 0, "sigma": 0.1, "acc": 0.3, "model": "sgd"}]
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
    extra = {"model": "m", "ckpt": "a,b.ckpt"}  # a comma: csv quoting must round-trip
    full_path, path = tmp_path / "full.csv", tmp_path / "rows.csv"
    full = evaluate_robustness(
        model, digits[1], grid, SEED, rows_path=full_path, extra=extra, progress=False
    )
    before = _state(model)
    _counting(monkeypatch, fail_on=3)
    with pytest.raises(RuntimeError, match="killed"):
        evaluate_robustness(
            model, digits[1], grid, SEED, rows_path=path, extra=extra, progress=False
        )
    assert _state(model) == before  # restored despite the exception
    assert len(path.read_text().splitlines()) == 1 + 2 * 2  # header + two complete chips
    with open(path, "a") as f:
        f.write("2,123,0.0,0.0,,0.9")  # torn line of a kill -9 mid-write
    calls = _counting(monkeypatch)
    resumed = evaluate_robustness(
        model, digits[1], grid, SEED, rows_path=path, extra=extra, progress=False
    )
    assert calls == [chip_seed(SEED, c) for c in (2, 3, 4)]  # done chips were not redone
    assert path.read_bytes() == full_path.read_bytes()
    assert resumed.rows == full.rows and resumed.summary == full.summary
    again = evaluate_robustness(
        model, digits[1], grid, SEED, rows_path=path, extra=extra, progress=False
    )
    assert calls == [chip_seed(SEED, c) for c in (2, 3, 4)] and again.rows == full.rows


def test_resume_does_not_confuse_other_models_or_seeds(model, digits, tmp_path, monkeypatch):
    grid = RobustnessGrid(sigmas=[0.1], chips=2)
    path = tmp_path / "rows.csv"
    calls = _counting(monkeypatch)
    a = evaluate_robustness(
        model, digits[1], grid, SEED, rows_path=path, extra={"model": "a"}, progress=False
    )
    evaluate_robustness(
        model, digits[1], grid, SEED, rows_path=path, extra={"model": "b"}, progress=False
    )
    evaluate_robustness(
        model, digits[1], grid, SEED + 1, rows_path=path, extra={"model": "a"}, progress=False
    )
    assert len(calls) == 6
    wider = RobustnessGrid(sigmas=[0.1], chips=3)  # one more chip: only it is evaluated
    a3 = evaluate_robustness(
        model, digits[1], wider, SEED, rows_path=path, extra={"model": "a"}, progress=False
    )
    assert calls[6:] == [chip_seed(SEED, 2)]
    assert a3.rows[:2] == a.rows
    with pytest.raises(ConfigError, match="rows_path"):  # other columns: never mix files
        evaluate_robustness(model, digits[1], grid, SEED, rows_path=path, progress=False)


# ----------------------------------------------------------------------------- ADC


def test_adc_sweep_two_levels_hurt_eighteen_do_not(model, digits):
    train, test = digits
    grid = RobustnessGrid(sigmas=[0.0], adc_levels=[None, 2, 18], chips=1)
    result = evaluate_robustness(
        model, test, grid, SEED, calib_loader=train, calib_batches=4, progress=False
    )
    acc = {s["adc_levels"]: s["acc_mean"] for s in result.summary}
    assert acc[None] > 0.85
    assert acc[2] < acc[None] - 0.05
    assert abs(acc[18] - acc[None]) < 0.02
    assert all(a.levels is None for a in adcs(model))  # the model's own setting is back


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
        rows += evaluate_robustness(
            model,
            test,
            grid,
            SEED,
            calib_loader=train,
            calib_batches=2,
            progress=False,
            extra={"model": label},
        ).rows
    summary = summarize(rows)
    assert len(summary) == 2 * 2 * 3
    for x in ("sigma", "adc_levels"):
        path = plot_robustness(summary, x, tmp_path / f"{x}.png", title=x)
        assert path == tmp_path / f"{x}.png"
        _png_ok(path)
    with pytest.raises(ConfigError, match="x="):
        plot_robustness(summary, "chips", tmp_path / "bad.png")

    single = evaluate_robustness(
        model, test, RobustnessGrid(sigmas=[0.1], chips=1), SEED, progress=False
    )
    csv_path, json_path = write_results(single, tmp_path / "out")
    doc = json.loads(json_path.read_text())
    assert doc["rows"] == single.rows
    assert doc["summary"][0]["acc_ci95"] is None  # NaN (one chip) as valid JSON null
    assert csv_path.read_text().splitlines()[0].startswith("sigma,mean_shift,adc_levels,acc_mean")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temps
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "robustness.json",
        "robustness_summary.csv",
    ]
