"""Stuck-at faults of a chip's conductance devices (``chip.faults``), for any device with pairs.

Every device of every pair (``cimsim.chip.devices.conductance``) is stuck at 0 (``stuck_off``,
an open or never-set cell) or at ``g_max`` (``stuck_on``, a shorted or never-reset cell) with the
configured probabilities, independently; a stuck device ignores programming and reads exactly its
stuck value at every time (no programming noise, drift or read noise). One uniform ``u`` per
device decides (``u < stuck_off``: off; ``u > 1 - stuck_on``: on), so the devices stuck at a
lower rate stay stuck at every higher one: a fault-rate sweep moves the same chip (common random
numbers). A programmed chip draws ``u`` from its seed and the tensor's name (its own stream: the
same chip's programming noise with and without faults); a training sample draws them afresh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cimsim.chip.noise import standard_noise, tensor_seed
from cimsim.validation import ConfigError, check_number

OK, OFF, ON = 0, 1, 2  # a device's fault code
_SQRT3 = math.sqrt(3.0)


@dataclass(frozen=True)
class FaultsConfig:
    """Stuck-at faults of Conv/Linear weights' devices (``noise.faults.*``, ``chip.faults.*``).

    Validated on construction: a bad value raises ``ConfigError`` naming the field.
    """

    stuck_off: float = 0.0
    """Probability (in [0, 1]) that a device is stuck at conductance 0."""
    stuck_on: float = 0.0
    """Probability (in [0, 1]) that a device is stuck at ``g_max``; ``stuck_off + stuck_on``
    must be <= 1 (each device is stuck one way at most)."""

    def __post_init__(self):
        for key in ("stuck_off", "stuck_on"):
            check_number(key, getattr(self, key), minimum=0.0, maximum=1.0)
            object.__setattr__(self, key, float(getattr(self, key)))
        p_off, p_on = self.stuck_off, self.stuck_on
        if p_off + p_on > 1.0:
            why = f"stuck_off + stuck_on must be <= 1 (stuck_off={p_off:g}): a device sticks once"
            raise ConfigError("stuck_on", p_on, why)

    @property
    def active(self) -> bool:
        """Whether any device can be stuck."""
        return self.rate > 0.0

    @property
    def rate(self) -> float:
        """The probability that a device is stuck either way."""
        return self.stuck_off + self.stuck_on


def fault_uniforms(
    shape, count: int, generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """``count`` uniforms in [0, 1] per element of ``shape``: ``(count, *shape)``, float64.

    Seeded (a chip): from ``generator`` on the CPU, then moved. Fresh (a training sample,
    ``generator=None``): ``|v| / sqrt(3)`` of a ``standard_noise`` uniform ``v``, so the draw
    follows ``training_stream`` and the antithetic tape, whose replay ``-v`` gives the same
    ``u``: an antithetic pair shares its faults and negates only the noise."""
    full = (count, *tuple(shape))
    if generator is not None:
        return torch.rand(full, generator=generator, dtype=torch.float64).to(device)
    v = standard_noise(full, "uniform", device=device, dtype=torch.float64)
    return v.abs_().div_(_SQRT3)


def fault_codes(u: torch.Tensor, cfg: FaultsConfig) -> torch.Tensor:
    """Each device's code (``OK``, ``OFF``, ``ON``) from its uniform ``u``, as ``uint8``."""
    p_off, p_on = cfg.stuck_off, cfg.stuck_on
    codes = torch.zeros(u.shape, dtype=torch.uint8, device=u.device)
    return codes.masked_fill_(u < p_off, OFF).masked_fill_(u > 1.0 - p_on, ON)


def draw_faults(
    cfg: FaultsConfig | None,
    shape,
    count: int,
    seed: int | None = None,
    name: str = "",
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor | None:
    """The fault codes ``(count, *shape)`` of the ``count`` devices of every weight (``2 N`` for
    ``N`` pairs: ``G+_1, G-_1, G+_2, ...``), or None without faults. A chip's come from
    ``(seed, name)`` (``tensor_seed(seed, name + "/faults")``), a training sample's from
    ``generator`` or, when None, fresh (``fault_uniforms``)."""
    if cfg is None or not cfg.active:
        return None
    if seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(tensor_seed(seed, f"{name}/faults"))
    return fault_codes(fault_uniforms(shape, count, generator, device), cfg)


def apply_faults(
    g: list[torch.Tensor], codes: torch.Tensor | None, g_max: float
) -> list[torch.Tensor]:
    """The conductances ``g`` (one tensor per device, ``codes``' order) with the stuck devices at
    0 or ``g_max``; ``g`` itself without faults."""
    if codes is None:
        return g
    out = []
    for gi, code in zip(g, codes.to(g[0].device), strict=True):
        zero = torch.zeros((), dtype=gi.dtype, device=gi.device)
        gi = torch.where(code == OFF, zero, gi)
        out.append(torch.where(code == ON, torch.full_like(zero, g_max), gi))
    return out


def live_pairs(codes: torch.Tensor | None, pairs: int) -> list[torch.Tensor | None]:
    """Per pair, where at least one of its devices is not stuck (None: everywhere): a pair whose
    both devices are stuck has no programmable device left, so no programming error."""
    if codes is None:
        return [None] * pairs
    return [(codes[2 * k] == OK) | (codes[2 * k + 1] == OK) for k in range(pairs)]
