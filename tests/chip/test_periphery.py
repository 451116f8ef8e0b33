"""The crossbar periphery (issue 12): tiles, the input DAC, per-tile ADCs with output noise and
short-term weight read noise, against independent computations.

Every check compares the layers with plain torch formulas (``F.conv2d``/``F.linear`` on the
tiles' input slices, the quantizer written out by hand) or with closed-form moments. Statistical
checks use fixed seeds: a mean within 4 standard errors, a variance inside the two-sided
chi-square bound at tail probability 1e-6 (the draws are zero-mean, so the sum of squares over
the known variance is chi-square with n degrees of freedom).

Over 350 lines: one test per semantic of the issue, plus the CLI end to end.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

import cimsim
from cimsim import (
    AnalogConfig,
    ConfigError,
    calibrate_adc,
    convert_to_analog,
    program_chip,
    set_adc,
    set_time,
)
from cimsim.chip.adc import adcs
from cimsim.chip.dac import DAC
from cimsim.chip.noise import chip_noise, derive_seed, noise_scales
from cimsim.chip.periphery import TileADC, symmetric_quantize
from cimsim.robustness.grid import EvalSettings, RobustnessGrid, chip_seed
from cimsim.robustness.measure import evaluate_robustness
from cimsim.training.classifier import AnalogClassifier
from conftest import FAST, compose_cfg

TAIL = 1e-6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_zero_mean_with_std(z: torch.Tensor, std: float, tail: float = TAIL) -> None:
    """``z`` looks like iid N(0, std^2): mean within 4 SE, sum of squares inside chi-square."""
    z = z.double().flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 4 * std / math.sqrt(n), (z.mean().item(), std, n)
    ss = (z.square().sum() / std**2).item()
    lo, hi = stats.chi2.ppf(tail, n), stats.chi2.isf(tail, n)
    assert lo < ss < hi, (ss / n, lo / n, hi / n)


def std_is_not(z: torch.Tensor, std: float) -> bool:
    """Whether the zero-mean sample ``z`` is far outside the chi-square bound for ``std``."""
    z = z.double().flatten()
    n = z.numel()
    ss = (z.square().sum() / std**2).item()
    return not stats.chi2.ppf(TAIL, n) < ss < stats.chi2.isf(TAIL, n)


def one(layer: nn.Module, config: AnalogConfig) -> nn.Module:
    """``layer`` converted alone inside a Sequential (its qualified name is ``0``)."""
    return convert_to_analog(nn.Sequential(layer), config)


def grads_of(module: nn.Module, x: torch.Tensor, g: torch.Tensor) -> tuple:
    """Output and the gradients of ``(module(x) * g).sum()`` to x and every parameter."""
    x = x.clone().requires_grad_()
    module.zero_grad()
    y = module(x)
    (y * g).sum().backward()
    return y.detach(), x.grad, *[p.grad.clone() for p in module.parameters()]


def assert_close_to(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal to float round-off, relative to the magnitude of ``b``."""
    scale = b.abs().max().item() + 1e-12
    torch.testing.assert_close(a, b, rtol=rel, atol=rel * scale)


# ----------------------------------------------------------------------------- 1. defaults


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_defaults_are_todays_layer_bit_for_bit(kind):
    torch.manual_seed(0)
    if kind == "conv":
        digital = nn.Conv2d(5, 7, 3, stride=2, padding=1)
        x = torch.randn(4, 5, 9, 9, generator=gen(1))

        def op(x, w, b):
            return F.conv2d(x, w, b, stride=2, padding=1)
    else:
        digital = nn.Linear(30, 9)
        x = torch.randn(6, 30, generator=gen(1))
        op = F.linear
    sigma, seed = 0.1, 1234
    model = one(digital, AnalogConfig(sigma=sigma))
    layer = model[0]
    assert not layer.config.periphery and layer.dac is None and layer.tile_adc is None
    assert list(model.state_dict()) == ["0." + k for k in digital.state_dict()]

    # A programmed chip: W + r_W sigma eps_W, b + r_b sigma eps_b, the draws named "0.weight"...
    program_chip(model, seed)
    model.eval()
    w, b = digital.weight.detach(), digital.bias.detach()
    r_w, r_b = noise_scales(w, b, "half_range", False, "separate")
    eps_w = chip_noise(seed, "0.weight", w.shape, "gaussian")
    eps_b = chip_noise(seed, "0.bias", b.shape, "gaussian")
    with torch.no_grad():
        expected = op(x, w + eps_w * sigma * r_w, b + eps_b * sigma * r_b)
        assert torch.equal(model(x), expected)

    # Every periphery field passed at its default: the same config, the same training forward.
    explicit = AnalogConfig(
        sigma=sigma,
        tile_rows=None,
        dac_levels=None,
        dac_range="calibrated",
        tile_adc_levels=None,
        out_noise=0.0,
        w_read_noise=0.0,
    )
    assert not explicit.periphery and not explicit.tile_outputs
    assert not explicit.needs_calibration
    other = one(digital, explicit).train()
    model.train()
    g = torch.randn_like(expected)
    torch.manual_seed(77)
    got = grads_of(other, x, g)
    torch.manual_seed(77)
    ref = grads_of(model, x, g)
    for a, c in zip(got, ref, strict=True):
        assert torch.equal(a, c)
    # ... and by hand: fresh draws from torch's generator, the weight's then the bias's.
    torch.manual_seed(77)
    e_w, e_b = torch.randn(w.shape), torch.randn(b.shape)
    with torch.no_grad():
        assert torch.equal(got[0], op(x, w + e_w * sigma * r_w, b + e_b * sigma * r_b))


# ----------------------------------------------------------------------------- 2. tiles, exact


def check_tiles(tiles, inputs: int, per_tile: int) -> None:
    sizes = [sl.stop - sl.start for sl in tiles]
    assert tiles[0].start == 0 and tiles[-1].stop == inputs
    assert all(a.stop == b.start for a, b in zip(tiles, tiles[1:], strict=False))
    assert max(sizes) - min(sizes) <= 1 and max(sizes) <= per_tile
    assert len(tiles) == -(-inputs // per_tile)  # as few tiles as fit


CASES = {
    # name: (digital layer, input, tile_rows, inputs per tile)
    "conv": (lambda: nn.Conv2d(20, 6, 3, stride=2, padding=1), (3, 20, 9, 9), 27, 3),
    "conv_reflect": (
        lambda: nn.Conv2d(20, 6, 3, padding=1, padding_mode="reflect"),
        (3, 20, 7, 7),
        27,
        3,
    ),
    "linear": (lambda: nn.Linear(50, 8), (5, 50), 16, 16),
    "linear_3d": (lambda: nn.Linear(50, 8), (2, 3, 50), 16, 16),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiled_layer_without_noise_or_quantization_equals_the_digital_layer(case):
    make, shape, tile_rows, per_tile = CASES[case]
    torch.manual_seed(3)
    digital = make()
    x = torch.randn(*shape, generator=gen(4))
    with torch.no_grad():
        g = torch.randn_like(digital(x))
    ref = grads_of(digital, x, g)
    inputs = digital.weight.shape[1]
    # Only the tiles' weight ranges change (one product); then the per-tile path forced by
    # read noise (off without a read: eval, no chip) and by a negligible output noise (train).
    for config, train in [
        (AnalogConfig(tile_rows=tile_rows), False),
        (AnalogConfig(tile_rows=tile_rows, w_read_noise=0.05), False),
        (AnalogConfig(tile_rows=tile_rows, out_noise=1e-30), True),
    ]:
        model = one(digital, config).train(train)
        layer = model[0]
        check_tiles(layer._tiles, inputs, per_tile)
        calls = []
        products = layer._tile_products
        layer._tile_products = lambda xg, wg, f=products, c=calls: c.append(1) or f(xg, wg)
        got = grads_of(model, x, g)
        assert (len(calls) > 0) == config.tile_outputs  # the per-tile path really ran
        for a, c in zip(got, ref, strict=True):
            assert_close_to(a, c)


def test_tile_rows_must_hold_a_whole_kernel_and_be_positive():
    with pytest.raises(ConfigError) as err:
        one(nn.Conv2d(4, 4, 3), AnalogConfig(tile_rows=8))
    assert err.value.key == "tile_rows"
    one(nn.Conv2d(4, 4, 3), AnalogConfig(tile_rows=9))  # one channel per tile is fine
    with pytest.raises(ConfigError) as err:
        AnalogConfig(tile_rows=0)
    assert err.value.key == "tile_rows"
    layer = one(nn.Conv2d(4, 4, 3), AnalogConfig(tile_rows=36))[0]
    assert layer._tiles is None  # the layer fits one tile


# ----------------------------------------------------------------------------- 3. tile ranges


def chip_weight(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model[0]._noisy_parameters()[0]


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_each_tile_is_perturbed_relative_to_its_own_range(kind):
    torch.manual_seed(5)
    if kind == "conv":
        digital, tile_rows = nn.Conv2d(12, 32, 3), 36  # 3 tiles of 4 channels, 1152 weights
    else:
        digital, tile_rows = nn.Linear(64, 32), 16  # 4 tiles of 16 inputs, 512 weights
    with torch.no_grad():
        digital.weight[:, : digital.weight.shape[1] // 4] *= 10  # tile 0: 10x the others' scale
    w = digital.weight.detach()
    sigma = 0.1
    tiled = one(digital, AnalogConfig(sigma=sigma, tile_rows=tile_rows))
    tiles = tiled[0]._tiles
    assert len(tiles) in (3, 4)
    program_chip(tiled, 21)
    dw = chip_weight(tiled) - w
    whole = one(digital, AnalogConfig(sigma=sigma))
    program_chip(whole, 21)
    dw_whole = chip_weight(whole) - w
    for sl in tiles:
        half_range = (w[:, sl].max() - w[:, sl].min()) / 2
        assert_zero_mean_with_std(dw[:, sl] / half_range, sigma)
    # One range for the whole layer: the small tiles get ~10x too much noise.
    small = tiles[-1]
    half_range = (w[:, small].max() - w[:, small].min()) / 2
    assert std_is_not(dw_whole[:, small] / half_range, sigma)


def test_per_channel_tiles_have_one_range_per_tile_and_output_row():
    torch.manual_seed(6)
    digital = nn.Linear(48, 64)
    with torch.no_grad():
        digital.weight[:, :16] *= 10
        digital.weight[::2] *= 4  # even rows 4x the odd ones
    w = digital.weight.detach()
    model = one(digital, AnalogConfig(sigma=0.1, tile_rows=16, per_channel=True))
    program_chip(model, 8)
    dw = chip_weight(model) - w
    tiles = model[0]._tiles
    assert len(tiles) == 3
    for sl in tiles:
        part = w[:, sl]
        half_range = (part.amax(1, keepdim=True) - part.amin(1, keepdim=True)) / 2
        assert_zero_mean_with_std(dw[:, sl] / half_range, 0.1)
        tile_range = (part.max() - part.min()) / 2  # per tile only: odd rows far too small
        assert std_is_not(dw[1::2, sl] / tile_range, 0.1)


# ----------------------------------------------------------------------------- 4. quantizers


LEVELS = [2, 3, 4, 5, 16, 255, 256]


@pytest.mark.parametrize("b", [1.0, 2.9])
def test_symmetric_quantize_has_exactly_the_levels_and_a_clipped_straight_through_gradient(b):
    bound = torch.tensor(b)
    x = torch.linspace(-1.5 * b, 1.5 * b, 100_001, dtype=torch.float32)
    ulp = 4 * b * torch.finfo(torch.float32).eps
    for levels in LEVELS:
        xg = x.clone().requires_grad_()
        q = symmetric_quantize(xg, bound, levels)
        values = q.detach().unique()
        assert len(values) == levels
        d = 2 * b / (levels - 1)
        expected = -b + d * torch.arange(levels, dtype=torch.float64)
        torch.testing.assert_close(values.double(), expected, rtol=0, atol=ulp)
        assert values.abs().max().item() <= b + ulp
        assert (0.0 in values.tolist()) == (levels % 2 == 1)  # odd levels: exact zero
        # each value is the nearest level of the clipped input
        nearest = expected[((x.double().clamp(-b, b) + b) / d).round().long()]
        assert ((q.detach().double() - nearest).abs() <= ulp).float().mean() > 0.999
        q.backward(torch.ones_like(q))
        inside = x.abs() < b
        assert torch.equal(xg.grad, inside.float())


def test_symmetric_quantize_end_levels_are_exactly_plus_minus_b():
    for b in (1.3, 2.9, 3.3643624782562256, 2.4554569721221924):
        bound = torch.tensor(b)
        x = torch.tensor([-10 * b, 10 * b])
        for levels in LEVELS:
            q = symmetric_quantize(x, bound, levels)
            assert q.tolist() == [-bound.item(), bound.item()], (b, levels, q.tolist())


def test_calibrated_dac_tracks_max_abs_and_clips_with_a_straight_through_gradient():
    levels = 16
    dac = DAC(levels).train()
    x1 = torch.linspace(-2.0, 3.0, 20_001)
    y = dac(x1)
    assert dac.hi.item() == 3.0 and dac.lo.item() == -3.0 and dac.calibrated
    assert len(y.unique()) == 14  # d = 0.4: [-2, 3] reaches the levels -2.2, -1.8, ..., 3.0
    assert torch.equal(y, symmetric_quantize(x1, torch.tensor(3.0), levels))
    x2 = torch.linspace(-5.0, 5.0, 20_001)
    dac(x2)  # training moves the range by momentum 0.01
    assert dac.hi.item() == pytest.approx(3.0 + 0.01 * (5.0 - 3.0), rel=1e-6)
    dac.eval()
    b = dac.hi.item()
    xg = (x2 * 2).requires_grad_()
    q = dac(xg)
    assert dac.hi.item() == b  # frozen in eval
    assert len(q.unique()) == levels and q.abs().max().item() <= b * (1 + 1e-6)
    q.backward(torch.ones_like(q))
    assert torch.equal(xg.grad, (xg.detach().abs() < b).float())
    # calibrate_adc on a programmed chip sets it like the first training batch
    dac.reset_calibration()
    dac.observing = True
    dac(x1 * 0.5)
    dac.observing = False
    assert dac.hi.item() == 1.5


def test_learned_dac_starts_from_the_first_batch_and_learns_from_clipped_inputs():
    dac = DAC(8, mode="learned")
    assert isinstance(dac.b_in, nn.Parameter) and not dac.calibratable
    fresh = DAC(8, mode="learned").eval()  # the first batch it sees sets the range, then trains
    fresh(torch.tensor([0.5, -2.0, 1.0]))
    assert fresh.b_in.item() == 2.0 and fresh.calibrated
    dac.train()
    x1 = torch.randn(1000, generator=gen(0))
    dac(x1)
    assert dac.b_in.item() == x1.abs().max().item()
    b = dac.b_in.item()
    x2 = (torch.randn(1000, generator=gen(1)) * b).requires_grad_()
    g = torch.randn(1000, generator=gen(2))
    q = dac(x2)
    assert dac.b_in.item() == b  # not moved by the second batch's data (only by its gradient)
    assert len(q.unique()) <= 8 and q.abs().max().item() <= b * (1 + 1e-6)
    (q * g).sum().backward()
    clipped = x2.detach().abs() > b
    assert clipped.sum() > 50
    expected = (torch.sign(x2.detach()) * g)[clipped].sum()
    torch.testing.assert_close(dac.b_in.grad, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(x2.grad, g * ~clipped)
    dac.reset_calibration()  # a trained range stays
    assert dac.calibrated and dac.b_in.item() == b
    # through a layer: a trainable parameter of the network
    layer = one(nn.Linear(4, 2), AnalogConfig(dac_levels=8, dac_range="learned"))[0]
    assert "dac.b_in" in dict(layer.named_parameters())


def test_tile_adc_quantizes_each_tile_to_its_own_range():
    scales = torch.tensor([1.0, 10.0, 0.1])
    base = torch.linspace(-1.0, 1.0, 4001).reshape(1, 1, -1)
    y = (base * scales.reshape(1, 3, 1)).expand(2, 3, 4001).contiguous()  # (B, T, C)
    for levels in (5, 16):
        adc = TileADC(3, levels, out_noise=0.0, ref="calibrated").train()
        q = adc(y)
        torch.testing.assert_close(adc.hi, scales)
        for t in range(3):
            values = q[:, t].unique()
            assert len(values) == levels
            expected = symmetric_quantize(y[:, t], adc.hi[t], levels)
            assert torch.equal(q[:, t], expected)
        adc.eval()
        yg = (y * 1.5).requires_grad_()
        q = adc(yg)
        q.backward(torch.ones_like(q))
        inside = yg.detach().abs() <= scales.reshape(1, 3, 1)
        assert torch.equal(yg.grad, inside.float())
        for t in range(3):
            assert q[:, t].abs().max().item() <= scales[t].item() * (1 + 1e-6)


@torch.no_grad()
def by_hand_tiles(layer, x: torch.Tensor, levels: int) -> torch.Tensor:
    """Each tile's partial sums from its input slice, quantized over the tile's ADC range,
    added, plus the bias."""
    w, b = layer.weight, layer.bias
    out = 0
    for t, sl in enumerate(layer._tiles):
        if isinstance(layer, nn.Conv2d):
            part = F.conv2d(x[:, sl], w[:, sl], None, layer.stride, layer.padding)
        else:
            part = F.linear(x[:, sl], w[:, sl])
        out = out + symmetric_quantize(part, layer.tile_adc.hi[t], levels)
    return out + b.reshape((1, -1) + (1,) * (x.dim() - 2))


@torch.no_grad()
def peaks(layer, x: torch.Tensor) -> torch.Tensor:
    dims = (0, 2, 3) if x.dim() == 4 else (0,)
    out = []
    for sl in layer._tiles:
        if isinstance(layer, nn.Conv2d):
            part = F.conv2d(x[:, sl], layer.weight[:, sl], None, layer.stride, layer.padding)
        else:
            part = F.linear(x[:, sl], layer.weight[:, sl])
        out.append(part.abs().amax(dim=dims).max())
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_tile_adc_through_a_layer_equals_the_tiles_quantized_by_hand(kind):
    torch.manual_seed(9)
    levels = 16
    if kind == "conv":
        digital, tile_rows = nn.Conv2d(10, 6, 3, stride=2, padding=1), 36
        xs = [torch.randn(8, 10, 8, 8, generator=gen(i)) for i in range(3)]
    else:
        digital, tile_rows = nn.Linear(48, 6), 16
        xs = [torch.randn(64, 48, generator=gen(i)) for i in range(3)]
    with torch.no_grad():
        digital.weight[:, :4] *= 5  # tile 0's partial sums on a wider range
    model = one(
        digital, AnalogConfig(tile_rows=tile_rows, tile_adc_levels=levels, out_ref="calibrated")
    )
    layer = model[0]
    assert layer.tile_adc.tiles == len(layer._tiles) == 3
    calibrate_adc(model, xs[:2], momentum=0.01)
    p0, p1 = peaks(layer, xs[0]), peaks(layer, xs[1])
    torch.testing.assert_close(layer.tile_adc.hi, p0 + 0.01 * (p1 - p0))
    assert layer.tile_adc.hi[0] > 2 * layer.tile_adc.hi[1:].max()
    with torch.no_grad():
        got = model(xs[2])
    expected = by_hand_tiles(layer, xs[2], levels)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # and not the single-ADC result: the tiles are quantized on their own
    assert not torch.allclose(got, digital(xs[2]), atol=1e-3)


# ----------------------------------------------------------------------------- 5. noise moments


def test_output_noise_has_std_out_noise_times_each_tiles_bound():
    scales = torch.tensor([1.0, 8.0, 0.25])
    y = torch.randn(50, 3, 400, generator=gen(0)) * scales.reshape(1, 3, 1)
    adc = TileADC(3, None, out_noise=0.1, ref="calibrated").train()
    assert adc.enabled
    adc(y)  # first training batch: the bounds
    hi = adc.hi.clone()
    torch.testing.assert_close(hi, y.abs().amax(dim=(0, 2)))
    adc.eval()
    torch.manual_seed(1)
    out = adc(y)
    for t in range(3):
        assert_zero_mean_with_std((out[:, t] - y[:, t]) / (0.1 * hi[t]), 1.0)
    adc.noisy = False
    assert torch.equal(adc(y), y)


def test_output_noise_through_a_programmed_layer_sums_the_tiles_variances():
    torch.manual_seed(2)
    digital = nn.Linear(48, 5)
    with torch.no_grad():
        digital.weight[:, :16] *= 6
    model = one(digital, AnalogConfig(tile_rows=16, out_noise=0.1, out_ref="calibrated"))
    x = torch.randn(40, 48, generator=gen(3))
    program_chip(model, 4)  # sigma = 0: the chip is exact but every read is noisy
    calibrate_adc(model, [x])
    hi = model[0].tile_adc.hi
    torch.testing.assert_close(hi, peaks(model[0], x))
    with torch.no_grad():
        clean = digital(x)
        torch.manual_seed(5)
        diffs = torch.stack([model(x) - clean for _ in range(50)])
    assert_zero_mean_with_std(diffs, 0.1 * hi.square().sum().sqrt().item())


def test_weight_read_noise_variance_per_output():
    torch.manual_seed(4)
    digital = nn.Linear(48, 6)
    with torch.no_grad():
        digital.weight[:, :16] *= 10  # tile 0's w_max is 10x the others'
    scale, reps = 0.05, 400
    model = one(digital, AnalogConfig(tile_rows=16, w_read_noise=scale))
    x = torch.randn(4, 48, generator=gen(6))
    w = digital.weight.detach()
    var = 0
    for sl in model[0]._tiles:
        w_max = w[:, sl].abs().max()
        var = var + scale**2 * w_max * F.linear(x[:, sl].square(), w[:, sl].abs())  # (4, 6)
    with torch.no_grad():
        clean = digital(x)
        model.eval()
        assert_close_to(model(x), clean)  # no read without training or a chip
        model.train()
        torch.manual_seed(7)
        z = torch.stack([(model(x) - clean) / var.sqrt() for _ in range(reps)])  # (R, 4, 6)
    assert_zero_mean_with_std(z, 1.0)
    for i in range(z.shape[1]):  # each output's own variance (Bonferroni over 24 outputs)
        for j in range(z.shape[2]):
            assert_zero_mean_with_std(z[:, i, j], 1.0, tail=TAIL / 24)
    # the noise is a constant for autograd: the gradients are the digital layer's
    g = torch.randn_like(clean)
    ref = grads_of(digital, x, g)
    got = grads_of(model, x, g)
    for a, c in zip(got[1:], ref[1:], strict=True):
        assert_close_to(a, c)


# ----------------------------------------------------------------------------- 6. robustness


def tiny_model(config: AnalogConfig) -> nn.Module:
    torch.manual_seed(11)
    net = nn.Sequential(
        nn.Conv2d(6, 8, 3, padding=1),
        nn.ReLU(),
        cimsim.ADC(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 4),
    )
    return convert_to_analog(net, config).eval()


def tiny_data():
    g = gen(12)
    xs = torch.randn(96, 6, 6, 6, generator=g)
    ys = torch.randint(0, 4, (96,), generator=g)
    batches = [(xs[i : i + 32], ys[i : i + 32]) for i in range(0, 96, 32)]
    return batches[:2], batches[2:]  # test, calibration


CHIP = dict(sigma=0.05, tile_rows=27, dac_levels=16, tile_adc_levels=16, out_noise=0.05)


def test_robustness_rows_are_reproducible_with_per_read_noise():
    model = tiny_model(AnalogConfig(**CHIP))
    test, calib = tiny_data()
    assert model[0]._tiles is not None and model[4]._tiles is not None
    grid = RobustnessGrid(sigmas=[0.05], chips=2)
    settings = EvalSettings(calib_loader=calib, progress=False)
    first = evaluate_robustness(model, test, grid, settings).rows
    second = evaluate_robustness(model, test, grid, settings).rows
    assert first == second and len(first) == 2
    # The row is the chip measured by hand: programmed, calibrated, reads seeded from the chip.
    seed = chip_seed(0, 1)
    program_chip(model, seed)
    torch.manual_seed(seed)
    calibrate_adc(model, calib)
    with torch.no_grad():
        torch.manual_seed(derive_seed("reads", seed))
        logits = torch.cat([model(x) for x, _ in test])
        again = torch.cat([model(x) for x, _ in test])
    y = torch.cat([y for _, y in test])
    assert first[1].loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert first[1].acc == (logits.argmax(1) == y).float().mean().item()
    assert not torch.equal(logits, again)  # the reads are noisy: the seeding makes them equal
    evaluate_robustness(model, test, grid, EvalSettings(progress=False))  # aihwkit's: no ranges
    calibrated = tiny_model(AnalogConfig(**CHIP, out_ref="calibrated"))
    with pytest.raises(ConfigError) as err:
        evaluate_robustness(calibrated, test, grid, EvalSettings(progress=False))
    assert err.value.key == "calib_loader"


def test_tile_grid_sets_the_tile_adcs_and_set_adc_keeps_to_its_kind():
    calibrated = dict(dac_range="calibrated", out_ref="calibrated")
    model = tiny_model(AnalogConfig(adc_levels=8, **CHIP, **calibrated))
    test, calib = tiny_data()
    tile = [a for a in adcs(model) if a.placement == "tile"]
    block = [a for a in adcs(model) if a.placement == "block"]
    dacs = [a for a in adcs(model) if a.placement == "dac"]
    assert len(tile) == 2 and len(block) == 1 and len(dacs) == 2
    grid = RobustnessGrid(sigmas=[0.05], adc_levels=[None, 4], chips=1, adc_kind="tile")
    rows = evaluate_robustness(model, test, grid, EvalSettings(calib_loader=calib)).rows
    assert [r.adc_levels for r in rows] == [None, 4]
    assert (rows[0].acc, rows[0].loss) != (rows[1].acc, rows[1].loss)
    assert [a.levels for a in tile] == [16, 16] and block[0].levels == 8  # restored
    # chip-kind grid levels are the block ADC's, the tiles' stay at 16
    calibrate_adc(model, calib)
    his = [a.hi.clone() for a in tile]
    set_adc(model, 4)
    assert block[0].levels == 4 and not block[0].calibrated
    assert [a.levels for a in tile] == [16, 16] and all(a.calibrated for a in tile + dacs)
    assert all(torch.equal(a.hi, h) for a, h in zip(tile, his, strict=True))
    set_adc(model, 4, kind="tile")
    assert [a.levels for a in tile] == [4, 4] and not any(a.calibrated for a in tile)
    assert block[0].levels == 4 and [a.levels for a in dacs] == [16, 16]
    with pytest.raises(ValueError):
        set_adc(tiny_model(AnalogConfig(sigma=0.05, tile_rows=27)), 4, kind="tile")


# ----------------------------------------------------------------------------- 7. end to end

TRAIN = [
    "crossbar=tiles",
    "crossbar.tile_rows=64",
    "noise.sigma=0.05",
    "hasgd.L=2",
    "logger=none",
    "test=false",
    "callbacks.robustness=null",
    "val_calib_batches=1",
]


@pytest.fixture(scope="module")
def tiled_checkpoint(tmp_path_factory):
    from cimsim.cli.train import train

    out = tmp_path_factory.mktemp("tiles")
    train(compose_cfg("train", out, FAST + TRAIN))
    return out / "checkpoints" / "last.ckpt"


def test_train_with_tiles_checkpoints_the_periphery(tiled_checkpoint):
    ckpt = torch.load(tiled_checkpoint, weights_only=True)
    model = AnalogClassifier.load_from_checkpoint(tiled_checkpoint, weights_only=True)
    chip = model.chip
    assert (chip.tile_rows, chip.dac_levels, chip.tile_adc_levels) == (64, 255, 255)
    assert chip.out_noise == 0.04 and chip.sigma == 0.05
    state = ckpt["state_dict"]
    tiled = [(n, m) for n, m in model.net.named_modules() if getattr(m, "_tiles", None)]
    assert tiled  # 64-row tiles split the 3x3 convs with more than 7 input channels
    assert (chip.dac_range, chip.out_ref, chip.out_bound) == ("per_vector", "normalized", 12.0)
    for name, layer in tiled:
        adc = layer.tile_adc
        assert adc.tiles == len(layer._tiles) and not adc.calibratable  # aihwkit's fixed range
        assert torch.equal(adc.hi, state[f"net.{name}.tile_adc.hi"])
        assert layer.dac.mode == "per_vector" and not layer.dac.calibratable
    fresh = AnalogClassifier(net=ckpt["hyper_parameters"]["net"], chip=chip)
    fresh.load_state_dict(state)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():  # the same network: clean reads of both agree
        torch.testing.assert_close(fresh.net.eval()(x), model.net.eval()(x))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("crossbar.tile_rows=0", "crossbar.tile_rows"),
        ("crossbar.dac_range=foo", "crossbar.dac_range"),
    ],
)
def test_bad_crossbar_settings_fail_with_their_key(tmp_path, override, key):
    from cimsim.cli.train import train

    with pytest.raises(ConfigError) as err:
        train(compose_cfg("train", tmp_path, FAST + TRAIN + [override]))
    assert err.value.key == key


def tile_sweep(ckpt, out, *extra):
    from cimsim.cli.evaluate import evaluate

    args = [
        f"ckpt={ckpt}",
        "robustness=tile_sweep",
        "robustness.chips=1",
        "robustness.max_batches=1",
        "robustness.adc_levels=[null,8]",
        "robustness.calib_batches=1",
        "progress=false",
        "wandb.enabled=false",
        *extra,
    ]
    return evaluate(compose_cfg("evaluate", out, args))


def test_tile_sweep_on_the_trained_tile_size(tiled_checkpoint, tmp_path):
    rows = tile_sweep(tiled_checkpoint, tmp_path, "chip.tile_rows=64").rows
    assert [r.adc_levels for r in rows] == [None, 8]
    assert len({r.model for r in rows}) == 1
    label = rows[0].model
    assert "tile_rows=64" in label and "tile_adc_levels" not in label
    assert (tmp_path / "robustness_rows.csv").stat().st_size > 0


def test_tile_sweep_variants_on_a_tiled_checkpoint(tiled_checkpoint, tmp_path):
    rows = tile_sweep(tiled_checkpoint, tmp_path).rows
    labels = list(dict.fromkeys(r.model for r in rows))
    assert len(labels) == 3 and len(rows) == 3 * 2
    assert sum("tile_rows=256" in lb for lb in labels) == 1
    assert sum("tile_rows=64" in lb for lb in labels) == 1
    assert not any("tile_adc_levels" in lb for lb in labels)
    for lb in labels:
        assert sorted(str(r.adc_levels) for r in rows if r.model == lb) == ["8", "None"]


# ----------------------------------------------------------------------------- 8. PCM


def test_pcm_composes_with_the_periphery():
    config = AnalogConfig(device="pcm", tile_rows=27, tile_adc_levels=64, out_noise=0.02)
    model = tiny_model(config)
    digital = tiny_model(AnalogConfig())
    test, calib = tiny_data()
    x = test[0][0]
    program_chip(model, 3)
    set_time(model, 3600.0)
    assert not any(a.calibratable for a in adcs(model) if a.placement == "tile")
    with torch.no_grad():
        y, ref = model(x), digital(x)
    assert torch.isfinite(y).all() and not torch.allclose(y, ref, atol=1e-3)
    assert (y - ref).abs().mean() < ref.abs().mean()  # a perturbation, not garbage
    model.train()
    loss = F.cross_entropy(model(x), test[0][1])
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_tiled_layers_train_and_read_under_bf16_autocast():
    """Under bf16 autocast the tiles' products run in bf16 and the gradients reach the fp32
    weights; they match the fp32 ones to bf16 precision (same draws: no noise, no ADC)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(20, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(288, 10))
    x = torch.randn(4, 20, 6, 6)
    chip = AnalogConfig(tile_rows=27, out_noise=1e-30)  # the per-tile path, no perturbation
    grads = []
    for bf16 in (False, True):
        model = convert_to_analog(net, chip).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = model(x)
        y.float().square().sum().backward()
        assert model[0].weight.grad.dtype == torch.float32
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    rel = (grads[1] - grads[0]).norm() / grads[0].norm()
    assert 0 < rel < 0.05  # bf16 has 8 bits of mantissa: a few 1e-3 relative


@pytest.mark.parametrize("groups", [2, 8])
def test_grouped_convs_run_through_the_tile_outputs(groups):
    """A grouped or depthwise conv (one tile: tiles need groups=1) with output noise and a tile
    ADC: the partial sums are the grouped conv's, quantized by hand to the same levels."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    chip = AnalogConfig(tile_adc_levels=15, out_ref="calibrated")
    layer = convert_to_analog(nn.Sequential(conv), chip)[0].eval()
    x = torch.randn(2, 8, 5, 5)
    calibrate_adc(layer, [x])
    partial = F.conv2d(x, conv.weight, None, padding=1, groups=groups)
    bound = partial.abs().amax()
    expected = symmetric_quantize(partial, bound, 15) + conv.bias.reshape(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected)
    noisy = convert_to_analog(nn.Sequential(conv), AnalogConfig(out_noise=0.05))[0].train()
    assert noisy(x).shape == (2, 8, 5, 5)


def test_values_exactly_at_the_range_pass_their_gradient():
    """|x| = b is inside the range (aihwkit's convention): the range is the batch peak on the
    first training batch and in calibration, so the peak element must keep its gradient."""
    b = torch.tensor(1.7)
    for levels in (4, 5, 255, 256):
        x = torch.tensor([-1.7, -0.3, 0.0, 1.7, 1.71, -2.0], requires_grad=True)
        symmetric_quantize(x, b, levels).sum().backward()
        assert x.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_a_periphery_checkpoint_loads_on_a_chip_without_it():
    """State of a DAC / tile ADC the test chip does not have is dropped on loading (an ideal-
    periphery baseline), and tile ranges of another tiling load as uncalibrated."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(20, 8, 3, padding=1), nn.Flatten(), nn.Linear(288, 10))
    trained = convert_to_analog(
        net, AnalogConfig(tile_rows=27, dac_levels=16, tile_adc_levels=16)
    ).train()
    trained(torch.randn(4, 20, 6, 6))  # tracks the ranges
    state = trained.state_dict()
    assert any(".tile_adc." in k for k in state) and any(".dac." in k for k in state)
    plain = convert_to_analog(net, AnalogConfig())
    plain.load_state_dict(state)  # strict: the periphery's keys are dropped, not unexpected
    torch.testing.assert_close(plain[0].weight, trained[0].weight)
    other = convert_to_analog(net, AnalogConfig(tile_rows=63, tile_adc_levels=16))
    other.load_state_dict(state)
    assert other[0].tile_adc.tiles == 3 and not other[0].tile_adc.calibrated


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_a_chip_reads_the_same_with_and_without_autograd(kind):
    """The tiles' products apart (``_tile_products``: a conv's as ``T`` dense convolutions) are
    the grouped product's (``_products``, which IR drop, read noise and the backward use), tile
    by tile; and a chip reads the same with and without autograd (the inputs grouped apart or
    not, the mask pass or not): the same draws (the key comes from the same global state) and
    per-tile drift compensation, compiled (the conv's tiles are above ``COMPILE_MIN``) or not
    (the Linear's)."""
    torch.manual_seed(3)
    if kind == "conv":
        digital, x = nn.Conv2d(40, 16, 3, padding=1), torch.randn(64, 40, 16, 16)
    else:
        digital, x = nn.Linear(300, 16), torch.randn(64, 300)
    cfg = AnalogConfig(
        device="pcm", tile_rows=128, dac_levels=255, tile_adc_levels=31, out_noise=0.04
    )
    chip = set_time(program_chip(one(digital, cfg).eval(), 0), 86400.0)
    layer = chip[0]
    assert len(layer._tiles) >= 3 and layer.chip_read_alpha is not None
    with torch.no_grad():
        xg, wg, _, _ = layer._prepare(x, layer.weight, 255, False)
        apart = layer._tile_products(xg, wg)
        for part, whole in zip(apart, layer._products(xg, wg).unbind(1), strict=True):
            torch.testing.assert_close(part, whole, rtol=1e-5, atol=1e-5)
    torch.manual_seed(5)
    with torch.no_grad():
        apart = chip(x)
    torch.manual_seed(5)
    grouped = chip(x.clone().requires_grad_()).detach()
    # (equal here; a partial sum on a rounding boundary could land one ADC level apart where
    # the two products add in different orders: a handful of outputs at most)
    assert (apart - grouped).abs().gt(1e-4).float().mean().item() < 1e-3
    torch.manual_seed(6)  # while another key moves many outputs by a level or more
    with torch.no_grad():
        assert (chip(x) - apart).abs().gt(1e-4).float().mean().item() > 0.05
