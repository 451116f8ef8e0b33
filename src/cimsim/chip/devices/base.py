"""The ``Device`` interface: how a device programs, reads and perturbs Conv/Linear weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch

# ``through_periphery(w, generator) -> y``: one-hot read-outs of weights ``w`` through the layer's
# tiles (output noise and tile ADC, normalized units), as a device's drift compensation may read.
Periphery = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class ProgrammedWeights(Protocol):
    """One weight tensor of one programmed chip: the device's frozen state (drawn from the chip
    seed and the tensor's name, so the same seed gives the same chip anywhere)."""

    def read(
        self, t_inference: float, repetition: int = 0, periphery: Periphery | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_t, alpha)``: the weights read ``t_inference`` s after programming (read-out
        ``repetition``; the same arguments always read the same) and the gain on the layer's
        analog output (a 0-d 1 without compensation). ``periphery``: see ``Periphery``; None
        when the tiles' outputs have neither noise nor an ADC."""
        ...


class Device:
    """A device model of Conv/Linear weights, bound to its validated config (``self.config``).

    Register a subclass with ``cimsim.register_device(name, ConfigClass, DeviceClass)``; select it
    with ``AnalogConfig(device=name, <name>={...})`` (Hydra ``noise.device=<name>``,
    ``evaluate.py chip.device=<name>``). Biases, BatchNorm and identity shortcuts keep the chip's
    relative perturbation (``sigma``, ``mean_shift``: digital at 0) whatever the device.

    Capabilities, read by the rest of cimsim instead of the device's name:
        timed: its reads depend on the time since programming: ``set_time``, time sweeps
            (``robustness.times``) and ``t_train`` (HA-SGD trains against the chip at that time).
        symmetric: its training draws may be replayed negated (``hasgd.antithetic``).
        scalable: a training sigma schedule (``noise.schedule``) scales its perturbation.
        stateful: it programs its own state (``program``, ``training_perturbation``); False only
            for ``relative``, whose weights take the chip's relative perturbation.
        recorded: its config is part of every chip's record (its defaults unless selected):
            ``pcm``, which every ``AnalogConfig`` carried before devices were plug-ins, so
            checkpoints and rows files keep their fingerprints. False for plug-ins.
        variants: robustness preset keys that list settings of one config field, a test chip
            each (``{"compensations": "drift_compensation"}``): new keys, neither a preset's own
            (``sigmas``, ``chips``, ...) nor another device's (``register_device`` refuses).
        conductances: its weights live on pairs of conductances, so the chip's stuck-at faults
            and device pairs (``AnalogConfig.faults``, ``AnalogConfig.pairs``) apply to it; a
            chip that sets them on a device without is refused. ``relative`` and ``pcm`` have
            them, and so does any ``ConductanceDevice`` (``cimsim.chip.devices.conductance``:
            implement its conductance-level hook and both come for free).

    Set on the bound device by ``AnalogConfig`` (None outside one: no faults, one pair):
        faults: the chip's ``FaultsConfig``; pairs: its ``PairsConfig``.
    """

    name: ClassVar[str] = ""  # set by register_device
    title: ClassVar[str] = ""  # for labels and messages ("PCM"); the name when empty
    timed: ClassVar[bool] = False
    symmetric: ClassVar[bool] = False
    scalable: ClassVar[bool] = False
    stateful: ClassVar[bool] = True
    recorded: ClassVar[bool] = False
    variants: ClassVar[dict[str, str]] = {}
    conductances: ClassVar[bool] = False
    faults: Any = None
    pairs: Any = None

    def __init__(self, config: Any):
        self.config = config

    @classmethod
    def display(cls) -> str:
        """The device's name in labels and messages."""
        return cls.title or cls.name

    def check_cells(self, faults: Any, pairs: Any) -> None:
        """Refuse a combination of the device's settings with the chip's ``faults`` and
        ``pairs`` it cannot model (a ``ConfigError``); called when a chip is built."""

    def check_time(self, t: float, key: str) -> None:
        """Refuse a time (s after programming) this device cannot be read at: a ``ConfigError``
        on ``key`` naming the allowed ones. Called for ``noise.t_train`` before training and for
        every time of a sweep before any chip is measured; any time is fine by default."""

    def label(self, chip: Any) -> str | None:
        """Its part of the recipe label of a model trained on ``chip`` (an ``AnalogConfig``):
        ``PCM t_train=3600s``; None: nothing."""
        return self.display()

    def program(
        self, weight: torch.Tensor, seed: int, name: str, tiles: list[slice] | None = None
    ) -> ProgrammedWeights:
        """Program ``weight`` (output channels first) on chip ``seed`` as tensor ``name``
        (``layer1.0.conv1.weight``); ``tiles``: the layer's crossbar tiles (input columns)."""
        raise NotImplementedError(f"device {self.name!r} does not program weights")

    def training_perturbation(
        self, weight: torch.Tensor, t_train: float, tiles: list[slice] | None = None
    ) -> torch.Tensor:
        """A fresh perturbation ``nu = W_chip - W`` of a new chip (read at ``t_train`` when
        ``timed``) for one HA-SGD sample: detached, shaped and typed like ``weight``; drawn from
        the global RNG of ``weight``'s device (the training stream)."""
        raise NotImplementedError(f"device {self.name!r} has no training perturbation")
