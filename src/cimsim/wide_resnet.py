"""Pre-activation Wide ResNet (Zagoruyko & Komodakis 2016, "Wide Residual Networks").

WRN-d-k has depth ``d = 6n + 4`` (three groups of n blocks, two 3x3 convs per block) and widths
16, 16k, 32k, 64k.
WRN-28-10 (36.5 M parameters) is the paper's network; WRN-16-4 and WRN-10-2 run on a CPU.

``cimsim.ADC()`` modules mark where a mixed-signal chip digitizes: after the stem conv, after
each residual add and before the linear head. They are the identity in a digital model.
``nn.Identity`` is used only for the identity shortcuts, because ``convert_to_analog`` turns
every ``nn.Identity`` into a noisy identity crossbar.

The block follows the authors' code (Wan et al., github wtianyi/NeuralNetworkResiliency,
``networks/wide_resnet.py``), which differs from the WRN paper's Torch code
(szagoruyko/wide-residual-networks): every conv has a bias, the first conv of a block keeps the
resolution and the second one carries the stride, a projection shortcut takes the block's raw
input rather than the pre-activated one, and dropout follows the first conv rather than the
second ReLU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cimsim.chip.adc import ADC
from cimsim.validation import ConfigError, check_int, check_number


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    """3x3 convolution with padding 1 (the spatial size is divided by ``stride``)."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=bias)


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3-dropout-BN-ReLU-conv3x3, plus the shortcut.

    As the authors' ``wide_basic``: ``conv1`` keeps the resolution and ``conv2`` carries the
    stride; the shortcut (a strided 1x1 conv where the shape changes, the identity elsewhere)
    takes the block's raw input ``x``.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        stride: stride of the second conv and of the projection (2 halves the spatial size).
        dropout: dropout probability between the two convs.
        bias: give every conv (both 3x3 and the 1x1 projection) a bias.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, dropout: float, bias: bool = True
    ):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels, stride, bias=bias)
        if in_channels != out_channels or stride != 1:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias)
        else:
            self.shortcut = nn.Identity()  # becomes a noisy identity crossbar on a chip
        self.adc = ADC()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dropout(self.conv1(F.relu(self.bn1(x))))  # (B, C_out, H, W)
        y = self.conv2(F.relu(self.bn2(y)))  # (B, C_out, H / stride, W / stride)
        # As the authors' code: the shortcut, projection or identity, sees the raw input x.
        return self.adc(y + self.shortcut(x))


class WideResNet(nn.Module):
    """Pre-activation Wide ResNet WRN-``depth``-``widen_factor``.

    Args:
        depth: total depth, ``6n + 4`` with ``n >= 1`` (10, 16, 22, 28, ...).
        widen_factor: width multiplier ``k`` of the three groups (16k, 32k, 64k channels).
        num_classes: number of output logits.
        in_channels: channels of the input images (1 grayscale, 3 RGB).
        dropout: dropout probability inside each block, in ``[0, 1)`` (the paper uses 0.3).
        conv_bias: give every conv (stem, block convs, 1x1 projections) a bias, as the authors'
            network does, so the bi-scale bias mapping reaches the convs too; ``False`` builds
            bias-free convs (the WRN paper's, since a BN follows each conv).

    Any input of at least 4x4 pixels works: the head pools globally.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 100,
        in_channels: int = 3,
        dropout: float = 0.0,
        conv_bias: bool = True,
    ):
        super().__init__()
        _check_args(depth, widen_factor, num_classes, in_channels, dropout, conv_bias)
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = conv3x3(in_channels, widths[0], bias=conv_bias)
        self.adc_stem = ADC()
        self.group1 = _group(widths[0], widths[1], n, 1, dropout, conv_bias)
        self.group2 = _group(widths[1], widths[2], n, 2, dropout, conv_bias)
        self.group3 = _group(widths[2], widths[3], n, 2, dropout, conv_bias)
        self.bn = nn.BatchNorm2d(widths[3])
        self.adc_head = ADC()
        self.fc = nn.Linear(widths[3], num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal conv weights, zero conv biases, BN weight 1 bias 0, linear bias 0.

        Kaiming normal (fan out) is the WRN paper's init. Conv biases start at zero so that
        ``conv_bias=True`` starts as the same function as ``conv_bias=False``. (The authors'
        ``main.py`` instead applies xavier-uniform with gain sqrt(2) to conv weights and leaves
        conv biases at PyTorch's default uniform init.)
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.adc_stem(self.conv1(x))  # (B, 16, H, W)
        x = self.group1(x)  # (B, 16k, H, W)
        x = self.group2(x)  # (B, 32k, H/2, W/2)
        x = self.group3(x)  # (B, 64k, H/4, W/4)
        x = F.relu(self.bn(x))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 64k)
        return self.fc(self.adc_head(x))  # (B, num_classes)


def _group(
    in_channels: int, out_channels: int, n: int, stride: int, dropout: float, bias: bool
) -> nn.Sequential:
    """``n`` blocks; the first changes the width and the stride."""
    blocks = [BasicBlock(in_channels, out_channels, stride, dropout, bias)]
    blocks += [BasicBlock(out_channels, out_channels, 1, dropout, bias) for _ in range(n - 1)]
    return nn.Sequential(*blocks)


def _check_args(depth, widen_factor, num_classes, in_channels, dropout, conv_bias) -> None:
    check_int("depth", depth, minimum=10)
    if (depth - 4) % 6 != 0:
        raise ConfigError("depth", depth, "must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...)")
    check_int("widen_factor", widen_factor, minimum=1)
    check_int("num_classes", num_classes, minimum=1)
    check_int("in_channels", in_channels, minimum=1)
    check_number("dropout", dropout, minimum=0.0)
    if dropout >= 1:
        raise ConfigError("dropout", dropout, "must be in [0, 1)")
    if not isinstance(conv_bias, bool):
        raise ConfigError("conv_bias", conv_bias, "must be true or false")
