"""IBM aihwkit's statistical PCM model: its parameters (``PCMConfig``) and equations."""

# Fitted on measured PCM devices (Nandakumar et al., "Phase-change memory models for deep learning
# training and inference", ICECS 2019): aihwkit's ``PCMLikeNoiseModel``
# (``aihwkit/inference/noise/pcm.py``) with the differential-pair mapping of its
# ``SinglePairConductanceConverter`` (``aihwkit/inference/converter/conductance.py``);
# docs/model.md, "The PCM device". Conductances in microsiemens (uS), times in seconds. A weight
# lives on a pair of devices, ``W = (G+ - G-) / s``; each is programmed with noise, drifts as
# ``(t / t0)^(-nu)`` and is read with 1/f noise. Everything is detached (``torch.no_grad``): a
# perturbation is a constant for autograd, so the gradient reaches the clean weights (as in
# ``cimsim.chip.noise``).

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cimsim.chip.compensation import DRIFT_COMPENSATIONS
from cimsim.chip.devices.conductance import to_pairs
from cimsim.validation import ConfigError, check_choice, check_number

MAPPINGS = ("tile", "tensor")

# aihwkit's floor on max|W| (mapping) and on g / g_max (drift fit): keeps log() and 1/x finite.
_ZERO_CLIP = 1e-7
# Programming-noise std polynomial in r = g_T / g_max, in uS, fitted at g_max = 25 uS (aihwkit's
# ``prog_coeff`` and ``prog_coeff_g_max_reference``).
_PROG_COEFFS = (0.26348, 1.9650, -1.1731)
_PROG_G_MAX_REF = 25.0


@dataclass(frozen=True)
class PCMConfig:
    """A PCM device as aihwkit's ``PCMLikeNoiseModel`` with its defaults (Nandakumar et al. 2019).

    Validated on construction: a bad value raises ``ConfigError`` naming the field.
    """

    g_max: float = 25.0
    """Conductance (uS) that the largest |weight| of a tensor maps to. Must be > 0."""
    t0: float = 20.0
    """Time (s) from the end of programming to the first read: the drift reference. ``t_inference``
    counts from there, so a chip read at ``t_inference`` has drifted for ``t = t_inference + t0``.
    Must exceed ``t_read``."""
    t_read: float = 250e-9
    """Duration (s) of one read, the lower cut-off of the 1/f read-noise integral. Must be > 0."""
    prog_noise_scale: float = 1.0
    """Factor (dimensionless) on the programming-noise std. Must be >= 0."""
    read_noise_scale: float = 1.0
    """Factor (dimensionless) on the 1/f read-noise std. Must be >= 0."""
    drift_scale: float = 1.0
    """Factor (dimensionless) on every drift exponent ``nu``. Must be >= 0."""
    drift_compensation: str = "global"
    """``none``, ``global`` (one factor per tensor, aihwkit's ``GlobalDriftCompensation``) or
    ``per_channel`` (one per output channel, aihwkit's ``PerColumnDriftCompensation``)."""
    compensation_read: str = "periphery"
    """How drift compensation reads the weights (the reference at programming and each later
    read-out) when the tiles' outputs have noise or an ADC: ``periphery`` (default, aihwkit's
    ``_forward_drift_readout_tensor``: one-hot inputs through the tile's output noise and ADC,
    in normalized units) or ``exact`` (the weights themselves). Without per-tile outputs both
    are the exact read."""
    mapping: str = "tile"
    """``tile`` (default, aihwkit's: each crossbar tile maps its own max |W| to ``g_max`` and
    compensates its own drift) or ``tensor`` (one scale and one compensation for the whole
    weight tensor, cimsim's earlier mapping). The same for a layer that is one tile."""
    remap_programmed: bool = False
    """Drift and read the programmed weights re-mapped onto a fresh pair, as aihwkit's
    ``BaseNoiseModel.apply_drift_noise`` does (``s' = g_max / max|W_prog|``, one device of each
    pair at 0 afterwards, so only the net conductance drifts and is read noisily). Default: each
    device of the original pair drifts and is read with its own draws."""

    def __post_init__(self):
        for key in ("g_max", "t0", "t_read"):
            check_number(key, getattr(self, key))
            if getattr(self, key) <= 0:
                raise ConfigError(key, getattr(self, key), "must be > 0")
        if self.t0 <= self.t_read:  # else ln((t + t_read) / (2 t_read)) < 0 at t_inference = 0
            raise ConfigError("t0", self.t0, f"must exceed t_read={self.t_read}")
        for key in ("prog_noise_scale", "read_noise_scale", "drift_scale"):
            check_number(key, getattr(self, key), minimum=0.0)
        check_choice("drift_compensation", self.drift_compensation, DRIFT_COMPENSATIONS)
        check_choice("remap_programmed", self.remap_programmed, (True, False))
        check_choice("mapping", self.mapping, MAPPINGS)
        check_choice("compensation_read", self.compensation_read, ("periphery", "exact"))


def _standard_normal(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, 1) draws shaped like ``like``, on the generator's device (so a seeded CPU generator
    gives the same draws for any device), then moved to ``like``'s device."""
    device = generator.device if generator is not None else like.device
    xi = torch.randn(like.shape, generator=generator, device=device, dtype=like.dtype)
    return xi.to(like.device)


@torch.no_grad()
def to_conductances(
    w: torch.Tensor, g_max: float, tiles: list[slice] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map weights onto a differential pair, one scale per tensor (aihwkit's
    ``SinglePairConductanceConverter.convert_to_conductances`` with ``g_min = 0``).

    Args:
        w: weights, any shape.
        g_max: conductance (uS) that ``max|w|`` maps to.
        tiles: the crossbar tiles' input columns (dim 1): each tile maps its own ``max|w|``
            (aihwkit's per-tile mapping); None = one scale for the tensor.

    Returns:
        ``(g_plus, g_minus, scale)``: target conductances (uS), shaped like ``w``, in
        ``[0, g_max]``, one of each pair 0; and the scale ``s = g_max / max|w|`` (uS per weight
        unit; ``max|w|`` floored at 1e-7 as aihwkit, so an all-zero tensor maps to zeros): 0-d,
        or with tiles ``(1, C_in, 1, ...)``, each tile's columns holding its scale.
    """
    g, scale = to_pairs(w, g_max, (1.0,), tiles)  # the one-pair case of the N-pair converter
    return g[0], g[1], scale


@torch.no_grad()
def from_conductances(
    g_plus: torch.Tensor, g_minus: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Read a pair back as weights: ``W = (G+ - G-) / s``."""
    return (g_plus - g_minus) / scale


@torch.no_grad()
def program(
    g_target: torch.Tensor, cfg: PCMConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Programmed conductances: target plus Gaussian programming noise, clipped at 0.

    ``sigma_p = (0.26348 + 1.9650 r - 1.1731 r^2) * g_max / 25 * prog_noise_scale`` (uS) with
    ``r = g_T / g_max``, ``g_p = max(g_T + sigma_p xi, 0)`` (aihwkit's
    ``PCMLikeNoiseModel.apply_programming_noise_to_conductance``). A device whose target is 0 is
    programmed too, so it ends at ``max(sigma_p(0) xi, 0)``: a small bias toward 0 on every weight.

    Args:
        g_target: target conductances (uS) in ``[0, g_max]``.
        cfg: the device.
        generator: source of the draws ``xi`` (global RNG of ``g_target``'s device if None).

    Returns:
        ``g_p`` (uS), shaped like ``g_target``; not clipped above (nor is it in aihwkit).
    """
    r = g_target / cfg.g_max
    c0, c1, c2 = _PROG_COEFFS
    sigma = (c0 + c1 * r + c2 * r * r) * (cfg.g_max / _PROG_G_MAX_REF * cfg.prog_noise_scale)
    return (g_target + sigma * _standard_normal(g_target, generator)).clamp_min(0.0)


@torch.no_grad()
def drift_exponents(
    g_target: torch.Tensor, cfg: PCMConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Drift exponents ``nu``, drawn once per device from its TARGET conductance.

    With ``r' = max(g_T / g_max, 1e-7)``: ``mu = clip(-0.0155 ln r' + 0.0244, 0.049, 0.1)``,
    ``sigma = clip(-0.0125 ln r' - 0.0059, 0.008, 0.045)``,
    ``nu = |mu + sigma xi| * drift_scale`` (aihwkit's
    ``PCMLikeNoiseModel.generate_drift_coefficients``): low conductances drift faster and more
    variably; the fold keeps every device decaying.

    Returns:
        ``nu`` (dimensionless, >= 0), shaped like ``g_target``.
    """
    log_r = torch.log((g_target / cfg.g_max).abs().clamp_min(_ZERO_CLIP))
    mu = (-0.0155 * log_r + 0.0244).clamp(0.049, 0.1)
    sigma = (-0.0125 * log_r - 0.0059).clamp(0.008, 0.045)
    return (mu + sigma * _standard_normal(g_target, generator)).abs() * cfg.drift_scale


@torch.no_grad()
def read(
    g_prog: torch.Tensor,
    nu: torch.Tensor,
    t_inference: float,
    cfg: PCMConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Conductances read ``t_inference`` seconds after programming: drift, then 1/f read noise.

    With ``t = t_inference + t0``: ``g_d = g_p (t / t0)^(-nu)``;
    ``Q = min(0.0088 / max((g_p / g_max)^0.65, 1e-3), 0.2)`` (from the PROGRAMMED conductance);
    ``g = max(g_d + |g_d| Q sqrt(ln((t + t_read) / (2 t_read))) read_noise_scale xi, 0)``
    (aihwkit's ``PCMLikeNoiseModel.apply_drift_noise_to_conductance``). Read noise is the 1/f
    noise accumulated since programming, so it is there already at ``t_inference = 0``.

    Args:
        g_prog: programmed conductances (uS).
        nu: their drift exponents (``drift_exponents``).
        t_inference: seconds after programming, >= 0.
        cfg: the device.
        generator: source of the read-noise draws (global RNG of ``g_prog``'s device if None).

    Returns:
        ``g`` (uS), shaped like ``g_prog``, >= 0.
    """
    check_number("t_inference", t_inference, minimum=0.0)
    t = float(t_inference) + cfg.t0
    g_drift = g_prog * torch.pow(t / cfg.t0, -nu)
    # The 1e-3 floor only keeps the division finite: Q hits its 0.2 cap already below r ~ 0.008.
    q = (0.0088 / (g_prog.abs() / cfg.g_max).pow(0.65).clamp_min(1e-3)).clamp_max(0.2)
    spread = q * (math.sqrt(math.log((t + cfg.t_read) / (2 * cfg.t_read))) * cfg.read_noise_scale)
    noise = g_drift.abs() * spread * _standard_normal(g_prog, generator)
    return (g_drift + noise).clamp_min(0.0)
