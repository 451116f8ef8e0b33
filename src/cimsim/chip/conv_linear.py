"""``AnalogConv2d`` and ``AnalogLinear``: Conv2d and Linear on an analog crossbar."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cimsim.chip.crossbar import CrossbarLayer
from cimsim.chip.periphery import to_groups


class AnalogConv2d(CrossbarLayer, nn.Conv2d):
    """``nn.Conv2d`` on an analog crossbar."""

    uses_device = True

    def analog_tensors(self):
        shapes = {"weight": self.weight.shape}
        if self.bias is not None and self.config.bias != "digital":
            shapes["bias"] = self.bias.shape
        return shapes

    def _grouped(self, x, weight):
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        if self._tiles is None:
            return x, weight
        tiles = len(self._tiles)
        xg = to_groups(x, self._tiles, 1)
        wg = to_groups(weight, self._tiles, 1)  # (C_out, T * c, k, k)
        c_out, width = wg.shape[0], wg.shape[1] // tiles
        wg = wg.reshape(c_out, tiles, width, *wg.shape[2:]).transpose(0, 1)
        wg = wg.reshape(tiles * c_out, width, *wg.shape[3:])
        # Channels-last: oneDNN's grouped convolution (and its backward) then runs about as fast
        # as the dense one; channels-first it is up to 2x slower.
        cl = torch.channels_last
        return xg.contiguous(memory_format=cl), wg.contiguous(memory_format=cl)

    def _conv_args(self, tiles: int) -> tuple:
        padding = self.padding if self.padding_mode == "zeros" else 0
        return self.stride, padding, self.dilation, tiles * self.groups  # tiles > 1: groups 1

    def _products(self, xg, wg):
        tiles = 1 if self._tiles is None else len(self._tiles)
        y = F.conv2d(xg, wg, None, *self._conv_args(tiles))
        return y.reshape(y.shape[0], tiles, -1, *y.shape[2:])

    def _products_backward(self, g, xg, wg, needs):
        tiles = g.shape[1]
        stride, padding, dilation, groups = self._conv_args(tiles)
        padding = (padding,) * 2 if isinstance(padding, int) else padding  # 0 after F.pad
        g = g.reshape(g.shape[0], -1, *g.shape[3:])
        if tiles > 1:  # already channels-last when it comes from the mask (a view then)
            g = g.contiguous(memory_format=torch.channels_last)
        gx, gw, _ = torch.ops.aten.convolution_backward(
            g,
            xg,
            wg,
            None,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            groups,
            [needs[0], needs[1], False],
        )
        return gx, gw

    def _patch_peaks(self, xg):
        tiles = 1 if self._tiles is None else len(self._tiles)
        m = xg.detach().abs().unflatten(1, (tiles, -1)).amax(dim=2)  # (B, T, H, W)
        stride, padding, dilation, _ = self._conv_args(tiles)
        peaks = F.max_pool2d(m, self.kernel_size, stride, padding, dilation)  # (B, T, H', W')
        return torch.where(peaks > 0, peaks, torch.ones_like(peaks)).unsqueeze(2)

    def _mvm(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)

    forward = CrossbarLayer._analog_forward


class AnalogLinear(CrossbarLayer, nn.Linear):
    """``nn.Linear`` on an analog crossbar."""

    uses_device = True

    analog_tensors = AnalogConv2d.analog_tensors

    def _grouped(self, x, weight):  # x: (N, C_in) (``_crossbar`` flattens the rest)
        if self._tiles is None:
            return x.unsqueeze(1), weight.unsqueeze(1)
        tiles = len(self._tiles)
        xg = to_groups(x, self._tiles, 1).reshape(x.shape[0], tiles, -1)
        return xg, to_groups(weight, self._tiles, 1).reshape(weight.shape[0], tiles, -1)

    def _products(self, xg, wg):  # (N, T, c) x (C_out, T, c) -> (N, T, C_out)
        return torch.einsum("ntc,otc->nto", xg, wg)

    def _products_backward(self, g, xg, wg, needs):
        gx = torch.einsum("nto,otc->ntc", g, wg) if needs[0] else None
        gw = torch.einsum("nto,ntc->otc", g, xg) if needs[1] else None
        return gx, gw

    def _vector_bounds(self, x):  # the features are the last dim: one vector per row
        flat = x.reshape(-1, x.shape[-1])
        return super()._vector_bounds(flat).reshape(x.shape)

    def _patch_peaks(self, xg):  # (N, T, c) -> (N, T, 1)
        peaks = xg.detach().abs().amax(dim=2, keepdim=True)
        return torch.where(peaks > 0, peaks, torch.ones_like(peaks))

    def _mvm(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _crossbar(self, x, weight, bias):
        if x.dim() <= 2 or not self.config.tile_outputs:
            return super()._crossbar(x, weight, bias)
        y = super()._crossbar(x.reshape(-1, x.shape[-1]), weight, bias)  # (N, C_out)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    forward = CrossbarLayer._analog_forward
