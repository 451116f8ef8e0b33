"""Fault sweeps (``RobustnessGrid(fault_rates=...)``, ``robustness=fault_sweep``): accuracy vs the
fraction of stuck devices, on a log axis. Rows are checked against chips programmed with those
faults and measured by hand; the other sweeps' rows, columns and fingerprints stay as they were.
"""

from __future__ import annotations

import copy
import csv

import matplotlib.figure
import pytest
import robustness_fixtures as rf
import torch
from robustness_fixtures import run
from torch import nn

from cimsim import AnalogConfig, ConfigError, analog_layers, convert_to_analog, program_chip
from cimsim.cli.evaluate import evaluate
from cimsim.cli.train import train
from cimsim.robustness.grid import RobustnessGrid, chip_seed
from cimsim.robustness.plots import plot_robustness
from cimsim.robustness.rows import COLUMNS, FAULT_COLUMNS, TIMED_COLUMNS, FaultRow, RowsFile
from cimsim.robustness.summary import format_summary
from conftest import FAST, compose_cfg

_one_thread, digits, trained_net = rf._one_thread, rf.digits, rf.trained_net
RATES = [0.0, 1e-3, 0.1]


@pytest.fixture
def model(trained_net):
    return convert_to_analog(trained_net, AnalogConfig(sigma=0.02))


@torch.no_grad()
def by_hand(model, test, seed: int, stuck_off: float, stuck_on: float) -> tuple[float, int]:
    """One chip of a fault sweep without its code: a copy of the model on a chip with these
    faults (``AnalogConfig.faults``), programmed from ``seed``, over the whole test set."""
    chip = copy.deepcopy(model).eval()
    for _, layer in analog_layers(chip):
        layer.config = AnalogConfig(
            **{**layer.config.as_dict(), "faults": {"stuck_off": stuck_off, "stuck_on": stuck_on}}
        )
    program_chip(chip, seed)
    correct, n = 0, 0
    for x, y in test:
        correct += (chip(x).argmax(1) == y).sum().item()
        n += len(y)
    return correct / n, n


def test_the_grid_validates_and_orders_fault_rates():
    grid = RobustnessGrid(sigmas=[0.0, 0.1], chips=2, fault_rates=RATES)
    assert grid.faulted and grid.reads() == [(0.0,), (1e-3,), (0.1,)]
    assert grid.cells()[:2] == [((0.0,), (0.0, 0.0, None)), ((0.0,), (0.1, 0.0, None))]
    assert grid.faults_at(0.1) == {"stuck_off": 0.05, "stuck_on": 0.05}
    on = RobustnessGrid(sigmas=[0.0], fault_rates=[0.1], fault_kind="stuck_on")
    assert on.faults_at(0.1) == {"stuck_off": 0.0, "stuck_on": 0.1}
    assert not RobustnessGrid(sigmas=[0.0]).faulted
    for kwargs, match in (
        ({"fault_rates": [0.1, 1.5]}, r"^fault_rates=1\.5"),
        ({"fault_rates": [0.1, 0.1]}, r"^fault_rates=\[0\.1, 0\.1\].*repeat"),
        ({"fault_rates": [None, 0.1]}, r"^fault_rates=.*null only alone"),
        ({"fault_rates": []}, r"^fault_rates=\[\]"),
        ({"fault_rates": [0.1], "fault_kind": "sideways"}, r"^fault_kind='sideways'"),
        ({"fault_rates": [0.1], "times": [0, 60]}, r"^fault_rates=\[0\.1\].*times=\[null\]"),
    ):
        with pytest.raises(ConfigError, match=match):
            RobustnessGrid(sigmas=[0.0], **kwargs)


def test_fault_sweep_rows_are_chips_with_those_faults(model, digits, tmp_path):
    """Every row is its chip programmed with the rate's faults (half stuck off, half on) and
    measured by hand; the same chip at every rate (common random numbers), read back on a
    rerun, summarized per rate, and written with a fault_rate column."""
    _, test = digits
    grid = RobustnessGrid(sigmas=[0.02], chips=2, fault_rates=RATES)
    rows_file = RowsFile(tmp_path / "rows.csv", "m")
    result = run(model, test, grid, rows_file=rows_file)
    assert [type(r) for r in result.rows] == [FaultRow] * 6
    assert [(r.chip, r.fault_rate) for r in result.rows] == [(c, p) for c in (0, 1) for p in RATES]
    for r in result.rows:
        assert (r.acc, r.n) == by_hand(model, test, r.chip_seed, r.fault_rate / 2, r.fault_rate / 2)
    clean = {r.chip: r.acc for r in result.rows if r.fault_rate == 0}
    assert all(r.acc < clean[r.chip] - 0.1 for r in result.rows if r.fault_rate == 0.1)
    with open(tmp_path / "rows.csv", newline="") as f:
        assert list(csv.DictReader(f).fieldnames) == FAULT_COLUMNS
    again = run(model, test, grid, rows_file=RowsFile(tmp_path / "rows.csv", "m"))
    assert again.rows == result.rows and rows_file.fingerprints  # read back, not recomputed
    assert (settings := next(iter(rows_file.fingerprints.values())))["fault_kind"] == "both"
    assert "faults" not in settings["chip"]  # the model's chip has none: a fingerprint as before
    assert [s["fault_rate"] for s in result.summary] == RATES
    assert "fault_rate" in format_summary(result.summary).splitlines()[0]


def test_other_sweeps_keep_their_columns_and_fingerprints(model, digits, tmp_path):
    """A sweep without fault rates writes the same columns and records the same settings."""
    assert COLUMNS == ["chip", "chip_seed", "sigma", "mean_shift", "adc_levels", "acc", "loss",
                       "n", "model", "ckpt", "fingerprint"]  # fmt: skip
    assert TIMED_COLUMNS[2:4] == ["t_inference", "repetition"]
    rows_file = RowsFile(tmp_path / "rows.csv", "m")
    run(model, digits[1], RobustnessGrid(sigmas=[0.02], chips=1), rows_file=rows_file)
    (settings,) = rows_file.fingerprints.values()
    assert "fault_kind" not in settings and not {"faults", "pairs"} & set(settings["chip"])


def test_the_figure_has_a_log_fault_rate_axis(model, digits, tmp_path, monkeypatch):
    """x = fault_rate: a log axis, 0 a decade below the smallest rate, a tick at every rate."""
    grid = RobustnessGrid(sigmas=[0.02], chips=1, fault_rates=RATES)
    summary = run(model, digits[1], grid).summary
    figures = []
    real = matplotlib.figure.Figure.savefig

    def save(fig, *args, **kwargs):
        figures.append(fig)
        return real(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", save)
    plot_robustness(summary, "fault_rate", tmp_path / "faults.png")
    (ax,) = figures[0].axes
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "0.001", "0.1"]
    assert list(ax.get_xticks()) == pytest.approx([1e-4, 1e-3, 0.1])
    assert "stuck" in ax.get_xlabel()
    with pytest.raises(ConfigError, match=r"^x='fault_rate'.*fault_rates"):
        plot_robustness(run(model, digits[1], RobustnessGrid(sigmas=[0.0], chips=1)).summary,
                        "fault_rate", tmp_path / "bad.png")  # fmt: skip


def test_a_fault_sweep_needs_devices_with_conductances(model, digits):
    from cimsim.chip.devices import get_device

    grid = RobustnessGrid(sigmas=[0.0], chips=1, fault_rates=[0.1])
    digital = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(ConfigError, match=r"^fault_rates=\[0\.1\].*got none"):
        run(convert_to_analog(digital, AnalogConfig(analog_bn=False)).eval()[:1], digits[1], grid)
    layer = analog_layers(model)[0][1]
    monkey = copy.copy(layer.config.device_model)
    monkey.conductances = False  # a plug-in without the hook
    object.__setattr__(layer.config, "_device_model", monkey)
    with pytest.raises(ConfigError, match=r"^fault_rates=.*Device.conductances"):
        run(model, digits[1], grid)
    assert get_device("relative").device_cls.conductances  # the class is untouched


def test_evaluate_py_fault_sweep_of_a_digital_and_a_faults_in_the_loop_model(tmp_path):
    """``python evaluate.py 'ckpt=[A,B]' robustness=fault_sweep``: the digital model and one
    trained with faults in the loop (HA-SGD samples with fresh faults), one curve each. Two
    trainings of 2 batches and the sweep: ~12 s on 2 CPUs."""
    common = FAST + ["logger=none", "test=false", "callbacks.robustness=null"]
    ckpts = []
    for name, extra in (("digital", []), ("faults", ["noise.faults.stuck_off=0.01",
                                                       "noise.faults.stuck_on=0.01"])):  # fmt: skip
        train(compose_cfg("train", tmp_path / name, common + extra))
        ckpts.append(tmp_path / name / "checkpoints" / "last.ckpt")
    small = ["robustness.chips=2", "robustness.fault_rates=[0.0,0.01,0.1]", "progress=false"]
    args = [f"ckpt=[{ckpts[0]},{ckpts[1]}]", "robustness=fault_sweep", "wandb.enabled=false"]
    args += small
    result = evaluate(compose_cfg("evaluate", tmp_path / "out", args))
    labels = ["train sigma=0, L=1", "train sigma=0, L=1, faults off 0.01 on 0.01"]
    assert (
        sorted({r.model for r in result.rows}) == labels
    )  # the grid sets the faults: no chip part
    assert [r.chip_seed for r in result.rows[:6:3]] == [chip_seed(0, 0), chip_seed(0, 1)]
    assert {r.fault_rate for r in result.rows} == {0.0, 0.01, 0.1}
    assert (tmp_path / "out" / "robustness.png").stat().st_size > 0
    with pytest.raises(ConfigError, match=r"^robustness\.x='fault_rate'.*fault_rates"):
        bad = [f"ckpt={ckpts[0]}", "robustness.x=fault_rate"]
        evaluate(compose_cfg("evaluate", tmp_path / "bad", bad))
