"""The crossbar periphery of Conv/Linear layers (docs/model.md, "The crossbar periphery").

A layer's unrolled weight is split along its inputs into tiles of at most ``tile_rows`` rows
(``tile_slices``); inputs pass a DAC (``DAC``: clip to ``[-b_in, b_in]``, round to N levels);
each tile's partial sums get short-term weight read noise (``read_noise``) and output noise, and
are digitized by the tile's own ADC (``TileADC``); the digital periphery adds the tiles and the
bias. Every quantizer has a straight-through gradient inside its range and zero outside.
``AnalogConfig``'s ``tile_rows``, ``dac_levels``, ``dac_range``, ``tile_adc_levels``,
``out_noise`` and ``w_read_noise`` switch the pieces on; all are off by default.
"""

from __future__ import annotations

import torch
from torch import nn

from cimsim.adc import ADC
from cimsim.validation import ConfigError

_TINY = torch.finfo(torch.float32).tiny


class _SymmetricQuantize(torch.autograd.Function):
    """``symmetric_quantize`` with its straight-through gradient, in one node (the quantizer sits
    on every tile's partial sums, so its elementwise passes are most of the periphery's cost)."""

    @staticmethod
    def forward(ctx, x, bound, levels: int):
        b = bound.to(x.dtype).clamp_min(_TINY)
        d = b * (2.0 / (levels - 1))
        inside = x.abs() <= b
        if levels % 2:  # clip(round(x / d) * d, -b, b): 0 is a level
            half = (levels - 1) // 2
            q = (x / d).round_().clamp_(-half, half).mul_(d)
        else:  # the grid -b + k d, offset by b
            q = ((x + b) / d).round_().clamp_(0, levels - 1).mul_(d).sub_(b)
        ctx.levels = levels
        if bound.requires_grad:
            ctx.save_for_backward(inside, torch.sign(x))
        else:
            ctx.save_for_backward(inside)
        ctx.bound_shape = bound.shape
        return q

    @staticmethod
    def backward(ctx, grad):
        inside = ctx.saved_tensors[0]
        grad_x = grad * inside
        grad_b = None
        if ctx.needs_input_grad[1]:
            sign = ctx.saved_tensors[1]
            outside = grad * sign * ~inside
            grad_b = outside.sum_to_size(ctx.bound_shape) if ctx.bound_shape else outside.sum()
        return grad_x, grad_b, None


def symmetric_quantize(x: torch.Tensor, bound: torch.Tensor, levels: int) -> torch.Tensor:
    """``x`` clipped to ``[-b, b]`` and rounded to the ``levels`` uniform values
    ``-b + k d`` (``d = 2 b / (levels - 1)``, ``k = 0 .. levels - 1``).

    For odd ``levels`` this is ``clip(round(x / d) * d, -b, b)`` (0 is a level); for even
    ``levels`` the grid has no zero and the rounding is offset by ``b``, so there are exactly
    ``levels`` values either way. The gradient to ``x`` is 1 inside ``[-b, b]`` and 0 outside
    (clipped straight-through); where ``bound`` requires a gradient (a learned range), the
    clipped values pass theirs to it (``d q / d b = sign(x)`` outside, 0 inside, as aihwkit's
    input range learning).

    Args:
        x: any tensor.
        bound: ``b > 0``, broadcastable against ``x``.
        levels: the number of output values, >= 2.
    """
    return _SymmetricQuantize.apply(x, bound, levels)


def tile_slices(inputs: int, per_tile: int) -> list[slice]:
    """``ceil(inputs / per_tile)`` contiguous slices of ``inputs`` input lines, balanced: their
    sizes differ by at most one, the larger first (aihwkit-lightning's ``get_split_sizes``)."""
    n = -(-inputs // per_tile)
    base, extra = divmod(inputs, n)
    sizes = [base + (i < extra) for i in range(n)]
    starts = [sum(sizes[:i]) for i in range(n)]
    return [slice(a, a + k) for a, k in zip(starts, sizes, strict=True)]


def grouped_index(tiles: list[slice], inputs: int) -> torch.Tensor | None:
    """Where tile ``t``'s inputs sit in a grouped layout of ``T`` equal groups of
    ``max(size)`` lines: the index into the inputs with one zero line appended (index
    ``inputs``) that pads the smaller tiles; ``None`` when all tiles have the same size."""
    width = max(sl.stop - sl.start for sl in tiles)
    if all(sl.stop - sl.start == width for sl in tiles):
        return None
    index = []
    for sl in tiles:
        index += list(range(sl.start, sl.stop)) + [inputs] * (width - (sl.stop - sl.start))
    return torch.tensor(index)


def to_groups(t: torch.Tensor, index: torch.Tensor | None, dim: int) -> torch.Tensor:
    """``t`` with its input lines (dim ``dim``) in equal tile groups (``grouped_index``)."""
    if index is None:
        return t
    pad_shape = list(t.shape)
    pad_shape[dim] = 1
    padded = torch.cat([t, t.new_zeros(pad_shape)], dim=dim)
    return padded.index_select(dim, index.to(t.device))


def layer_tiles(layer: nn.Module, tile_rows: int | None) -> list[slice] | None:
    """The input slices of a Conv2d (whole input channels, ``tile_rows // (k*k)`` per tile) or a
    Linear (``tile_rows`` features per tile); ``None`` when the layer is one tile."""
    if tile_rows is None:
        return None
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ConfigError("tile_rows", tile_rows, "tiles need convs with groups=1")
        rows = layer.kernel_size[0] * layer.kernel_size[1]
        if rows > tile_rows:
            why = f"must be >= the {rows} rows of one input channel's {layer.kernel_size} kernel"
            raise ConfigError("tile_rows", tile_rows, why)
        per_tile, inputs = tile_rows // rows, layer.in_channels
    else:
        per_tile, inputs = tile_rows, layer.in_features
    return None if inputs <= per_tile else tile_slices(inputs, per_tile)


class DAC(ADC):
    """A layer's input DAC: ``x`` clipped to ``[-b_in, b_in]`` and rounded to ``levels`` values.

    ``learned=False``: ``b_in`` is calibrated on data like an ADC range (the moving max of
    ``|x|``; ``calibrate_adc`` after programming, tracked while training in the loop).
    ``learned=True``: ``b_in`` is a parameter set from the first training batch's max ``|x|``,
    then trained through the straight-through gradient (``symmetric_quantize``); it is part of
    the trained network, so programming a chip does not reset it.
    """

    def __init__(self, levels: int, learned: bool = False, momentum: float = 0.01):
        super().__init__(levels, momentum=momentum, placement="dac")
        self.learned = learned
        if learned:
            self.b_in = nn.Parameter(torch.ones(()))

    @property
    def calibratable(self) -> bool:
        return not self.learned

    def reset_calibration(self) -> None:
        if not self.learned:
            super().reset_calibration()

    @torch.no_grad()
    def _observe(self, x: torch.Tensor, momentum: float) -> None:
        peak = x.detach().abs().amax().float()
        if not self.calibrated:
            self.hi.copy_(peak)
            self.calibrated = True
        else:
            self.hi.lerp_(peak, momentum)
        self.lo.copy_(-self.hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.learned:
            if not self.calibrated:
                if not self.training:
                    raise RuntimeError("a learned DAC range is set by training: train first")
                with torch.no_grad():
                    self.b_in.copy_(x.detach().abs().amax().float())
                self.calibrated = True
            return symmetric_quantize(x, self.b_in, self.levels)
        self._update_range(x)
        return symmetric_quantize(x, self.hi, self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, learned={self.learned}"


class TileADC(ADC):
    """The ADCs of a layer's tiles: output noise, then quantization, per tile.

    Its input is the tiles' partial sums stacked along dim 1, ``(B, T, ...)``. Tile ``t`` has its
    own bound ``b_out[t]`` (the moving max of its ``|y|``, calibrated after programming and
    tracked while training, as the layer ADC), adds ``out_noise * b_out * xi`` (fresh standard
    normal draws at every forward), then with ``levels`` quantizes to ``[-b_out, b_out]``
    (``symmetric_quantize``). With ``levels=None`` only the output noise is added.
    """

    def __init__(self, tiles: int, levels: int | None, out_noise: float, momentum: float = 0.01):
        super().__init__(levels, momentum=momentum, placement="tile")
        self.tiles, self.out_noise = tiles, out_noise
        self.noisy = True  # the layer clears it where no chip reads (a clean validation pass)
        self.register_buffer("lo", torch.zeros(tiles))
        self.register_buffer("hi", torch.zeros(tiles))

    @property
    def enabled(self) -> bool:
        return self.active and (self.levels is not None or self.out_noise > 0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key in ("lo", "hi"):
            state_dict.setdefault(prefix + key, torch.zeros(self.tiles))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def _observe(self, y: torch.Tensor, momentum: float) -> None:
        peak = y.detach().abs().transpose(0, 1).reshape(y.shape[1], -1).amax(dim=1).float()
        if not self.calibrated:
            self.hi.copy_(peak)
            self.calibrated = True
        else:
            self.hi.lerp_(peak, momentum)
        self.lo.copy_(-self.hi)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return y
        self._update_range(y)
        bound = self.hi.reshape((1, -1) + (1,) * (y.dim() - 2))  # (1, T, 1, ...)
        if self.out_noise > 0 and self.noisy:
            with torch.no_grad():
                noise = torch.randn_like(y).mul_(bound.to(y.dtype) * self.out_noise)
            y = y + noise  # a constant for autograd
        if self.levels is None:
            return y
        return symmetric_quantize(y, bound, self.levels)

    def extra_repr(self) -> str:
        return f"tiles={self.tiles}, levels={self.levels}, out_noise={self.out_noise}"


@torch.no_grad()
def read_noise(y_part: torch.Tensor, squares: torch.Tensor, w_max: torch.Tensor, scale: float):
    """aihwkit's PCM_READ short-term weight noise of one tile's partial sums: standard normal
    draws times ``scale * sqrt(w_max * sum_j |w_ij| x_j^2)`` (``squares`` is that sum, the tile's
    product of ``|W|`` with ``x^2``), i.e. ``scale * sqrt(sum_j |w_ij / w_max| x_j^2)`` in units of
    the tile's ``w_max``, fresh at every call. A constant for autograd."""
    std = squares.clamp_min(0.0).mul_(w_max.to(squares.dtype)).sqrt_().mul_(scale)
    return torch.randn_like(y_part).mul_(std)
