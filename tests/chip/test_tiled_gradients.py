"""The tiled crossbar's gradient (``periphery._TiledSum``) against autograd through aihwkit's
forward written by hand: straight through the DAC, straight through the tile ADC inside its
range and zero outside. Where nothing clips, cimsim takes the dense product's gradient (the
tiles add up to it); where something does, the grouped product's, masked: both are checked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_periphery_units import quantize, tiles_of
from torch import nn

from cimsim import AnalogConfig, convert_to_analog


def straight(x: torch.Tensor, q: torch.Tensor, inside: torch.Tensor | None = None):
    """``q``'s value with ``x``'s gradient (only ``inside``, when given)."""
    if inside is None:
        return x + (q - x).detach()
    return x * inside + (q - x * inside).detach()


def by_hand(layer: nn.Module, x: torch.Tensor, tile_rows: int, dac: int, adc: int, bound: float):
    """aihwkit's noise-free forward per tile and vector, differentiable (see
    ``test_periphery_units.by_hand``), and how many partial sums clipped."""
    w = layer.weight
    conv = isinstance(layer, nn.Conv2d)
    k = w.shape[2] * w.shape[3] if conv else 1
    chans = tiles_of(w.shape[1], tile_rows // k)
    parts = []
    for sl in chans:  # the per-vector DAC: per image (a conv) or row (a Linear) and tile
        part = x[:, sl]
        dims = tuple(range(1, part.dim()))
        big = part.detach().abs().amax(dim=dims, keepdim=True).clamp_min(1e-30)
        parts.append(straight(part, quantize(part.detach() / big, torch.tensor(1.0), dac) * big))
    xq = torch.cat(parts, dim=1)
    if conv:
        patches = F.unfold(xq, w.shape[2:], padding=layer.padding, stride=layer.stride)
        vectors, weights = patches.transpose(1, 2), w.flatten(1)
    else:
        vectors, weights = xq.unsqueeze(1), w
    out, clipped = 0, 0
    for sl in chans:
        r = slice(sl.start * k, sl.stop * k)
        v, w_t = vectors[..., r], weights[:, r]
        s = v.detach().abs().amax(dim=-1, keepdim=True)
        s = torch.where(s > 0, s, torch.ones_like(s))
        unit = w_t.detach().abs().max() * s
        y = v @ w_t.T
        inside = (y.detach().abs() <= bound * unit).float()
        clipped += int((inside == 0).sum())
        out = out + straight(
            y, quantize(y.detach() / unit, torch.tensor(bound), adc) * unit, inside
        )
    if conv:
        size = [(n + 2 * p - kk) // st + 1 for n, p, kk, st in zip(
            x.shape[2:], layer.padding, w.shape[2:], layer.stride, strict=True)]  # fmt: skip
        return out.transpose(1, 2).reshape(x.shape[0], -1, *size), clipped
    return out[:, 0], clipped


CASES = {
    "linear": (lambda: nn.Linear(40, 6, bias=False), (16, 40), 18),
    "conv": (lambda: nn.Conv2d(7, 5, 3, padding=1, stride=2, bias=False), (3, 7, 7, 7), 27),
}


@pytest.mark.parametrize("kind", sorted(CASES))
@pytest.mark.parametrize("bound", [12.0, 0.3])  # nothing clips / many partial sums clip
def test_the_tiled_gradient_is_straight_through_inside_the_range(kind, bound):
    torch.manual_seed(0)
    make, shape, tile_rows = CASES[kind]
    digital = make()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    g = torch.randn_like(digital(x))
    chip = AnalogConfig(tile_rows=tile_rows, dac_levels=255, tile_adc_levels=15, out_bound=bound)
    layer = convert_to_analog(nn.Sequential(digital), chip)[0].train()
    xa = x.clone().requires_grad_()
    (layer(xa) * g).sum().backward()
    xr = x.clone().requires_grad_()
    ref, clipped = by_hand(digital, xr, tile_rows, 255, 15, bound)
    (ref * g).sum().backward()
    assert (clipped > 0) == (bound < 1)
    scale = xr.grad.abs().max().item()
    torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-4, atol=1e-5 * scale)
    scale = digital.weight.grad.abs().max().item()
    torch.testing.assert_close(layer.weight.grad, digital.weight.grad, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("padding", ["same", 2, "valid"])
def test_any_conv_padding_reads_through_the_periphery(padding):
    """The input vectors' scales pool over the zero-padded input, so paddings beyond half the
    kernel and torch's 'same' / 'valid' run (dilation 2, kernel 3: 'same' pads 2 per side);
    noise-free, the tiled periphery then equals the product with the DAC'd inputs."""
    torch.manual_seed(0)
    digital = nn.Conv2d(6, 4, 3, padding=padding, dilation=2, bias=False)
    x = torch.randn(2, 6, 9, 9, generator=torch.Generator().manual_seed(3))
    chip = AnalogConfig(tile_rows=27, tile_adc_levels=None, out_noise=1e-30, out_bound=1e9)
    layer = convert_to_analog(nn.Sequential(digital), chip)[0].eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), digital(x), rtol=1e-5, atol=1e-5)
