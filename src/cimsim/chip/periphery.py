"""The crossbar periphery of Conv/Linear layers (docs/model.md, "The crossbar periphery").

A layer's unrolled weight is split along its inputs into tiles of at most ``tile_rows`` rows
(``tile_slices``); inputs pass a DAC (``cimsim.chip.dac.DAC``: clip to ``[-b_in, b_in]``, round to N
levels); each tile's partial sums get short-term weight read noise and output noise
(``cimsim.chip.readout_noise``) and are digitized by the tile's own ADC (``TileADC``); the digital
periphery adds the tiles and the bias. Every quantizer has a straight-through gradient inside its
range and zero outside. ``AnalogConfig``'s ``tile_rows``, ``dac_levels``, ``dac_range``,
``tile_adc_levels``, ``out_noise`` and ``w_read_noise`` switch the pieces on; all are off by
default.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cimsim.chip.adc import ADC
from cimsim.chip.draws import normal_like
from cimsim.chip.fused import fused_tail, stack_tiles
from cimsim.validation import ConfigError

_TINY = torch.finfo(torch.float32).tiny


@torch.no_grad()
def quantize_(
    y: torch.Tensor, bound: torch.Tensor, levels: int, mask: bool = True
) -> torch.Tensor | None:
    """``y`` replaced in place by its level of ``symmetric_quantize``; returns where ``y`` was
    inside ``[-b, b]`` (``|y| = b`` included, aihwkit's convention). With
    ``c = (levels - 1) / 2`` the level index is ``k = clip(round(y c / b + c), 0, levels - 1)``
    and the value ``(k - c) / c * b``: the ends are exactly ``-b`` and ``b``. For odd ``levels``
    this is the issue's ``clip(round(y / d) d, -b, b)`` and the middle level is exactly 0; for
    even ``levels`` the grid is offset by ``d / 2`` (exactly ``levels`` values, but no zero: an
    exact 0 reads as ``+-d / 2``, a coherent offset over many zero inputs; aihwkit's "8-bit"
    converters have 255 levels). Half-precision inputs are quantized on a float32 copy (a bf16
    grid of 256 levels would not be uniform). ``mask=False`` (no gradient to pass) skips the
    mask and returns None."""
    if y.dtype in (torch.float16, torch.bfloat16):
        y32 = y.float()
        inside = _quantize32_(y32, bound, levels, mask)
        y.copy_(y32)
        return inside
    return _quantize32_(y, bound, levels, mask)


def _quantize32_(y: torch.Tensor, bound: torch.Tensor, levels: int, mask: bool = True):
    b = bound.to(y.dtype).clamp_min(_TINY)
    c = (levels - 1) / 2
    inside = (y >= -b) & (y <= b) if mask else None  # before scaling: |y| = b is inside
    y.mul_(c / b).add_(c)  # index space [0, levels - 1]
    y.round_().clamp_(0, levels - 1).sub_(c).div_(c).mul_(b)
    return inside


class _SymmetricQuantize(torch.autograd.Function):
    """``symmetric_quantize`` with its straight-through gradient, in one node (the quantizer sits
    on every tile's partial sums, so its elementwise passes are most of the periphery's cost)."""

    @staticmethod
    def forward(ctx, x, bound, levels: int):
        q = x.detach().clone()
        inside = quantize_(q, bound.detach(), levels)
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
    if not (torch.is_grad_enabled() and (x.requires_grad or bound.requires_grad)):
        q = x.detach().clone()  # no gradient to pass: no mask to keep
        quantize_(q, bound.detach(), levels, mask=False)
        return q
    return _SymmetricQuantize.apply(x, bound, levels)


def tile_slices(inputs: int, per_tile: int) -> list[slice]:
    """``ceil(inputs / per_tile)`` contiguous slices of ``inputs`` input lines, balanced: their
    sizes differ by at most one, the larger first (aihwkit-lightning's ``get_split_sizes``)."""
    n = -(-inputs // per_tile)
    base, extra = divmod(inputs, n)
    sizes = [base + (i < extra) for i in range(n)]
    starts = [sum(sizes[:i]) for i in range(n)]
    return [slice(a, a + k) for a, k in zip(starts, sizes, strict=True)]


def to_groups(t: torch.Tensor, tiles: list[slice], dim: int) -> torch.Tensor:
    """``t`` with its input lines (dim ``dim``) laid out as ``T`` equal groups of the largest
    tile's size, the smaller tiles padded with zero lines (a view-free copy whose backward is
    slicing)."""
    width = max(sl.stop - sl.start for sl in tiles)
    if all(sl.stop - sl.start == width for sl in tiles):
        return t
    parts = []
    for sl in tiles:
        part = t.narrow(dim, sl.start, sl.stop - sl.start)
        missing = width - (sl.stop - sl.start)
        if missing:
            shape = list(part.shape)
            shape[dim] = missing
            part = torch.cat([part, part.new_zeros(shape)], dim=dim)
        parts.append(part)
    return torch.cat(parts, dim=dim)


def layer_tiles(layer: nn.Module, tile_rows: int | None) -> list[slice] | None:
    """The input slices of a Conv2d or Conv1d (whole input channels, ``tile_rows // (k*k)`` or
    ``tile_rows // k`` per tile) or a Linear (``tile_rows`` features per tile); ``None`` when the
    layer is one tile."""
    if tile_rows is None:
        return None
    if isinstance(layer, nn.Conv2d | nn.Conv1d):
        if layer.groups != 1:
            raise ConfigError("tile_rows", tile_rows, "tiles need convs with groups=1")
        rows = math.prod(layer.kernel_size)
        if rows > tile_rows:
            why = f"must be >= the {rows} rows of one input channel's {layer.kernel_size} kernel"
            raise ConfigError("tile_rows", tile_rows, why)
        per_tile, inputs = tile_rows // rows, layer.in_channels
    else:
        per_tile, inputs = tile_rows, layer.in_features
    return None if inputs <= per_tile else tile_slices(inputs, per_tile)


def track_bound(adc: ADC, peak: torch.Tensor, momentum: float) -> None:
    """A symmetric range ``[-b, b]``: the first observation sets ``b`` to ``peak``, later ones
    move it by ``momentum`` (the moving max of ``|x|``)."""
    if not adc.calibrated:
        adc.hi.copy_(peak)
        adc.calibrated = True
    else:
        adc.hi.lerp_(peak, momentum)
    adc.lo.copy_(-adc.hi)


class _StraightThrough(torch.autograd.Function):
    """``fn_(y.clone())`` (an in-place map returning where its input was inside the range, or
    None), with the gradient passed straight through where it was."""

    @staticmethod
    def forward(ctx, y, fn_):
        out = y.detach().clone()
        inside = fn_(out)
        ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return (grad if inside is None else grad * inside), None


class TileADC(ADC):
    """The output periphery of a layer's tiles: output noise, then the ADC, per tile.

    Its input is the tiles' partial sums stacked along dim 1, ``(B, T, ...)``. With
    ``ref="normalized"`` (aihwkit's units) each partial sum has its own unit ``u = w_max * s_x``
    (the tile's largest ``|w|`` times the input vector's scale; the layer passes ``u``): it gets
    ``out_noise * u * xi`` (fresh standard normal draws at every forward where ``noisy``), is
    clipped to ``[-out_bound u, out_bound u]`` and, with ``levels``, quantized there
    (``symmetric_quantize``'s grid). Nothing is calibrated: the range is fixed at programming.
    With ``ref="calibrated"`` tile ``t`` has its own bound ``b_out[t]`` (the moving max of its
    ``|y|``, calibrated after programming and tracked while training, as the layer ADC), the
    noise is ``out_noise * b_out * xi`` and the range ``[-b_out, b_out]``. The gradient is
    straight through where the noisy partial sum is inside the range; ``digitize_`` does it in
    place (the layers' fused path, ``tiled_sum``).
    """

    def __init__(
        self,
        tiles: int,
        levels: int | None,
        out_noise: float,
        ref: str = "normalized",
        out_bound: float = 12.0,
        momentum: float = 0.01,
    ):
        super().__init__(levels, momentum=momentum, placement="tile")
        self.tiles, self.out_noise, self.ref, self.out_bound = tiles, out_noise, ref, out_bound
        self.noisy = True  # the layer clears it where no chip reads (a clean validation pass)
        self.register_buffer("lo", torch.zeros(tiles))
        self.register_buffer("hi", torch.zeros(tiles))

    @property
    def enabled(self) -> bool:
        return self.active and (self.levels is not None or self.out_noise > 0)

    @property
    def calibratable(self) -> bool:
        return self.ref == "calibrated"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Ranges of another tiling (a test chip with other tile_rows than trained) do not apply:
        # load as uncalibrated (a chip's ranges are calibrated after programming anyway).
        other = any(
            prefix + k in state_dict and state_dict[prefix + k].shape != (self.tiles,)
            for k in ("lo", "hi")
        )
        for key in ("lo", "hi"):
            if other or prefix + key not in state_dict:
                state_dict[prefix + key] = torch.zeros(self.tiles)
        if other:
            state_dict[prefix + "_calibrated"] = torch.tensor(False)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def _observe(self, y: torch.Tensor, momentum: float) -> None:
        dims = [d for d in range(y.dim()) if d != 1]
        peak = torch.maximum(y.amax(dim=dims), -y.amin(dim=dims)).float()  # (T,)
        track_bound(self, peak, momentum)

    @torch.no_grad()
    def digitize_(
        self, y: torch.Tensor, unit: torch.Tensor | None = None, mask: bool = True
    ) -> torch.Tensor | None:
        """Add the output noise and clip/quantize, in place on ``y``; return where the noisy
        ``y`` was inside the range (None: nothing clips, or ``mask=False``: no gradient to
        pass). ``unit``: the normalized unit of every partial sum, broadcastable against ``y``
        (``ref="normalized"`` only). Each step is one in-place pass over the ``T``-times larger
        tensor of partial sums."""
        noisy = self.out_noise > 0 and self.noisy
        if self.ref == "normalized":
            if noisy:
                y.addcmul_(normal_like(y), unit.to(y.dtype), value=self.out_noise)
            bound = unit * self.out_bound
            if self.levels is None:
                return clip_(y, bound, mask)
            return quantize_(y, bound, self.levels, mask)
        if self.levels is None and not noisy and not (self.training or self.observing):
            return None  # nothing to do: a clean read-out needs no range
        self._update_range(y)
        bound = self.hi.reshape((1, -1) + (1,) * (y.dim() - 2)).to(y.dtype)  # (1, T, 1, ...)
        if noisy:
            y.addcmul_(normal_like(y), bound, value=self.out_noise)
        return None if self.levels is None else quantize_(y, bound, self.levels, mask)

    @torch.no_grad()
    def finish(
        self,
        y: torch.Tensor,
        unit: torch.Tensor | None,
        alpha: torch.Tensor | None = None,
        mask: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tiles' partial sums ``y`` (B, T, ...; or the list of the tiles' ``(B, ...)``)
        through ``digitize_``, times the digital gain ``alpha`` (per tile and output,
        broadcastable), summed over the tiles: ``(sum, inside)``. In normalized units this is one
        fused pass (``cimsim.chip.fused.fused_tail``); ``y`` may be overwritten."""
        if self.ref == "normalized":
            noise = self.out_noise if self.noisy else 0.0
            return fused_tail(
                y, unit, out_noise=noise, bound=self.out_bound, levels=self.levels,
                alpha=alpha, mask=mask,
            )  # fmt: skip
        if not isinstance(y, torch.Tensor):  # the tiles' products given apart
            y = stack_tiles(y)
        inside = self.digitize_(y, unit, mask)
        if alpha is not None:
            y.mul_(alpha)
        return y.sum(dim=1), inside

    def forward(self, y: torch.Tensor, unit: torch.Tensor | None = None) -> torch.Tensor:
        if not self.enabled:
            return y
        return _StraightThrough.apply(y, lambda t: self.digitize_(t, unit))

    def extra_repr(self) -> str:
        return (
            f"tiles={self.tiles}, levels={self.levels}, out_noise={self.out_noise}, "
            f"ref={self.ref!r}, out_bound={self.out_bound}"
        )


@torch.no_grad()
def clip_(y: torch.Tensor, bound: torch.Tensor, mask: bool = True) -> torch.Tensor | None:
    """``y`` clipped in place to ``[-b, b]``; returns where it was inside (``|y| = b`` too), or
    None with ``mask=False``."""
    b = bound.to(y.dtype)
    inside = (y >= -b) & (y <= b) if mask else None
    torch.maximum(y, -b, out=y)
    torch.minimum(y, b, out=y)
    return inside


@torch.no_grad()
def periphery_readout(
    w: torch.Tensor, units: torch.Tensor, adc: TileADC, generator: torch.Generator
) -> torch.Tensor:
    """What a tile's forward gives for one-hot inputs, the read-out aihwkit's drift compensation
    measures (``InferenceTileWithPeriphery._forward_drift_readout_tensor``): input ``e_j`` (its
    own max, so ``s_x = 1``) reads column ``j`` of the tile, ``w_ij / w_max,t``, plus output
    noise, through the ADC; in normalized units, shaped like ``w``.

    Args:
        w: the weights read (C_out, C_in, ...).
        units: each weight's tile ``w_max,t``, broadcastable against ``w``.
        adc: the layer's tile ADC (its ``out_noise``, ``out_bound`` and ``levels``).
        generator: the CPU generator of this read-out's output noise.
    """
    y = (w / units).float()
    if adc.out_noise > 0:
        xi = torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device)
        y.add_(xi, alpha=adc.out_noise)
    bound = torch.full((), adc.out_bound, dtype=y.dtype, device=y.device)
    if adc.levels is None:
        clip_(y, bound)
    else:
        quantize_(y, bound, adc.levels)
    return y


class _TiledSum(torch.autograd.Function):
    """``post_(tile_products(xg, wg))`` of the layer's prepared operands (``_prepare``):
    the tiles' partial sums through ``post_`` (noise, ADC, the sum over tiles; it returns the sum
    and where the gradient passes, or None where it passes everywhere). One node: autograd keeps
    the grouped inputs (and a boolean mask where something clipped), never the ``T``-times larger
    partial sums. The gradient is straight through the DAC and the ADC inside its range: where
    nothing clipped it is the dense product's (the tiles' products add up to it), else the
    grouped product's, masked."""

    @staticmethod
    def forward(ctx, x, weight, layer, levels, peaks, post_):
        ctx.dtypes = (x.dtype, weight.dtype)
        device = x.device.type
        cast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        grads = any(ctx.needs_input_grad[:2])
        with torch.autocast(device, enabled=False):
            xg, wg, w_pad, s = layer._prepare(x.detach(), weight.detach(), levels, peaks)
            if cast is not None:  # the products run (and are saved) in autocast's dtype
                xg, wg, w_pad = xg.to(cast), wg.to(cast), w_pad.to(cast)
            products = layer._tile_products(xg, wg)  # T x (B, C_out, ...)
            out, inside = post_(products, xg, wg, s, grads)
        ctx.dense = inside is None
        ctx.save_for_backward(xg, w_pad if ctx.dense else wg, inside)
        ctx.layer = layer
        return out

    @staticmethod
    def backward(ctx, grad):
        xg, w, inside = ctx.saved_tensors
        layer, needs = ctx.layer, ctx.needs_input_grad[:2]
        if ctx.dense:
            gx, gw = layer._dense_backward(grad.to(xg.dtype), xg, w, needs)
        else:  # in the partial sums' own layout (channels-last for a conv): no reordering copy
            g = grad.unsqueeze(1).to(xg.dtype)
            g = torch.mul(g, inside, out=torch.empty_like(inside, dtype=g.dtype))
            gx, gw = layer._products_backward(g, xg, w, needs)
        gx, gw = layer._ungroup(gx), layer._ungroup(gw)
        gx = None if gx is None else gx.to(ctx.dtypes[0])
        gw = None if gw is None else gw.to(ctx.dtypes[1])
        return gx, gw, None, None, None, None


def tiled_sum(x, weight, layer, levels, peaks, post_) -> torch.Tensor:
    """The layer's output before the bias: every tile's partial sums (``layer._tile_products``
    of its ``_prepare``d operands, the list of the tiles' ``(B, C_out, ...)``) through
    ``post_(y, xg, wg, s, grads)``, which returns their sum over the tiles and where the
    gradient passes (None: everywhere, or no gradient wanted). ``levels``: the per-vector DAC's
    (None: none); ``peaks``: whether ``post_`` needs the input vectors' scales ``s``."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _TiledSum.apply(x, weight, layer, levels, peaks, post_)
    with torch.no_grad():  # no mask to build: the tiles' products apart (``_tile_products``)
        xg, wg, _, s = layer._prepare(x, weight, levels, peaks, apart=True)
        return post_(layer._tile_products(xg, wg), xg, wg, s, False)[0]
