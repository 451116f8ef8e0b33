"""Weights on pairs of conductances: aihwkit's N-pair converter (``chip.pairs``), the relative
device on pairs with faults, and ``ConductanceDevice``, the hook that gives a device both.

A weight lives on ``N`` differential pairs with significances ``f = (f_1, ..., f_N)``
(aihwkit's ``NPairConductanceConverter``, ``g_min = 0``): ``s = sum(f) g_max / max|W|`` maps the
largest |weight| of a tile (or tensor) to all pairs at ``g_max``; pair ``k`` holds what the
pairs before it cannot, ``G+_k = clip((max(s W, 0) - L_k) / f_k, 0, g_max)`` (``G-_k`` the same
of ``-s W``) with ``L_k = g_max (f_1 + ... + f_{k-1})``, so a pair is used only once the ones
before it are full; ``W = sum_k f_k (G+_k - G-_k) / s``. ``f = (1,)`` is the single pair of
aihwkit's ``SinglePairConductanceConverter``. Stuck-at faults (``cimsim.chip.devices.faults``)
act on the ``2 N`` devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from cimsim.chip.compensation import per_tile
from cimsim.chip.devices.base import Device, Periphery
from cimsim.chip.devices.faults import apply_faults, draw_faults, live_pairs
from cimsim.chip.noise import chip_noise, standard_noise, tensor_seed
from cimsim.validation import ConfigError

_ZERO_CLIP = 1e-7  # aihwkit's floor on max|W|: an all-zero tensor maps to zeros


@dataclass(frozen=True)
class PairsConfig:
    """The device pairs of every Conv/Linear weight (``noise.pairs.f``, ``chip.pairs.f``).

    Validated on construction: a bad value raises ``ConfigError`` naming the field.
    """

    f: tuple[float, ...] = (1.0,)
    """The pairs' significance factors, filled in this order (aihwkit's ``f_lst``, "from lowest
    to highest"): ``[1]`` one pair (default), ``[1, 3]`` a second pair of 3x significance used
    once the first is full. A non-empty list of finite numbers > 0."""

    def __post_init__(self):
        f = self.f
        if isinstance(f, str | bytes) or not hasattr(f, "__iter__"):
            raise ConfigError("f", f, "must be a non-empty list of significance factors: [1, 3]")
        f = tuple(f)
        for fk in f:
            if isinstance(fk, bool) or not isinstance(fk, int | float) or not math.isfinite(fk):
                raise ConfigError("f", list(f), "must hold finite numbers > 0")
            if fk <= 0:
                why = "must hold numbers > 0 (a pair of significance <= 0 cannot map a weight)"
                raise ConfigError("f", list(f), why)
        if not f:
            raise ConfigError("f", [], "must be a non-empty list of significance factors: [1]")
        object.__setattr__(self, "f", tuple(float(fk) for fk in f))

    @property
    def count(self) -> int:
        """``N``, the pairs per weight."""
        return len(self.f)


def pairs_of(device: Device) -> tuple[float, ...]:
    """The significance factors of ``device``'s chip (one pair when it has none set)."""
    return (1.0,) if device.pairs is None else device.pairs.f


@torch.no_grad()
def to_pairs(
    w: torch.Tensor, g_max: float, f=(1.0,), tiles: list[slice] | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Map weights onto ``N = len(f)`` pairs (aihwkit's ``NPairConductanceConverter
    .convert_to_conductances`` with ``g_min = 0``; the module docstring's formulas).

    Args:
        w: weights, any shape.
        g_max: conductance (uS) of a full device.
        f: the pairs' significance factors, in fill order.
        tiles: the crossbar tiles' input columns (dim 1): each maps its own ``max|w|``; None =
            one scale for the tensor.

    Returns:
        ``(g, s)``: the ``2 N`` target conductances ``[G+_1, G-_1, G+_2, ...]`` in
        ``[0, g_max]``, each shaped like ``w``; and the scale ``s`` (uS per weight unit), 0-d or
        with tiles ``(1, C_in, 1, ...)``.
    """
    peak = w.abs().max() if tiles is None else per_tile(w, tiles, "amax")
    scale = (sum(f) * g_max) / peak.clamp_min(_ZERO_CLIP)
    scaled = w * scale
    halves = (scaled.clamp_min(0.0), (-scaled).clamp_min(0.0))
    g, lower = [], 0.0
    for fk in f:
        for half in halves:
            if lower:
                half = half - lower
            g.append((half if fk == 1 else half / fk).clamp(0.0, g_max))
        lower += fk * g_max
    return g, scale


@torch.no_grad()
def from_pairs(g: list[torch.Tensor], scale: torch.Tensor, f=(1.0,)) -> torch.Tensor:
    """Read pairs back as weights: ``W = sum_k f_k (G+_k - G-_k) / s`` (aihwkit's
    ``convert_back_to_weights``)."""
    total = None
    for k, fk in enumerate(f):
        d = g[2 * k] - g[2 * k + 1]
        d = d if fk == 1 else d * fk
        total = d if total is None else total + d
    return total / scale


def work_tensor(w: torch.Tensor) -> torch.Tensor:
    """Detached, in float32 or wider (conductances need the mantissa)."""
    return w.detach().to(torch.promote_types(w.dtype, torch.float32))


# ----------------------------------------------------------------------------- relative device


def chip_cells(seed: int, name: str, like: torch.Tensor, config) -> tuple[list, Any]:
    """A programmed chip's draws of the relative device on ``config.pairs`` with
    ``config.faults`` (an ``AnalogConfig``): the standard draws of pairs 2..N (pair 1's are the
    layer's own) and the fault codes, from the chip seed and the tensor's name."""
    n, dist, on = config.pairs.count, config.distribution, (like.device, like.dtype)
    extra = [chip_noise(seed, f"{name}/pair{k}", like.shape, dist, *on) for k in range(2, n + 1)]
    return extra, draw_faults(config.faults, like.shape, 2 * n, seed, name, device=like.device)


def fresh_cells(like: torch.Tensor, config) -> tuple[list, Any]:
    """``chip_cells`` drawn afresh for one training sample (the training stream, the tape)."""
    n, dist = config.pairs.count, config.distribution
    extra = [
        standard_noise(like.shape, dist, device=like.device, dtype=like.dtype) for _ in range(1, n)
    ]
    return extra, draw_faults(config.faults, like.shape, 2 * n, device=like.device)


@torch.no_grad()
def relative_cells(
    weight: torch.Tensor,
    r: torch.Tensor,
    eps: list[torch.Tensor],
    sigma: float,
    mean_shift: float,
    f,
    codes: torch.Tensor | None,
    tiles: list[slice] | None = None,
) -> torch.Tensor:
    """The relative device's ``nu = W_chip - W`` on ``N`` pairs with faults.

    Pair ``k`` spans ``f_k / F`` of the weight range (``F = sum f``) and carries its own error
    ``r (mu + sigma eps_k)`` in that share: ``nu = (W_f - W) + r sum_k (f_k / F) live_k (mu +
    sigma eps_k)``, so the std is ``sigma r sqrt(sum f_k^2) / F`` (one pair: ``sigma r``) and
    the mean ``mu r``. ``W_f``: the weights mapped onto the pairs (``to_pairs``, ``g_max = 1``,
    per tile) with the stuck devices at 0 or full, read back; ``live_k`` = 0 where both devices
    of pair ``k`` are stuck (nothing programmable is left there). ``eps``: one standard draw
    per pair.
    """
    total, share = None, 1.0 / sum(f)
    for fk, e, live in zip(f, eps, live_pairs(codes, len(f)), strict=True):
        term = e.to(weight.device) * sigma
        if mean_shift:
            term = term + mean_shift
        term = term * (fk * share)
        if live is not None:
            term = term * live.to(device=term.device, dtype=term.dtype)
        total = term if total is None else total + term
    nu = total * r
    if codes is not None:
        w = work_tensor(weight)
        g, scale = to_pairs(w, 1.0, f, tiles)
        nu = nu + (from_pairs(apply_faults(g, codes, 1.0), scale, f) - w).to(nu.dtype)
    return nu


# ----------------------------------------------------------------------------- the hook


class ConductanceDevice(Device):
    """A device whose Conv/Linear weights live on differential pairs of conductances.

    Implement the conductance-level hook, ``program_conductances`` and ``read_conductances`` (on
    lists of conductance tensors, uS), and ``g_max`` (``config.g_max`` by default): cimsim maps
    the weights onto the chip's pairs (``chip.pairs``, per crossbar tile), programs and reads
    them through the hook, puts the stuck devices (``chip.faults``) at 0 or ``g_max`` on every
    read, and draws a fresh chip per HA-SGD sample. ``docs/extending.md`` has an example.
    """

    conductances = True

    @property
    def g_max(self) -> float:
        """The conductance (uS) of a full device: a tile's largest |weight| fills every pair."""
        return float(self.config.g_max)

    def program_conductances(self, targets: list[torch.Tensor], generator) -> Any:
        """Program the ``targets`` (uS; the ``2 N`` devices ``[G+_1, G-_1, ...]``, each shaped
        like the weights) with draws from ``generator`` (None: the global RNG of their device);
        returns the programmed state that ``read_conductances`` reads (any object)."""
        raise NotImplementedError(f"device {self.name!r} does not program conductances")

    def read_conductances(
        self, programmed: Any, t_inference: float, generator
    ) -> list[torch.Tensor]:
        """The ``2 N`` conductances (uS) of ``programmed`` read ``t_inference`` s after
        programming (0 unless ``timed``), drawing read noise from ``generator``."""
        raise NotImplementedError(f"device {self.name!r} does not read conductances")

    def program(self, weight, seed, name, tiles=None) -> ConductanceWeights:
        return ConductanceWeights(self, weight, seed, name, tiles)

    def training_perturbation(self, weight, t_train, tiles=None) -> torch.Tensor:
        w = work_tensor(weight)
        chip = ConductanceWeights(self, w, None, "", tiles)
        return (chip.weights(float(t_train) if self.timed else 0.0, None) - w).to(weight.dtype)


class ConductanceWeights:
    """One weight tensor of one programmed chip of a ``ConductanceDevice``: mapped onto its
    pairs, programmed (draws from (chip seed, name)), faults from ``(seed, name + "/faults")``,
    read with draws from (seed, name, t, repetition). ``seed=None``: a fresh chip (training)."""

    def __init__(self, device: ConductanceDevice, weight, seed: int | None, name: str, tiles=None):
        self.device, self.seed, self.name = device, seed, name
        self.dtype, self.f, w = weight.dtype, pairs_of(device), work_tensor(weight)
        g = None
        if seed is not None:
            g = torch.Generator(device="cpu").manual_seed(tensor_seed(seed, name))
        targets, self.scale = to_pairs(w, device.g_max, self.f, tiles)
        self.codes = draw_faults(device.faults, w.shape, len(targets), seed, name, device=w.device)
        self.state = device.program_conductances(targets, g)

    def weights(self, t_inference: float, generator) -> torch.Tensor:
        """The weights read at ``t_inference`` (read noise from ``generator``), faults applied."""
        g = self.device.read_conductances(self.state, t_inference, generator)
        return from_pairs(apply_faults(g, self.codes, self.device.g_max), self.scale, self.f)

    def read(
        self, t_inference: float, repetition: int = 0, periphery: Periphery | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_t, 1)``: no compensation of its own."""
        key = f"{self.name}/read@t={float(t_inference)!r}/rep={repetition}"
        g = torch.Generator(device="cpu").manual_seed(tensor_seed(self.seed, key))
        w = self.weights(t_inference, g).to(self.dtype)
        return w, torch.ones((), dtype=w.dtype, device=w.device)
