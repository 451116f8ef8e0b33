"""The periphery on aihwkit's definitions (issue 19), against hand computations.

aihwkit's forward (``simulator/tiles/analog_mvm.py``): each input vector is divided by its own
max |x| over the tile's inputs (``noise_management=abs_max``), quantized by the DAC over
[-1, 1]; the tile computes with weights normalized by the tile's max |w|, adds
``out_noise * xi``, quantizes over [-out_bound, out_bound] and clips; the result is scaled back
by ``w_max * max|x|``. The checks below write that out with ``F.unfold``, per tile and per
vector, and compare the layers with it (no noise: exactly; with noise: by moments).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_periphery import assert_zero_mean_with_std
from torch import nn

from cimsim import AnalogConfig, convert_to_analog, program_chip, set_time
from cimsim.chip.devices.pcm import PCMConfig, PCMWeights, to_conductances


def quantize(x: torch.Tensor, bound: torch.Tensor, levels: int) -> torch.Tensor:
    """aihwkit's ``UniformQuantize`` then clip: step ``2 b / (levels - 1)`` (odd levels)."""
    step = 2 * bound / (levels - 1)
    return torch.minimum(torch.maximum(torch.round(x / step) * step, -bound), bound)


def tiles_of(inputs: int, per_tile: int) -> list[slice]:
    n = -(-inputs // per_tile)
    base, extra = divmod(inputs, n)
    sizes = [base + (i < extra) for i in range(n)]
    return [slice(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(n)]


@torch.no_grad()
def by_hand(layer: nn.Module, x: torch.Tensor, tile_rows: int, dac: int, adc: int, bound: float):
    """The layer's output on aihwkit's definitions without noise, vector by vector: (N, C_out)
    for a Linear, (B, C_out, H', W') for a conv."""
    w = layer.weight
    if isinstance(layer, nn.Conv2d):
        k = w.shape[2] * w.shape[3]
        chans = tiles_of(w.shape[1], tile_rows // k)
        # A conv's input is one tensor, quantized once per image and tile, on the grid of its
        # largest |x| (cimsim's departure: aihwkit quantizes each patch on its own grid).
        xq = x.clone()
        for sl in chans:
            big = x[:, sl].abs().amax(dim=(1, 2, 3), keepdim=True)
            big = torch.where(big > 0, big, torch.ones_like(big))
            xq[:, sl] = quantize(x[:, sl] / big, torch.tensor(1.0), dac) * big
        raw, x, dac = x, xq, None

        def unfold(t):  # (B, L, C k k): each output position's patch, channel-major
            return F.unfold(t, w.shape[2:], padding=layer.padding, stride=layer.stride).mT

        rows = [slice(sl.start * k, sl.stop * k) for sl in chans]
        vectors, raw_vectors, weights = unfold(x), unfold(raw), w.flatten(1)
    else:
        chans = rows = tiles_of(w.shape[1], tile_rows)
        vectors, weights = x.unsqueeze(1), w  # (N, 1, C)
        raw_vectors = vectors
    out = 0
    for sl, r in zip(chans, rows, strict=True):
        v = vectors[..., r]
        # The unit's scale: the vector's max |x| before the DAC (aihwkit's abs_max divides the
        # raw vector); for a conv, not the max of the image-quantized patch.
        s = raw_vectors[..., r].abs().amax(dim=-1, keepdim=True)
        s = torch.where(s > 0, s, torch.ones_like(s))
        w_t = weights[:, r]
        w_max = w_t.abs().max()
        v_q = v / s if dac is None else quantize(v / s, torch.tensor(1.0), dac)
        y_norm = v_q @ (w_t / w_max).T  # (.., L or 1, C_out)
        out = out + quantize(y_norm, torch.tensor(bound), adc) * w_max * s
        assert sl.stop > sl.start
    if isinstance(layer, nn.Conv2d):
        size = [
            (n + 2 * p - kk) // st + 1
            for n, p, kk, st in zip(
                x.shape[2:], layer.padding, w.shape[2:], layer.stride, strict=True
            )
        ]
        out = out.transpose(1, 2).reshape(x.shape[0], -1, *size)
        return out + layer.bias.reshape(1, -1, 1, 1)
    return out[:, 0] + layer.bias


LAYERS = {
    "linear": (lambda: nn.Linear(40, 6), lambda g: torch.relu(torch.randn(16, 40, generator=g))),
    "conv": (
        lambda: nn.Conv2d(7, 5, 3, padding=1, stride=2),
        lambda g: torch.relu(torch.randn(3, 7, 7, 7, generator=g)),
    ),
}


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize(("tile_rows", "levels", "bound"), [(18, 255, 12.0), (27, 15, 2.0)])
def test_noise_free_periphery_equals_aihwkits_forward_by_hand(kind, tile_rows, levels, bound):
    torch.manual_seed(0)
    make, inputs = LAYERS[kind]
    digital = make()
    with torch.no_grad():
        digital.weight[:, :3] *= 4  # tile 0's weights on a wider range
    x = inputs(torch.Generator().manual_seed(1))
    x[0] = 0.0  # a vector of zeros: scaled by 1, as in aihwkit
    chip = AnalogConfig(
        tile_rows=tile_rows, dac_levels=levels, tile_adc_levels=levels, out_bound=bound
    )
    layer = convert_to_analog(nn.Sequential(digital), chip)[0].eval()
    assert layer._tiles is not None and len(layer._tiles) >= 2
    with torch.no_grad():
        got = layer(x)
    expected = by_hand(digital, x, tile_rows, levels, levels, bound)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    if bound == 2.0:  # a narrow ADC range clips, so the check above covers clipping too
        assert not torch.allclose(got, digital(x), atol=1e-2)


def test_output_noise_is_out_noise_times_wmax_times_each_vectors_max():
    torch.manual_seed(3)
    digital = nn.Linear(40, 6)
    with torch.no_grad():
        digital.weight[:, :20] *= 5
    x = torch.relu(torch.randn(64, 40, generator=torch.Generator().manual_seed(2)))
    x[:, 20:] *= 0.1  # tile 1's vectors are smaller: their noise is too
    chip = AnalogConfig(tile_rows=20, out_noise=0.1, out_bound=1e6)
    layer = convert_to_analog(nn.Sequential(digital), chip)[0]
    program_chip(layer, 0)  # sigma 0: every read is noisy, the weights exact
    w_max = torch.stack([digital.weight[:, sl].abs().max() for sl in (slice(0, 20), slice(20, 40))])
    s = torch.stack([x[:, sl].abs().amax(dim=1) for sl in (slice(0, 20), slice(20, 40))], dim=1)
    unit = (s * w_max).square().sum(dim=1).sqrt().unsqueeze(1)  # (N, 1): the tiles' sum
    with torch.no_grad():
        torch.manual_seed(4)
        errors = torch.stack([layer(x) - digital(x) for _ in range(40)])  # (R, N, C_out)
    assert_zero_mean_with_std(errors / unit, 0.1)
    # the calibrated unit (b_out, cimsim's earlier one) is another, much larger noise
    calibrated = AnalogConfig(tile_rows=20, out_noise=0.1, out_ref="calibrated")
    other = convert_to_analog(nn.Sequential(digital), calibrated)[0]
    program_chip(other, 0)
    from cimsim import calibrate_adc

    calibrate_adc(other, [x])
    with torch.no_grad():
        wide = torch.stack([other(x) - digital(x) for _ in range(10)])
    assert wide.std() > 2 * errors.std()


def test_pcm_compensation_is_applied_after_the_tile_adc():
    """aihwkit scales a tile's digitized output by the drift compensation (``alpha``): the ADC
    quantizes the drifted, uncompensated partial sums on the range fixed at programming."""
    torch.manual_seed(5)
    digital = nn.Linear(30, 4)
    x = torch.relu(torch.randn(32, 30, generator=torch.Generator().manual_seed(6)))
    exact = PCMConfig(compensation_read="exact")
    chip = AnalogConfig(device="pcm", pcm=exact, tile_adc_levels=7, out_bound=3.0)
    layer = convert_to_analog(nn.Sequential(digital), chip)[0].eval()
    program_chip(layer, 2)
    set_time(layer, 3.15e7)  # a year: alpha is well above 1
    w_t, alpha = layer.device_state.read_out(3.15e7)
    assert alpha.item() > 1.3
    s = x.abs().amax(dim=1, keepdim=True)
    w_max = digital.weight.abs().max()
    y_norm = F.linear(x / s, w_t) / w_max
    expected = alpha * quantize(y_norm, torch.tensor(3.0), 7) * w_max * s + digital.bias
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        before = quantize(F.linear(x / s, w_t * alpha) / w_max, torch.tensor(3.0), 7)
        assert not torch.allclose(layer(x), before * w_max * s + digital.bias, atol=1e-3)
    assert math.isfinite(alpha.item())


def test_pcm_maps_and_compensates_each_tile_on_its_own():
    """``pcm.mapping='tile'`` (aihwkit's): each tile's max |W| maps to g_max, so a tile of small
    weights gets programming noise on its own, small scale; ``tensor`` maps both on one scale."""
    torch.manual_seed(0)
    w = torch.randn(64, 40)
    w[:, 20:] *= 0.1
    tiles = [slice(0, 20), slice(20, 40)]
    g_plus, g_minus, scale = to_conductances(w, 25.0, tiles)
    for sl in tiles:
        assert (g_plus - g_minus)[:, sl].abs().max().item() == pytest.approx(25.0)
    ratios = {}
    for mapping in ("tile", "tensor"):
        chip = PCMWeights(w, PCMConfig(mapping=mapping), 1, "w", tiles)
        err = chip.programmed_weights - w
        ratios[mapping] = (err[:, 20:].std() / err[:, :20].std()).item()
        _, alpha = chip.read_out(3.15e7)
        if mapping == "tile":  # one gain per tile, from that tile's own read-outs
            assert alpha.shape == (1, 40) and alpha[0, 0] != alpha[0, 39]
            assert torch.equal(alpha[0, :20], alpha[0, :1].expand(20))
        else:
            assert alpha.dim() == 0
    # the programming-noise std ~ sigma_p(g) / s: with its own scale the small tile's error
    # shrinks with its weights (ratio ~ 0.1); on the shared scale it stays near sigma_p(0)
    assert ratios["tile"] < 0.2 < 0.5 < ratios["tensor"]


def test_pcm_compensation_reads_through_the_tiles_periphery():
    """aihwkit's drift compensation reads the tile with one-hot inputs through its ADC: the
    reference and every later read-out are ``max(mean |Q(W / w_max)|, 1e-4)`` (no output noise
    here, so by hand exactly), and the gain is their ratio."""
    torch.manual_seed(7)
    digital = nn.Linear(30, 4)
    x = torch.relu(torch.randn(8, 30, generator=torch.Generator().manual_seed(8)))
    chip = AnalogConfig(device="pcm", tile_adc_levels=7, out_bound=1.0)
    layer = convert_to_analog(nn.Sequential(digital), chip)[0].eval()
    program_chip(layer, 3)
    set_time(layer, 3.15e7)
    w_max = digital.weight.abs().max()
    w_t, exact_alpha = layer.device_state.read_out(3.15e7)

    def read(w):
        return quantize(w / w_max, torch.tensor(1.0), 7).abs().mean().clamp_min(1e-4)

    alpha = read(layer.device_state.programmed_weights) / read(w_t)
    torch.testing.assert_close(layer.chip_read_alpha, alpha.reshape(1, 1), rtol=1e-5, atol=0)
    assert abs(alpha.item() / exact_alpha.item() - 1) > 0.01  # the ADC's coarse read counts
    s = x.abs().amax(dim=1, keepdim=True)
    expected = alpha * quantize(F.linear(x / s, w_t) / w_max, torch.tensor(1.0), 7) * w_max * s
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected + digital.bias, rtol=1e-5, atol=1e-5)
