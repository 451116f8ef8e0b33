"""The Hessian-trace diagnostic against a Hessian known in closed form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cimsim import AnalogConfig, convert_to_analog
from cimsim.training.hessian import hessian_traces, mean_loss
from conftest import authors_scales


def test_least_squares_traces_match_the_closed_form_within_their_standard_error():
    # J(W, b) = mean over N x out of (W x + b - y)^2: H_WW = 2/(N out) I_out (x) X^T X, so
    # tr(H_W) = 2 sum_n |x_n|^2 / N and tr(H_b) = 2 (independent of out).
    g = torch.Generator().manual_seed(0)
    n, d, out = 64, 10, 5
    x, y = torch.randn(n, d, generator=g) * 1.5 + 0.3, torch.randn(n, out, generator=g)
    torch.manual_seed(0)
    model = convert_to_analog(nn.Linear(d, out), AnalogConfig(sigma=0.1)).eval()
    estimates, (total, total_se) = hessian_traces(
        model, lambda: F.mse_loss(model(x), y), probes=64, generator=g
    )
    exact = {"weight": 2 * x.square().sum().item() / n, "bias": 2.0}
    by_name = {e.name.split(".")[-1]: e for e in estimates}
    for key, value in exact.items():
        e = by_name[key]
        assert 0 < e.stderr < 0.2 * value  # an informative estimate
        assert abs(e.trace - value) < 4 * e.stderr, (key, e.trace, value, e.stderr)
    # the weighted total uses the bi-scale noise scales: W relative to R, b to R f
    R, Rf = authors_scales(model.weight, model.bias)
    assert by_name["weight"].r2 == pytest.approx(R**2, rel=1e-5)
    assert by_name["bias"].r2 == pytest.approx(Rf**2, rel=1e-5)
    expected = R**2 * exact["weight"] + Rf**2 * exact["bias"]
    assert abs(total - expected) < 4 * total_se


def test_the_loss_under_the_hessian_is_the_per_sample_mean_over_uneven_batches():
    """A batch of 3 and one of 1: the mean over the 4 samples (what the chips' rows measure),
    not the mean of the two batch means (which weighs the lone sample 3x)."""
    net = torch.nn.Linear(2, 3)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])
    y = torch.tensor([0, 1, 2, 1])
    batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    per_sample = torch.nn.functional.cross_entropy(net(x), y, reduction="none")
    assert mean_loss(net, batches, torch.device("cpu"))().item() == pytest.approx(
        per_sample.mean().item()
    )
    assert per_sample.mean().item() != pytest.approx(
        (per_sample[:3].mean().item() + per_sample[3].item()) / 2
    )
