"""Shared by the robustness tests: a tiny convnet trained on sklearn digits, and chips
programmed and measured by hand (independent of ``evaluate_robustness``)."""

from __future__ import annotations

import copy
import csv

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import cimsim.robustness.measure as rb
from cimsim import (
    ADC,
    AnalogConfig,
    analog_layers,
    calibrate_adc,
    convert_to_analog,
    program_chip,
    set_adc,
    set_noise,
)
from cimsim.chip.adc import adcs
from cimsim.robustness.grid import EvalSettings
from cimsim.robustness.measure import evaluate_robustness

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
