"""The ``rram`` device: aihwkit's ReRAM model (Wan et al. 2022) at 1 s, 1 day and 2 days."""

# IBM aihwkit's ``ReRamWan2022NoiseModel`` (``aihwkit/inference/noise/reram.py``) as its code
# computes it, on the differential pair of its default ``SinglePairConductanceConverter`` (the
# mapping of ``cimsim.chip.devices.pcm_model``); docs/model.md, "The RRAM device". Conductances in
# microsiemens (uS), times in seconds. The model has no drift law: at each of three times it draws
# a device's conductance afresh around its TARGET, with a std polynomial in ``g_T / g_max``
# fitted at that time. ``program`` and ``read`` act on conductances only (any converter's), and
# ``RRAMWeights`` maps weights onto a pair and compensates as the PCM device does.

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from cimsim.chip.compensation import (
    DRIFT_COMPENSATIONS,
    PeripheryCompensated,
    compensation_factor,
    compensation_readout,
)
from cimsim.chip.devices.base import Device, Periphery
from cimsim.chip.devices.conductance import from_pairs, to_pairs, work_tensor
from cimsim.chip.devices.faults import apply_faults, draw_faults
from cimsim.chip.devices.pcm_model import MAPPINGS
from cimsim.chip.devices.registry import register_device
from cimsim.chip.noise import _Tape, tensor_seed
from cimsim.validation import ConfigError, check_choice, check_number

DAY = 86400.0
# The times aihwkit's fit has (its ``coeff_dic`` keys): 1 s, 1 day, 2 days after programming.
TIMES = (1.0, DAY, 2 * DAY)
# What a chip may be read at: 0 is the programmed chip itself (cimsim's ``program_chip``), then
# the fitted times; aihwkit raises for any other ``t_inference``, and so does cimsim.
READ_TIMES = (0.0, *TIMES)
# The std (uS) at each time, a polynomial in r = g_T / g_max in ascending powers: aihwkit's
# ``coeff_dic`` (written there highest power first and reversed with ``[::-1]``).
STD_COEFFS = {
    1.0: (0.348, 16.030, -43.853, 45.393, -16.815),
    DAY: (0.701, 22.086, -50.773, 47.095, -16.458),
    2 * DAY: (0.782, 20.274, -43.507, 37.062, -11.934),
}
# The g_max (uS) of the measured devices the polynomials were fitted at. aihwkit stores it as
# ``prog_coeff_g_max_reference`` but ``_apply_poly`` never reads it: it scales the std by
# ``g_max / coeff_g_max_reference`` = 1. cimsim follows the code; this constant is unused too.
FIT_G_MAX = 40.0
_TIME_NAMES = {0.0: "0 (programmed)", 1.0: "1", DAY: "86400 (1 day)", 2 * DAY: "172800 (2 days)"}


@dataclass(frozen=True)
class RRAMConfig:
    """A ReRAM device as aihwkit's ``ReRamWan2022NoiseModel`` with its defaults.

    Validated on construction: a bad value raises ``ConfigError`` naming the field.
    """

    g_max: float = 25.0
    """Conductance (uS) that the largest |weight| of a tile (or tensor) maps to (aihwkit's
    ``SinglePairConductanceConverter`` default); also the ``g_max`` of ``r = g_T / g_max``. The
    std polynomials are in uS whatever ``g_max``: a larger ``g_max`` is relatively less noisy.
    Must be > 0."""
    noise_scale: float = 1.0
    """Factor (dimensionless) on every std (aihwkit's ``noise_scale``). Must be >= 0."""
    drift_compensation: str = "global"
    """``none``, ``global`` (aihwkit's ``InferenceRPUConfig`` default,
    ``GlobalDriftCompensation``) or ``per_channel``: as the PCM device's. The reference is the
    programmed chip (t = 0, gain 1); at 1 s, 1 day and 2 days the gain rescales the read weights'
    mean |W| back to it."""
    compensation_read: str = "periphery"
    """``periphery`` (aihwkit's: compensation read-outs through the tiles' output noise and ADC)
    or ``exact``; as the PCM device's."""
    mapping: str = "tile"
    """``tile`` (aihwkit's: each crossbar tile maps its own max |W| to ``g_max`` and compensates
    on its own) or ``tensor``."""
    remap_programmed: bool = False
    """Read the conductances at t > 0 back with the scale of the programmed weights re-mapped,
    ``s' = g_max / max|W_prog|``, as aihwkit's ``BaseNoiseModel.apply_drift_noise`` does (it
    re-maps ``W_prog``, but the ReRAM model draws around the ORIGINAL targets, mapped with
    ``s = g_max / max|W|``: the weights come back scaled by ``s / s'``). Default: back with
    ``s``, the scale the chip was programmed with."""

    def __post_init__(self):
        check_number("g_max", self.g_max, finite=True)
        if self.g_max <= 0:
            raise ConfigError("g_max", self.g_max, "must be > 0")
        check_number("noise_scale", self.noise_scale, minimum=0.0, finite=True)
        check_choice("drift_compensation", self.drift_compensation, DRIFT_COMPENSATIONS)
        check_choice("compensation_read", self.compensation_read, ("periphery", "exact"))
        check_choice("mapping", self.mapping, MAPPINGS)
        check_choice("remap_programmed", self.remap_programmed, (True, False))


def check_time(t: float, key: str = "t_inference", times: tuple = READ_TIMES) -> float:
    """``t`` as a float if it is one of ``times`` (exactly, as aihwkit's dict lookup), else a
    ``ConfigError`` on ``key`` naming them."""
    check_number(key, t, minimum=0.0)
    if float(t) not in times:
        allowed = ", ".join(_TIME_NAMES[x] for x in times)
        why = f"the RRAM model (aihwkit's ReRamWan2022NoiseModel) is fitted at {allowed} s only"
        raise ConfigError(key, t, why)
    return float(t)


def noise_std(g_target: torch.Tensor, t: float, cfg: RRAMConfig) -> torch.Tensor:
    """The std (uS) at fitted time ``t``: ``sum_i c_i(t) (g_T / g_max)^i * noise_scale`` (aihwkit's
    ``_apply_poly``: no ``g_max / 40`` rescaling, see ``FIT_G_MAX``)."""
    r = g_target / cfg.g_max
    coeffs = STD_COEFFS[check_time(t, times=TIMES)]
    std = torch.full_like(g_target, coeffs[-1])
    for c in reversed(coeffs[:-1]):  # Horner
        std = std * r + c
    return std * cfg.noise_scale


def _draw(g_target: torch.Tensor, t: float, cfg: RRAMConfig, generator) -> torch.Tensor:
    """``max(g_T + std_t(g_T) xi, 0)``; ``xi`` from ``generator`` on its own device (a seeded CPU
    generator gives the same draws on any device), or the global RNG of ``g_target``'s device."""
    device = generator.device if generator is not None else g_target.device
    xi = torch.randn(g_target.shape, generator=generator, device=device, dtype=g_target.dtype)
    return (g_target + noise_std(g_target, t, cfg) * xi.to(g_target.device)).clamp_min(0.0)


@torch.no_grad()
def program(
    g_target: torch.Tensor, cfg: RRAMConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Programmed conductances (uS): ``max(g_T + sigma_1s(g_T) xi, 0)``, the earliest time's
    polynomial (aihwkit's ``apply_programming_noise_to_conductance``: ``min`` of the keys).
    Targets at 0 (the idle device of each pair) are programmed too: ``max(0.348 xi, 0)``."""
    return _draw(g_target, TIMES[0], cfg, generator)


@torch.no_grad()
def read(
    g_target: torch.Tensor, t: float, cfg: RRAMConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Conductances (uS) read ``t`` s after programming, ``t`` one of ``TIMES``: drawn afresh
    around the TARGET, ``max(g_T + sigma_t(g_T) xi, 0)`` (aihwkit's
    ``apply_drift_noise_to_conductance``, which ignores the programmed conductance). The draw is
    the whole deviation at ``t``: there is no separate read noise."""
    return _draw(g_target, check_time(t, times=TIMES), cfg, generator)


class RRAMChip(NamedTuple):
    """One programmed tensor: the target conductances (uS, what every later read draws around) of
    every device of its pairs of significances ``f`` (``[G+_1, G-_1, ...]``, ``chip.pairs``), the
    programmed weights, the scale ``s`` they were mapped with and the scale reads at t > 0 come
    back with (``s``, or ``s'`` under ``remap_programmed``), the compensation reference
    (``compensation_readout`` of the programmed weights) and the fault codes (``chip.faults``)."""

    targets: list[torch.Tensor]
    w_prog: torch.Tensor
    scale: torch.Tensor
    read_scale: torch.Tensor
    reference: torch.Tensor
    f: tuple[float, ...] = (1.0,)
    codes: torch.Tensor | None = None


@torch.no_grad()
def _program_chip(
    w: torch.Tensor, cfg: RRAMConfig, generator, tiles=None, f=(1.0,), codes=None
) -> RRAMChip:
    """Map onto the pairs ``f`` and program; draws in a fixed order: G+_1, G-_1, G+_2, ...
    Stuck devices (``codes``) sit at 0 or g_max (``cimsim.chip.devices.faults``)."""
    targets, scale = to_pairs(w, cfg.g_max, f, tiles)
    progs = apply_faults([program(g, cfg, generator) for g in targets], codes, cfg.g_max)
    w_prog = from_pairs(progs, scale, f)
    read_scale = to_pairs(w_prog, cfg.g_max, f, tiles)[1] if cfg.remap_programmed else scale
    reference = compensation_readout(w_prog, cfg.drift_compensation == "per_channel", tiles)
    return RRAMChip(targets, w_prog, scale, read_scale, reference, tuple(f), codes)


@torch.no_grad()
def _read_chip(chip: RRAMChip, t: float, cfg: RRAMConfig, generator, tiles=None):
    """``(W_t, alpha)``: the weights at ``t`` (uncompensated) and the compensation gain; at
    ``t = 0`` the programmed weights and a gain of 1 (aihwkit's tile after ``program_weights``)."""
    if t == 0.0:
        return chip.w_prog, torch.ones((), dtype=chip.w_prog.dtype, device=chip.w_prog.device)
    g = apply_faults([read(gt, t, cfg, generator) for gt in chip.targets], chip.codes, cfg.g_max)
    w_t = from_pairs(g, chip.read_scale, chip.f)
    return w_t, compensation_factor(chip.reference, w_t, cfg.drift_compensation, tiles)


def _tiles_of(cfg: RRAMConfig, tiles: list[slice] | None) -> list[slice] | None:
    return tiles if cfg.mapping == "tile" else None


class RRAMWeights(PeripheryCompensated):
    """One weight tensor of one programmed RRAM chip, read at 0 s, 1 s, 1 day or 2 days.

    Programming draws come from a CPU generator seeded by (chip seed, tensor name); each read-out
    at ``t > 0`` draws the whole pair afresh around its targets from (chip seed, name, t,
    repetition), as aihwkit draws anew at each ``drift_analog_weights(t)``: the same
    ``(t, repetition)`` reads the same, another repetition is another draw. What stays with the
    chip is its programmed state (read at ``t = 0``) and the compensation reference.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        cfg: RRAMConfig,
        seed: int,
        name: str,
        tiles: list[slice] | None = None,
        faults=None,
        pairs=None,
    ):
        self.cfg, self.seed, self.name = cfg, int(seed), name
        self.dtype, self.tiles = weight.dtype, _tiles_of(cfg, tiles)
        g = torch.Generator(device="cpu").manual_seed(tensor_seed(self.seed, name))
        w, f = work_tensor(weight), (1.0,) if pairs is None else pairs.f  # chip.faults, chip.pairs
        codes = draw_faults(faults, w.shape, 2 * len(f), self.seed, name, device=w.device)
        self.chip = _program_chip(w, cfg, g, self.tiles, f, codes)
        self.periphery_reference: torch.Tensor | None = None  # set by the first periphery read

    @property
    def programmed_weights(self) -> torch.Tensor:
        """``W_prog``: the weights right after programming (what ``t = 0`` reads)."""
        return self.chip.w_prog.to(self.dtype)

    def read_out(
        self, t_inference: float, repetition: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_t, alpha)``: the uncompensated weights at ``t_inference`` (one of
        ``READ_TIMES``, else a ``ConfigError`` naming them) and the compensation gain."""
        t = check_time(t_inference)
        g = self._read_generator(t, repetition)
        w_t, alpha = _read_chip(self.chip, t, self.cfg, g, self.tiles)
        return w_t.to(self.dtype), alpha.to(self.dtype)

    def read(
        self, t_inference: float, repetition: int = 0, periphery: Periphery | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``read_out``; with ``periphery`` and ``compensation_read='periphery'``, the gain at
        ``t > 0`` is aihwkit's: both compensation read-outs through the tiles' periphery."""
        w_t, alpha = self.read_out(t_inference, repetition)
        cfg = self.cfg
        if periphery is not None and cfg.compensation_read == "periphery" and t_inference != 0:
            if cfg.drift_compensation != "none":
                alpha = self._periphery_alpha(
                    w_t, f"t={float(t_inference)!r}/rep={repetition}", periphery
                )
        return w_t, alpha


@torch.no_grad()
def rram_training_perturbation(
    weight: torch.Tensor,
    cfg: RRAMConfig,
    t_train: float,
    generator: torch.Generator | None = None,
    tiles: list[slice] | None = None,
    faults=None,
    pairs=None,
) -> torch.Tensor:
    """A fresh HA-SGD perturbation ``nu = W_chip - W``: a new chip programmed and read at
    ``t_train`` (one of ``READ_TIMES``, else a ``ConfigError`` on ``t_train``), compensated as
    ``cfg.drift_compensation`` (exactly: no periphery in training). Detached, shaped and typed
    like ``weight``; drawn from ``generator`` (the global RNG of ``weight``'s device if None),
    with fresh ``faults`` on its ``pairs`` (``chip.faults``, ``chip.pairs``; None: none, one)."""
    t = check_time(t_train, "t_train")
    if _Tape.mode is not None:
        raise RuntimeError(
            "antithetic pairs need the relative device: RRAM draws are not symmetric"
        )
    w, tiles = work_tensor(weight), _tiles_of(cfg, tiles)
    f = (1.0,) if pairs is None else pairs.f
    codes = draw_faults(faults, w.shape, 2 * len(f), generator=generator, device=w.device)
    chip = _program_chip(w, cfg, generator, tiles, f, codes)
    w_t, alpha = _read_chip(chip, t, cfg, generator, tiles)
    return (w_t * alpha - w).to(weight.dtype)


class RRAMDevice(Device):
    """aihwkit's ReRAM device (``RRAMConfig``): a programmed chip read at 0 s, 1 s, 1 day or 2
    days (``set_time``); HA-SGD trains against a fresh chip read at ``t_train``. Not recorded: a
    chip's record names its settings only when it is selected (adding it changed no fingerprint)."""

    title = "RRAM"
    timed = True
    conductances = True  # chip.faults and chip.pairs (cimsim.chip.devices.conductance)

    def check_time(self, t: float, key: str) -> None:
        check_time(t, key)

    def label(self, chip) -> str | None:
        return f"RRAM t_train={chip.t_train:g}s"

    def program(self, weight, seed, name, tiles=None) -> RRAMWeights:
        return RRAMWeights(weight, self.config, seed, name, tiles, self.faults, self.pairs)

    def training_perturbation(self, weight, t_train, tiles=None) -> torch.Tensor:
        cells = {"faults": self.faults, "pairs": self.pairs}
        return rram_training_perturbation(weight, self.config, t_train, tiles=tiles, **cells)


register_device("rram", RRAMConfig, RRAMDevice)
