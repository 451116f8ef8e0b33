"""Noise schedules for training: which sigma each HA-SGD step trains at.

The chip's sigma is the target; the schedule decides the training sigma of each step:

* ``constant``: ``kappa * sigma`` every step (``kappa = 1``: plain HA-SGD; hardware-aware
  training studies find an over-scaled training noise of 1-2x the expected chip noise best,
  e.g. Joshi et al., Nat. Commun. 2020);
* ``ramp``: ``kappa * sigma * min(1, epoch / ramp_epochs)``, a linear warm-up that lets the
  network first fit the data (``epoch`` counts fractional epochs);
* ``uniform``: a sigma drawn each step uniformly from ``[low, high] * kappa * sigma``, a model
  that is robust over a range of chips.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cimsim.validation import ConfigError, check_choice, check_number

SCHEDULES = ("constant", "ramp", "uniform")


@dataclass(frozen=True)
class NoiseSchedule:
    """The training sigma as a function of the step.

    Attributes:
        kind: ``constant``, ``ramp`` or ``uniform``.
        kappa: factor on the chip's sigma (> 0; 1 = train at the chip's noise).
        ramp_epochs: epochs of the linear ramp (``ramp``), > 0.
        low: lower end of the uniform range, as a fraction of ``kappa * sigma`` (``uniform``).
        high: upper end, >= low.
    """

    kind: str = "constant"
    kappa: float = 1.0
    ramp_epochs: float = 10.0
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self):
        check_choice("kind", self.kind, SCHEDULES)
        check_number("kappa", self.kappa, minimum=0.0)
        if self.kappa == 0:
            raise ConfigError("kappa", self.kappa, "must be > 0")
        check_number("ramp_epochs", self.ramp_epochs, minimum=0.0)
        if self.kind == "ramp" and self.ramp_epochs == 0:
            raise ConfigError("ramp_epochs", self.ramp_epochs, "must be > 0 for a ramp")
        check_number("low", self.low, minimum=0.0)
        check_number("high", self.high, minimum=self.low)

    def sigma(self, target: float, epoch: float, generator: torch.Generator | None = None) -> float:
        """The training sigma at (fractional) ``epoch`` for a chip of noise ``target``."""
        base = self.kappa * target
        if self.kind == "ramp":
            return base * min(1.0, epoch / self.ramp_epochs)
        if self.kind == "uniform":
            u = torch.rand((), generator=generator).item()
            return base * (self.low + (self.high - self.low) * u)
        return base
