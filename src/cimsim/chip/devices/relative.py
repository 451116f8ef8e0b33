"""The ``relative`` device (the paper's): weights perturbed as ``W + r(W) (mu + sigma eps)``."""

from __future__ import annotations

from dataclasses import dataclass

from cimsim.chip.devices.base import Device
from cimsim.chip.devices.registry import register_device


@dataclass(frozen=True)
class RelativeConfig:
    """No settings of its own: the perturbation is the chip's ``sigma``, ``mean_shift``,
    ``distribution``, ``scale``, ``per_channel`` and ``bias`` mapping (``AnalogConfig``), shared
    with biases, BatchNorm and identity shortcuts."""


class RelativeDevice(Device):
    """The relative perturbation of ``cimsim.chip.noise`` on Conv/Linear weights (Wan et al.
    2022): no state of its own. A programmed chip freezes the layer's standard draws ``eps``
    (drawn from the chip seed and the tensor's name) and scales them by the chip's current sigma
    at each forward, so ``set_noise`` moves the same chip to another level; training draws are
    fresh each forward, symmetric (antithetic pairs negate them) and scaled by the schedule."""

    symmetric = True
    scalable = True
    stateful = False
    conductances = True  # chip.faults and chip.pairs: cimsim.chip.devices.conductance

    def label(self, chip) -> str | None:
        return None  # the recipe's ``train sigma=..`` already says it


register_device("relative", RelativeConfig, RelativeDevice)
