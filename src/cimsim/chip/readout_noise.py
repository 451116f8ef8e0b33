"""The noise of every crossbar read-out: output noise draws and aihwkit's PCM_READ weight read
noise, drawn over the tiles' partial sums (``cimsim.chip.periphery``)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

# Gaussian draws on the CPU: torch's normal_ runs on one thread (one Mersenne-Twister stream),
# and the tiles' output noise needs one draw per partial sum (T times the layer's outputs). Large
# draws are split into a fixed number of chunks, each with its own generator seeded from the
# global one, filled in parallel where threads allow and one after another where they do not:
# the values depend on the global seed and the size only, never on the thread count.
_CHUNKS = 8
_PARALLEL_MIN = 1 << 20
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _fill(part: tuple[torch.Tensor, int]) -> None:
    with torch.no_grad():
        part[0].normal_(generator=torch.Generator().manual_seed(part[1]))


def _normal_(flat: torch.Tensor) -> torch.Tensor:
    """``flat.normal_()`` (a contiguous 1-D tensor); on the CPU, when large, in ``_CHUNKS``
    chunks seeded from the global generator (in parallel on up to ``_CHUNKS`` threads)."""
    if flat.device.type != "cpu" or flat.numel() < _PARALLEL_MIN:
        return flat.normal_()
    global _pool, _pool_size
    seeds = torch.randint(0, 2**62, (_CHUNKS,)).tolist()  # from the global generator
    parts = list(zip(flat.chunk(_CHUNKS), seeds, strict=True))
    threads = min(torch.get_num_threads(), _CHUNKS)
    if threads < 2:
        for part in parts:
            _fill(part)
        return flat
    if _pool is None or _pool_size < threads:
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cimsim-randn")
        _pool_size = threads
    list(_pool.map(_fill, parts))
    return flat


def dense_randn_like(y: torch.Tensor) -> torch.Tensor:
    """Standard normal draws shaped and laid out like ``y`` (e.g. channels-last), drawn over its
    storage in memory order: ``normal_`` on a permuted layout takes a slow strided path."""
    out = torch.empty_like(y)  # same strides as a dense y
    _normal_(out.as_strided((out.numel(),), (1,)))
    return out


@torch.no_grad()
def read_noise(y_part: torch.Tensor, squares: torch.Tensor, w_max: torch.Tensor, scale: float):
    """aihwkit's PCM_READ short-term weight noise of one tile's partial sums: standard normal
    draws times ``scale * sqrt(w_max * sum_j |w_ij| x_j^2)`` (``squares`` is that sum, the tile's
    product of ``|W|`` with ``x^2``), i.e. ``scale * sqrt(sum_j |w_ij / w_max| x_j^2)`` in units of
    the tile's ``w_max``, fresh at every call. A constant for autograd."""
    std = squares.clamp_min(0.0).mul_(w_max.to(squares.dtype)).sqrt_().mul_(scale)
    return dense_randn_like(y_part).mul_(std)
