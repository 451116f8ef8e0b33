"""The noise of every crossbar read-out: output noise draws and aihwkit's PCM_READ weight read
noise, drawn over the tiles' partial sums (``cimsim.chip.periphery``)."""

from __future__ import annotations

import torch

from cimsim.chip.draws import normal_like


@torch.no_grad()
def read_noise(y_part: torch.Tensor, squares: torch.Tensor, w_max: torch.Tensor, scale: float):
    """aihwkit's PCM_READ short-term weight noise of one tile's partial sums: standard normal
    draws times ``scale * sqrt(w_max * sum_j |w_ij| x_j^2)`` (``squares`` is that sum, the tile's
    product of ``|W|`` with ``x^2``), i.e. ``scale * sqrt(sum_j |w_ij / w_max| x_j^2)`` in units of
    the tile's ``w_max``, fresh at every call. A constant for autograd."""
    std = squares.clamp_min(0.0).mul_(w_max.to(squares.dtype)).sqrt_().mul_(scale)
    return normal_like(y_part).mul_(std)
