"""The tiles' periphery in single passes: inputs (per-vector DAC, grouping into tiles, the input
vectors' scales) and outputs (output noise, ADC, the digital gain and the sum over tiles).

Every tile's partial sums ``(B, T, C_out, ...)`` get output noise (``cimsim.chip.draws``'
counter-based draws, computed in the pass), are clipped or digitized by the tile's ADC, scaled
by the drift compensation and summed over the tiles: one elementwise expression over the
``T``-times larger tensor, compiled into one pass where it pays (``cimsim.chip.compiled``). The
pass runs in the partial sums' memory order (a conv's are channels-last: ``(B, H, W, T, C)``),
so it reads them once, in order, and writes the sum in the same layout; the draws still follow
the logical index. The partial sums come as the list of the tiles' ``(B, C_out, ...)`` (a conv's
from ``T`` dense convolutions, faster than one grouped one; a stacked tensor is unbound), summed
by the tail with no stacking copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cimsim.chip import compiled
from cimsim.chip.draws import Z_MAX, _gaussian, _gaussian_at, new_key


def _grid(y, b, levels: int):
    """``y`` on ``levels`` uniform values over ``[-b, b]`` (``periphery.quantize_``'s grid)."""
    c = (levels - 1) / 2
    k = torch.clamp(torch.round(y * (c / b) + c), 0, levels - 1)
    return (k - c) / c * b


def _noisy(y, unit, noise, out_noise, bound, order: tuple):
    """``y`` plus its output noise (``noise``: the standard draws shaped like ``y``, or None) and
    the ADC's bound ``b = bound * unit``, both with their dims in ``order`` (``y``'s memory
    order: ``y.permute(order)`` is contiguous)."""
    y, unit = y.permute(order), unit.permute(order)
    if noise is not None:
        y = y + noise.permute(order) * (unit * out_noise)
    return y, (unit * bound).clamp_min(torch.finfo(torch.float32).tiny)


def _draws(key, shape, y):
    """The standard draws of stream ``key`` over the partial sums' ``shape`` ``(B, T, ...)``,
    paired over the tiles (tiles ``2k`` and ``2k + 1`` share a Box-Muller pair); None without a
    key."""
    return None if key is None else _gaussian(key, shape, y.device, y.dtype, paired=1)


def _adc(noisy, b, levels):
    """The tile ADC: ``noisy`` clipped to ``[-b, b]`` and, with ``levels``, on its grid."""
    return torch.minimum(torch.maximum(noisy, -b), b) if levels is None else _grid(noisy, b, levels)


def _tile_draws(key, shape, t, eager, y):
    """Tile ``t``'s standard draws of the stacked ``shape`` (``eager``: all of them, computed
    once outside a compiled pass); None without a key."""
    if key is None:
        return None
    if eager is not None:
        return eager.select(1, t)
    return _gaussian_at(key, shape, 1, t, y.device, y.dtype)


def _tail(ys, unit, key, out_noise, bound, levels, alpha, count: bool, order: tuple):
    """The tile tail as one expression over the ``T`` tiles' partial sums ``ys[t]`` ``(B, C_out,
    ...)``, each in memory order ``order``: ``y`` plus ``out_noise * unit * xi``, clipped to
    ``[-b, b]`` with ``b = bound * unit`` and, with ``levels``, on its grid (see
    ``cimsim.chip.periphery.quantize_``), times ``alpha``, summed over the tiles; ``unit`` and
    ``alpha`` keep the tile dim (1). The draws are those of the stacked ``(B, T, C_out, ...)``.
    With ``count``, also how many of each output's partial sums may have fallen outside
    ``[-b, b]``: those with ``|y| > b - Z_MAX * out_noise * unit`` (no draw is larger than
    ``Z_MAX``; less a relative 2^-20 for rounding), a bound computed from ``y`` alone, so that
    the noisy partial sums have one user and stay in registers. The results are views in
    logical order."""
    shape = ys[0].shape[:1] + (len(ys),) + ys[0].shape[1:]
    eager = None if torch.compiler.is_compiling() else _draws(key, shape, ys[0])  # once
    total, outside = None, None
    for t, y in enumerate(ys):
        u = _tile(unit, t)
        xi = _tile_draws(key, shape, t, eager, y)
        noisy, b = _noisy(y, u, xi, out_noise, bound, order)
        q = _adc(noisy, b, levels)
        if alpha is not None:
            q = q * _tile(alpha, t).permute(order)
        total = q if total is None else total + q
        if count:
            margin = b * (1 - 2**-20)  # and float32 rounding of the noisy sum
            if key is not None:
                margin = margin - u.permute(order) * (Z_MAX * out_noise)
            out = (y.permute(order).abs() > margin).to(torch.float32)
            outside = out if outside is None else outside + out
    back = [order.index(d) for d in range(len(order))]
    return total.permute(back), None if outside is None else outside.permute(back)


def _tile(t: torch.Tensor, i: int) -> torch.Tensor:
    """Tile ``i``'s slice of a per-tile tensor (dim 1, of size ``T`` or 1)."""
    return t.select(1, i if t.shape[1] > 1 else 0)


def _inside(ys, unit, key, out_noise, bound, order: tuple):
    """Where ``_tail``'s noisy partial sums were inside ``[-b, b]`` (the same draws): a bool
    ``(B, T, C_out, ...)`` laid out with the tiles just outside the innermost dim of ``order``
    (a conv's channels-last ``(B, H, W, T, C)``: its grouped layout)."""
    shape = ys[0].shape[:1] + (len(ys),) + ys[0].shape[1:]
    eager = None if torch.compiler.is_compiling() else _draws(key, shape, ys[0])
    masks = []
    for t, y in enumerate(ys):
        noisy, b = _noisy(
            y, _tile(unit, t), _tile_draws(key, shape, t, eager, y), out_noise, bound, order
        )
        masks.append((noisy >= -b) & (noisy <= b))
    return _stacked(masks, order)


def _stacked(parts: list, order: tuple) -> torch.Tensor:
    """The tiles' ``parts`` (each permuted to ``order``) as ``(B, T, C_out, ...)``, laid out with
    the tiles just outside the innermost dim of ``order``."""
    inner = len(order) - 1
    stacked = torch.stack(parts, dim=inner)  # dims: order's, the tiles before the innermost
    dims = [d + (d >= 1) for d in order]  # the parts' dims among (B, T, C_out, ...)
    dims.insert(inner, 1)
    return stacked.permute([dims.index(d) for d in range(len(dims))])


def stack_tiles(ys: list[torch.Tensor]) -> torch.Tensor:
    """The tiles' partial sums ``ys[t]`` ``(B, C_out, ...)`` as one ``(B, T, C_out, ...)``, in
    their grouped layout (a conv's channels-last ``(B, H, W, T, C)``: what the grouped
    product gives, so its backward reshapes it without a copy)."""
    order = _memory_order(ys[0])
    return _stacked([y.permute(order) for y in ys], order)


def _memory_order(y: torch.Tensor) -> tuple[int, ...]:
    """``y``'s dims from the outermost to the innermost in memory."""
    return tuple(sorted(range(y.dim()), key=lambda d: -y.stride(d)))


@torch.no_grad()
def fused_tail(
    y: torch.Tensor | list[torch.Tensor],
    unit: torch.Tensor,
    *,
    out_noise: float,
    bound: float,
    levels: int | None,
    alpha: torch.Tensor | None = None,
    key: torch.Tensor | None = None,
    mask: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every tile's output periphery and the digital sum, in one pass where it compiles.

    Args:
        y: the tiles' partial sums ``(B, T, C_out, ...)``, or the list of the ``T`` tiles'
            ``(B, C_out, ...)`` (as separate products give them: no stacking copy).
        unit: the unit of each partial sum, broadcastable against ``(B, T, C_out, ...)``:
            aihwkit's normalized ``w_max * s_x``, or a calibrated ``b_out`` per tile (with
            ``bound=1``).
        out_noise: the output noise std in units of ``unit`` (0: none).
        bound: the ADC range ``[-bound * unit, bound * unit]``; values outside clip.
        levels: the ADC's number of levels (None: clip only).
        alpha: a gain on each digitized partial sum (drift compensation), broadcastable.
        key: the stream of the output noise (a fresh one from the global generator when None).
            The draws follow the ``(B, T, C_out, ...)`` index either way.
        mask: also say where the noisy partial sums were inside the range (the gradient's
            mask): computed only when some value may have clipped.

    Returns:
        ``(sum over tiles, inside)``: ``inside`` is None when nothing can have clipped (no
        partial sum within ``Z_MAX`` noise stds of the range's ends) or ``mask`` is false. The
        mask, when needed, is a second pass over the same draws (a counter-based stream replays
        exactly), so the common case writes nothing ``T`` times larger.
    """
    ys = list(y.unbind(1)) if isinstance(y, torch.Tensor) else list(y)
    first = ys[0]
    noise_key = None
    if out_noise > 0:
        noise_key = new_key(first.device) if key is None else key.to(first.device)
    dtype = torch.float32 if first.dtype in (torch.float16, torch.bfloat16) else first.dtype
    work = [p.to(dtype) for p in ys]
    order = _memory_order(work[0])
    unit = _to_rank(unit.to(dtype), first.dim() + 1)
    alpha = None if alpha is None else _to_rank(alpha.to(dtype), first.dim() + 1)
    args = (work, unit, noise_key, float(out_noise), float(bound))
    size = first.numel() * len(ys)  # the pass's work: every tile's partial sums
    out, outside = compiled.run(_tail, first, *args, levels, alpha, mask, order, numel=size)
    inside = None
    if mask and bool(outside.any()):
        inside = compiled.run(_inside, first, *args, order, numel=size)
    return out.to(first.dtype), inside


def _to_rank(t: torch.Tensor, dims: int) -> torch.Tensor:
    """``t`` with leading size-1 dims up to ``dims`` (broadcasting's alignment, explicit so that
    it can be permuted with ``y``)."""
    return t.reshape((1,) * (dims - t.dim()) + tuple(t.shape))


def _group(x, sizes: tuple, levels, pool, peaks: bool, channels_last: bool, apart: bool = False):
    """``group_inputs`` as one expression: one read of ``x`` for each pixel's max ``|x|`` per
    tile (the vector's, for a Linear), another for the grouped, quantized inputs."""
    width, parts, pixels, start = max(sizes), [], [], 0
    for size in sizes:
        part = x.narrow(1, start, size)
        start += size
        pixel = part.abs().amax(dim=1, keepdim=True)  # (B, 1, ...): each pixel's max |x|
        pixels.append(pixel)
        if levels is not None:  # the per-vector DAC: the image's (vector's) max |x| in the tile
            b = pixel.amax(dim=tuple(range(2, x.dim())), keepdim=True) if x.dim() > 2 else pixel
            part = _grid(part, torch.where(b > 0, b, torch.ones_like(b)), levels)
        if size < width:
            part = F.pad(part, [0, 0] * (x.dim() - 2) + [0, width - size])
        parts.append(part)
    if apart:  # each group contiguous in its own layout (a product copies a strided one)
        layout = torch.channels_last if channels_last else torch.contiguous_format
        xg = [part.contiguous(memory_format=layout) for part in parts]
    else:
        xg = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if channels_last:
            xg = xg.contiguous(memory_format=torch.channels_last)
    if not peaks:
        return xg, None
    m = torch.cat(pixels, dim=1) if len(pixels) > 1 else pixels[0]  # (B, T, ...)
    if pool is not None:  # a conv's vector: the patch of one output position (zeros padded)
        kernel, stride, pads, dilation = pool
        m = F.max_pool2d(F.pad(m, pads), kernel, stride, 0, dilation)
    m = m.unsqueeze(2)
    return xg, torch.where(m > 0, m, torch.ones_like(m))


@torch.no_grad()
def group_inputs(
    x: torch.Tensor,
    sizes: tuple[int, ...],
    levels: int | None,
    pool: tuple | None = None,
    peaks: bool = True,
    channels_last: bool = False,
    apart: bool = False,
) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor | None]:
    """A layer's inputs as ``T`` equal groups of input lines (dim 1), in one pass where it pays.

    Args:
        x: ``(B, C_in)`` or ``(B, C_in, H, W)``.
        sizes: the tiles' numbers of input lines, in order (their sum is ``C_in``); the smaller
            ones are padded with zero lines to the largest.
        levels: the per-vector DAC's levels (each tile's slice of each vector on ``levels``
            values over ``+-`` its max ``|x|``, a zero vector's max read as 1); None: exact.
        pool: a conv's ``(kernel, stride, pads, dilation)`` (``pads`` as ``F.pad``'s, the last
            dim first): the scale of each output position's patch is the max over its window of
            the zero-padded input; None for a Linear.
        peaks: whether to return the scales (each vector's max ``|x|`` before the DAC, as
            aihwkit's ``abs_max`` noise management divides it).
        channels_last: lay the grouped conv input out channels-last.
        apart: return the ``T`` groups as a list of ``(B, w, ...)`` tensors, each contiguous
            (for ``T`` separate products), instead of one tensor.

    Returns:
        ``(xg, s)``: ``xg`` ``(B, T*w, ...)`` (or its ``T`` groups); ``s`` each vector's max
        ``|x|`` per tile before the DAC, ``(B, T, 1, ...)`` (zeros read as 1), or None.
    """
    args = (tuple(sizes), levels, pool, peaks, channels_last, apart)
    return compiled.run(_group, x, x, *args)
