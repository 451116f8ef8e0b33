"""The training-method protocol: a method's settings and step hooks, and the registry of them."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cimsim.chip.config import AnalogConfig

LossFn = Callable[[torch.Tensor], torch.Tensor]  # logits -> the loss of one forward


@dataclass(frozen=True)
class Setting:
    """One setting of a method: its default and its key in the training config (train.yaml)."""

    default: Any
    key: str


@dataclass
class Step:
    """One training step as ``TrainingMethod.around_samples`` sees it: ``closure`` runs one
    forward at ``w + dw`` and returns its loss, ``backward`` back-propagates it, ``grad_sync``
    (``None`` without DDP) switches the gradient all-reduce, ``correct`` collects each forward's
    accuracy (``train/acc``)."""

    net: nn.Module
    optimizer: Any
    closure: Callable[[], torch.Tensor]
    backward: Callable[[torch.Tensor], None]
    grad_sync: Callable[[bool], AbstractContextManager] | None
    correct: list


class TrainingMethod:
    """How a training step changes beyond HA-SGD's L samples. Every hook is a no-op here; a
    method overrides those it needs and does nothing while its settings leave it off.

    ``settings``: its fields of ``TrainingMethods`` (flat names, unique across methods; stored in
    every checkpoint), each with its default and its key in the training config. The hooks read
    them from ``m``, the model's ``TrainingMethods`` (``m.<field>``).
    """

    settings: dict[str, Setting] = {}

    def validate(self, s: dict) -> None:
        """Check (and normalize, in place) its values in ``s``; a ``ConfigError`` names the
        field."""

    def for_training(self, s: dict) -> None:
        """Checks that only training needs (a file that must exist), not loading a checkpoint."""

    def check(self, m: Any, chip: AnalogConfig, L: int) -> None:
        """Fail on a combination with the chip or L that cannot work, naming the config key."""

    def label(self, m: Any) -> list[str]:
        """Its parts of a model's recipe label (``recipe_label``), none while off."""
        return []

    def extra_passes(self, m: Any) -> int:
        """Forward-backward passes per step beyond the L samples."""
        return 0

    def extra_forwards(self, m: Any) -> int:
        """Forward-only passes per step (a teacher's), a third of a forward-backward pass each."""
        return 0

    def on_fit_start(self, m: Any, module: nn.Module) -> None:
        """Before training: load what the steps need."""

    def sigma(self, m: Any, sigma: float, epoch: float) -> float:
        """This step's training sigma, from the chip's (or the previous method's)."""
        return sigma

    def loss(self, m: Any, module, x, y, loss: LossFn) -> LossFn:
        """The loss of each forward of this batch, given the one so far (cross-entropy)."""
        return loss

    def around_samples(self, m: Any, step: Step) -> AbstractContextManager:
        """A context around the L samples; the optimizer steps after it exits."""
        return nullcontext()

    def sample(self, m: Any, i: int) -> AbstractContextManager:
        """A context around the forward and backward of sample ``i`` (0 .. L-1)."""
        return nullcontext()


METHODS: dict[str, TrainingMethod] = {}
# Names a setting may not take: the attributes of ``TrainingMethods`` (its hooks, ``passes``,
# ``forwards``, ``asdict``; cimsim.training.methods, a layer above: tests/training/
# test_method_registry.py checks this list against it), which a field of that name would hide.
RESERVED_SETTINGS = frozenset(dir(TrainingMethod)) | {"passes", "forwards", "asdict"}


def register_method(name: str, method: TrainingMethod) -> TrainingMethod:
    """Add ``method`` under ``name`` (its settings become fields of ``TrainingMethods``, so a
    setting is an identifier that names no attribute of it: ``passes``, ``label``, ``sigma``
    are refused); registering a name again replaces it."""
    if not isinstance(method, TrainingMethod):
        raise TypeError(f"{name}: {method!r} is not a TrainingMethod")
    for field in method.settings:
        if not isinstance(field, str) or not field.isidentifier() or field.startswith("_"):
            raise ValueError(f"{name}: setting {field!r} must be an identifier without a leading _")
        if field in RESERVED_SETTINGS:
            raise ValueError(f"{name}: setting {field!r} is taken by a TrainingMethods attribute")
    others = {f for n, m in METHODS.items() if n != name for f in m.settings}
    if clash := others & set(method.settings):
        raise ValueError(f"{name}: settings {sorted(clash)} belong to another method")
    METHODS[name] = method
    return method


def method_settings() -> dict[str, Setting]:
    """Every registered method's settings, by field name, in registration order."""
    return {f: s for m in METHODS.values() for f, s in m.settings.items()}
