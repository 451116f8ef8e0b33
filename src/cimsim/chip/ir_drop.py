"""aihwkit's IR drop of a crossbar tile's outputs (``AnalogConfig.ir_drop``, ``ir_drop_g_ratio``).

The steady-state voltage drop along each output wire of a tile, as aihwkit 1.2.0's C++ forward
pass models it (``src/rpucuda/rpu_forward_backward_pass.cpp``, ``applyIrDrop``, called from
``applyNonIdealities`` right after the analog product, before the weight read noise, the output
noise and the ADC). In the tile's normalized units (weights over the tile's ``w_max = max |W|``,
inputs over their scale ``s_x``; the weights in ``[-1, 1]``, the inputs too except on a conv, whose
DAC grid is its image's and ``s_x`` its patch's raw max, so a rounded-up input can exceed 1 by
half a DAC step over ``s_x``), for output ``i`` of an ``n``-row tile:

    a_i = n / g_ratio * sum_j |w_ij| |x_j|                  (the output's total input current)
    c_i = a_i (a_i (0.05 a_i - 0.2) + 0.5)                  (aihwkit's fit of the drop to it)
    y_i = sum_j w_ij x_j - ir_drop * c_i * sum_j w_ij x_j (1 - (1 - j / n)^2)

with ``j = 0 .. n-1`` the tile's rows in order (a conv's ``(channel, kh, kw)`` order, torch's
unfold), so the first row gets no drop and the last the most (aihwkit's docstring says the
first input is the farthest from the output; its code does the opposite, and this follows the
code). In physical units the drop is ``u`` times the normalized one (``u = w_max * s_x``, the
output unit of ``cimsim.chip.periphery``), and ``a_i`` is the physical ``sum_j |w_ij| |x_j|``
over ``u``: the two sums are two more grouped products of the tiles (a conv's as grouped
convolutions, no im2col), since the row profile ``1 - (1 - j/n)^2`` is a weight on each row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# aihwkit's IOParameters.ir_drop_g_ratio: wire conductance from one cell to the next over the
# device's max conductance, 1 / 0.35 Ohm / 5e-6 S (C++ ``ir_drop_Gw_div_gmax = 5.7143e5``).
DEFAULT_G_RATIO = 1.0 / 0.35 / 5e-6


def drop_coefficient(a: torch.Tensor) -> torch.Tensor:
    """aihwkit's ``c(a) = a (a (0.05 a - 0.2) + 0.5)`` of the normalized current ``a``
    (increasing in ``a``: its derivative ``0.15 a^2 - 0.4 a + 0.5`` has no real root)."""
    return torch.mul(a, 0.05).sub_(0.2).mul_(a).add_(0.5).mul_(a)  # one temporary


def row_profile(rows: list[int], width: int, **like) -> torch.Tensor:
    """``(T, width)``: ``1 - (1 - j / n_t)^2`` for row ``j < n_t`` of tile ``t`` (``n_t`` rows),
    0 on the zero rows that pad a smaller tile to ``width``."""
    j = torch.arange(width, **like)
    n = torch.tensor(rows, **like).unsqueeze(1)
    profile = 1 - (1 - j / n).square()
    return torch.where(j < n, profile, torch.zeros_like(profile))


def tile_rows_of(wg: torch.Tensor, tiles: list[slice] | None) -> tuple[list[int], int, int]:
    """``(rows per tile, rows per input line, tiles)`` of grouped weights: a Linear's
    ``(C_out, T, width)`` (a line is a row) or a conv's ``(T * C_out, width, kh, kw)`` (a line is
    an input channel of ``kh * kw`` rows); ``tiles`` the layer's input slices (None: one tile)."""
    per_line = 1 if wg.dim() == 3 else wg[0, 0].numel()
    width = wg.shape[2] if wg.dim() == 3 else wg.shape[1]
    lines = [sl.stop - sl.start for sl in tiles] if tiles else [width]
    return [k * per_line for k in lines], per_line, len(lines)


def profiled_weights(wg: torch.Tensor, tiles: list[slice] | None) -> torch.Tensor:
    """``wg`` with each tile row's weight times its ``row_profile``, in ``wg``'s layout."""
    rows, per_line, count = tile_rows_of(wg, tiles)
    if wg.dim() == 3:  # Linear (C_out, T, width)
        profile = row_profile(rows, wg.shape[2], dtype=wg.dtype, device=wg.device)
        return wg * profile.unsqueeze(0)
    width, kernel = wg.shape[1], wg.shape[2:]  # conv (T * C_out, width, kh, kw)
    profile = row_profile(rows, width * per_line, dtype=wg.dtype, device=wg.device)
    profile = profile.reshape(count, 1, width, *kernel)
    out = torch.empty_like(wg)  # wg's memory format (channels-last for the grouped conv)
    per_tile = (count, -1, width, *kernel)
    torch.mul(wg.reshape(per_tile), profile, out=out.view(per_tile))
    return out


def ir_drop(
    current: torch.Tensor,
    weighted: torch.Tensor,
    units: torch.Tensor,
    rows: torch.Tensor,
    scale: float,
    g_ratio: float = DEFAULT_G_RATIO,
) -> torch.Tensor:
    """The drop to subtract from each partial sum, in its physical units (the formula above).

    Args:
        current: ``sum_j |w_ij| |x_j|`` of every partial sum, physical units, ``(B, T, C_out,
            ...)``.
        weighted: ``sum_j w_ij x_j (1 - (1 - j / n_t)^2)``, physical units, same shape.
        units: each partial sum's normalized unit ``u = w_max,t s_x``, broadcastable.
        rows: each tile's row count ``n_t``, broadcastable (``(1, T, 1, ...)``).
        scale: ``ir_drop`` (aihwkit's scale of the drop; 0 is none).
        g_ratio: ``ir_drop_g_ratio``, wire over max device conductance.
    """
    a = torch.div(current, units.to(current.dtype)).mul_(rows.to(current.dtype) / g_ratio)
    return drop_coefficient(a).mul_(weighted).mul_(scale)


@torch.no_grad()
def apply_ir_drop_(
    y: torch.Tensor,
    xg: torch.Tensor,
    wg: torch.Tensor,
    products: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    units: torch.Tensor,
    tiles: list[slice] | None,
    scale: float,
    g_ratio: float = DEFAULT_G_RATIO,
) -> torch.Tensor:
    """Every tile's partial sums ``y`` ``(B, T, C_out, ...)`` less their IR drop, in place; a
    constant for autograd (as in aihwkit, whose backward pass is the ideal transposed product).

    Args:
        y: the tiles' partial sums of ``products(xg, wg)``.
        xg, wg: the grouped inputs (after the DAC) and weights (as read) of the layer's tiles.
        products: the layer's grouped product, ``(xg, wg) -> (B, T, C_out, ...)``.
        units: each partial sum's normalized unit ``w_max,t s_x``, broadcastable against ``y``.
        tiles: the layer's input slices (None: the layer is one tile).
        scale, g_ratio: ``ir_drop`` and ``ir_drop_g_ratio``.

    Costs two grouped products (``|x| |W|`` and ``x`` times the profiled ``W``) and their
    ``T``-times larger outputs.
    """
    xg, wg = xg.detach(), wg.detach()
    current = products(xg.abs(), wg.abs())
    weighted = products(xg, profiled_weights(wg, tiles))
    rows, _, count = tile_rows_of(wg, tiles)
    n = torch.tensor(rows, dtype=current.dtype, device=current.device)
    n = n.reshape((1, count) + (1,) * (y.dim() - 2))
    units = units.reshape((1,) * (y.dim() - units.dim()) + units.shape)
    # Elementwise passes in memory order (a conv's partial sums are channels-last): all alike
    order = sorted(range(y.dim()), key=lambda d: -y.stride(d))
    y_, current, weighted, units, n = (t.permute(order) for t in (y, current, weighted, units, n))
    y_.sub_(ir_drop(current, weighted, units, n, scale, g_ratio))
    return y
