"""Turn any torch model into its analog twin, and program chip instances on it."""

from __future__ import annotations

import copy
import dataclasses
import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from cimsim.chip.adc import CHIP_PLACEMENTS, adcs
from cimsim.chip.attention import AnalogMultiheadAttention
from cimsim.chip.batchnorm import AnalogBatchNorm2d, AnalogSyncBatchNorm
from cimsim.chip.config import AnalogConfig, check_relative
from cimsim.chip.conv1d import AnalogConv1d
from cimsim.chip.conv_linear import AnalogConv2d, AnalogLinear
from cimsim.chip.devices import device_names, get_device
from cimsim.chip.layers import AnalogIdentity, AnalogLayer
from cimsim.chip.norm import AnalogBatchNorm1d, AnalogGroupNorm, AnalogLayerNorm
from cimsim.validation import ConfigError, check_number

# Exact digital type -> analog type. Subclasses are left alone: their forward may differ.
_ANALOG_TYPES = {
    nn.Conv2d: AnalogConv2d,
    nn.Conv1d: AnalogConv1d,
    nn.Linear: AnalogLinear,
    nn.BatchNorm2d: AnalogBatchNorm2d,
    nn.SyncBatchNorm: AnalogSyncBatchNorm,
    nn.Identity: AnalogIdentity,
    nn.MultiheadAttention: AnalogMultiheadAttention,  # its projections: Linear crossbars
    nn.BatchNorm1d: AnalogBatchNorm1d,
    nn.LayerNorm: AnalogLayerNorm,
    nn.GroupNorm: AnalogGroupNorm,
}


def skip_reason(module: nn.Module, config: AnalogConfig) -> str | None:
    """Why ``convert_to_analog`` leaves a convertible ``module`` digital under ``config`` (None:
    it converts it, or its type is not one it converts)."""
    if type(module) is nn.BatchNorm1d:
        if not config.analog_norm:
            return "BatchNorm1d: digital by default (analog_norm=false)"
        if not module.track_running_stats:
            return "BatchNorm1d without running statistics: no fixed affine to store"
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not config.analog_bn:
            return f"{type(module).__name__}: digital (analog_bn=false)"
        if not module.track_running_stats:
            # Without running statistics there is no fixed affine to store on a chip.
            return f"{type(module).__name__} without running statistics: no fixed affine to store"
        return None
    if isinstance(module, nn.LayerNorm | nn.GroupNorm):
        if not config.analog_norm:
            return f"{type(module).__name__}: digital by default (analog_norm=false)"
        if not getattr(module, "elementwise_affine", getattr(module, "affine", False)):
            return f"{type(module).__name__} without affine: nothing stored"
        return None
    if isinstance(module, nn.Identity) and not config.identity_noise:
        return "Identity: digital (identity_noise=false)"
    return None


def _wanted(module: nn.Module, config: AnalogConfig) -> bool:
    return skip_reason(module, config) is None


def convert_to_analog(model: nn.Module, config: AnalogConfig, inplace: bool = False) -> nn.Module:
    """Return ``model`` with its layers replaced by analog ones (docs/model.md).

    Converts modules whose type is exactly ``nn.Conv2d``, ``nn.Conv1d``, ``nn.Linear``,
    ``nn.BatchNorm2d`` or ``nn.SyncBatchNorm`` (when ``config.analog_bn``), ``nn.Identity`` (when
    ``config.identity_noise``; in a residual network these are the identity shortcuts),
    ``nn.LayerNorm``, ``nn.GroupNorm`` and ``nn.BatchNorm1d`` (their affine, when
    ``config.analog_norm``) and ``nn.MultiheadAttention`` (its projections become
    ``AnalogLinear`` children, ``cimsim.chip.attention``; the attention itself stays digital).
    Subclasses are left alone (their forward may differ); ``cimsim.coverage`` lists what stays
    digital. Parameters keep their values, and ``state_dict`` its keys, so it stays
    interchangeable with the digital model's. ADC points the model marks with ``cimsim.ADC()``
    are used when ``adc_placement='block'``. An ``nn.TransformerEncoder`` holding analog layers
    no longer takes its nested-tensor path (torch's fused kernels read the digital weights).

    Args:
        model: any torch model.
        config: the chip.
        inplace: convert ``model`` itself instead of a deep copy.
    """
    if not isinstance(config, AnalogConfig):
        raise TypeError(f"config must be a cimsim.AnalogConfig, got {type(config).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    for module in list(model.modules()):
        analog_type = _ANALOG_TYPES.get(type(module))
        if analog_type is not None and _wanted(module, config):
            # Swap the class in place: parameters, buffers and hooks stay the same objects.
            module.__class__ = analog_type
            module._init_analog(config)
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and analog_layers(module):
            module.use_nested_tensor = False  # padded inputs would reach the layers as nested
    block_adcs = [a for a in adcs(model, active_only=False) if a.placement == "block"]
    if config.adc_levels is not None and config.adc_placement == "block" and not block_adcs:
        raise ConfigError(
            "adc_placement",
            "block",
            "this model marks no block outputs with cimsim.ADC(); use adc_placement='layer' "
            "or add ADC() modules where the chip digitizes",
        )
    for adc in adcs(model, active_only=False):
        if adc.placement not in CHIP_PLACEMENTS:  # a layer's periphery, set by the layer
            continue
        adc.active = adc.placement == config.adc_placement
        if adc.active:
            adc.levels = config.adc_levels
    return model


def analog_layers(model: nn.Module) -> list[tuple[str, AnalogLayer]]:
    """``(qualified name, layer)`` for every analog layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AnalogLayer)]


def _require_analog(model: nn.Module) -> list[tuple[str, AnalogLayer]]:
    layers = analog_layers(model)
    if not layers:
        raise ValueError("the model has no analog layers: call cimsim.convert_to_analog first")
    return layers


def _reset_adcs(model: nn.Module) -> None:
    for adc in adcs(model):
        adc.reset_calibration()


def set_noise(
    model: nn.Module, sigma: float | None = None, mean_shift: float | None = None
) -> nn.Module:
    """Change the noise level of every analog layer in place (``None`` keeps the current value).

    A programmed chip keeps its standard draws, so it is the same chip at the new level
    (common random numbers). ADC ranges must be recalibrated afterwards.
    """
    changes = {}
    if sigma is not None:
        check_relative("sigma", sigma)
        changes["sigma"] = float(sigma)
    if mean_shift is not None:
        check_relative("mean_shift", mean_shift, signed=True)
        changes["mean_shift"] = float(mean_shift)
    for _, layer in _require_analog(model):
        layer.config = dataclasses.replace(layer.config, **changes)
    _reset_adcs(model)
    return model


def program_chip(model: nn.Module, seed: int) -> nn.Module:
    """Program one chip instance: draw and freeze a perturbation for every analog tensor.

    The draws depend only on ``seed`` and each tensor's qualified name, not on ``sigma`` or the
    device. Used in ``eval()`` mode; ``train()`` mode always draws fresh noise.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError("seed", seed, "must be an integer")
    for name, layer in _require_analog(model):
        layer.program(seed, name)
    _reset_adcs(model)
    return model


def device_layers(model: nn.Module) -> list[AnalogLayer]:
    """The analog layers whose weights follow ``config.device`` (Conv/Linear)."""
    return [layer for _, layer in analog_layers(model) if layer.uses_device]


def timed_chip(model: nn.Module) -> bool:
    """Whether ``model`` has weights on a device whose reads depend on time (``Device.timed``:
    ``set_time`` and time sweeps apply)."""
    return any(layer.config.device_model.timed for layer in device_layers(model))


def set_time(model: nn.Module, t_inference: float, repetition: int = 0) -> nn.Module:
    """Move a programmed chip on a timed device (``device='pcm'``) to ``t_inference`` seconds
    after programming: every Conv/Linear reads its drifted, compensated weights once, with the
    read noise of read-out ``repetition`` (the same ``(chip, t, repetition)`` always reads the
    same; another repetition redraws only the read noise). ``program_chip`` starts at ``t = 0``.
    ADC ranges must be recalibrated afterwards. A device whose reads do not depend on time is a
    ``ConfigError`` on ``device``.
    """
    check_number("t_inference", t_inference, minimum=0.0)
    if isinstance(repetition, bool) or not isinstance(repetition, int) or repetition < 0:
        raise ConfigError("repetition", repetition, "must be an integer >= 0")
    timed = [n for n in device_names() if get_device(n).device_cls.timed]
    titles = " or ".join(get_device(n).device_cls.display() for n in timed)
    needs = f"set_time needs a programmed {titles} chip"
    untimed = [
        layer.config.device for layer in device_layers(model) if not layer.config.device_model.timed
    ]
    if untimed:
        why = f"{needs}: {untimed[0]!r} weights do not move in time (timed devices: {timed})"
        raise ConfigError("device", untimed[0], why)
    layers = [layer for _, layer in _require_analog(model) if layer.device_state is not None]
    if not layers:
        raise ValueError(
            f"{needs}: convert with AnalogConfig(device={timed[0]!r}) and call "
            "cimsim.program_chip(model, seed) first"
        )
    for layer in layers:
        layer.set_time(t_inference, repetition)
    _reset_adcs(model)
    return model


@contextmanager
def systematic_chip(model: nn.Module) -> Iterator[nn.Module]:
    """The model's chip without its random part, for its noise-free accuracy: inside, every
    analog layer whose chip has a mean shift reads ``p + r * mean_shift`` in ``eval()`` (sigma 0:
    deterministic, so one chip stands for all); outside, the layers are as they were. A model
    trained for a drifted chip is scored on that chip, not on its undrifted weights.

    For a model with no chip programmed (``clear_chip``); ADC ranges are kept (in training they
    track the drifted outputs). Weights on a device with state of its own (``pcm``) follow it, so
    those layers are left alone.
    """
    layers = [
        (name, layer, layer.config)
        for name, layer in analog_layers(model)
        if layer.config.mean_shift != 0.0 and not layer._device_weights
    ]
    try:
        for name, layer, config in layers:
            layer.config = dataclasses.replace(config, sigma=0.0)
            _program_zeros(layer, name)
        yield model
    finally:
        for _, layer, config in layers:
            layer.clear()
            layer.config = config


def _program_zeros(layer: AnalogLayer, name: str) -> None:
    """A programmed chip whose standard draws are all 0 (at sigma 0 any draws would do): no
    random numbers on the validation and test batches' path."""
    tensors = layer.analog_tensors()
    if not tensors:  # nothing stored (an identity shortcut): its draws come at its forward
        layer.program(0, name)
        return
    like = next(iter(layer.parameters(recurse=False)), None)
    if like is None:
        like = next(iter(layer.buffers(recurse=False)))
    layer.chip_seed, layer._chip_cache = 0, None
    for tensor, shape in tensors.items():
        setattr(layer, f"chip_{tensor}", torch.zeros(shape, device=like.device, dtype=like.dtype))


def clear_chip(model: nn.Module) -> nn.Module:
    """Forget the programmed chip: ``eval()`` runs without noise again."""
    for _, layer in analog_layers(model):
        layer.clear()
    _reset_adcs(model)
    return model


def build_network(spec: dict[str, Any]) -> nn.Module:
    """Build a network from ``{"_target_": "module.Class", **kwargs}`` (no Hydra needed)."""
    kwargs = dict(spec)
    target = kwargs.pop("_target_", None)
    if not isinstance(target, str) or "." not in target:
        raise ConfigError(
            "_target_", target, "must be a dotted path like 'cimsim.wide_resnet.WideResNet'"
        )
    module_name, _, attr = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError("_target_", target, f"cannot be imported ({err})") from err
    return cls(**kwargs)
