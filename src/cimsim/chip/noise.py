"""The perturbation model as plain functions (docs/model.md, "The perturbation").

A stored tensor ``p`` becomes ``p + r(p) * (mu + sigma * eps)`` where ``r`` is its range,
``eps`` zero-mean unit-variance draws, ``mu`` the mean shift and ``sigma`` the relative std.
Everything here is detached: the perturbation is a constant for autograd, so the gradient of
``J(w + nu)`` reaches the clean ``w`` unchanged (the aihwkit trick).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_SQRT3 = math.sqrt(3.0)


def _span(lo: torch.Tensor, hi: torch.Tensor, scale: str) -> torch.Tensor:
    """The range of values spanning ``[lo, hi]``: (hi - lo) / 2, or max(|lo|, |hi|)."""
    if scale == "half_range":
        return (hi - lo) * 0.5
    if scale == "abs_max":
        return torch.maximum(-lo, hi).clamp_min(0.0)
    raise ValueError(f"scale={scale!r} is invalid: allowed values are 'half_range', 'abs_max'")


def _extremes(p: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of ``p``: 0-d, or (C_out,) per output channel. One pass over ``p``."""
    flat = p.reshape(p.shape[0], -1) if per_channel else p.reshape(1, -1)
    lo, hi = torch.aminmax(flat, dim=1)
    return (lo, hi) if per_channel else (lo.reshape(()), hi.reshape(()))


def _as_weight(r: torch.Tensor, p: torch.Tensor, per_channel: bool) -> torch.Tensor:
    return r.reshape((-1,) + (1,) * (p.dim() - 1)) if per_channel else r


@torch.no_grad()
def tensor_range(p: torch.Tensor, scale: str, per_channel: bool = False) -> torch.Tensor:
    """The range ``r`` that noise is relative to.

    Args:
        p: the stored tensor, output channels first: (C_out, ...).
        scale: ``half_range`` = (max - min) / 2, or ``abs_max`` = max |p|.
        per_channel: one range per output channel instead of one per tensor.

    Returns:
        A 0-d tensor, or (C_out, 1, ..., 1) with ``per_channel``, broadcastable against ``p``.
    """
    return _as_weight(_span(*_extremes(p, per_channel), scale), p, per_channel)


@torch.no_grad()
def noise_scales(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: str,
    per_channel: bool = False,
    bias_mode: str = "separate",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The noise scales of a weight and its bias under a bias mapping (``AnalogConfig.bias``).

    ``separate`` is the authors' bi-scale mapping (``match_range`` in their
    ``networks/noisy_layers.py``): the crossbar stores the augmented row ``[W, b/f]`` with
    ``f = r(b) / r(W)``, so both share the scale of the union ``R = r(concat(W, b/f))``: W is
    perturbed relative to ``R`` and b relative to ``R * f``. When ``r(W)`` or ``r(b)`` is 0 there
    is nothing to match and each tensor keeps its own range (as the authors' code does).
    ``unscaled``: the naive physical mapping ``[W, b]`` with ``s = 1`` (the bias on the weights'
    conductance scale, which must then span it): both relative to ``R = r(concat(W, b))``.
    ``per_tensor``: ``r(W)`` and ``r(b)``; ``shared``: ``r(W)`` for both (the bias noise at the
    weights' scale, as if the bias fitted in it); ``digital``: no bias noise (``None``). The
    union's range comes from the extremes of W and b (f > 0 keeps their order), so no copy of
    the weights is made.

    Args:
        weight: (C_out, ...) weights.
        bias: (C_out,) bias or ``None``.
        scale: ``half_range`` or ``abs_max`` (see ``tensor_range``).
        per_channel: one scale per output channel (row of the augmented matrix); ``f`` stays one
            per tensor (the one extra input line that carries the bias).
        bias_mode: ``separate``, ``unscaled``, ``per_tensor``, ``shared`` or ``digital``.

    Returns:
        ``(r_w, r_b)``: ``r_w`` broadcasts against ``weight``, ``r_b`` against ``bias`` (or None).
    """
    lo_w, hi_w = _extremes(weight, per_channel)
    r_w = _span(lo_w, hi_w, scale)  # 0-d or (C_out,)
    if bias is None or bias_mode == "digital":
        return _as_weight(r_w, weight, per_channel), None
    if bias_mode == "shared":
        return _as_weight(r_w, weight, per_channel), r_w
    lo_b, hi_b = torch.aminmax(bias.reshape(-1))
    r_b = _span(lo_b, hi_b, scale)
    if bias_mode == "per_tensor":
        return _as_weight(r_w, weight, per_channel), r_b
    if bias_mode not in ("separate", "unscaled"):
        raise ValueError(
            f"bias_mode={bias_mode!r} is invalid: allowed values are 'separate', 'unscaled', "
            "'per_tensor', 'shared', 'digital'"
        )
    r_w_tensor = _span(lo_w.min(), hi_w.max(), scale)
    if bias_mode == "unscaled":  # s = 1: the union of W and the raw bias, always
        matched = torch.ones((), dtype=torch.bool, device=weight.device)
        f = torch.ones((), dtype=weight.dtype, device=weight.device)
    else:
        matched = (r_w_tensor > 0) & (r_b > 0)
        f = torch.where(matched, r_b / torch.where(matched, r_w_tensor, 1.0), 1.0)  # 0-d
    if per_channel:  # row i of [W, b/f]: its own extremes and b_i / f
        lo_u, hi_u = torch.minimum(lo_w, bias / f), torch.maximum(hi_w, bias / f)
    else:
        lo_u, hi_u = torch.minimum(lo_w, lo_b / f), torch.maximum(hi_w, hi_b / f)
    r_union = _span(lo_u, hi_u, scale)
    r_w = torch.where(matched, r_union, r_w)
    return _as_weight(r_w, weight, per_channel), torch.where(matched, r_union * f, r_b)


def _draw(shape, distribution: str, generator, device, dtype) -> torch.Tensor:
    if distribution == "gaussian":
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if distribution == "uniform":
        u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
        return u.mul_(2 * _SQRT3).sub_(_SQRT3)
    raise ValueError(
        f"distribution={distribution!r} is invalid: allowed values are 'gaussian', 'uniform'"
    )


class _Stream:
    """Where unseeded (training) draws come from: ``training_stream``'s generator, else the
    global RNG of the draw's device."""

    generator: torch.Generator | None = None


@contextmanager
def training_stream(generator: torch.Generator) -> Iterator[None]:
    """Unseeded draws inside come from ``generator`` (on the device they are drawn on), so the
    training noise is a stream of its own: it neither moves nor follows the global RNG that
    orders the data and drives dropout."""
    previous, _Stream.generator = _Stream.generator, generator
    try:
        yield
    finally:
        _Stream.generator = previous


class _Tape:
    """The training draws of one forward, kept to be replayed negated by the next (antithetic
    pairs). ``mode`` is None (draw), ``record`` or ``replay``."""

    mode: str | None = None
    draws: list[torch.Tensor] = []


@contextmanager
def antithetic(mode: str) -> Iterator[None]:
    """Within ``antithetic("record")`` every training draw ``eps`` is kept; within the following
    ``antithetic("replay")`` the draws come back in the same order, negated: ``-eps``. For a
    symmetric distribution ``-eps`` has the same law, and the pair's mean cancels every odd
    term of the noise exactly (the mean shift, ``mu * r``, is not negated)."""
    if mode not in ("record", "replay"):
        raise ValueError(f"mode={mode!r} is invalid: allowed values are 'record', 'replay'")
    if mode == "record":
        _Tape.draws = []
    _Tape.mode = mode
    try:
        yield
    finally:
        _Tape.mode = None
        if mode == "replay":
            left, _Tape.draws = len(_Tape.draws), []
            if left:
                raise RuntimeError(f"antithetic replay used {left} draws fewer than recorded")


def standard_noise(
    shape, distribution: str, *, generator: torch.Generator | None = None, device=None, dtype=None
) -> torch.Tensor:
    """Zero-mean, unit-variance iid draws: N(0, 1) or U(-sqrt(3), sqrt(3)). Unseeded (training)
    draws come from ``training_stream`` when one is active and follow ``antithetic`` when it is;
    seeded ones (chips) do neither."""
    if generator is None and _Tape.mode == "replay":
        if not _Tape.draws or tuple(_Tape.draws[0].shape) != tuple(shape):
            raise RuntimeError("antithetic replay: the forward drew differently than recorded")
        return _Tape.draws.pop(0).neg_()
    eps = _draw(
        shape,
        distribution,
        generator if generator is not None else _Stream.generator,
        device,
        dtype,
    )
    if generator is None and _Tape.mode == "record":
        _Tape.draws.append(eps.clone())
    return eps


@torch.no_grad()
def perturbation(
    eps: torch.Tensor,
    r: torch.Tensor,
    sigma: float,
    mean_shift: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``nu = r * (mean_shift + sigma * eps)``; writes into ``out`` when given (may be ``eps``)."""
    out = torch.mul(eps, sigma, out=out) if out is not None else eps * sigma
    if mean_shift:
        out.add_(mean_shift)
    return out.mul_(r)


def derive_seed(*parts: object) -> int:
    """The project's one seed derivation: a 63-bit integer from BLAKE2b of
    ``"cimsim-" + ":".join(parts)``. It depends on nothing else, is the same on every platform and
    Python version (unlike ``hash``), and nearby inputs give unrelated seeds (unlike sums)."""
    text = "cimsim-" + ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one stored tensor of chip ``seed``, from the tensor's qualified name.

    Deriving per tensor (not from one stream) keeps a tensor's draws independent of every other
    tensor's shape and of the module order, so the same chip seed gives the same draws for a
    layer in any model that has a layer of that name and shape.
    """
    return derive_seed("tensor", int(seed), name)


@torch.compiler.disable  # a seeded CPU generator: runs eagerly, outside a compiled graph
def chip_noise(
    seed: int, name: str, shape, distribution: str, device=None, dtype=None
) -> torch.Tensor:
    """The standard draws ``eps`` of tensor ``name`` on chip ``seed``: drawn on the CPU so the same
    seed gives the same chip on any device, then moved."""
    g = torch.Generator(device="cpu").manual_seed(tensor_seed(seed, name))
    eps = standard_noise(shape, distribution, generator=g)
    return eps.to(device=device, dtype=dtype)
