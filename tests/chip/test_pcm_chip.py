"""The PCM device on a network: programmed chips moved in time, training draws, configuration.
Expected values come from ``cimsim.chip.devices.pcm.PCMWeights`` built independently with the same
seed and
tensor name (its statistics are checked in test_pcm.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cimsim
import cimsim.chip.convert
import cimsim.robustness.measure
from cimsim import AnalogConfig, ConfigError, convert_to_analog, program_chip, set_time
from cimsim.chip.devices.pcm import PCMConfig, PCMWeights, pcm_training_perturbation
from cimsim.cli.train import train
from cimsim.robustness.grid import EvalSettings, RobustnessGrid
from cimsim.robustness.measure import evaluate_robustness


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


X = torch.randn(8, 32, generator=torch.Generator().manual_seed(1))


def by_hand(digital: nn.Sequential, seed: int, t: float, rep: int = 0):
    """The chip's output from PCMWeights per layer; biases digital (sigma = 0)."""
    h = X
    for i in (0, 2):
        layer = digital[i]
        w = PCMWeights(layer.weight, PCMConfig(), seed, f"{i}.weight").weights_at(t, rep)
        h = F.linear(h, w, layer.bias)
        if i == 0:
            h = F.relu(h)
    return h


@pytest.mark.parametrize("t, rep", [(0.0, 0), (3600.0, 0), (3600.0, 2), (31536000.0, 1)])
def test_programmed_chip_reads_the_pcm_weights_at_its_time(t, rep):
    digital = net()
    chip = program_chip(convert_to_analog(digital, AnalogConfig(device="pcm")).eval(), 7)
    if (t, rep) != (0.0, 0):
        set_time(chip, t, rep)
    with torch.no_grad():
        torch.testing.assert_close(chip(X), by_hand(digital, 7, t, rep), rtol=1e-5, atol=1e-6)
    assert chip[0].chip_time == (t, rep)


def test_repetitions_redraw_read_noise_only_and_times_reproduce():
    digital = net()
    chip = program_chip(convert_to_analog(digital, AnalogConfig(device="pcm")).eval(), 7)
    set_time(chip, 86400.0, 0)
    a = chip(X)
    set_time(chip, 86400.0, 1)
    b = chip(X)
    set_time(chip, 86400.0, 0)
    assert torch.equal(chip(X), a) and not torch.equal(a, b)
    quiet = AnalogConfig(device="pcm", pcm=PCMConfig(read_noise_scale=0.0))
    chip = program_chip(convert_to_analog(digital, quiet).eval(), 7)
    outs = [set_time(chip, 86400.0, r)(X) for r in (0, 1)]
    assert torch.equal(*outs)  # without read noise the repetitions are the same chip state


def test_ideal_device_is_the_digital_network_and_biases_stay_digital():
    digital = net()
    ideal = PCMConfig(prog_noise_scale=0.0, read_noise_scale=0.0, drift_scale=0.0)
    chip = program_chip(convert_to_analog(digital, AnalogConfig(device="pcm", pcm=ideal)), 1)
    for t in (0.0, 3600.0):
        set_time(chip.eval(), t)
        # conductance round trip W -> (G+, G-) -> W: float32 rounding only
        torch.testing.assert_close(chip(X), digital(X), rtol=1e-5, atol=1e-6)
    noisy = program_chip(convert_to_analog(digital, AnalogConfig(device="pcm")).eval(), 1)
    weight, bias = noisy[2]._noisy_parameters()
    assert bias is noisy[2].bias  # the bias is not perturbed at sigma = 0 (digital, as aihwkit)
    torch.testing.assert_close(weight, noisy[2].chip_read_weight)
    assert not torch.allclose(weight, digital[2].weight)


def test_training_draws_a_fresh_pcm_chip_at_t_train_and_reaches_the_weights():
    digital = net()
    cfg = AnalogConfig(device="pcm", t_train=3600.0)
    model = convert_to_analog(digital, cfg).train()
    torch.manual_seed(5)
    y = model(X)
    torch.manual_seed(5)  # replay: layer 0's draws, then layer 2's
    h = X
    for i in (0, 2):
        w = digital[i].weight
        h = F.linear(h, w + pcm_training_perturbation(w, cfg.pcm, 3600.0), digital[i].bias)
        h = F.relu(h) if i == 0 else h
    torch.testing.assert_close(y, h)
    y.square().sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    assert not torch.equal(model(X), model(X))  # fresh draws every forward


def test_pcm_config_round_trips_and_names_bad_fields():
    cfg = AnalogConfig(device="pcm", pcm={"g_max": 20.0, "drift_compensation": "none"})
    assert cfg.pcm == PCMConfig(g_max=20.0, drift_compensation="none")
    assert AnalogConfig(**dataclasses.asdict(cfg)) == cfg  # as a checkpoint stores it
    with pytest.raises(ConfigError, match=r"^pcm\.g_max=-1 is invalid"):
        AnalogConfig(device="pcm", pcm={"g_max": -1})
    with pytest.raises(ConfigError, match=r"^device='memristor' is invalid"):
        AnalogConfig(device="memristor")
    with pytest.raises(ConfigError, match=r"^t_train=-1 is invalid"):
        AnalogConfig(device="pcm", t_train=-1)


def test_set_time_needs_a_programmed_pcm_chip():
    relative = program_chip(convert_to_analog(net(), AnalogConfig(sigma=0.1)), 0)
    with pytest.raises(ValueError, match="set_time needs a programmed PCM or RRAM chip"):
        set_time(relative, 60.0)
    chip = program_chip(convert_to_analog(net(), AnalogConfig(device="pcm")), 0)
    with pytest.raises(ConfigError, match=r"^t_inference=-1"):
        set_time(chip, -1)
    with pytest.raises(ConfigError, match=r"^repetition=1.5"):
        set_time(chip, 1.0, 1.5)
    cimsim.clear_chip(chip)
    with pytest.raises(ValueError, match="set_time"):
        set_time(chip, 60.0)


def test_the_noise_config_composes_to_a_pcm_chip(train_cfg):
    from cimsim.cli.train import chip_config

    chip = chip_config(train_cfg(["noise=pcm", "noise.t_train=60", "noise.pcm.g_max=20"]))
    assert chip.device == "pcm" and chip.t_train == 60 and chip.pcm.g_max == 20


def test_an_evaluation_leaves_the_chip_at_its_time():
    chip = program_chip(convert_to_analog(net(), AnalogConfig(device="pcm")).eval(), 7)
    set_time(chip, 86400.0, 1)
    before = chip(X)
    loader = [(X, torch.zeros(8, dtype=torch.long))]
    evaluate_robustness(
        chip, loader, RobustnessGrid(sigmas=[0.0], chips=2), EvalSettings(progress=False)
    )
    assert chip[0].chip_time == (86400.0, 1) and torch.equal(chip(X), before)


def test_val_acc_noisy_of_a_pcm_model_reads_its_chips_at_t_train(train_cfg, monkeypatch):
    times = []
    real = cimsim.chip.convert.set_time

    def spy(model, t, repetition=0):
        times.append(t)
        return real(model, t, repetition)

    monkeypatch.setattr(cimsim.robustness.measure, "set_time", spy)
    overrides = ["noise=pcm", "noise.t_train=3600", "logger=none", "test=false"]
    train(
        train_cfg([*overrides, "callbacks.robustness=null", "callbacks.hessian.every_n_epochs=0"])
    )
    assert times and set(times) == {3600.0}
