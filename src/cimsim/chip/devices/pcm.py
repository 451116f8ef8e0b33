"""The ``pcm`` device: PCM weights programmed on a chip, read over time, drawn in training."""

# The drift compensation (aihwkit's ``GlobalDriftCompensation`` / ``PerColumnDriftCompensation``,
# ``aihwkit/inference/compensation/drift.py``) reads out and scales as ``cimsim.chip.compensation``;
# the model's equations are in ``cimsim.chip.devices.pcm_model``.

from __future__ import annotations

from typing import NamedTuple

import torch

from cimsim.chip.compensation import (
    PeripheryCompensated,
    compensation_factor,
    compensation_readout,
)
from cimsim.chip.devices.base import Device, Periphery
from cimsim.chip.devices.conductance import from_pairs, to_pairs, work_tensor
from cimsim.chip.devices.faults import FaultsConfig, apply_faults, draw_faults
from cimsim.chip.devices.pcm_model import (  # noqa: F401  (the model's API, here too)
    DRIFT_COMPENSATIONS,
    MAPPINGS,
    PCMConfig,
    drift_exponents,
    from_conductances,
    program,
    read,
    to_conductances,
)
from cimsim.chip.devices.registry import register_device
from cimsim.chip.noise import _Tape, tensor_seed
from cimsim.validation import ConfigError, check_number


class ProgrammedPair(NamedTuple):
    """One programmed tensor: every device's programmed conductance (uS) and drift exponent,
    ``[G+_1, G-_1, G+_2, ...]`` for the pairs of significances ``f`` (shaped like the weights),
    the mapping scale ``s`` (uS per weight unit), the compensation reference
    (``compensation_readout`` of the programmed weights) and the fault codes (None: none)."""

    g: list[torch.Tensor]
    nu: list[torch.Tensor]
    scale: torch.Tensor
    reference: torch.Tensor
    f: tuple[float, ...] = (1.0,)
    codes: torch.Tensor | None = None

    @property
    def g_plus(self) -> torch.Tensor:  # the first pair's, as before pairs
        return self.g[0]

    @property
    def g_minus(self) -> torch.Tensor:
        return self.g[1]

    @property
    def nu_plus(self) -> torch.Tensor:
        return self.nu[0]

    @property
    def nu_minus(self) -> torch.Tensor:
        return self.nu[1]


@torch.no_grad()
def _program_pair(
    w: torch.Tensor, cfg: PCMConfig, generator, tiles=None, f=(1.0,), codes=None
) -> ProgrammedPair:
    """Map onto the pairs ``f`` (``conductance.to_pairs``), program and draw drift exponents;
    draws in a fixed order: xi_p of every device (G+_1, G-_1, G+_2, ...), then xi_nu of every
    device (one pair: xi_p+, xi_p-, xi_nu+, xi_nu-). Stuck devices (``codes``) then sit at 0 or
    g_max. The reference is read on the programmed chip before any drift or read noise, as
    aihwkit's ``InferenceTileWithPeriphery.program_weights`` does. ``tiles``: per-tile mapping
    and compensation (``_tiles_of``)."""
    targets, scale = to_pairs(w, cfg.g_max, f, tiles)
    progs = [program(g, cfg, generator) for g in targets]
    nus = [drift_exponents(g, cfg, generator) for g in targets]
    progs = apply_faults(progs, codes, cfg.g_max)
    w_prog = from_pairs(progs, scale, f)
    if cfg.remap_programmed:
        progs, scale = to_pairs(w_prog, cfg.g_max, f, tiles)
        progs = apply_faults(progs, codes, cfg.g_max)
    per_channel = cfg.drift_compensation == "per_channel"
    reference = compensation_readout(w_prog, per_channel, tiles)
    return ProgrammedPair(progs, nus, scale, reference, tuple(f), codes)


@torch.no_grad()
def _read_pair(
    chip: ProgrammedPair, t_inference: float, cfg: PCMConfig, generator, tiles=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_t, alpha)``: the drifted, read weights (uncompensated; the devices read in order,
    stuck ones at their value) and the compensation gain."""
    g = [read(gi, nu, t_inference, cfg, generator) for gi, nu in zip(chip.g, chip.nu, strict=True)]
    w_t = from_pairs(apply_faults(g, chip.codes, cfg.g_max), chip.scale, chip.f)
    return w_t, compensation_factor(chip.reference, w_t, cfg.drift_compensation, tiles)


def _tiles_of(cfg: PCMConfig, tiles: list[slice] | None) -> list[slice] | None:
    """The tiles that map and compensate on their own: the layer's, under ``mapping='tile'``."""
    return tiles if cfg.mapping == "tile" else None


class PCMWeights(PeripheryCompensated):
    """One weight tensor of one programmed PCM chip, movable in time.

    Programming noise and drift exponents of both devices of every pair are drawn once, from a
    CPU generator seeded by (chip seed, tensor name) (``cimsim.chip.noise.tensor_seed``): the same
    seed gives the same chip on any device and in any module order. Read noise is drawn per read
    from (chip seed, name, t_inference, repetition): re-reading the same chip at the same time
    with another repetition redraws only the read noise.

    Args:
        weight: the digital weights, output channels first: (C_out, ...).
        cfg: the device.
        seed: the chip seed.
        name: the tensor's qualified name (``layer1.0.conv1.weight``).
        tiles: the layer's crossbar tiles (per-tile mapping under ``cfg.mapping='tile'``).
        faults: the chip's stuck-at faults (``FaultsConfig``; None: none), drawn from
            (chip seed, name + "/faults").
        pairs: the chip's device pairs (``PairsConfig``; None: one pair).

    Attributes:
        pair: the programmed state (``ProgrammedPair``), fixed for the life of the chip.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        cfg: PCMConfig,
        seed: int,
        name: str,
        tiles: list[slice] | None = None,
        faults: FaultsConfig | None = None,
        pairs=None,
    ):
        self.cfg, self.seed, self.name = cfg, int(seed), name
        self.dtype, self.tiles = weight.dtype, _tiles_of(cfg, tiles)
        g = torch.Generator(device="cpu").manual_seed(tensor_seed(self.seed, name))
        w, f = work_tensor(weight), (1.0,) if pairs is None else pairs.f  # chip.pairs, chip.faults
        codes = draw_faults(faults, w.shape, 2 * len(f), self.seed, name, device=w.device)
        self.pair = _program_pair(w, cfg, g, self.tiles, f, codes)
        # The reference read through the tiles' periphery (set by the first such read).
        self.periphery_reference: torch.Tensor | None = None

    @property
    def programmed_weights(self) -> torch.Tensor:
        """``W_prog``: the weights right after programming (no drift, no read noise)."""
        c = self.pair
        return from_pairs(c.g, c.scale, c.f).to(self.dtype)

    @property
    def reference(self) -> torch.Tensor:
        """The compensation reference ``max(mean|W_prog|, 1e-4)`` (0-d, or per output channel)."""
        return self.pair.reference

    def read_out(
        self, t_inference: float, repetition: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_t, alpha)`` at ``t_inference`` seconds: the uncompensated weights and the
        compensation gain (1 without compensation; not exactly 1 at ``t_inference = 0``, where
        read noise already acts, as in aihwkit). ``alpha * (W_t x)`` equals ``(alpha W_t) x`` for
        a Conv/Linear: applying alpha to the output instead of the weights is the same for a
        layer without bias, and with a bias only if alpha multiplies before the bias is added."""
        check_number("t_inference", t_inference, minimum=0.0)
        g = self._read_generator(t_inference, repetition)
        w_t, alpha = _read_pair(self.pair, t_inference, self.cfg, g, self.tiles)
        return w_t.to(self.dtype), alpha.to(self.dtype)

    def read(
        self, t_inference: float, repetition: int = 0, periphery: Periphery | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``read_out``; with ``periphery`` and ``compensation_read='periphery'``, the gain is
        aihwkit's: both compensation read-outs through the tiles' noisy periphery."""
        w_t, alpha = self.read_out(t_inference, repetition)
        cfg = self.cfg
        if periphery is not None and cfg.compensation_read == "periphery":
            if cfg.drift_compensation != "none":
                read = f"t={float(t_inference)!r}/rep={repetition}"
                alpha = self._periphery_alpha(w_t, read, periphery)
        return w_t, alpha


@torch.no_grad()
def pcm_training_perturbation(
    weight: torch.Tensor,
    cfg: PCMConfig,
    t_train: float,
    generator: torch.Generator | None = None,
    tiles: list[slice] | None = None,
    faults: FaultsConfig | None = None,
    pairs=None,
) -> torch.Tensor:
    """A fresh HA-SGD perturbation from the PCM model: ``nu = W_chip - W`` with ``W_chip`` a new
    chip (both devices programmed, drift exponents drawn) read at ``t_train`` s and compensated
    as ``cfg.drift_compensation``: the training distribution is the test distribution at
    ``t_train`` (q = p). Add it outside ``no_grad`` (``weight + nu``) so the gradient reaches W.

    aihwkit's PCM training modifier (``WeightModifierType.PCM_NOISE``) differs: it drops the mean
    drift instead of compensating it and uses one signed device per weight (docs/model.md).

    Args:
        weight: the clean weights, output channels first.
        cfg: the device.
        t_train: seconds after programming that training targets, >= 0.
        generator: source of the draws (the global RNG of ``weight``'s device if None).
        tiles: the layer's crossbar tiles (per-tile mapping under ``cfg.mapping='tile'``).
        faults, pairs: the chip's stuck-at faults (fresh ones: faults in the loop) and pairs.

    Returns:
        The perturbation, detached, shaped and typed like ``weight``.
    """
    if _antithetic_active():
        raise RuntimeError("antithetic pairs need the relative device: PCM draws are not symmetric")
    w, tiles = work_tensor(weight), _tiles_of(cfg, tiles)
    f = (1.0,) if pairs is None else pairs.f
    codes = draw_faults(faults, w.shape, 2 * len(f), generator=generator, device=w.device)
    chip = _program_pair(w, cfg, generator, tiles, f, codes)
    w_t, alpha = _read_pair(chip, t_train, cfg, generator, tiles)
    return (w_t * alpha - w).to(weight.dtype)


def _antithetic_active() -> bool:
    return _Tape.mode is not None


class PCMDevice(Device):
    """IBM aihwkit's PCM device (``PCMConfig``): a programmed chip drifts and is read over time
    (``set_time``); HA-SGD trains against a fresh chip read at ``t_train``."""

    title = "PCM"
    timed = True
    recorded = True
    variants = {"compensations": "drift_compensation"}
    conductances = True

    def check_cells(self, faults, pairs) -> None:
        if faults.active and self.config.remap_programmed:  # the remap would move stuck devices
            why = "re-mapping a chip with stuck devices (faults) would move them: set it false"
            raise ConfigError("pcm.remap_programmed", True, why)

    def label(self, chip) -> str | None:
        return f"PCM t_train={chip.t_train:g}s"

    def program(self, weight, seed, name, tiles=None) -> PCMWeights:
        return PCMWeights(weight, self.config, seed, name, tiles, self.faults, self.pairs)

    def training_perturbation(self, weight, t_train, tiles=None) -> torch.Tensor:
        cells = {"faults": self.faults, "pairs": self.pairs}
        return pcm_training_perturbation(weight, self.config, t_train, tiles=tiles, **cells)


register_device("pcm", PCMConfig, PCMDevice)
