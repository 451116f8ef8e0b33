"""Training methods beyond plain HA-SGD: antithetic pairs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cimsim.layers as layers
import cimsim.noise as noise
from cimsim import AnalogConfig, convert_to_analog
from cimsim.hasgd import hasgd_backward
from cimsim.noise import antithetic


def quadratic_problem():
    torch.manual_seed(0)
    layer = nn.Linear(6, 3)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    return layer, x, y


def gradient(layer, x, y, **kwargs):
    layer.zero_grad()
    hasgd_backward(lambda: F.mse_loss(layer(x), y), **kwargs)
    return torch.cat([layer.weight.grad.flatten(), layer.bias.grad.flatten()])


@pytest.mark.parametrize("distribution", ["gaussian", "uniform"])
def test_antithetic_pair_gives_the_digital_gradient_of_a_quadratic_loss(distribution):
    # J(W + dW) is quadratic in dW: its gradient is linear in dW, so +dW and -dW cancel exactly.
    layer, x, y = quadratic_problem()
    digital = gradient(layer, x, y, L=1)
    cfg = AnalogConfig(sigma=0.1, distribution=distribution)
    analog = convert_to_analog(layer, cfg).train()
    torch.manual_seed(1)
    pair = gradient(analog, x, y, L=2, antithetic=True)
    torch.testing.assert_close(pair, digital, rtol=1e-5, atol=1e-6)
    torch.manual_seed(1)
    iid = gradient(analog, x, y, L=2)
    assert (iid - digital).abs().max() > 100 * (pair - digital).abs().max() + 1e-4


def test_replayed_draws_are_the_recorded_ones_negated(monkeypatch):
    model = convert_to_analog(
        nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Identity(), nn.Flatten()),
        AnalogConfig(sigma=0.1, mean_shift=0.02),
    ).train()
    x = torch.randn(3, 2, 5, 5)
    drawn, served = [], []
    real_draw, real_noise = noise._draw, noise.standard_noise

    def spy_draw(*args):
        drawn.append(real_draw(*args).clone())
        return drawn[-1].clone()

    def spy_noise(*args, **kwargs):
        served.append(real_noise(*args, **kwargs).clone())
        return served[-1].clone()

    monkeypatch.setattr(noise, "_draw", spy_draw)
    monkeypatch.setattr(layers, "standard_noise", spy_noise)
    with antithetic("record"):
        model(x)
    with antithetic("replay"):
        model(x)
    assert len(drawn) == 5  # conv W, b; BN w, b; identity: drawn once, in the record pass
    assert len(served) == 10
    for plus, minus in zip(served[:5], served[5:], strict=True):
        assert torch.equal(minus, -plus)


def test_antithetic_needs_even_L_and_a_matching_forward():
    layer, x, y = quadratic_problem()
    with pytest.raises(ValueError, match="L=3 is invalid with antithetic pairs"):
        gradient(convert_to_analog(layer, AnalogConfig(sigma=0.1)), x, y, L=3, antithetic=True)
    analog = convert_to_analog(layer, AnalogConfig(sigma=0.1)).train()
    with pytest.raises(RuntimeError, match="fewer than recorded"):
        with antithetic("record"):
            analog(x)
        with antithetic("replay"):
            pass
