"""What a study writes besides its rows (``cimsim.robustness.plots``): the figure, the summary
CSV and JSON, and the lines a figure and W&B draw."""

from __future__ import annotations

import dataclasses
import json
import math
import struct

import matplotlib.image
import pytest
import robustness_fixtures as rf
from robustness_fixtures import _csv_rows, run

from cimsim import ConfigError
from cimsim.robustness.grid import RobustnessGrid
from cimsim.robustness.plots import lines, plot_robustness, write_results
from cimsim.robustness.summary import summarize

# the shared fixtures (robustness_fixtures.py): pytest finds fixtures among a module's names
_one_thread, digits, trained_net, model = rf._one_thread, rf.digits, rf.trained_net, rf.model


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
