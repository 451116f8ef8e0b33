"""Any vision or transformer model converts (issue 21, item 5): multi-head attention, Conv1d,
LayerNorm/GroupNorm/BatchNorm1d and ``cimsim.coverage``, checked against torch's own modules, a
(1, k) Conv2d, closed forms, and on four torchvision models end to end."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import cimsim
from cimsim import AnalogConfig, ConfigError, convert_to_analog, coverage, program_chip
from cimsim.chip.noise import tensor_range
from cimsim.training.hasgd import hasgd_backward

E, H = 16, 4


def _inputs(batch_first: bool, layout: str, unbatched: bool = False):
    """query, key, value of (B=3, L=5, S=7): one tensor for self-attention (S = L then)."""
    kdim = 12 if layout == "kdim" else E
    s = 5 if layout == "self" else 7

    def make(length: int, dim: int) -> torch.Tensor:
        shape = (
            (length, dim) if unbatched else (3, length, dim) if batch_first else (length, 3, dim)
        )
        return torch.randn(shape)

    q = make(5, E)
    if layout == "self":
        return q, q, q, s
    k = make(s, kdim)
    return q, k, k, s


def _pair(**kw) -> tuple[nn.MultiheadAttention, nn.Module]:
    torch.manual_seed(0)
    digital = nn.MultiheadAttention(E, H, **kw)
    with torch.no_grad():  # torch initializes biases to 0: make them count
        for p in digital.parameters():
            if p.dim() == 1:
                p.normal_()
    return digital, convert_to_analog(digital, AnalogConfig())


def _both(digital, analog, args, kwargs, seed: int = 1):
    torch.manual_seed(seed)
    expected = digital(*args, **kwargs)
    torch.manual_seed(seed)
    return expected, analog(*args, **kwargs)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights,average", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("layout", ["self", "cross", "kdim"])
def test_attention_equals_torch(batch_first, need_weights, average, layout):
    kdim = 12 if layout == "kdim" else None
    digital, analog = _pair(batch_first=batch_first, kdim=kdim, vdim=kdim)
    q, k, v, s = _inputs(batch_first, layout)
    padding = torch.rand(3, s) < 0.3
    padding[:, 0] = False  # no row fully masked (softmax of nothing)
    mask = torch.rand(5, s) < 0.2
    kwargs = dict(key_padding_mask=padding, attn_mask=mask, need_weights=need_weights)
    kwargs["average_attn_weights"] = average
    for grad in (False, True):  # without gradients torch takes its fused path
        with torch.set_grad_enabled(grad):
            (y, w), (y_a, w_a) = _both(digital, analog, (q, k, v), kwargs)
        torch.testing.assert_close(y_a, y)
        assert (w is None) == (w_a is None) == (not need_weights)
        if need_weights:
            torch.testing.assert_close(w_a, w)
    y.sum().backward()  # the gradients reach the same weights
    y_a.sum().backward()
    if layout == "kdim":
        torch.testing.assert_close(analog.k_proj.weight.grad, digital.k_proj_weight.grad)
    else:
        torch.testing.assert_close(analog.in_proj.weight.grad, digital.in_proj_weight.grad)
    torch.testing.assert_close(analog.out_proj.weight.grad, digital.out_proj.weight.grad)


@pytest.mark.parametrize(
    "module,call",
    [
        (dict(add_bias_kv=True, add_zero_attn=True), dict()),
        (dict(bias=False, batch_first=True), dict(need_weights=False)),
        (dict(batch_first=True), dict(is_causal=True, need_weights=False)),
        (dict(batch_first=True), dict(is_causal=True, need_weights=True)),
        (dict(batch_first=True, dropout=0.3), dict(train=True, need_weights=True)),
        (dict(batch_first=True, dropout=0.3), dict(train=True, need_weights=False)),
        (dict(batch_first=True), dict(unbatched=True)),
        (dict(kdim=12, vdim=10), dict(unbatched=True)),
    ],
)
def test_attention_options_equal_torch(module, call):
    digital, analog = _pair(**module)
    call = dict(call)
    train, unbatched = call.pop("train", False), call.pop("unbatched", False)
    digital.train(train), analog.train(train)
    layout = "kdim" if "kdim" in module else "self"
    q, k, v, _ = _inputs(module.get("batch_first", False), layout, unbatched)
    if "vdim" in module:
        v = torch.randn(k.shape[0], 10)
    if call.get("is_causal"):
        call["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(5)
    (y, w), (y_a, w_a) = _both(digital, analog, (q, k, v), call)  # dropout: the same draws
    torch.testing.assert_close(y_a, y)
    if w is not None:
        torch.testing.assert_close(w_a, w)


def test_attention_state_dict_is_torchs():
    for kw in (dict(), dict(kdim=12, vdim=10)):
        digital, analog = _pair(**kw)
        theirs, ours = digital.state_dict(), analog.state_dict()
        assert sorted(ours) == sorted(theirs)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key])
        fresh, _ = _pair(**kw)
        fresh.load_state_dict(ours)  # analog -> digital
        other = convert_to_analog(nn.MultiheadAttention(E, H, **kw), AnalogConfig())
        other.load_state_dict(theirs)  # digital -> analog
        for key, value in other.state_dict().items():
            torch.testing.assert_close(value, theirs[key])
    # Converting in place keeps the parameter objects (an optimizer built before still works).
    digital, _ = _pair()
    weight = digital.in_proj_weight
    analog = convert_to_analog(digital, AnalogConfig(), inplace=True)
    assert analog.in_proj.weight is weight and analog.in_proj_weight is None
    assert [n for n, _ in cimsim.analog_layers(analog)] == ["out_proj", "in_proj"]
    assert analog.in_proj.weight.shape == (3 * E, E)  # q, k, v: one 3E x E crossbar


def test_programmed_attention_is_torchs_on_the_chips_weights():
    """A programmed chip = torch's own attention on ``W + r(W) sigma eps`` (bias noise off, per
    tensor ranges), written out with the chip's draws: the analog path adds nothing else."""
    digital, _ = _pair(batch_first=True)
    sigma = 0.1
    chip = convert_to_analog(digital, AnalogConfig(sigma=sigma, bias="digital"))
    program_chip(chip, seed=4).eval()
    w = {}
    for name in ("in_proj", "out_proj"):
        layer = getattr(chip, name)
        r = tensor_range(layer.weight.detach(), "half_range")
        w[name] = layer.weight.detach() + r * sigma * layer.chip_weight
    q, *_ = _inputs(True, "self")
    with torch.no_grad():
        y, _ = chip(q, q, q, need_weights=False)
        x = q.transpose(0, 1)
        expected, _ = F.multi_head_attention_forward(
            *(x, x, x, E, H, w["in_proj"], digital.in_proj_bias, None, None, False, 0.0),
            w["out_proj"],
            digital.out_proj.bias,
            training=False,
            need_weights=False,
        )
    torch.testing.assert_close(y, expected.transpose(0, 1))
    assert (y - digital(q, q, q)[0]).abs().max() > 1e-2  # and the chip did perturb


def test_transformer_encoder_runs_on_the_chip_in_eval():
    """torch's fused encoder kernels read the digital weights: a converted encoder must not take
    them (a programmed chip in eval without gradients equals its unfused path)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    digital = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    x = torch.randn(4, 8, 32)
    padding = torch.zeros(4, 8, dtype=torch.bool)
    padding[:, 6:] = True
    chip = program_chip(convert_to_analog(digital, AnalogConfig(sigma=0.1)), seed=0).eval()
    clean = convert_to_analog(digital, AnalogConfig()).eval()
    assert not chip.use_nested_tensor
    with torch.no_grad():
        fused = chip(x, src_key_padding_mask=padding)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            unfused = chip(x, src_key_padding_mask=padding)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
        expected, y = (
            digital(x, src_key_padding_mask=padding),
            clean(x, src_key_padding_mask=padding),
        )
    torch.testing.assert_close(fused, unfused)
    assert (fused - expected)[:, :6].abs().max() > 1e-2
    # sigma 0: the digital encoder (whose nested path leaves zeros at padded positions)
    torch.testing.assert_close(y[:, :6], expected[:, :6], rtol=1e-5, atol=1e-5)


def _conv_pair(**kw) -> tuple[nn.Conv1d, nn.Conv2d]:
    padding = kw.pop("padding", 1)
    dilation = kw.get("dilation", 1)
    pad2 = {"same": (0, dilation), "valid": (0, 0)}.get(padding, (0, padding))
    c1 = nn.Conv1d(6, 4, 3, padding=padding, **kw)
    kw2 = {k: (1, v) if k in ("stride", "dilation") else v for k, v in kw.items()}
    c2 = nn.Conv2d(6, 4, (1, 3), padding=pad2, **kw2)
    with torch.no_grad():
        c2.weight.copy_(c1.weight.unsqueeze(2))
        c2.bias.copy_(c1.bias)
    return c1, c2


PERIPHERY = dict(tile_rows=6, dac_levels=15, tile_adc_levels=63, out_noise=0.04, w_read_noise=0.02)


@pytest.mark.parametrize(
    "conv", [dict(), dict(padding="same"), dict(padding_mode="reflect"), dict(stride=2, dilation=2)]
)
@pytest.mark.parametrize(
    "chip",
    [dict(), dict(sigma=0.1, per_channel=True), dict(sigma=0.05, **PERIPHERY)]
    + [dict(device="pcm", tile_rows=7, tile_adc_levels=255, out_noise=0.04)],
)
def test_conv1d_is_a_1_by_k_conv2d(conv, chip):
    """Conv1d on the chip = the (1, k) Conv2d on the chip, draw for draw (the chip's draws
    depend on the seed, the name and the number of values): programmed, and in training."""
    torch.manual_seed(0)
    c1, c2 = _conv_pair(**conv)
    x = torch.randn(3, 6, 11)
    assert type(convert_to_analog(c1, AnalogConfig(**chip))) is cimsim.AnalogConv1d
    one, two = (convert_to_analog(nn.Sequential(c), AnalogConfig(**chip)) for c in (c1, c2))
    if "tile_rows" in chip:  # whole input channels: tile_rows // k per tile
        per = chip["tile_rows"] // 3
        assert len(one[0]._tiles) == len(two[0]._tiles) == math.ceil(6 / per)
    for model in (one, two):
        program_chip(model, seed=3).eval()
        if chip.get("device") == "pcm":
            cimsim.set_time(model, 3600.0)
    torch.manual_seed(5)
    y1 = one(x)
    torch.manual_seed(5)
    y2 = two(x.unsqueeze(2)).squeeze(2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    if not chip:
        torch.testing.assert_close(y1, c1(x))
    one.train(), two.train()
    torch.manual_seed(6)
    one(x).square().sum().backward()
    torch.manual_seed(6)
    two(x.unsqueeze(2)).square().sum().backward()
    torch.testing.assert_close(
        one[0].weight.grad, two[0].weight.grad.squeeze(2), rtol=1e-4, atol=1e-5
    )


def _norms() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 6, 1), nn.GroupNorm(3, 6), nn.BatchNorm1d(6))
    model.append(nn.Linear(5, 5)).append(nn.LayerNorm(5))
    with torch.no_grad():
        for m in model[1:]:
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0)
            if m.weight is not None:
                m.weight.normal_(1.0, 0.3), m.bias.normal_()
    return model


def test_norms_are_digital_by_default_and_analog_on_request():
    model = _norms()
    plain = convert_to_analog(model, AnalogConfig())
    assert [type(m) for m in plain[1:3]] + [type(plain[4])] == [
        nn.GroupNorm,
        nn.BatchNorm1d,
        nn.LayerNorm,
    ]
    chip = AnalogConfig(analog_norm=True)
    analog = convert_to_analog(model, chip)
    kinds = [cimsim.AnalogGroupNorm, cimsim.AnalogBatchNorm1d, cimsim.AnalogLayerNorm]
    assert [type(m) for m in analog[1:3]] + [type(analog[4])] == kinds
    x = torch.randn(8, 4, 5)
    for train in (True, False):  # sigma 0: the digital layers exactly (running stats too)
        model.train(train), analog.train(train)
        torch.testing.assert_close(analog(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(analog[2].running_var, model[2].running_var)
    with pytest.raises(ConfigError, match="analog_norm"):
        AnalogConfig(analog_norm="yes")
    assert "analog_norm" not in AnalogConfig().as_dict()  # old fingerprints stay
    assert AnalogConfig(**chip.as_dict()).analog_norm is True


def test_programmed_norms_follow_the_closed_form():
    """gamma and beta each perturbed by ``r sigma eps`` (per-tensor half range, ``bias=per_tensor``:
    each its own); BatchNorm1d's fold ``w = gamma / sqrt(var + eps)``, ``b = beta - mean w``."""
    model, sigma = _norms().eval(), 0.2
    analog = convert_to_analog(
        model, AnalogConfig(sigma=sigma, analog_norm=True, bias="per_tensor")
    )
    program_chip(analog, seed=7).eval()
    x = torch.randn(8, 4, 5)

    def noisy(layer, w, b):
        r_w, r_b = tensor_range(w, "half_range"), tensor_range(b, "half_range")
        return w + r_w * sigma * layer.chip_weight, b + r_b * sigma * layer.chip_bias

    with torch.no_grad():
        h = analog[0](x)  # the Conv1d and the Linear on the chip too (tested above)
        gn, bn, ln = analog[1], analog[2], analog[4]
        h = F.group_norm(h, 3, *noisy(gn, gn.weight, gn.bias), gn.eps)
        w = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        w, b = noisy(bn, w, bn.bias - bn.running_mean * w)
        h = analog[3](h * w[:, None] + b[:, None])
        expected = F.layer_norm(h, (5,), *noisy(ln, ln.weight, ln.bias), ln.eps)
        torch.testing.assert_close(analog(x), expected)
        assert (analog(x) - model(x)).abs().max() > 1e-2


def test_sync_batchnorm1d_stays_analog():
    analog = convert_to_analog(_norms(), AnalogConfig(sigma=0.1, analog_norm=True))
    program_chip(analog, seed=1).eval()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(analog)
    assert type(synced[2]).__name__ == "AnalogSyncBatchNorm1d" and synced[2].chip_seed == 1
    x = torch.randn(8, 4, 5)
    torch.testing.assert_close(synced(x), analog(x))


class _Custom(nn.Module):
    """A Linear subclass, a weight used directly and an activation x activation product."""

    def __init__(self):
        super().__init__()
        self.sub = nn.modules.linear.NonDynamicallyQuantizableLinear(8, 8)
        self.scale = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):  # x: (N, 8)
        h = self.sub(x) @ self.scale
        return torch.einsum("ni,nj->nij", h, h).sum(-1)


def test_coverage_counts_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8),
        _Custom(),
        nn.LayerNorm(8),
    )
    x = torch.randn(2, 3, 6, 6)
    analog = convert_to_analog(model, AnalogConfig(adc_levels=15, adc_placement="layer"))
    result = coverage(analog, x)  # uncalibrated ADCs: bypassed, not an error
    positions = 2 * 4 * 6 * 6  # output elements of each conv (and of the BatchNorm)
    on_chip = positions * 3 * 9 + positions + positions * 2 * 9 + 2 * 8 * 144
    # _Custom: the matmul (N x 8 outputs, 8 terms each) and the einsum (the product of its
    # index sizes, n i j); the subclassed Linear; the LayerNorm's affine, one per element.
    off_chip = {"5": 2 * 8 * 8 + 2 * 8 * 8, "5.sub": 2 * 8 * 8, "6": 2 * 8}
    assert result.analog == on_chip
    assert result.total == on_chip + sum(off_chip.values())
    assert result.fraction == pytest.approx(on_chip / result.total)
    digital = {m.name: 0 for m in result.digital}
    for m in result.digital:
        digital[m.name] += m.macs
    assert digital == off_chip
    reasons = {m.reason for m in result.digital}
    assert "LayerNorm: digital by default (analog_norm=false)" in reasons
    assert any(r.startswith("unsupported type NonDynamicallyQuantizableLinear") for r in reasons)
    assert "weights used directly in _Custom.forward (matmul)" in reasons
    assert "activation x activation (einsum): no stored weights" in reasons
    assert [p.name for p in result.parameters if "_Custom" in p.reason] == ["5.scale"]
    text = str(result)
    assert "MAC coverage" in text and "5.sub" in text and "by type" in text
    assert analog.training and all(a.levels == 15 for a in cimsim.chip.adc.adcs(analog))
    plain = coverage(model, x)  # a digital model: nothing on the chip, and it says why
    assert plain.analog == 0 and plain.total == result.total
    assert all("not converted" in m.reason for m in plain.digital if m.kind == "Conv2d")


def vit_macs(vit: torchvision.models.VisionTransformer, image: int) -> tuple[int, int]:
    """(on chip, digital) MACs of torchvision's ViT on one image, written out: the patch
    embedding, per layer the q/k/v (3 E^2) and out (E^2) projections and the MLP (2 E M) per
    token, the head on the class token; digital: per layer the scores and weighted sum
    (2 N^2 E) and the two LayerNorms' affines, and the final LayerNorm."""
    p, e, layers = vit.patch_size, vit.hidden_dim, len(vit.encoder.layers)
    mlp, classes = vit.mlp_dim, vit.heads.head.out_features
    patches = (image // p) ** 2
    n = patches + 1
    on_chip = patches * e * 3 * p * p + layers * (4 * n * e * e + 2 * n * e * mlp) + e * classes
    return on_chip, layers * (2 * n * n * e + 2 * n * e) + n * e


def test_vit_b_16_coverage_at_224_is_its_closed_form():
    """ViT-B/16 at 224 x 224 (197 tokens): its attention (activation x activation) is about 4 %
    of its MACs, so at most about 96 % can be on a crossbar."""
    model = torchvision.models.vit_b_16(weights=None)
    analog = convert_to_analog(model, AnalogConfig(), inplace=True)
    result = coverage(analog, torch.randn(1, 3, 224, 224))
    on_chip, digital = vit_macs(model, 224)
    assert (result.analog, result.total) == (on_chip, on_chip + digital)
    assert 0.958 < result.fraction < 0.96  # 95.9 %: the attention alone is 4.07 %
    layers, n, e = 12, 197, 768  # of the MACs with stored weights, only the LayerNorms' are not
    assert result.weight_fraction == on_chip / (on_chip + digital - layers * 2 * n * n * e)
    assert result.weight_fraction > 0.999


TINY_VIT = dict(patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
MODELS = {  # name -> (constructor, keyword arguments, input size)
    "resnet18": (torchvision.models.resnet18, {}, 32),
    "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, {}, 64),
    "efficientnet_b0": (torchvision.models.efficientnet_b0, {}, 64),
    # 4 patches + the class token (see the test above); 86 M weights: about 20 to 40 s here
    "vit_b_16": (torchvision.models.vit_b_16, {"image_size": 32}, 32),
    "vit_tiny": (torchvision.models.VisionTransformer, {"image_size": 32, **TINY_VIT}, 32),
}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n == "vit_b_16" else n for n in MODELS],
)
def test_torchvision_models_convert_train_and_program(name):
    build, kwargs, size = MODELS[name]
    torch.manual_seed(0)
    if build is not torchvision.models.VisionTransformer:
        kwargs = {"weights": None, **kwargs}
    digital = build(num_classes=10, **kwargs)
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 7])
    with torch.no_grad():  # BatchNorm's running statistics of one batch: eval outputs of scale
        norms = [m for m in digital.modules() if isinstance(m, nn.BatchNorm2d)]
        for m in norms:
            m.momentum = 1.0
        if norms:
            digital(torch.randn(8, 3, size, size))
        for m in digital.modules():
            if isinstance(m, nn.Linear) and not m.weight.any():  # ViT's zero head: no gradient
                nn.init.normal_(m.weight, std=0.02)  # would reach the layers below it
    digital.eval()
    analog = convert_to_analog(digital, AnalogConfig(sigma=0.05))
    result = coverage(analog, x)
    if isinstance(digital, torchvision.models.VisionTransformer):  # the attention is its share
        on_chip, off_chip = (2 * n for n in vit_macs(digital, size))  # two images
        assert (result.analog, result.total) == (on_chip, on_chip + off_chip)
    else:  # everything but elementwise ops on the chip
        assert result.fraction == 1.0, str(result)
    # One HA-SGD step (L = 2) moves every trained tensor, with finite gradients.
    before = {n: p.detach().clone() for n, p in analog.named_parameters()}
    opt = torch.optim.SGD(analog.parameters(), lr=0.1)
    analog.train()
    loss = hasgd_backward(lambda: F.cross_entropy(analog(x), y), 2, model=analog)
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in analog.parameters() if p.grad is not None)
    opt.step()
    moved = [n for n, p in analog.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) >= 0.9 * len(before)
    # A programmed chip at sigma 0 is the digital model; at sigma 0.05 it is not.
    chip = program_chip(convert_to_analog(digital, AnalogConfig()), seed=0).eval()
    with torch.no_grad():
        expected = digital(x)
        scale = expected.abs().max().item()
        assert scale > 1e-3
        torch.testing.assert_close(chip(x), expected, rtol=1e-4, atol=1e-5 * scale)
        cimsim.set_noise(chip, sigma=0.05)
        assert (chip(x) - expected).abs().max() > 1e-2 * scale
    assert all(layer.chip_seed == 0 for _, layer in cimsim.analog_layers(chip))


class _Sequence(nn.Module):
    """Conv1d, attention and LayerNorm over a sequence of 8 tokens: every new layer type."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(4, 16, 3, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):  # (N, 4, 8)
        h = self.conv(x).transpose(1, 2)
        h = self.norm(h + self.attn(h, h, h, need_weights=False)[0])
        return self.head(h.mean(1))


def test_the_chip_api_handles_the_new_layers():
    """program_chip, set_noise, systematic_chip and the robustness evaluation see every analog
    tensor of the new layers (the attention's children, the Conv1d, the LayerNorm)."""
    from cimsim.robustness.grid import EvalSettings, RobustnessGrid
    from cimsim.robustness.measure import evaluate_robustness

    torch.manual_seed(0)
    digital = _Sequence().eval()
    x = torch.randn(64, 4, 8)
    y = digital(x).argmax(1)  # the digital model is right on every sample
    chip = AnalogConfig(analog_norm=True, mean_shift=0.05)
    model = convert_to_analog(digital, chip).eval()
    names = [n for n, _ in cimsim.analog_layers(model)]
    assert names == ["conv", "attn.out_proj", "attn.in_proj", "norm", "head"]
    with cimsim.systematic_chip(model), torch.no_grad():  # the mean shift alone: deterministic
        shifted = model(x)
    assert (shifted - digital(x)).abs().max() > 1e-3
    cimsim.set_noise(model, mean_shift=0.0)
    grid = RobustnessGrid(sigmas=(0.0, 0.2), chips=3)
    result = evaluate_robustness(model, [(x, y)], grid, EvalSettings(progress=False))
    accs = {s: [r.acc for r in result.rows if r.point[0] == s] for s in (0.0, 0.2)}
    assert accs[0.0] == [1.0] * 3
    assert len(set(accs[0.2])) > 1  # chip to chip variation: every chip is its own
    assert all(layer.chip_seed is None for _, layer in cimsim.analog_layers(model))  # restored


@pytest.mark.parametrize("padding", ["same", "valid", 2])
def test_conv1d_tiles_pad_as_torch(padding):
    """An even kernel's 'same' pads unevenly (torch's split): tiles and tile outputs on, the
    layer is nn.Conv1d up to its ADC's step (2^20 - 1 levels over 30 normalized units)."""
    torch.manual_seed(0)
    conv, x = nn.Conv1d(6, 4, 4, padding=padding), torch.randn(2, 6, 9)
    chip = AnalogConfig(tile_rows=8, tile_adc_levels=2**20 - 1, out_bound=30.0)
    analog = program_chip(nn.Sequential(convert_to_analog(conv, chip)), seed=0).eval()
    assert len(analog[0]._tiles) == 3  # two input channels of 4 rows per 8-row tile
    torch.testing.assert_close(analog(x), conv(x), rtol=0, atol=1e-4)


def test_coverage_names_the_layers_it_cannot_count():
    """A recurrent layer runs torch's fused kernels, which the count does not see: it must not
    pass silently as a full coverage (review finding)."""
    model = nn.Sequential(nn.LSTM(8, 16, batch_first=True))
    cov = cimsim.coverage(
        cimsim.convert_to_analog(model, cimsim.AnalogConfig()), torch.randn(2, 5, 8)
    )
    assert {p.name for p in cov.uncounted} >= {"0.weight_ih_l0", "0.weight_hh_l0"}
    assert "NOT COUNTED (unsupported layers): 0" in str(cov)
