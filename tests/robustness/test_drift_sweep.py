"""PCM time sweeps (``RobustnessGrid(times=..., repetitions=...)``, ``robustness=drift_sweep``):
each chip programmed once and read once per time and read-out, the rows and their resumable file,
the summary and the time axis (evaluate.py's drift sweep: test_drift_evaluate.py). Values are
checked against independent computations: rows against chips programmed, moved in time and
measured by hand, the summary against numpy and scipy.
"""

from __future__ import annotations

import copy
import csv
import math

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import stats
from sklearn.datasets import load_digits
from torch import nn

import cimsim.robustness.measure as rb
from cimsim import AnalogConfig, ConfigError, convert_to_analog, program_chip, set_noise, set_time
from cimsim.chip.devices.pcm import PCMWeights
from cimsim.robustness.grid import EvalSettings, RobustnessGrid, chip_seed
from cimsim.robustness.measure import evaluate_robustness
from cimsim.robustness.plots import _time_axis, lines, plot_robustness
from cimsim.robustness.rows import TIMED_COLUMNS, Row, RowsFile, TimedRow
from cimsim.robustness.summary import format_summary, format_time, summarize

SEED = 3
YEAR = 31536000.0


def run(model, test, grid, rows_file=None, **settings):
    settings = EvalSettings(**{"seed": SEED, "progress": False, **settings})
    return evaluate_robustness(model, test, grid, settings, rows_file)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def digits():
    """Test batches of 8x8 digits (B, 1, 8, 8), fixed order, and a digital convnet (~94 %)."""
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 64, 10),
    )  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(8):
        for i in range(0, 1400, 128):
            loss = nn.functional.cross_entropy(net(x[i : i + 128]), y[i : i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
    test = [(x[i : i + 128], y[i : i + 128]) for i in range(1400, len(x), 128)]
    return net.eval(), test


@pytest.fixture
def pcm_model(digits):
    return convert_to_analog(digits[0], AnalogConfig(device="pcm"))


@torch.no_grad()
def by_hand(model, test, seed, t, rep, sigma=0.0):
    """(accuracy, n) of one chip read at (t, rep), without evaluate_robustness."""
    chip = copy.deepcopy(model).eval()
    program_chip(chip, seed)
    set_time(chip, t, rep)
    set_noise(chip, sigma=sigma)
    correct, n = 0, 0
    for x, y in test:
        correct += (chip(x).argmax(1) == y).sum().item()
        n += len(y)
    return correct / n, n


# ----------------------------------------------------------------------------- the grid


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"times": []}, "times"),
        ({"times": [0, None]}, "times"),
        ({"times": [-1]}, "times"),
        ({"times": ["1h"]}, "times"),
        ({"times": [60, 60.0]}, "times"),
        ({"times": [0], "repetitions": 0}, "repetitions"),
        ({"repetitions": 2}, "repetitions"),  # read-outs without times
    ],
)
def test_grid_rejects_bad_times_naming_the_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        RobustnessGrid(sigmas=[0.0], **kwargs)
    assert err.value.key == key and str(err.value).startswith(f"{key}=")


def test_grid_reads_every_time_and_repetition_then_the_points():
    grid = RobustnessGrid(sigmas=[0, 0.1], chips=2, times=[0, 60], repetitions=2)
    assert grid.timed and grid.times == (0.0, 60.0) and isinstance(grid.times[0], float)
    assert grid.reads() == [(0.0, 0), (0.0, 1), (60.0, 0), (60.0, 1)]
    assert grid.cells()[:3] == [
        ((0.0, 0), (0.0, 0.0, None)), ((0.0, 0), (0.1, 0.0, None)), ((0.0, 1), (0.0, 0.0, None)),
    ]  # fmt: skip
    assert len(grid.cells()) == 4 * 2
    assert grid.for_chip(AnalogConfig()).times == grid.times  # train tokens only
    plain = RobustnessGrid(sigmas=[0.1])
    assert not plain.timed and plain.times == (None,) and plain.repetitions == 1
    assert plain.cells() == [(None, (0.1, 0.0, None))]


# ----------------------------------------------------------------------------- the sweep


def test_each_chip_is_programmed_once_and_read_once_per_time_and_repetition(
    pcm_model, digits, monkeypatch
):
    """The drifted weights are computed once per (chip, t, repetition), never per batch."""
    programs, moves, reads = [], [], []
    real_program, real_move, real_read = rb.program_chip, rb.set_time, PCMWeights.read_out

    def program(model, seed):
        programs.append(seed)
        return real_program(model, seed)

    def move(model, t, rep):
        moves.append((t, rep))
        return real_move(model, t, rep)

    def read(self, t, rep=0):
        reads.append((self.name, t, rep))
        return real_read(self, t, rep)

    monkeypatch.setattr(rb, "program_chip", program)
    monkeypatch.setattr(rb, "set_time", move)
    monkeypatch.setattr(PCMWeights, "read_out", read)
    test = digits[1]
    grid = RobustnessGrid(sigmas=[0.0, 0.05], chips=2, times=[0, YEAR], repetitions=2)
    result = run(pcm_model, test, grid)
    assert programs == [chip_seed(SEED, c) for c in range(2)]
    assert moves == [(0.0, 0), (0.0, 1), (YEAR, 0), (YEAR, 1)] * 2
    # 2 PCM tensors (conv, linear) per chip: read at t = 0 when programmed, then once per
    # read-out; the 4 test batches and the 2 sigmas reuse them.
    assert len(test) == 4 and len(reads) == 2 * 2 * (1 + 4)
    rows = result.rows
    assert all(isinstance(r, TimedRow) for r in rows) and len(rows) == 2 * 4 * 2
    assert [(r.chip, r.t_inference, r.repetition, r.sigma) for r in rows[:4]] == [
        (0, 0.0, 0, 0.0), (0, 0.0, 0, 0.05), (0, 0.0, 1, 0.0), (0, 0.0, 1, 0.05),
    ]  # fmt: skip
    for r in rows:  # every row is its chip, read at its time, measured by hand
        assert (r.acc, r.n) == by_hand(pcm_model, test, r.chip_seed, r.t_inference, r.repetition,
                                       r.sigma)  # fmt: skip
    same_read = {}
    for r in rows:  # read-outs of one chip differ by read noise only: some losses differ
        same_read.setdefault((r.chip, r.t_inference, r.sigma), []).append(r.loss)
    assert any(a != b for a, b in same_read.values())
    analog = [m for m in pcm_model.modules() if hasattr(m, "device_state")]
    assert analog and all(layer.chip_seed is None for layer in analog)


def test_a_time_sweep_needs_a_pcm_model_and_fails_before_any_work(digits, monkeypatch):
    monkeypatch.setattr(rb, "program_chip", lambda *a: pytest.fail("programmed a chip"))
    relative = convert_to_analog(digits[0], AnalogConfig(sigma=0.05))
    with pytest.raises(ConfigError, match=r"^times=\[0\.0, 60\.0\] is invalid: .*PCM") as err:
        run(relative, digits[1], RobustnessGrid(sigmas=[0.0], times=[0, 60]))
    assert err.value.key == "times"


def test_time_rows_resume_byte_identically_and_only_new_read_outs_are_computed(
    pcm_model, digits, tmp_path, monkeypatch
):
    test = digits[1][:1]
    program_chip(pcm_model.eval(), 5)  # a chip at its own time, which every run must leave
    set_time(pcm_model, 60.0, 1)
    with torch.no_grad():
        before = pcm_model(test[0][0])
    grid = RobustnessGrid(sigmas=[0.0], chips=4, times=[0, 3600], repetitions=2)
    full_path, path = tmp_path / "full.csv", tmp_path / "rows.csv"
    full = run(pcm_model, test, grid, RowsFile(full_path, "m"))
    assert full_path.read_text().splitlines()[0] == ",".join(TIMED_COLUMNS)
    assert TIMED_COLUMNS[:4] == ["chip", "chip_seed", "t_inference", "repetition"]
    real = rb.program_chip
    calls = []

    def killed_on_third_chip(model, seed):
        calls.append(seed)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(model, seed)

    monkeypatch.setattr(rb, "program_chip", killed_on_third_chip)
    with pytest.raises(RuntimeError, match="killed"):
        run(pcm_model, test, grid, RowsFile(path, "m"))
    with open(path, "a") as f:
        f.write("2,123,0.0,0,0.0,0.0,,0.9")  # torn line of a kill -9 mid-write
    monkeypatch.setattr(rb, "program_chip", real)
    resumed = run(pcm_model, test, grid, RowsFile(path, "m"))
    assert path.read_bytes() == full_path.read_bytes()
    assert resumed.rows == full.rows and resumed.summary == full.summary
    moves, real_move = [], rb.set_time

    def move(model, t, rep):
        moves.append((t, rep))
        return real_move(model, t, rep)

    monkeypatch.setattr(rb, "set_time", move)
    more = run(pcm_model, test, replace_reps(grid, 3), RowsFile(path, "m"))
    assert moves == [(0.0, 2), (3600.0, 2)] * 4  # only the third read-out of every chip and time
    assert [r for r in more.rows if r.repetition < 2] == full.rows
    with pytest.raises(ConfigError, match=r"^rows file=.* has columns"):  # never mixed
        run(pcm_model, test, RobustnessGrid(sigmas=[0.0], chips=1), RowsFile(path, "m"))
    assert pcm_model[0].chip_time == (60.0, 1)
    with torch.no_grad():
        assert torch.equal(pcm_model(test[0][0]), before)


def replace_reps(grid, repetitions):
    return RobustnessGrid(grid.sigmas, chips=grid.chips, times=grid.times, repetitions=repetitions)


# ----------------------------------------------------------------------------- the summary


def _p5(values):
    """The 5th percentile by linear interpolation between order statistics (numpy's default)."""
    x = sorted(values)
    h = 0.05 * (len(x) - 1)
    lo = math.floor(h)
    return x[lo] + (h - lo) * (x[min(lo + 1, len(x) - 1)] - x[lo])


def test_time_summary_separates_chip_and_read_spread_as_numpy_does():
    rng = np.random.default_rng(0)
    n_chips, n_reads, times = 7, 3, (0.0, 3600.0)
    acc = rng.uniform(0.5, 1.0, size=(2, len(times), n_chips, n_reads))
    loss = rng.uniform(0.1, 2.0, size=acc.shape)
    rows = [
        TimedRow(c, 100 + c, 0.0, 0.0, None, float(acc[m, k, c, r]), float(loss[m, k, c, r]), 10,
                 model=f"m{m}", t_inference=t, repetition=r)
        for m in range(2) for c in range(n_chips) for k, t in enumerate(times)
        for r in range(n_reads)
    ]  # fmt: skip
    summary = summarize(rows)
    assert [(s["model"], s["t_inference"]) for s in summary] == [
        ("m0", 0.0), ("m0", 3600.0), ("m1", 0.0), ("m1", 3600.0),
    ]  # fmt: skip
    for s in summary:
        a = acc[int(s["model"][1]), times.index(s["t_inference"])]  # (chips, read-outs)
        means = a.mean(axis=1)
        low, high = stats.t.interval(0.95, n_chips - 1, loc=means.mean(), scale=stats.sem(means))
        assert s["acc_mean"] == pytest.approx(a.mean(), rel=1e-12)
        assert s["acc_ci95"] == pytest.approx((high - low) / 2, rel=1e-9)
        assert s["acc_std_chip"] == pytest.approx(means.std(ddof=1), rel=1e-12)
        assert s["acc_std_read"] == pytest.approx(np.sqrt(a.var(axis=1, ddof=1).mean()), rel=1e-12)
        assert s["acc_p5"] == pytest.approx(_p5(means), rel=1e-12)
        assert min(means) < s["acc_p5"] < np.median(means)
        m, k = int(s["model"][1]), times.index(s["t_inference"])
        assert s["loss_mean"] == pytest.approx(loss[m, k].mean(), rel=1e-12)
        assert (s["chips"], s["repetitions"]) == (n_chips, n_reads)
        assert s["acc_std_chip"] > 0 and s["acc_std_read"] > 0
    one = summarize([r for r in rows if r.repetition == 0 and r.model == "m0"])  # R = 1
    assert math.isnan(one[0]["acc_std_read"]) and one[0]["repetitions"] == 1
    assert one[0]["acc_std_chip"] == pytest.approx(acc[0, 0, :, 0].std(ddof=1), rel=1e-12)
    with pytest.raises(ValueError, match="time sweep"):
        summarize([rows[0], Row(0, 1, 0.0, 0.0, None, 0.5, 1.0, 10)])
    table = format_summary(summary).splitlines()
    assert table[0].split() == [
        "model", "t_inference", "sigma", "mean_shift", "adc_levels", "acc_mean%", "ci95%",
        "chip_std%", "read_std%", "p5%", "loss_mean", "chips", "reads",
    ]  # fmt: skip
    assert table[2].split()[1:3] == ["1", "h"]  # 3600 s, in human units


# ----------------------------------------------------------------------------- the figure


def test_time_axis_is_logarithmic_in_human_units_with_zero_at_the_left(tmp_path):
    times = [0, 60, 3600, 86400, 2592000, YEAR]
    assert [format_time(t) for t in times] == ["0", "1 min", "1 h", "1 d", "30 d", "1 y"]
    assert [format_time(t) for t in (20, 90, 0.5, 5400)] == ["20 s", "1.5 min", "0.5 s", "1.5 h"]
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    position = _time_axis(ax, times)
    assert ax.get_xscale() == "log" and position(0) == 6.0 and position(60) == 60
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1 min", "1 h", "1 d", "30 d",
                                                            "1 y"]  # fmt: skip
    assert list(ax.get_xticks()) == [6.0, 60, 3600, 86400, 2592000, YEAR]

    def entry(model, t, acc):
        return {"model": model, "t_inference": t, "sigma": 0.0, "mean_shift": 0.0,
                "adc_levels": None, "acc_mean": acc, "acc_ci95": 0.01}  # fmt: skip

    summary = [entry(m, t, 0.9 - 0.01 * i) for m in ("a", "a | chip pcm.drift_compensation=none")
               for i, t in enumerate(times)]  # fmt: skip
    assert [len(v) for v in lines(summary, "t_inference").values()] == [6, 6]  # one per model
    path = plot_robustness(summary, "t_inference", tmp_path / "drift.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plain = [{k: v for k, v in e.items() if k != "t_inference"} for e in summary]
    with pytest.raises(ConfigError, match=r"^x='t_inference' is invalid: needs a time sweep"):
        plot_robustness(plain, "t_inference", tmp_path / "bad.png")
