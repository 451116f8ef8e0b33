"""The Wide ResNet: shapes, the paper's parameter count, ADC points, shortcuts, validation."""

import pytest
import torch
from torch import nn

from cimsim.adc import ADC
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


def test_wrn_28_10_has_the_papers_36_5m_parameters():
    with torch.device("meta"):  # no memory, no init cost
        model = WideResNet(depth=28, widen_factor=10, num_classes=100)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 36.5e6) < 0.1e6


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
            assert block.shortcut.kernel_size == (1, 1) and block.shortcut.bias is None
        else:
            assert type(block.shortcut) is nn.Identity
    wide = WideResNet(depth=16, widen_factor=2, num_classes=10, in_channels=3)
    assert isinstance(wide.group1[0].shortcut, nn.Conv2d)  # 16 -> 32 channels, stride 1


def test_nn_identity_is_used_only_for_shortcuts():
    # convert_to_analog turns every nn.Identity into a noisy identity crossbar.
    model = WideResNet(depth=22, widen_factor=2, num_classes=10, in_channels=3)
    identities = [n for n, m in model.named_modules() if type(m) is nn.Identity]
    assert len(identities) == 9 - 3
    assert all(n.endswith(".shortcut") for n in identities)


def test_init_and_biases():
    model = WideResNet(depth=10, widen_factor=2, num_classes=10, in_channels=3)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
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
    ],
)
def test_invalid_args_raise_config_error_naming_the_key(key, value):
    kwargs = dict(depth=10, widen_factor=1, num_classes=10, in_channels=1)
    kwargs[key] = value
    with pytest.raises(ConfigError, match=rf"^{key}=") as info:
        WideResNet(**kwargs)
    assert info.value.key == key
