"""The test chip of evaluate.py: ``chip.<field>`` overrides, variants and device lists."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from cimsim import AnalogConfig, ConfigError
from cimsim.chip.convert import device_layers
from cimsim.chip.devices import get_device, variant_lists
from cimsim.robustness.grid import SWEEPS


def chip_overrides(cfg: DictConfig) -> dict:
    """The ``chip.<field>=VALUE`` settings that replace the training chip's on the test chip."""
    overrides = OmegaConf.to_container(cfg.chip) if cfg.get("chip") else {}
    names = [k for k in AnalogConfig.setting_keys() if k not in SWEEPS]  # with pcm, plug-ins
    for key, value in overrides.items():
        if key in SWEEPS:
            axis = {"sigma": "sigmas", "mean_shift": "mean_shifts", "t_inference": "times"}
            axis = axis.get(key, key)
            raise ConfigError(f"chip.{key}", value, f"is swept by the grid: set robustness.{axis}")
        if key not in names:
            allowed = "unknown chip field; allowed fields are " + ", ".join(names)
            raise ConfigError(f"chip.{key}", value, allowed)
    try:
        AnalogConfig(**overrides)  # each value checked before any checkpoint is loaded
    except ConfigError as err:  # nested keys too: chip.pcm.drift_compensation
        raise ConfigError(f"chip.{err.key}", err.value, err.allowed) from None
    return overrides


def check_variants(variants) -> list[dict]:
    """``robustness.variants``: null, or distinct test-chip settings (a curve each)."""
    if variants is None:
        return []
    variants = OmegaConf.to_container(variants) if OmegaConf.is_config(variants) else variants
    if (
        not isinstance(variants, list)
        or not variants
        or not all(isinstance(v, dict) for v in variants)
    ):
        why = "must be null or a non-empty list of chip settings: [{tile_rows: 256}, ...]"
        raise ConfigError("robustness.variants", variants, why)
    for v in variants:
        try:
            AnalogConfig(**v)
        except (ConfigError, TypeError) as err:
            raise ConfigError("robustness.variants", v, f"is not a chip setting ({err})") from None
    if len({repr(sorted(v.items())) for v in variants}) != len(variants):
        raise ConfigError("robustness.variants", variants, "must not repeat a setting")
    return variants


def chip_variants(cfg: DictConfig) -> list[dict]:
    """The overrides of each test chip of every checkpoint: the ``chip.<field>`` ones, once per
    ``robustness.variants`` entry or ``robustness.compensations`` setting (a curve each), unless
    a ``chip.<field>`` override names a varied field itself (it then wins over the preset's
    list: ``chip.tile_rows=256``, ``chip.pcm.drift_compensation=none``)."""
    overrides = chip_overrides(cfg)
    variants = check_variants(cfg.robustness.get("variants"))
    if variants and not any(k in overrides for v in variants for k in v):
        return [{**v, **overrides} for v in variants]
    for key, (device, field) in variant_lists().items():  # compensations: pcm's
        values, nested = cfg.robustness.get(key), overrides.get(device) or {}
        if values and field not in nested:
            return [{**overrides, device: {**nested, field: v}} for v in values]
    return [overrides]


def check_variant_lists(robustness) -> None:
    """The preset's lists of one device setting, a test chip each (``compensations``: pcm's
    drift compensations): null, or distinct valid settings."""
    for key, (device, field) in variant_lists().items():
        values = robustness.get(key)
        if values is None:
            continue
        if isinstance(values, str) or not values:
            raise ConfigError(key, values, f"must be null or a list of {device}.{field} settings")
        for v in values:
            try:
                get_device(device).config_cls(**{field: v})
            except ConfigError as err:
                raise ConfigError(key, v, err.allowed) from None
        if len(set(values)) != len(values):
            raise ConfigError(key, list(values), "must not repeat a setting")


def check_variant_devices(robustness, net, ckpt: str) -> None:
    """A preset's list of device settings needs a model on that device."""
    for key, (device, field) in variant_lists().items():
        values = robustness.get(key)
        if values and device not in {layer.config.device for layer in device_layers(net)}:
            title = get_device(device).device_cls.display()
            why = f"{ckpt} is not a {title} model (device={device!r}): it has no {field} to vary"
            raise ConfigError(f"robustness.{key}", list(values), why)


def override_chip(trained: AnalogConfig, overrides: dict) -> AnalogConfig:
    """The ``trained`` chip with ``overrides``; a device's nested override replaces only the
    fields it names (``chip.pcm.drift_compensation=none`` keeps the checkpoint's g_max)."""
    return trained.override(overrides)
