"""The analog core against docs/model.md: exactness at zero noise, noise statistics, the bi-scale
bias, analog BatchNorm, identity noise, chips, gradients, the ADC and state_dict round trips.

Statistical checks use fixed seeds and a tolerance of 5 standard errors of the estimate, so a
correct implementation fails with probability < 1e-6 and a wrong scale (even by 5 %) fails.

Over 350 lines: one test per semantic choice of the core (the issue list it answers is long).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cimsim
from cimsim import AnalogConfig, ConfigError, convert_to_analog, program_chip, set_noise
from cimsim.chip.batchnorm import AnalogBatchNorm2d, AnalogSyncBatchNorm
from cimsim.chip.noise import noise_scales, tensor_range
from cimsim.training.hasgd import hasgd_backward
from conftest import authors_scales

# Excess-free kurtosis E[eps^4] of the unit-variance draws: the SE of a sample std is
# sigma * sqrt((kurtosis - 1) / (4 n)).
KURTOSIS = {"gaussian": 3.0, "uniform": 1.8}


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        cimsim.ADC(),
        nn.Identity(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def batch(n=16):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def noisy_weight(layer, train: bool):
    """The perturbed (weight, bias) the layer uses in one forward."""
    layer.train(train)
    with torch.no_grad():
        return layer._noisy_weight_bias(layer.weight, layer.bias)


def check_moments(sample: torch.Tensor, mean: float, std: float, distribution: str):
    n = sample.numel()
    assert abs(sample.mean().item() - mean) < 5 * std / math.sqrt(n)
    se_std = std * math.sqrt((KURTOSIS[distribution] - 1) / (4 * n))
    assert abs(sample.std().item() - std) < 5 * se_std


# ----------------------------------------------------------------------------- exactness


def test_zero_noise_is_exactly_digital_in_train_and_eval():
    digital = tiny_net()
    analog = convert_to_analog(digital, AnalogConfig(sigma=0.0, mean_shift=0.0))
    x = batch()
    for mode in (True, False):
        digital.train(mode)
        analog.train(mode)
        assert torch.equal(analog(x), digital(x))
    program_chip(analog, 3)  # a chip at zero noise is still exact
    assert torch.equal(analog.eval()(x), digital.eval()(x))
    for a, d in zip(analog.state_dict().values(), digital.state_dict().values(), strict=True):
        assert torch.equal(a, d)  # BN running statistics updated identically


def test_conversion_swaps_expected_layers_and_keeps_parameters():
    digital = tiny_net()
    analog = convert_to_analog(digital, AnalogConfig(sigma=0.1))
    kinds = [type(m).__name__ for m in analog]
    assert kinds[:2] == ["AnalogConv2d", "AnalogBatchNorm2d"]
    assert kinds[4] == "AnalogIdentity" and kinds[-1] == "AnalogLinear"
    assert type(digital[0]) is nn.Conv2d  # a copy by default, the original is untouched
    plain = convert_to_analog(
        digital, AnalogConfig(sigma=0.1, analog_bn=False, identity_noise=False)
    )
    assert type(plain[1]) is nn.BatchNorm2d and type(plain[4]) is nn.Identity


# ----------------------------------------------------------------------------- noise maths


@pytest.mark.parametrize("distribution", ["gaussian", "uniform"])
@pytest.mark.parametrize("scale", ["half_range", "abs_max"])
@pytest.mark.parametrize("train", [True, False])
def test_perturbation_moments_per_tensor(distribution, scale, train):
    torch.manual_seed(0)
    layer = nn.Linear(1024, 512, bias=False)
    with torch.no_grad():
        layer.weight.mul_(3.0).add_(0.5)  # asymmetric: half range != abs max
    sigma, mu = 0.07, -0.03
    cfg = AnalogConfig(sigma=sigma, mean_shift=mu, distribution=distribution, scale=scale)
    analog = convert_to_analog(layer, cfg)
    program_chip(analog, 11)
    w = analog.weight.detach()
    r = ((w.max() - w.min()) / 2 if scale == "half_range" else w.abs().max()).item()
    nu = noisy_weight(analog, train)[0] - w
    check_moments(nu, mu * r, sigma * r, distribution)


@pytest.mark.parametrize("distribution", ["gaussian", "uniform"])
@pytest.mark.parametrize("scale", ["half_range", "abs_max"])
def test_perturbation_moments_per_channel(distribution, scale):
    torch.manual_seed(0)
    layer = nn.Linear(4096, 64, bias=False)
    with torch.no_grad():  # rows with ranges spanning 100x
        layer.weight.mul_(torch.logspace(-1, 1, 64).unsqueeze(1))
    sigma, mu = 0.05, 0.02
    cfg = AnalogConfig(
        sigma=sigma, mean_shift=mu, distribution=distribution, scale=scale, per_channel=True
    )
    analog = convert_to_analog(layer, cfg)
    w = analog.weight.detach()
    if scale == "half_range":
        r = (w.amax(1, keepdim=True) - w.amin(1, keepdim=True)) / 2
    else:
        r = w.abs().amax(1, keepdim=True)
    nu = noisy_weight(analog, True)[0] - w
    check_moments(nu / r, mu, sigma, distribution)  # pooled, normalised by each row's range
    # and each row alone is on its own scale (a per-tensor range would fail for small rows)
    row_std = (nu / r).std(dim=1)
    assert torch.all((row_std - sigma).abs() < 5 * sigma * math.sqrt(2 / 4096) * 1.5)


def test_tensor_range_shapes():
    w = torch.randn(6, 3, 2, 2)
    assert tensor_range(w, "half_range").shape == ()
    assert tensor_range(w, "abs_max", per_channel=True).shape == (6, 1, 1, 1)


# ----------------------------------------------------------------------------- bias mapping


def bias_layer(bias_mode: str):
    torch.manual_seed(0)
    layer = nn.Linear(8, 200_000)
    with torch.no_grad():
        layer.weight.uniform_(-1.0, 1.0)  # r(W) = 1 (up to sampling)
        layer.bias.uniform_(-0.01, 0.01)  # r(b) = 0.01: 100x smaller
    return convert_to_analog(layer, AnalogConfig(sigma=0.1, bias=bias_mode))


@pytest.mark.parametrize("mode", ["separate", "per_tensor", "shared", "digital"])
def test_bias_mapping(mode):
    analog = bias_layer(mode)
    w, b = analog.weight.detach(), analog.bias.detach()
    nu_b = noisy_weight(analog, True)[1] - b
    r = {
        "separate": authors_scales(w, b)[1],
        "per_tensor": ((b.max() - b.min()) / 2).item(),
        "shared": ((w.max() - w.min()) / 2).item(),
    }
    if mode == "digital":
        assert torch.equal(nu_b, torch.zeros_like(b))
    else:
        check_moments(nu_b, 0.0, 0.1 * r[mode], "gaussian")


def test_bi_scale_hand_computed_case():
    # W = [1, 2, 3]: r(W) = 1; b = [-0.5, 0.5]: r(b) = 0.5, so f = 0.5 and b/f = [-1, 1]. The
    # union [1, 2, 3, -1, 1] spans [-1, 3]: R = 2, so W's scale is 2 and b's is R f = 1 (the
    # per-tensor rule would say 1 and 0.5).
    w, b = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([-0.5, 0.5])
    r_w, r_b = noise_scales(w, b, "half_range", bias_mode="separate")
    assert (r_w.item(), r_b.item()) == (2.0, 1.0)
    assert [t.item() for t in noise_scales(w, b, "half_range", bias_mode="per_tensor")] == [1, 0.5]
    # abs_max: r(W) = 3, r(b) = 0.5; max|b/f| = max|W| by construction, so R = r(W) exactly
    r_w, r_b = noise_scales(w, b, "abs_max", bias_mode="separate")
    assert (r_w.item(), r_b.item()) == (3.0, 0.5)


@pytest.mark.parametrize("scale", ["half_range", "abs_max"])
def test_bi_scale_union_on_offset_tensors(scale):
    # The analog-BN case: all-positive w, centred b. The union range is far above r(w).
    g = torch.Generator().manual_seed(3)
    w = torch.rand(64, generator=g) * 2 + 3  # [3, 5]: r = 1 (half range)
    b = torch.randn(64, generator=g)
    r_w, r_b = noise_scales(w, b, scale, bias_mode="separate")
    R, Rf = authors_scales(w, b, scale)
    torch.testing.assert_close(r_w.double(), torch.tensor(R, dtype=torch.float64))
    torch.testing.assert_close(r_b.double(), torch.tensor(Rf, dtype=torch.float64))
    if scale == "half_range":
        assert r_w > 3 * tensor_range(w, scale)  # what the per-tensor rule would use
    # one range zero: nothing to match, each keeps its own (as the authors' code)
    r_w, r_b = noise_scales(w, torch.zeros(64), scale, bias_mode="separate")
    assert r_w == tensor_range(w, scale) and r_b == 0


def test_bi_scale_per_channel_rows():
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(6, 10, generator=g) + 1.0, torch.randn(6, generator=g) * 0.1
    r_w, r_b = noise_scales(w, b, "half_range", per_channel=True, bias_mode="separate")
    f = tensor_range(b, "half_range") / tensor_range(w, "half_range")  # one f per tensor
    rows = torch.cat([w, (b / f).unsqueeze(1)], dim=1)
    R = (rows.amax(1) - rows.amin(1)) / 2
    torch.testing.assert_close(r_w.reshape(-1), R)
    torch.testing.assert_close(r_b, R * f)


# ----------------------------------------------------------------------------- analog BN


def trained_bn():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(32)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-2.0, 2.0)
        bn.running_var.uniform_(0.5, 3.0)
    return bn


def test_analog_batchnorm_perturbs_the_per_channel_affine():
    bn = trained_bn()
    sigma, mu = 0.1, 0.05
    analog = convert_to_analog(bn, AnalogConfig(sigma=sigma, mean_shift=mu)).eval()
    program_chip(analog, 5)
    w = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    b = bn.bias - bn.running_mean * w
    R, Rf = authors_scales(w, b)  # all-positive w, centred b: R well above r(w)
    assert R > 1.5 * ((w.max() - w.min()) / 2).item()
    w_chip = w + R * (mu + sigma * analog.chip_weight)
    b_chip = b + Rf * (mu + sigma * analog.chip_bias)
    x = torch.randn(4, 32, 5, 5)
    expected = x * w_chip.view(1, -1, 1, 1) + b_chip.view(1, -1, 1, 1)
    torch.testing.assert_close(analog(x), expected, rtol=1e-5, atol=1e-5)
    # the gradient still reaches gamma and beta (the perturbation is a constant)
    analog(x).sum().backward()
    assert analog.weight.grad is not None and analog.bias.grad is not None


def test_analog_batchnorm_training_noise_is_relative_to_the_batch_fold():
    # A fresh BN (gamma 1, beta 0, running mean 0, var 1) has a constant running fold: r(w) = 0,
    # so noise relative to the running statistics would be zero. The authors fold the batch.
    bn = nn.BatchNorm2d(16)
    analog = convert_to_analog(bn, AnalogConfig(sigma=0.1)).train()
    x = torch.randn(8, 16, 4, 4, generator=torch.Generator().manual_seed(2)) * 3 + 1
    x.requires_grad_()
    torch.manual_seed(7)
    y = analog(x)
    torch.manual_seed(7)  # replay: weight draws first, then bias
    eps_w, eps_b = torch.randn(16), torch.randn(16)
    xd = x.detach().clone().requires_grad_()
    m, v = xd.mean((0, 2, 3)), xd.var((0, 2, 3), unbiased=False)
    w = 1 / torch.sqrt(v + bn.eps)
    b = -m * w
    R, Rf = authors_scales(w, b)
    expected = xd * (w + R * 0.1 * eps_w).view(1, -1, 1, 1) + (b + Rf * 0.1 * eps_b).view(
        1, -1, 1, 1
    )
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    # the gradient flows through the batch statistics, the noise is a constant
    y.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(x.grad, xd.grad, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(y, bn.train()(x))  # perturbed from the first step


def test_analog_batchnorm_trains_and_updates_running_stats():
    bn = trained_bn()
    analog = convert_to_analog(bn, AnalogConfig(sigma=0.1)).train()
    mean0, var0 = analog.running_mean.clone(), analog.running_var.clone()
    x = torch.randn(8, 32, 4, 4)
    y1, y2 = analog(x), analog(x)
    assert not torch.equal(y1, y2)  # fresh noise per forward
    assert analog.num_batches_tracked.item() == 2
    # exactly torch's update rule (unbiased running variance), applied twice
    m, v = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(analog.running_mean, mean0 * 0.81 + m * 0.19)
    torch.testing.assert_close(analog.running_var, var0 * 0.81 + v * 0.19)


@pytest.mark.parametrize("sigma", [0.0, 0.1])
def test_running_stats_move_once_per_hasgd_step(sigma):
    analog = convert_to_analog(tiny_net(), AnalogConfig(sigma=sigma, adc_levels=4)).train()
    reference = convert_to_analog(tiny_net(), AnalogConfig(sigma=sigma, adc_levels=4)).train()
    x = batch()
    for step in range(1, 3):
        hasgd_backward(lambda: analog(x).square().mean(), 3, model=analog)
        assert analog[1].num_batches_tracked.item() == step  # not 3 * step
        assert analog[6].num_batches_tracked.item() == step
        if sigma == 0:  # same inputs: exactly one plain forward's update
            reference(x)
            torch.testing.assert_close(analog[1].running_mean, reference[1].running_mean)
            torch.testing.assert_close(analog[3].hi, reference[3].hi)  # ADC range likewise
    assert analog[1].track_running_stats and analog[3].tracking  # restored


def test_batchnorm_ranges_stay_per_tensor_with_per_channel():
    # one value per channel: per-channel ranges would be 0 and BN would lose its noise
    bn = trained_bn()
    for bias in ("separate", "per_tensor", "shared"):
        chips = [
            program_chip(convert_to_analog(bn, AnalogConfig(sigma=0.1, bias=bias, **kw)).eval(), 5)
            for kw in ({}, {"per_channel": True})
        ]
        x = torch.randn(2, 32, 3, 3)
        assert torch.equal(chips[0](x), chips[1](x))
        assert not torch.allclose(chips[1](x), bn.eval()(x))


def test_sync_batchnorm_conversion_keeps_batchnorm_analog():
    from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm

    analog = convert_to_analog(tiny_net(), AnalogConfig(sigma=0.1)).eval()
    program_chip(analog, 3)
    x = batch()
    before = analog(x)
    synced = TorchSyncBatchNorm().apply(analog)  # what trainer sync_batchnorm=True does
    norms = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 2 and all(type(m) is AnalogSyncBatchNorm for m in norms)
    assert torch.equal(synced(x), before)  # the same programmed chip, BN still perturbed
    cimsim.clear_chip(synced)
    assert not torch.allclose(synced(x), before)
    program_chip(synced, 3)
    layer = convert_to_analog(tiny_net(), AnalogConfig(adc_levels=4, adc_placement="layer"))
    cimsim.calibrate_adc(layer, [batch()])
    hi = layer[1].adc.hi.clone()
    layer = TorchSyncBatchNorm().apply(layer)  # a layer ADC keeps its calibrated range
    assert layer[1].adc.calibrated and torch.equal(layer[1].adc.hi, hi)
    reverted = TorchSyncBatchNorm().revert(synced)  # Lightning's teardown leaves it analog
    assert sum(isinstance(m, AnalogBatchNorm2d) for m in reverted.modules()) == 2
    assert torch.equal(reverted(x), before)


# ----------------------------------------------------------------------------- identity


@pytest.mark.parametrize("train", [True, False])
def test_identity_noise_per_element_ignores_mean_shift_by_default(train):
    analog = convert_to_analog(nn.Identity(), AnalogConfig(sigma=0.08, mean_shift=0.05))
    program_chip(analog, 2)
    analog.train(train)
    x = torch.rand(3, 64, 20, 20) + 0.5
    gain = analog(x) / x
    # one draw per activation element, shared by the samples of the batch
    torch.testing.assert_close(gain, gain[:1].expand_as(gain))
    check_moments(gain[0] - 1.0, 0.0, 0.08, "gaussian")  # mu ignored, as the authors


@pytest.mark.parametrize("train", [True, False])
def test_identity_noise_per_channel_with_mean_shift(train):
    cfg = AnalogConfig(
        sigma=0.08, mean_shift=0.01, identity_draws="channel", identity_mean_shift=True
    )
    analog = convert_to_analog(nn.Identity(), cfg)
    program_chip(analog, 2)
    analog.train(train)
    x = torch.rand(3, 20_000, 2, 2) + 0.5
    gain = analog(x) / x
    # one gain per channel, shared by the batch and the spatial positions
    torch.testing.assert_close(gain, gain[:1, :, :1, :1].expand_as(gain))
    check_moments(gain[0, :, 0, 0] - 1.0, 0.01, 0.08, "gaussian")


# ----------------------------------------------------------------------------- chips


def test_programmed_chip_is_frozen_and_seeded():
    analog = convert_to_analog(tiny_net(), AnalogConfig(sigma=0.1)).eval()
    x = batch()
    clean = analog(x)
    program_chip(analog, 1)
    a1, a2 = analog(x), analog(x)
    assert torch.equal(a1, a2) and not torch.equal(a1, clean)
    program_chip(analog, 2)
    assert not torch.allclose(analog(x), a1)
    program_chip(analog, 1)
    assert torch.equal(analog(x), a1)  # reproducible from the seed
    cimsim.clear_chip(analog)
    assert torch.equal(analog(x), clean)
    analog.train()
    assert not torch.equal(analog(x), analog(x))  # training: fresh draws every forward


def test_chip_draws_do_not_depend_on_sigma():
    analog = convert_to_analog(tiny_net(), AnalogConfig(sigma=0.05)).eval()
    program_chip(analog, 9)
    conv = analog[0]
    nu_a = noisy_weight(conv, False)[0] - conv.weight
    set_noise(analog, sigma=0.15)
    nu_b = noisy_weight(conv, False)[0] - conv.weight
    torch.testing.assert_close(nu_b, 3.0 * nu_a, rtol=1e-5, atol=1e-7)


def test_state_dict_never_holds_a_perturbation_and_round_trips():
    digital = tiny_net()
    analog = convert_to_analog(digital, AnalogConfig(sigma=0.1, adc_levels=4))
    program_chip(analog, 4)
    assert list(analog.state_dict()) == list(digital.state_dict())
    fresh_digital = tiny_net()
    for p in fresh_digital.parameters():
        nn.init.normal_(p)
    analog.load_state_dict(fresh_digital.state_dict())  # digital -> analog, strict
    back = tiny_net()
    back.load_state_dict(analog.state_dict())  # analog -> digital, strict
    for k, v in fresh_digital.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)


# ----------------------------------------------------------------------------- gradients


def test_gradient_is_the_digital_gradient_at_the_perturbed_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    analog = convert_to_analog(conv, AnalogConfig(sigma=0.2, mean_shift=0.05)).eval()
    program_chip(analog, 7)
    w_noisy, b_noisy = (t.detach() for t in noisy_weight(analog, False))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    F.conv2d(x, w_noisy.requires_grad_(), b_noisy.requires_grad_(), padding=1).pow(
        2
    ).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    analog(x2).pow(2).sum().backward()
    torch.testing.assert_close(analog.weight.grad, w_noisy.grad)
    torch.testing.assert_close(analog.bias.grad, b_noisy.grad)
    torch.testing.assert_close(x2.grad, x.grad)


def test_training_gradient_uses_the_fresh_perturbation():
    torch.manual_seed(0)
    lin = nn.Linear(5, 3)
    analog = convert_to_analog(lin, AnalogConfig(sigma=0.3)).train()
    x = torch.randn(4, 5)
    torch.manual_seed(123)
    analog(x).square().sum().backward()
    torch.manual_seed(123)  # replay the draws: weight first, then bias
    eps_w, eps_b = torch.randn(3, 5), torch.randn(3)
    w, b = lin.weight.detach(), lin.bias.detach()
    R, Rf = authors_scales(w, b)
    w_noisy = (w + 0.3 * eps_w * R).requires_grad_()
    b_noisy = (b + 0.3 * eps_b * Rf).requires_grad_()
    F.linear(x, w_noisy, b_noisy).square().sum().backward()
    torch.testing.assert_close(analog.weight.grad, w_noisy.grad)
    torch.testing.assert_close(analog.bias.grad, b_noisy.grad)


# ----------------------------------------------------------------------------- ADC


@pytest.mark.parametrize("levels", [2, 3, 5, 18])
def test_adc_output_has_exactly_n_levels_and_contains_zero(levels):
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 3 + 0.5  # spans range
    lo, hi = torch.tensor(-2.0), torch.tensor(4.0)
    q = cimsim.adc_quantize(x, lo, hi, levels)
    values = q.unique()
    assert len(values) == levels
    steps = values.diff()
    torch.testing.assert_close(steps, torch.full_like(steps, steps[0].item()))  # uniform grid
    assert (values == 0).any()  # 0 exactly representable


def test_adc_gradient_is_straight_through_inside_the_range():
    x = torch.linspace(-3, 5, 101, requires_grad=True)
    q = cimsim.adc_quantize(x, torch.tensor(-1.0), torch.tensor(3.0), 5)
    q.sum().backward()
    inside = (x >= -1.0) & (x <= 3.0)
    assert torch.equal(x.grad, inside.float())


def test_adc_calibration_and_levels():
    analog = convert_to_analog(tiny_net(), AnalogConfig(sigma=0.05, adc_levels=3)).eval()
    program_chip(analog, 0)
    seen = {}
    adc = analog[3]
    adc.register_forward_hook(lambda m, i, o: seen.update(out=o))
    with pytest.raises(RuntimeError, match="calibrate_adc"):
        analog(batch())
    assert cimsim.calibrate_adc(analog, [(batch(), None)] * 3) == 3
    analog(batch())
    assert seen["out"].unique().numel() == 3  # calibrated on this batch: it spans the range
    cimsim.set_adc(analog, None)
    analog(batch())
    assert seen["out"].unique().numel() > 100


def test_layer_placement_quantizes_every_analog_layer():
    analog = convert_to_analog(tiny_net(), AnalogConfig(adc_levels=4, adc_placement="layer"))
    placed = [a for a in cimsim.chip.adc.adcs(analog)]
    assert len(placed) == 5  # 2 convs, 2 BNs, 1 linear; the marker is inactive
    assert not analog[3].active
    cimsim.calibrate_adc(analog.eval(), [batch()])
    assert analog(batch()).unique().numel() == 4


@pytest.mark.parametrize("levels", [2, 4, 8])
def test_adc_in_the_loop_has_n_levels_and_clipped_gradient(levels):
    adc = cimsim.ADC(levels).train()
    x = torch.linspace(-1.0, 3.0, 4001)
    y = adc(x)  # the first batch sets the range to its own min/max: the input spans it
    assert (adc.lo.item(), adc.hi.item()) == (-1.0, 3.0)
    assert y.unique().numel() == levels
    wide = torch.linspace(-3.0, 5.0, 801, requires_grad=True)
    adc.tracking = False  # quantize with the trained range
    adc(wide).sum().backward()
    step = 4.0 / (levels - 1)
    zero_point = round(1.0 / step)
    lo_q, hi_q = -zero_point * step, (levels - 1 - zero_point) * step
    inside = (wide >= lo_q) & (wide <= hi_q)
    assert torch.equal(wide.grad, inside.float())  # 1 inside, exactly 0 outside
    assert inside.any() and (~inside).any()


class Square(nn.Module):
    def forward(self, x):
        return x * x


def test_calibration_is_sequential_and_uses_the_momentum():
    model = nn.Sequential(cimsim.ADC(3), Square(), cimsim.ADC(3))
    # ADC 1 calibrates to [-1, 2]: step 1.5, zero point 1, levels {-1.5, 0, 1.5}; so ADC 2 sees
    # [2.25, 0, 2.25] (quantized upstream), not x^2 = [1, 0.09, 4].
    x = torch.tensor([-1.0, 0.3, 2.0])
    cimsim.calibrate_adc(model, [x])
    assert (model[2].lo.item(), model[2].hi.item()) == (0.0, 2.25)
    x2 = torch.tensor([-3.0, 0.0, 1.0])  # a second batch moves the range by the momentum
    cimsim.calibrate_adc(model, [x, x2], momentum=0.25)
    assert model[0].lo.item() == pytest.approx(-1.0 + 0.25 * (-3.0 + 1.0))
    assert model[0].hi.item() == pytest.approx(2.0 + 0.25 * (1.0 - 2.0))
    with pytest.raises(ValueError, match="calib_momentum=0"):
        cimsim.calibrate_adc(model, [x], momentum=0)


def test_adc_range_is_saved_and_restored():
    analog = convert_to_analog(tiny_net(), AnalogConfig(adc_levels=4)).train()
    analog(batch())
    state = analog.state_dict()
    fresh = convert_to_analog(tiny_net(), AnalogConfig(adc_levels=4)).eval()
    fresh.load_state_dict(state)
    assert fresh[3].calibrated and fresh[3].hi == analog[3].hi
    torch.testing.assert_close(fresh(batch()), analog.eval()(batch()))
    old = {k: v for k, v in state.items() if not k.startswith("3.")}  # a pre-range checkpoint
    fresh.load_state_dict(old)
    assert not fresh[3].calibrated


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"sigma": -1}, "sigma"),
        ({"sigma": "big"}, "sigma"),
        ({"mean_shift": float("nan")}, "mean_shift"),
        ({"distribution": "cauchy"}, "distribution"),
        ({"scale": "rms"}, "scale"),
        ({"per_channel": "yes"}, "per_channel"),
        ({"bias": "folded"}, "bias"),
        ({"analog_bn": None}, "analog_bn"),
        ({"identity_noise": 2}, "identity_noise"),
        ({"identity_draws": "pixel"}, "identity_draws"),
        ({"identity_mean_shift": "no"}, "identity_mean_shift"),
        ({"adc_levels": 1}, "adc_levels"),
        ({"adc_levels": 4.5}, "adc_levels"),
        ({"adc_placement": "everywhere"}, "adc_placement"),
    ],
)
def test_invalid_config_values_name_the_field(kwargs, key):
    with pytest.raises(ValueError, match=f"^{key}=") as info:
        AnalogConfig(**kwargs)
    assert isinstance(info.value, ConfigError) and info.value.key == key


def test_invalid_runtime_values():
    analog = convert_to_analog(tiny_net(), AnalogConfig())
    with pytest.raises(ValueError, match="sigma=-0.1"):
        set_noise(analog, sigma=-0.1)
    with pytest.raises(ValueError, match="adc_levels=1"):
        cimsim.set_adc(analog, 1)
    with pytest.raises(ValueError, match="convert_to_analog"):
        program_chip(tiny_net(), 0)
    with pytest.raises(ValueError, match="adc_placement"):
        convert_to_analog(nn.Linear(2, 2), AnalogConfig(adc_levels=4))


# ----------------------------------------------------------------------------- chip cache


def uncached(analog, x):
    """The chip's output recomputed from scratch (the eval cache is bypassed with grad on)."""
    with torch.enable_grad():
        return analog(x).detach()


def test_chip_cache_follows_every_change_of_the_chip_or_the_weights():
    analog = convert_to_analog(tiny_net(), AnalogConfig(sigma=0.1)).eval()
    x = batch()
    program_chip(analog, 1)
    outputs = []

    def check():
        with torch.no_grad():
            cached = analog(x)
        torch.testing.assert_close(cached, uncached(analog, x), rtol=0, atol=0)
        outputs.append(cached)

    check()
    set_noise(analog, sigma=0.2)
    check()
    program_chip(analog, 2)
    check()
    with torch.no_grad():  # an optimizer-style in-place update of the weights
        analog[0].weight.add_(0.01)
        analog[1].running_var.mul_(1.5)
    check()
    analog.load_state_dict(convert_to_analog(tiny_net(), AnalogConfig()).state_dict())
    check()
    cimsim.clear_chip(analog)
    check()
    for a, b in zip(outputs, outputs[1:], strict=False):
        assert not torch.equal(a, b)  # each change did change the output
