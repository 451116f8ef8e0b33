"""The Wide ResNet: shapes, parameter counts, the authors' block, ADC points, init, validation."""

import pytest
import torch
from torch import nn

from cimsim.chip.adc import ADC
from cimsim.validation import ConfigError
from cimsim.wide_resnet import BasicBlock, WideResNet


@pytest.mark.parametrize(
    ("kwargs", "x_shape", "out_shape"),
    [
        (dict(depth=10, widen_factor=2, num_classes=10, in_channels=1), (2, 1, 8, 8), (2, 10)),
        (dict(depth=10, widen_factor=1, num_classes=10, in_channels=1), (2, 1, 4, 4), (2, 10)),
        (dict(depth=16, widen_factor=2, num_classes=100, in_channels=3), (2, 3, 32, 32), (2, 100)),
    ],
)
def test_output_shape(kwargs, x_shape, out_shape):
    model = WideResNet(**kwargs)
    assert model(torch.randn(x_shape)).shape == out_shape


def _closed_form_wrn_parameters(depth, k, num_classes, in_channels, conv_bias):
    """Parameters of WRN-depth-k summed layer by layer, from the authors' architecture."""
    b = int(conv_bias)
    n = (depth - 4) // 6
    widths = [16, 16 * k, 32 * k, 64 * k]
    total = in_channels * 16 * 9 + 16 * b  # stem conv
    for group in range(3):
        c_in, c_out = widths[group], widths[group + 1]
        for i in range(n):
            c = c_in if i == 0 else c_out
            total += 2 * c  # bn1 (gamma, beta)
            total += c * c_out * 9 + c_out * b  # conv1
            total += 2 * c_out  # bn2
            total += c_out * c_out * 9 + c_out * b  # conv2
            if i == 0 and (c != c_out or group > 0):  # 1x1 projection (width or stride change)
                total += c * c_out + c_out * b
    return total + 2 * widths[3] + widths[3] * num_classes + num_classes  # final BN, fc


@pytest.mark.parametrize("conv_bias", [True, False])
def test_wrn_28_10_cifar100_parameter_count_matches_a_closed_form(conv_bias):
    with torch.device("meta"):  # no memory, no init cost
        model = WideResNet(depth=28, widen_factor=10, num_classes=100, conv_bias=conv_bias)
    n = sum(p.numel() for p in model.parameters())
    assert n == _closed_form_wrn_parameters(28, 10, 100, 3, conv_bias)
    assert abs(n - 36.5e6) < 0.1e6  # the WRN paper's count


@pytest.mark.parametrize("depth", [10, 16, 22])
def test_adc_points_stem_every_block_and_head(depth):
    model = WideResNet(depth=depth, widen_factor=2, num_classes=10, in_channels=1)
    n_blocks = 3 * (depth - 4) // 6
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == n_blocks
    markers = [m for m in model.modules() if isinstance(m, ADC)]
    assert len(markers) == 1 + n_blocks + 1
    # Every marker is on the forward path, and the head's sees the pooled (B, 64k) features.
    seen = []
    for m in markers:
        m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0].shape, out)))
    model(torch.randn(3, 1, 8, 8))
    assert all(out.shape == shape for _, shape, out in seen)
    assert [mod for mod, _, _ in seen] == markers
    assert seen[0][1] == (3, 16, 8, 8)  # after the stem conv
    assert seen[-1][0] is model.adc_head and seen[-1][1] == (3, 64 * 2)


def test_adc_outputs_feed_the_network():
    model = WideResNet(depth=10, widen_factor=1, num_classes=10, in_channels=1).eval()
    x = torch.randn(2, 1, 8, 8)
    expected = model(x)
    for name, m in list(model.named_modules()):
        if isinstance(m, ADC):
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            setattr(owner, child, _Zero())
            assert not torch.allclose(model(x), expected), name  # its output is used
            setattr(owner, child, m)
    assert torch.equal(model(x), expected)


class _Zero(nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_shortcut_is_a_1x1_conv_exactly_where_the_shape_changes():
    model = WideResNet(depth=16, widen_factor=1, num_classes=10, in_channels=3)
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    # widen_factor 1: group 1 keeps 16 channels; groups 2 and 3 open with a stride-2 widening.
    projecting = {model.group2[0], model.group3[0]}
    for block in blocks:
        if block in projecting:
            assert isinstance(block.shortcut, nn.Conv2d)
            assert block.shortcut.kernel_size == (1, 1) and block.shortcut.stride == (2, 2)
        else:
            assert type(block.shortcut) is nn.Identity
    wide = WideResNet(depth=16, widen_factor=2, num_classes=10, in_channels=3)
    assert isinstance(wide.group1[0].shortcut, nn.Conv2d)  # 16 -> 32 channels, stride 1
    assert wide.group1[0].shortcut.stride == (1, 1)


def test_the_stride_sits_on_conv2_of_a_downsampling_block():
    # The authors' wide_basic: conv1 keeps the resolution, conv2 (and the projection) stride.
    model = WideResNet(depth=10, widen_factor=1, num_classes=10, in_channels=3)
    for block in (model.group2[0], model.group3[0]):
        assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    shapes = []
    for conv in (model.group2[0].conv1, model.group2[0].conv2):
        conv.register_forward_hook(lambda m, i, out: shapes.append(out.shape))  # returns None
    model(torch.randn(2, 3, 16, 16))
    assert shapes == [(2, 32, 16, 16), (2, 32, 8, 8)]  # conv1, then conv2


@pytest.mark.parametrize("block_name", ["group1.0", "group2.0", "group2.1"])
def test_the_shortcut_receives_the_raw_block_input(block_name):
    # group1.0 projects 16 -> 32 channels, group2.0 projects with stride 2, group2.1 is identity.
    model = WideResNet(depth=16, widen_factor=2, num_classes=10, in_channels=3).train()
    block = model.get_submodule(block_name)
    seen = {}  # the hooks return None, so they change nothing
    block.register_forward_pre_hook(lambda m, inp: seen.update(block=inp[0].clone()))
    block.shortcut.register_forward_hook(lambda m, inp, out: seen.update(shortcut=inp[0]))
    model(torch.randn(2, 3, 8, 8))
    # Not relu(bn1(x)): a pre-activated input would be non-negative, the raw one is not.
    assert torch.equal(seen["shortcut"], seen["block"]) and seen["block"].min() < 0


def test_nn_identity_is_used_only_for_shortcuts():
    # convert_to_analog turns every nn.Identity into a noisy identity crossbar.
    model = WideResNet(depth=22, widen_factor=2, num_classes=10, in_channels=3)
    identities = [n for n, m in model.named_modules() if type(m) is nn.Identity]
    assert len(identities) == 9 - 3
    assert all(n.endswith(".shortcut") for n in identities)


def test_every_conv_has_a_bias_by_default_and_none_without_conv_bias():
    convs = [m for m in WideResNet(16, 2, 10, 3).modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 2 * 6 + 3  # stem, two per block, three 1x1 projections
    assert all(m.bias is not None and m.bias.shape == (m.out_channels,) for m in convs)
    bare = WideResNet(16, 2, 10, 3, conv_bias=False)
    assert all(m.bias is None for m in bare.modules() if isinstance(m, nn.Conv2d))


def test_conv_bias_starts_at_zero_so_both_variants_compute_the_same_function():
    with_bias = WideResNet(depth=10, widen_factor=2, num_classes=10, in_channels=3).eval()
    conv_biases = [m.bias for m in with_bias.modules() if isinstance(m, nn.Conv2d)]
    assert all(torch.all(b == 0) for b in conv_biases)
    without = WideResNet(10, 2, 10, 3, conv_bias=False).eval()
    missing, unexpected = without.load_state_dict(with_bias.state_dict(), strict=False)
    assert not missing and len(unexpected) == len(conv_biases)  # only the conv biases differ
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(with_bias(x), without(x))


def test_init_of_weights():
    model = WideResNet(depth=10, widen_factor=2, num_classes=10, in_channels=3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.all(model.fc.bias == 0)
    # Kaiming normal, fan_out: std = sqrt(2 / (out_channels * 3 * 3)).
    w = model.group3[0].conv2.weight
    expected = (2 / (w.shape[0] * 9)) ** 0.5
    assert w.std().item() == pytest.approx(expected, rel=0.05)


def test_dropout_is_active_in_training_only():
    model = WideResNet(depth=10, widen_factor=1, num_classes=10, in_channels=1, dropout=0.5)
    x = torch.randn(4, 1, 8, 8)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("depth", 12),
        ("depth", 4),
        ("depth", 16.0),
        ("widen_factor", 0),
        ("num_classes", 0),
        ("in_channels", 0),
        ("dropout", 1.0),
        ("dropout", -0.1),
        ("conv_bias", 1),
        ("conv_bias", "yes"),
    ],
)
def test_invalid_args_raise_config_error_naming_the_key(key, value):
    kwargs = dict(depth=10, widen_factor=1, num_classes=10, in_channels=1)
    kwargs[key] = value
    with pytest.raises(ConfigError, match=rf"^{key}=") as info:
        WideResNet(**kwargs)
    assert info.value.key == key
