"""The device registry: ``register_device``, lookup by name, and ``plugins=[module]`` loading."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable
from typing import Any, NamedTuple

from cimsim.chip.devices.base import Device
from cimsim.validation import ConfigError


class Registration(NamedTuple):
    """One registered device: its name, validated config dataclass and ``Device`` subclass."""

    name: str
    config_cls: type
    device_cls: type[Device]

    def owns(self, config: Any) -> bool:
        """Whether ``config`` is of this device's config class: an instance, or of a class of the
        same qualified name (defined by an earlier run of the plug-in's module)."""
        cls = type(config)
        return isinstance(config, self.config_cls) or (
            dataclasses.is_dataclass(cls) and _qualified(cls) == _qualified(self.config_cls)
        )

    def current(self, config: Any) -> Any:
        """``config`` (one it ``owns``) as an instance of the registered class, built from its
        fields (validated again) when an earlier class of the same name made it."""
        if isinstance(config, self.config_cls):
            return config
        fields = dataclasses.fields(config)
        return self.config_cls(**{f.name: getattr(config, f.name) for f in fields if f.init})


_REGISTRY: dict[str, Registration] = {}
# Names a device may not take: AnalogConfig's fields and attributes (``chip.<name>`` keys, added
# by ``cimsim.chip.config``), and the other keys of the ``noise`` group and of the run configs
# beside a device's settings (``noise.schedule`` is a training method's; ``plugins=[module]``).
_RESERVED: set[str] = {"schedule", "plugins", "defaults"}
# Keys a device's ``variants`` may not take: the robustness presets' own keys (RobustnessGrid's
# fields, conf/robustness/shared/base.yaml's, ``variants``); tests/chip/test_device_plugin.py
# checks this list against them (the robustness layer is above this one: no import).
RESERVED_VARIANTS = frozenset(
    {
        "sigmas", "mean_shifts", "adc_levels", "chips", "times", "repetitions", "adc_kind",
        "name", "x", "max_batches", "calib_split", "calib_batches", "calib_momentum",
        "target_sigma", "variants", "defaults", "fault_rates", "fault_kind", "outcomes",
    }
)  # fmt: skip


def reserve_names(names: Iterable[str]) -> None:
    """Keep ``names`` from ever naming a device (called by ``cimsim.chip.config``)."""
    _RESERVED.update(names)


def register_device(
    name: str, config_cls: type, device_cls: type[Device], *, replace: bool = False
) -> None:
    """Make device ``name`` selectable: ``AnalogConfig(device=name, <name>={...})``.

    Args:
        name: a lowercase identifier, also the config key (``noise.<name>.<field>``,
            ``chip.<name>.<field>``).
        config_cls: a dataclass (frozen, so chips compare and hash) whose ``__post_init__``
            validates, raising ``cimsim.ConfigError`` naming the field; constructible with no
            arguments (its defaults).
        device_cls: a ``cimsim.Device`` subclass, built as ``device_cls(config)``; its
            ``variants`` keys must be new robustness preset keys, declared by no other device.
        replace: let a config class of another qualified name take a plug-in's name.

    Registering a plug-in's name again replaces it when its config class has the same qualified
    name (``module.QualName``) as the registered one: the module run again, as a notebook cell
    may. Chips built before keep working: a config of the earlier class counts as the new
    class's, converted through its fields (which must still fit). A config class of another
    qualified name under a taken name is refused, unless ``replace=True`` says so (configs of
    the earlier class are then refused). The built-in devices stay.
    """
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"device name {name!r} must be a lowercase identifier")
    if name.startswith("_") or name in _RESERVED:
        why = "an AnalogConfig field or attribute, or another key of the noise group or run config"
        raise ValueError(f"device name {name!r} is taken by {why}")
    if not dataclasses.is_dataclass(config_cls) or not isinstance(config_cls, type):
        raise TypeError(f"config_cls of device {name!r} must be a dataclass, got {config_cls!r}")
    if not isinstance(device_cls, type) or not issubclass(device_cls, Device):
        raise TypeError(f"device_cls of device {name!r} must subclass cimsim.Device")
    old = _REGISTRY.get(name)
    if old is not None and old.device_cls.__module__.startswith(__package__ + "."):
        if _qualified(old.device_cls) != _qualified(device_cls):
            raise ValueError(f"device {name!r} is built in: register yours under another name")
    if old is not None and not replace and _qualified(old.config_cls) != _qualified(config_cls):
        raise ValueError(
            f"device {name!r} is registered with config {_qualified(old.config_cls)}, not "
            f"{_qualified(config_cls)}: another name, or register_device(..., replace=True)"
        )
    config_cls()  # its defaults must be a valid config
    _check_variants(name, config_cls, device_cls)
    device_cls.name = name
    _REGISTRY[name] = Registration(name, config_cls, device_cls)


def _check_variants(name: str, config_cls: type, device_cls: type[Device]) -> None:
    """Each of ``device_cls.variants`` names a field of its config, under a key that is not a
    robustness preset's own nor another registered device's."""
    for key, field in device_cls.variants.items():
        if field not in {f.name for f in dataclasses.fields(config_cls)}:
            raise ValueError(f"device {name!r}: variants[{key!r}] names no field of its config")
        if key in RESERVED_VARIANTS:
            raise ValueError(f"device {name!r}: variants key {key!r} is a robustness preset key")
        holder = next((r.name for r in _REGISTRY.values() if key in r.device_cls.variants), name)
        if holder != name:
            raise ValueError(
                f"device {name!r}: variants key {key!r} is declared by device {holder!r}"
            )


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def device_names() -> tuple[str, ...]:
    """The registered devices, in registration order (the built-ins first)."""
    return tuple(_REGISTRY)


def get_device(name: str, key: str = "device") -> Registration:
    """The registration of device ``name``; a ``ConfigError`` on ``key`` naming the choices."""
    if not isinstance(name, str) or name not in _REGISTRY:
        allowed = "allowed values are " + ", ".join(map(repr, _REGISTRY))
        raise ConfigError(key, name, f"{allowed} (a plug-in device: plugins=[module])")
    return _REGISTRY[name]


def variant_lists() -> dict[str, tuple[str, str]]:
    """Robustness preset keys that list device settings: key -> (device, config field)."""
    return {k: (r.name, f) for r in _REGISTRY.values() for k, f in r.device_cls.variants.items()}


def load_plugins(modules, key: str = "plugins") -> list:
    """Import ``modules`` (dotted names; each registers its devices on import), in order: the
    ``plugins=[module]`` config key, read before anything else of the config is used."""
    if modules is None:
        return []
    if isinstance(modules, str) or not isinstance(modules, Iterable):
        raise ConfigError(key, modules, "must be a list of importable modules: plugins=[my_mod]")
    loaded = []
    for module in modules:
        if not isinstance(module, str) or not module:
            raise ConfigError(key, module, "must be a module name (a dotted path)")
        try:
            loaded.append(importlib.import_module(module))
        except ImportError as err:
            raise ConfigError(key, module, f"cannot be imported ({err})") from None
    return loaded
