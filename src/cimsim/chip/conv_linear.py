"""``AnalogConv2d`` and ``AnalogLinear``: Conv2d and Linear on an analog crossbar."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cimsim.chip.crossbar import CrossbarLayer
from cimsim.chip.fused import group_inputs
from cimsim.chip.periphery import to_groups


class AnalogConv2d(CrossbarLayer, nn.Conv2d):
    """``nn.Conv2d`` on an analog crossbar."""

    uses_device = True

    def analog_tensors(self):
        shapes = {"weight": self.weight.shape}
        if self.bias is not None and self.config.bias != "digital":
            shapes["bias"] = self.bias.shape
        return shapes

    def _pad(self, x):
        if self.padding_mode == "zeros":
            return x
        return F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)

    @property
    def _kernel2d(self) -> tuple:
        return self.kernel_size

    def _pool_pads(self) -> list[int]:
        """The zero padding the product applies, as ``F.pad``'s list (last dim first)."""
        if self.padding_mode != "zeros":  # ``_pad`` did it
            return [0, 0, 0, 0]
        return list(self._reversed_padding_repeated_twice)  # 'same' / 'valid' resolved too

    def _conv_args(self, tiles: int) -> tuple:
        padding = self.padding if self.padding_mode == "zeros" else 0  # else ``_pad`` did it
        return self.stride, padding, self.dilation, tiles * self.groups  # tiles > 1: groups 1

    def _prepare(self, x, weight, levels, peaks, apart=False):
        tiles = self._tiles or [slice(0, x.shape[1])]
        count, c_out = len(tiles), weight.shape[0]
        stride, _, dilation, _ = self._conv_args(count)
        pool = (self._kernel2d, stride, self._pool_pads(), dilation)
        # Channels-last: the tiles' convolutions and the grouped backward run fastest in it
        # (oneDNN's grouped convolution channels-first was up to 2x slower).
        sizes = tuple(sl.stop - sl.start for sl in tiles)
        xg, s = group_inputs(x, sizes, levels, pool, peaks, count > 1, apart and count > 1)
        w_pad = to_groups(weight, tiles, 1)  # (C_out, T * w, k, k)
        if count == 1:
            return xg, w_pad, w_pad, s
        width = w_pad.shape[1] // count
        wg = w_pad.reshape(c_out, count, width, *w_pad.shape[2:]).transpose(0, 1)
        wg = wg.reshape(count * c_out, width, *w_pad.shape[2:])
        return xg, wg.contiguous(memory_format=torch.channels_last), w_pad, s

    def _products(self, xg, wg):
        tiles = 1 if self._tiles is None else len(self._tiles)
        y = F.conv2d(xg, wg, None, *self._conv_args(tiles))
        return y.reshape(y.shape[0], tiles, -1, *y.shape[2:])

    def _tile_products(self, xg, wg):
        tiles = 1 if self._tiles is None else len(self._tiles)
        if tiles == 1:
            return CrossbarLayer._tile_products(self, xg, wg)  # (copied onto AnalogConv1d)
        # oneDNN's grouped convolution was slower than T dense ones of the same sizes here.
        stride, padding, dilation, _ = self._conv_args(1)
        args = (None, stride, padding, dilation, self.groups)
        xs = xg if isinstance(xg, list) else xg.chunk(tiles, dim=1)  # (a chunk is copied)
        ws = wg.chunk(tiles, dim=0)
        return [F.conv2d(a, w, *args) for a, w in zip(xs, ws, strict=True)]

    def _products_backward(self, g, xg, wg, needs):
        tiles = g.shape[1]
        stride, padding, dilation, groups = self._conv_args(tiles)
        g = g.reshape(g.shape[0], -1, *g.shape[3:])
        if tiles > 1:  # already channels-last when it comes from the mask (a view then)
            g = g.contiguous(memory_format=torch.channels_last)
        gx, gw = self._conv_backward(g, xg, wg, (stride, padding, dilation, groups), needs)
        if gw is not None and tiles > 1:  # (T * C_out, w, k, k) -> (C_out, T * w, k, k)
            c_out = gw.shape[0] // tiles
            gw = gw.reshape(tiles, c_out, *gw.shape[1:]).transpose(0, 1)
            gw = gw.reshape(c_out, -1, *gw.shape[3:])
        return gx, gw

    def _dense_backward(self, g, xg, w_pad, needs):
        stride, padding, dilation, _ = self._conv_args(1)
        return self._conv_backward(g, xg, w_pad, (stride, padding, dilation, self.groups), needs)

    @staticmethod
    def _conv_backward(g, x, w, args, needs) -> tuple:
        stride, padding, dilation, groups = args
        padding = (padding,) * 2 if isinstance(padding, int) else padding
        gx, gw, _ = torch.ops.aten.convolution_backward(
            g, x, w, None, stride, padding, dilation, False, [0, 0], groups,
            [needs[0], needs[1], False],
        )  # fmt: skip
        return gx, gw

    def _mvm(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)

    forward = CrossbarLayer._analog_forward


class AnalogLinear(CrossbarLayer, nn.Linear):
    """``nn.Linear`` on an analog crossbar."""

    uses_device = True

    analog_tensors = AnalogConv2d.analog_tensors

    def _prepare(self, x, weight, levels, peaks, apart=False):  # x: (N, C_in) (flattened)
        tiles = self._tiles or [slice(0, x.shape[1])]
        sizes = tuple(sl.stop - sl.start for sl in tiles)
        xg, s = group_inputs(x, sizes, levels, None, peaks)
        w_pad = to_groups(weight, tiles, 1)  # (C_out, T * w)
        count = len(tiles)
        return xg.unflatten(1, (count, -1)), w_pad.unflatten(1, (count, -1)), w_pad, s

    def _products(self, xg, wg):  # (N, T, c) x (C_out, T, c) -> (N, T, C_out)
        return torch.einsum("ntc,otc->nto", xg, wg)

    def _products_backward(self, g, xg, wg, needs):  # in the padded layouts (N|C_out, T * c)
        gx = torch.einsum("nto,otc->ntc", g, wg).flatten(1) if needs[0] else None
        gw = torch.einsum("nto,ntc->otc", g, xg).flatten(1) if needs[1] else None
        return gx, gw

    def _dense_backward(self, g, xg, w_pad, needs):  # of F.linear on the padded operands
        gx = g @ w_pad if needs[0] else None
        return gx, (g.t() @ xg.flatten(1) if needs[1] else None)

    def _vector_bounds(self, x):  # the features are the last dim: one vector per row
        flat = x.reshape(-1, x.shape[-1])
        return super()._vector_bounds(flat).reshape(x.shape)

    def _mvm(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _crossbar(self, x, weight, bias):
        if x.dim() <= 2 or not self.config.tile_outputs:
            return super()._crossbar(x, weight, bias)
        y = super()._crossbar(x.reshape(-1, x.shape[-1]), weight, bias)  # (N, C_out)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    forward = CrossbarLayer._analog_forward
