"""``AnalogConv1d``: ``nn.Conv1d`` on an analog crossbar, the crossbar of a (1, k) Conv2d."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from cimsim.chip.conv_linear import AnalogConv2d
from cimsim.chip.crossbar import CrossbarLayer


class AnalogConv1d(CrossbarLayer, nn.Conv1d):
    """``nn.Conv1d`` on an analog crossbar.

    The weights keep Conv1d's names and shape ``(C_out, C_in / groups, k)`` (a digital
    ``state_dict`` loads as is) and take the perturbation of any Conv/Linear weight (the device,
    ranges per tensor, output channel or tile). Without tile outputs the layer runs
    ``F.conv1d`` on them. With tile outputs (``AnalogConfig.tile_outputs``) it is
    ``AnalogConv2d``'s crossbar on the input as ``(B, C, 1, L)`` and the kernel as ``(1, k)``:
    tiles hold whole input channels (``tile_rows // k`` each, ``periphery.layer_tiles``), and
    the DAC, the per-tile partial sums, read and output noise and the tile ADCs are a Conv2d's.
    Only the geometry below is this class's own; the rest of the crossbar is ``AnalogConv2d``'s
    (copied onto this class under the definition), so the two cannot drift apart.
    """

    uses_device = True
    analog_tensors = AnalogConv2d.analog_tensors

    def _zeros(self) -> int | None:
        """The zeros the convolution adds on each side (after the DAC, as a Conv2d's), or None
        when ``_pad`` pads the input: a padding mode, or an uneven ``'same'``."""
        if self.padding_mode != "zeros":
            return None
        if isinstance(self.padding, str):  # 'valid': [0, 0]; 'same': torch's own split
            left, right = self._reversed_padding_repeated_twice
            return left if left == right else None
        return self.padding[0]

    def _pad(self, x):  # x: (B, C, 1, L)
        if self._zeros() is not None:
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, [*self._reversed_padding_repeated_twice, 0, 0], mode=mode)

    @property
    def _kernel2d(self) -> tuple:
        return (1, self.kernel_size[0])

    def _pool_pads(self) -> list[int]:  # the zeros the product adds (``_pad`` did the rest)
        zeros = self._zeros() or 0
        return [zeros, zeros, 0, 0]

    def _conv_args(self, tiles: int) -> tuple:
        padding = (0, self._zeros() or 0)
        return (1, self.stride[0]), padding, (1, self.dilation[0]), tiles * self.groups

    def _mvm(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)  # F.conv1d

    def _crossbar(self, x, weight, bias):
        if not self.config.tile_outputs:  # the DAC and F.conv1d on the (tile-)perturbed weights
            return super()._crossbar(x, weight, bias)
        if x.dim() == 2:  # unbatched (C, L)
            return self._crossbar(x.unsqueeze(0), weight, bias).squeeze(0)
        return super()._crossbar(x.unsqueeze(2), weight.unsqueeze(2), bias).squeeze(2)

    forward = CrossbarLayer._analog_forward


for _name, _value in vars(AnalogConv2d).items():  # the crossbar: AnalogConv2d's, on (1, k)
    if not _name.startswith("__") and _name not in vars(AnalogConv1d):
        setattr(AnalogConv1d, _name, _value)
