"""Counter-based Gaussian draws for the crossbar's read-outs (the tiles' fused tail computes them).

Every partial sum of every tile gets its own output-noise draw, so the draws (``T`` times a
layer's outputs) and the elementwise passes over them were most of the periphery's cost. Here a
draw is a pure function of a 64-bit key and the element's logical index: SplitMix64 (Steele et
al., OOPSLA 2014; the ``splitmix64`` generator of Vigna's xoshiro reference) turns
``key + (i + 1) * gamma`` into 64 random bits, whose two halves are the uniforms of one
Box-Muller draw. The tiles' output noise uses both draws of each pair: along the tile dim,
coordinates ``2k`` and ``2k + 1`` take ``r cos(2 pi u2)`` and ``r sin(2 pi u2)`` of the counter of
``2k`` (``paired``), so a pass over two tiles' partial sums hashes and takes the log once. So

* the values depend on the key and the tensor's shape only: not on the thread count, the memory
  layout (channels-last or not), the chunking or the device;
* the draws are an elementwise expression of the index: ``torch.compile`` fuses them into the
  pass that uses them (``cimsim.chip.fused``), computed in registers and never stored; small
  tensors, other devices and machines where compilation fails run the same expression eagerly
  (the same values). Compiled, SplitMix64's counter ``key + (i + 1) * gamma`` is written as
  ``key + gamma`` plus one term ``j_d * (s_d * gamma)`` per dimension ``d`` (``j_d`` the
  element's coordinate, ``s_d`` the row-major stride): the same 64-bit value, since the
  counter is linear in ``i`` modulo 2^64, but a pass that runs in another memory order
  (channels-last) then computes it with vector arithmetic instead of a scalar index per element.

The key of each call comes from the global generator of the tensor's device (one draw), so a run
is reproducible from its seed like any ``torch.randn``.
"""

from __future__ import annotations

import math

import torch

from cimsim.chip import compiled

_U64 = 1 << 64


def _signed(v: int) -> int:
    """A 64-bit unsigned constant as the int64 with the same bits."""
    return v - _U64 if v >= 1 << 63 else v


_GAMMA = _signed(0x9E3779B97F4A7C15)  # SplitMix64's increment (the golden ratio in 64 bits)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)
_LOW32 = (1 << 32) - 1
_TWO_PI = 2.0 * math.pi
_QUARTER = float(torch.tensor(math.pi / 2, dtype=torch.float32))  # pi/2 in float32
# No draw exceeds this in magnitude: Box-Muller's radius is at most sqrt(-2 ln 2^-32), since
# u1 >= 2^-32 (6.6604...; the cosine's factor is at most 1, and float32 rounding adds < 1e-6).
Z_MAX = 6.661
EAGER_CHUNK = 1 << 20  # draws per eager chunk (a compiled pass computes them in registers)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _counters(key, shape: torch.Size, device, fixed: dict | None = None, paired: int | None = None):
    """SplitMix64's counters ``key + (i + 1) * gamma`` of the row-major ``shape`` (int64,
    wrapping), as a broadcast sum of one term per dimension (see the module docstring). ``key``
    is ``(2,)``: the stream's key and gamma (a tensor, so that a compiler cannot fold the
    wrapping products into its 64-bit index arithmetic). ``fixed`` maps dims to a coordinate:
    those dims are dropped from the result (``[:, t]`` for ``{1: t}``), their terms start the
    sum, so that the expressions of different coordinates share no prefix (a compiler would
    store a shared one). ``paired``: along this dim, coordinates ``2k`` and ``2k + 1`` both get
    the counter of ``2k`` (a fixed coordinate there is rounded down to even too)."""
    fixed = fixed or {}
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    z = key[0] + key[1]
    for d, at in fixed.items():
        z = z + key[1] * ((at - at % 2 if d == paired else at) * strides[d])
    free = [d for d in range(len(shape)) if d not in fixed]
    z = z.reshape((1,) * len(free))
    for e, d in reversed(list(enumerate(free))):
        index = torch.arange(shape[d], device=device, dtype=torch.int64)
        if d == paired:
            index = index - index % 2
        term = index * (key[1] * strides[d])
        z = z + term.reshape([-1 if f == e else 1 for f in range(len(free))])
    return z


def _box_muller(z: torch.Tensor, phase=None) -> torch.Tensor:
    """The standard normal draw of each SplitMix64 counter ``z``, float32: SplitMix64's mix gives
    64 bits, Box-Muller turns their high 32 bits (``u1`` in ``(0, 1]``) and low 32 bits (``u2``
    in ``[0, 1)``) into ``sqrt(-2 ln u1) cos(2 pi u2)``; with ``phase`` pi/2 (a float or a
    float32 tensor of 0 and pi/2), its other draw ``sqrt(-2 ln u1) cos(2 pi u2 - pi/2)``, i.e.
    ``... sin(2 pi u2)``: the two are independent standard normals (Box and Muller, 1958)."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    u1 = (_shr(z, 32) + 1).to(torch.float32) * 2.0**-32
    u2 = (z & _LOW32).to(torch.float32) * 2.0**-32
    angle = _TWO_PI * u2 if phase is None else _TWO_PI * u2 - phase
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(angle)


def _phases(n: int, device) -> torch.Tensor:
    """The Box-Muller phase of coordinates ``0 .. n-1`` of a paired dim: 0, pi/2, 0, pi/2, ..."""
    return (torch.arange(n, device=device) % 2).to(torch.float32) * _QUARTER


def _gaussian(
    key: torch.Tensor, shape: torch.Size, device, dtype=torch.float32, paired: int | None = None
) -> torch.Tensor:
    """Standard normal draws of stream ``key``, element ``i`` of the row-major ``shape`` from
    counter ``i``; with ``paired`` (a dim), coordinates ``2k`` and ``2k + 1`` along it are the two
    draws of one Box-Muller pair, at the counter of ``2k`` (half the hashes and logarithms).
    Compiled, an expression of the element's coordinates (fused into the pass that uses it, in
    that pass's memory order); eagerly, in chunks of ``EAGER_CHUNK`` draws along the row-major
    index (the same values; the int64 intermediates stay small)."""
    if torch.compiler.is_compiling():
        phase = None
        if paired is not None:
            phase = _phases(shape[paired], device).reshape(
                [-1 if d == paired else 1 for d in range(len(shape))]
            )
        return _box_muller(_counters(key, shape, device, paired=paired), phase).to(dtype)
    count = math.prod(shape)
    out = torch.empty(count, device=device, dtype=dtype)
    for start in range(0, count, EAGER_CHUNK):
        index = torch.arange(start, min(start + EAGER_CHUNK, count), device=device)
        phase = None
        if paired is not None:
            stride = math.prod(shape[paired + 1 :])
            odd = (index // stride) % shape[paired] % 2
            index, phase = index - odd * stride, odd.to(torch.float32) * _QUARTER
        out[start : start + index.numel()] = _box_muller(key[0] + (index + 1) * key[1], phase)
    return out.view(shape)


def _gaussian_at(key: torch.Tensor, shape: torch.Size, dim: int, at: int, device, dtype):
    """``_gaussian(key, shape, ..., paired=dim).select(dim, at)``; compiled, from that slice's
    coordinates alone (each slice its own expression, fused into its user; the two slices of a
    pair share their hash and logarithm within the pass)."""
    if torch.compiler.is_compiling():
        phase = _QUARTER if at % 2 else None
        z = _counters(key, shape, device, {dim: at}, paired=dim)
        return _box_muller(z, phase).to(dtype)
    return _gaussian(key, shape, device, dtype, paired=dim).select(dim, at)


def new_key(device: torch.device | str = "cpu") -> torch.Tensor:
    """A fresh stream from the global generator of ``device``: ``(2,)`` int64 on it, a random
    64-bit key and SplitMix64's gamma."""
    device = torch.device(device)
    key = torch.randint(-(1 << 63), (1 << 63) - 1, (1,), dtype=torch.int64, device=device)
    return torch.cat([key, torch.tensor([_GAMMA], device=device)])


def stream(key: int) -> torch.Tensor:
    """The stream of a given 64-bit ``key`` (e.g. derived from a chip seed), as ``new_key``."""
    return torch.tensor([_signed(key % _U64), _GAMMA], dtype=torch.int64)


def normal_like(y: torch.Tensor, key: torch.Tensor | None = None) -> torch.Tensor:
    """Standard normal draws shaped like ``y`` (its dtype and device, a dense tensor), from
    stream ``key`` (a fresh one from the global generator when None)."""
    key = new_key(y.device) if key is None else key.to(y.device)
    return compiled.run(_gaussian, y, key, y.shape, y.device, y.dtype)
