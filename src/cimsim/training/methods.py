"""The built-in training methods, a model's methods (TrainingMethods), its label and pass count."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cimsim.chip.config import AnalogConfig
from cimsim.chip.noise import antithetic as antithetic_draws
from cimsim.robustness.grid import RobustnessGrid
from cimsim.robustness.study import Subject, subject_label
from cimsim.training.checkpoint import load_module
from cimsim.training.distill import distillation_loss
from cimsim.training.hasgd import frozen_running_stats, sam_ascent
from cimsim.training.method import (
    METHODS,
    LossFn,
    Setting,
    Step,
    TrainingMethod,
    method_settings,
    register_method,
)
from cimsim.training.schedule import NoiseSchedule
from cimsim.validation import ConfigError, check_choice, check_number

__all__ = [
    "Setting",
    "Step",
    "TrainingMethod",
    "TrainingMethods",
    "method_settings",
    "model_subject",
    "passes_per_step",
    "recipe_label",
    "register_method",
    "training_passes",
]


class TrainingMethods:
    """The settings of every registered method for one model (immutable), and the hooks of all
    of them together. ``TrainingMethods(sam_rho=0.05)``: the rest take their defaults."""

    def __init__(self, **values: Any):
        known = method_settings()
        for key, value in values.items():
            if key not in known:
                why = "no registered training method has this setting (a plug-in: plugins=[module])"
                raise ConfigError(key, value, why)
        s = {f: copy.deepcopy(setting.default) for f, setting in known.items()} | values
        for method in METHODS.values():
            method.validate(s)
        self.__dict__.update(s)

    @classmethod
    def for_training(cls, **values: Any) -> TrainingMethods:
        """As ``TrainingMethods(**values)``, after the checks only training needs."""
        for method in METHODS.values():
            method.for_training(values)
        return cls(**values)

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrainingMethods) and vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TrainingMethods({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"

    def asdict(self) -> dict:
        """Plain values (what a checkpoint stores as ``hyper_parameters.methods``)."""
        plain = dataclasses.asdict
        return {k: plain(v) if dataclasses.is_dataclass(v) else v for k, v in vars(self).items()}

    def check(self, chip: AnalogConfig, L: int) -> None:
        for method in METHODS.values():
            method.check(self, chip, L)

    def label(self) -> list[str]:
        return [part for method in METHODS.values() for part in method.label(self)]

    def passes(self, L: int) -> int:
        """Forward-backward passes per step: L, plus the methods' extra ones."""
        return L + sum(method.extra_passes(self) for method in METHODS.values())

    def forwards(self) -> int:
        """Forward-only passes per step (a distillation teacher's)."""
        return sum(method.extra_forwards(self) for method in METHODS.values())

    def on_fit_start(self, module: nn.Module) -> None:
        for method in METHODS.values():
            method.on_fit_start(self, module)

    def sigma(self, sigma: float, epoch: float) -> float:
        for method in METHODS.values():
            sigma = method.sigma(self, sigma, epoch)
        return sigma

    def loss(self, module, x, y, loss: LossFn) -> LossFn:
        for method in METHODS.values():
            loss = method.loss(self, module, x, y, loss)
        return loss

    @contextmanager
    def around_samples(self, step: Step) -> Iterator[None]:
        with ExitStack() as stack:
            for method in METHODS.values():
                stack.enter_context(method.around_samples(self, step))
            yield

    @contextmanager
    def sample(self, i: int) -> Iterator[None]:
        with ExitStack() as stack:
            for method in METHODS.values():
                stack.enter_context(method.sample(self, i))
            yield


def recipe_label(chip: AnalogConfig, L: int, methods: TrainingMethods | None = None) -> str:
    """A model's training recipe, from its training ``chip``, HA-SGD's ``L`` samples per step and
    the training methods: ``train sigma=0.1, L=4`` (then ``mu=..``, ``ADC n``, ``PCM``, the
    crossbar periphery, then each method's parts: ``antithetic``, the schedule, ``SAM rho``,
    ``distilled`` when set)."""
    parts = [f"train sigma={chip.sigma:g}", f"L={L}"]
    if chip.mean_shift:
        parts.append(f"mu={chip.mean_shift:g}")
    if chip.adc_levels:
        parts.append(f"ADC {chip.adc_levels}")
    device = chip.device_model.label(chip)  # the device's part: PCM t_train=3600s
    if device:
        parts.append(device)
    parts += periphery_parts(chip)
    if chip.faults.active:  # HA-SGD with faults in the loop
        parts.append(f"faults off {chip.faults.stuck_off:g} on {chip.faults.stuck_on:g}")
    if chip.pairs.count > 1:
        parts.append("pairs f=" + "/".join(f"{f:g}" for f in chip.pairs.f))
    parts += (methods or TrainingMethods()).label()
    return ", ".join(parts)


def periphery_parts(chip: AnalogConfig) -> list[str]:
    """The crossbar periphery a model was trained with, for its recipe label."""
    parts = []
    if chip.tile_rows is not None:
        parts.append(f"tiles {chip.tile_rows} rows")
    if chip.dac_levels is not None:
        parts.append(f"DAC {chip.dac_levels}" + (" learned" if chip.dac_range == "learned" else ""))
    if chip.tile_adc_levels is not None:
        parts.append(f"tile ADC {chip.tile_adc_levels}")
    if chip.out_noise:
        parts.append(f"out noise {chip.out_noise:g}")
    if chip.w_read_noise:
        parts.append(f"read noise {chip.w_read_noise:g}")
    if chip.ir_drop:
        parts.append(f"IR drop {chip.ir_drop:g}, g ratio {chip.ir_drop_g_ratio:.4g}")
    return parts


def training_passes(global_step: int, L: int, methods: TrainingMethods) -> int:
    """Forward-backward passes a training run took: L per step, one more with SAM's ascent."""
    return int(global_step) * methods.passes(L)


def model_subject(
    model,
    grid: RobustnessGrid,
    ckpt: str = "",
    *,
    trained: AnalogConfig | None = None,
    ckpt_sha256: str | None = None,
    global_step: int | None = None,
) -> Subject:
    """A trained model (``AnalogClassifier``) as a study's subject on its chip ``model.chip``,
    named by its training recipe (``recipe_label`` of the ``trained`` chip: ``model.chip``
    unless it was loaded onto another test chip) and that test chip (``subject_label``); with
    ``global_step``, the forward-backward passes its training took."""
    recipe = recipe_label(trained or model.chip, model.L, model.methods)
    label = subject_label(recipe, model.chip, grid)
    passes = None if global_step is None else training_passes(global_step, model.L, model.methods)
    return Subject(label, model.net.eval(), grid, ckpt, ckpt_sha256=ckpt_sha256, passes=passes)


def passes_per_step(L: int, methods: TrainingMethods) -> float:
    """A step's compute in forward-backward passes, a forward-only pass (a distillation
    teacher's) counted as a third of one."""
    return methods.passes(L) + methods.forwards() / 3


# ----------------------------------------------------------------------------- the methods


class Antithetic(TrainingMethod):
    """Samples in pairs ``+dw, -dw`` (L even; symmetric draws only)."""

    settings = {"antithetic": Setting(False, "hasgd.antithetic")}

    def validate(self, s):
        check_choice("antithetic", s["antithetic"], (True, False))

    def check(self, m, chip, L):
        if m.antithetic and L % 2:
            raise ConfigError("hasgd.antithetic", True, f"needs an even L (hasgd.L={L})")
        if m.antithetic and not chip.device_model.symmetric:
            title = chip.device_model.display()
            why = f"needs noise.device=relative: {title} draws are not symmetric"
            raise ConfigError("hasgd.antithetic", True, why)

    def label(self, m):
        return ["antithetic"] if m.antithetic else []

    def sample(self, m, i):
        if not m.antithetic:
            return nullcontext()
        return antithetic_draws("replay" if i % 2 else "record")


class Schedule(TrainingMethod):
    """The training sigma per step (``NoiseSchedule``, or its fields)."""

    settings = {"schedule": Setting({}, "noise.schedule")}

    def validate(self, s):
        if s["schedule"] is None or isinstance(s["schedule"], dict):
            try:
                s["schedule"] = NoiseSchedule(**(s["schedule"] or {}))
            except ConfigError as err:
                raise err.with_prefix("schedule") from None

    def check(self, m, chip, L):
        schedule = m.schedule
        if not chip.device_model.scalable and (schedule.kind != "constant" or schedule.kappa != 1):
            raise ConfigError(
                "noise.schedule.kind",
                schedule.kind,
                f"must be constant with kappa 1 under noise.device={chip.device}: a schedule "
                f"scales the relative sigma, not the {chip.device_model.display()} device",
            )

    def label(self, m):
        schedule, parts = m.schedule, []
        if schedule.kind == "ramp":
            parts.append(f"ramp {schedule.ramp_epochs:g} ep")
        elif schedule.kind == "uniform":
            parts.append(f"uniform [{schedule.low:g}, {schedule.high:g}]")
        if schedule.kappa != 1:
            parts.append(f"x{schedule.kappa:g} sigma")
        return parts

    def sigma(self, m, sigma, epoch):
        return m.schedule.sigma(sigma, epoch)


class SAM(TrainingMethod):
    """A sharpness-aware ascent step before the samples (rho 0 = off; ASAM: scaled by |w|)."""

    settings = {
        "sam_rho": Setting(0.0, "hasgd.sam.rho"),
        "sam_adaptive": Setting(False, "hasgd.sam.adaptive"),
    }

    def validate(self, s):
        check_number("sam_rho", s["sam_rho"], minimum=0.0)
        check_choice("sam_adaptive", s["sam_adaptive"], (True, False))

    def label(self, m):
        return [f"{'ASAM' if m.sam_adaptive else 'SAM'} {m.sam_rho:g}"] if m.sam_rho else []

    def extra_passes(self, m):
        return 1 if m.sam_rho > 0 else 0

    @contextmanager
    def around_samples(self, m, step):
        if not m.sam_rho > 0:
            yield
            return
        # the ascent gradient from one sample: no statistics update, no all-reduce
        no_sync = step.grad_sync(False) if step.grad_sync else nullcontext()
        with frozen_running_stats(step.net), no_sync:
            step.backward(step.closure())
        step.correct.clear()
        with sam_ascent(list(step.net.parameters()), m.sam_rho, m.sam_adaptive):
            step.optimizer.zero_grad()
            yield


class Distill(TrainingMethod):
    """Distillation from a checkpoint's clean network (the teacher; loaded at fit start, kept
    out of the module tree: not in the state_dict, the optimizer or SAM's ascent)."""

    settings = {
        "teacher": Setting(None, "distill.teacher"),
        "distill_beta": Setting(0.5, "distill.beta"),
        "distill_temperature": Setting(4.0, "distill.temperature"),
    }

    def validate(self, s):
        if s["teacher"] is not None and not isinstance(s["teacher"], str):
            raise ConfigError("teacher", s["teacher"], "must be a checkpoint path or null")
        check_number("distill_beta", s["distill_beta"], minimum=0.0, maximum=1.0)
        check_number("distill_temperature", s["distill_temperature"], minimum=0.0)
        if s["distill_temperature"] == 0:
            raise ConfigError("distill_temperature", 0, "must be > 0")

    def for_training(self, s):
        teacher = s.get("teacher")
        if teacher is not None:  # needed to train, not to load: stored absolute, checked here
            if not Path(teacher).is_file():
                raise ConfigError("teacher", teacher, "no such checkpoint file")
            s["teacher"] = str(Path(teacher).resolve())

    def label(self, m):
        return ["distilled"] if m.teacher else []

    def extra_forwards(self, m):
        return 1 if m.teacher else 0

    def on_fit_start(self, m, module):
        if m.teacher and module.__dict__.get("teacher") is None:
            teacher = load_module(
                type(module), m.teacher, map_location=module.device, weights_only=True
            )
            module.__dict__["teacher"] = teacher.net.eval().requires_grad_(False)  # no chip

    def loss(self, m, module, x, y, loss):
        if module.__dict__.get("teacher") is None:
            return loss
        with torch.no_grad():  # once per batch, reused by the L samples
            teacher = module.__dict__["teacher"](x)
        beta, T = m.distill_beta, m.distill_temperature
        return lambda logits: distillation_loss(logits, teacher, y, beta, T)


register_method("antithetic", Antithetic())
register_method("schedule", Schedule())
register_method("sam", SAM())
register_method("distill", Distill())
