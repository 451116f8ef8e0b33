"""A model trained for a drifted chip (``noise.mean_shift``) is tested and swept on that chip."""

from __future__ import annotations

import csv
import json

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cimsim import AnalogConfig, ConfigError, convert_to_analog, program_chip, set_noise
from cimsim.chip.convert import clear_chip, systematic_chip
from cimsim.cli.train import train
from cimsim.robustness.grid import TRAIN, RobustnessGrid
from cimsim.training.callbacks import sweep_title
from cimsim.training.classifier import AnalogClassifier
from conftest import authors_scales

MU = 0.05


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def test_systematic_chip_reads_the_mean_shift_by_hand_and_restores_the_layers():
    x = torch.randn(32, 6)
    digital = mlp()
    analog = convert_to_analog(mlp(), AnalogConfig(sigma=0.1, mean_shift=MU)).eval()
    # By hand: W + R mu, b + R f mu under the authors' bi-scale ranges, no random part.
    h = x
    for i, layer in enumerate(digital):
        if isinstance(layer, nn.Linear):
            R, Rf = authors_scales(layer.weight, layer.bias)
            w = layer.weight + float(R) * MU
            b = layer.bias + float(Rf) * MU
            h = F.linear(h, w, b)
        else:
            h = layer(h)
        assert i < 3
    with torch.no_grad(), systematic_chip(analog):
        inside = analog(x)
    torch.testing.assert_close(inside, h.detach(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # outside: eval() with no chip programmed is the clean network again
        torch.testing.assert_close(analog(x), digital(x))
    assert all(layer.config.sigma == 0.1 for layer in analog if hasattr(layer, "config"))
    assert all(layer.chip_seed is None for layer in analog if hasattr(layer, "config"))


def test_test_metrics_are_measured_at_the_training_mean_shift():
    torch.manual_seed(1)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 4, (32,))
    net = {"_target_": "cimsim.wide_resnet.WideResNet", "depth": 10, "widen_factor": 1}
    net |= {"num_classes": 4, "in_channels": 1}
    model = AnalogClassifier(net=net, chip=AnalogConfig(sigma=0.1, mean_shift=MU), val_chips=0)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    (logged,) = trainer.test(model, DataLoader(TensorDataset(x, y), batch_size=16), verbose=False)

    # Independently, through the public chip API: sigma 0 at the mean shift, one programmed chip.
    analog = model.net.eval()
    with torch.no_grad():
        clean = F.cross_entropy(analog(x), y).item()
        set_noise(analog, sigma=0.0)
        program_chip(analog, 3)
        drifted = F.cross_entropy(analog(x), y).item()
        clear_chip(analog)
        set_noise(analog, sigma=0.1)
    assert abs(drifted - clean) > 1e-3  # the two chips differ: the check below can fail
    assert logged["test/loss"] == pytest.approx(drifted, rel=1e-5)


def test_grid_train_mean_shift_resolves_per_model():
    grid = RobustnessGrid(sigmas=[0.0, 0.1], mean_shifts=[TRAIN], chips=2)
    with pytest.raises(ConfigError, match="mean_shifts"):
        list(grid.points())
    resolved = grid.for_chip(AnalogConfig(sigma=0.05, mean_shift=-0.02))
    assert resolved.mean_shifts == (-0.02,)
    assert [p[1] for p in resolved.points()] == [-0.02, -0.02]
    assert "mean shift -0.02" in sweep_title(resolved)


@pytest.mark.parametrize(
    ("key", "value"), [("sigma", 5.0), ("sigma", 1.5), ("mean_shift", -1.2), ("mean_shift", 2)]
)
def test_relative_levels_beyond_the_range_are_refused(key, value):
    with pytest.raises(ConfigError, match=rf"{key}={value!r} is invalid: must be .*<= 1"):
        AnalogConfig(**{key: value})


def test_train_py_tests_and_sweeps_a_drift_trained_model_on_its_chip(train_cfg, tmp_path):
    cfg = train_cfg([f"noise.mean_shift={MU}", "noise.sigma=0.05", "logger=csv"])
    train(cfg)
    with open(next(tmp_path.rglob("robustness_rows.csv"))) as f:
        shifts = {float(row["mean_shift"]) for row in csv.DictReader(f)}
    assert shifts == {MU}
    summary = json.loads(next(tmp_path.rglob("robustness.json")).read_text())
    rows = summary if isinstance(summary, list) else summary.get("summary", summary)
    assert {float(s["mean_shift"]) for s in rows} == {MU}


def test_reports_compare_each_model_at_its_own_mean_shift(tmp_path):
    """A drift-trained model's rows are at its mean shift (``mean_shifts=[train]``): the compute
    plot and the loss prediction use them, next to a model's rows at 0."""
    from types import SimpleNamespace

    from cimsim.robustness.plots import (
        measured_losses,
        own_mean_shift,
        plot_compute,
        plot_loss_prediction,
    )

    def point(model, sigma, mu, acc):
        return {
            "model": model,
            "sigma": sigma,
            "mean_shift": mu,
            "adc_levels": None,
            "acc_mean": acc,
            "acc_ci95": 0.01,
            "loss_mean": 1 - acc,
            "chips": 2,
        }

    summary = [point("drift", s, MU, 0.9 - s) for s in (0.0, 0.1)]
    summary += [point("plain", s, 0.0, 0.8 - s) for s in (0.0, 0.1)]
    summary += [point("swept", 0.1, m, 0.5) for m in (-MU, 0.0, MU)]
    assert own_mean_shift(summary, "drift") == MU and own_mean_shift(summary, "swept") == 0.0
    subjects = [SimpleNamespace(label=m, passes=10) for m in ("drift", "plain", "swept")]
    table, _ = plot_compute(summary, subjects, 0.1, tmp_path)
    assert table.read_text().count("\n") == 4  # a header and one row per model
    traces = {m: {"weighted": 1.0, "weighted_se": 0.1, "probes": 2} for m in ("drift", "plain")}
    losses = measured_losses(summary, "drift")  # its own mean shift, not 0
    assert [s for s, _ in losses] == [0.0, 0.1]
    assert [loss for _, loss in losses] == pytest.approx([0.1, 0.2])
    _, figure = plot_loss_prediction(summary, traces, tmp_path)
    assert figure.exists()


def test_systematic_chip_drifts_an_identity_shortcut_only_when_asked():
    """``identity_mean_shift=true``: the shortcut reads ``x * (1 + mu)``; by default it is exact."""
    x = torch.randn(2, 3, 4, 4)
    for drifts, gain in ((True, 1 + MU), (False, 1.0)):
        chip = AnalogConfig(sigma=0.1, mean_shift=MU, identity_mean_shift=drifts)
        model = convert_to_analog(nn.Sequential(nn.Identity()), chip).eval()
        with torch.no_grad(), systematic_chip(model):
            torch.testing.assert_close(model(x), x * gain)
        with torch.no_grad():
            assert torch.equal(model(x), x)  # outside: the clean network again
