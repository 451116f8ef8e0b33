"""The device registry: ``register_device``, lookup by name, and ``plugins=[module]`` loading."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable
from typing import NamedTuple

from cimsim.chip.devices.base import Device
from cimsim.validation import ConfigError


class Registration(NamedTuple):
    """One registered device: its name, validated config dataclass and ``Device`` subclass."""

    name: str
    config_cls: type
    device_cls: type[Device]


_REGISTRY: dict[str, Registration] = {}
# Names a device may not take: AnalogConfig's fields and attributes (``chip.<name>`` keys).
_RESERVED: set[str] = set()


def reserve_names(names: Iterable[str]) -> None:
    """Keep ``names`` from ever naming a device (called by ``cimsim.chip.config``)."""
    _RESERVED.update(names)


def register_device(name: str, config_cls: type, device_cls: type[Device]) -> None:
    """Make device ``name`` selectable: ``AnalogConfig(device=name, <name>={...})``.

    Args:
        name: a lowercase identifier, also the config key (``noise.<name>.<field>``,
            ``chip.<name>.<field>``).
        config_cls: a dataclass (frozen, so chips compare and hash) whose ``__post_init__``
            validates, raising ``cimsim.ConfigError`` naming the field; constructible with no
            arguments (its defaults).
        device_cls: a ``cimsim.Device`` subclass, built as ``device_cls(config)``.

    Registering a plug-in's name again replaces it (a module run twice, as a notebook cell
    may); the built-in devices stay.
    """
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"device name {name!r} must be a lowercase identifier")
    if name.startswith("_") or name in _RESERVED:
        raise ValueError(f"device name {name!r} is taken by an AnalogConfig field or attribute")
    if not dataclasses.is_dataclass(config_cls) or not isinstance(config_cls, type):
        raise TypeError(f"config_cls of device {name!r} must be a dataclass, got {config_cls!r}")
    if not isinstance(device_cls, type) or not issubclass(device_cls, Device):
        raise TypeError(f"device_cls of device {name!r} must subclass cimsim.Device")
    old = _REGISTRY.get(name)
    if old is not None and old.device_cls.__module__.startswith(__package__ + "."):
        if _qualified(old.device_cls) != _qualified(device_cls):
            raise ValueError(f"device {name!r} is built in: register yours under another name")
    config_cls()  # its defaults must be a valid config
    for key, field in device_cls.variants.items():
        if field not in {f.name for f in dataclasses.fields(config_cls)}:
            raise ValueError(f"device {name!r}: variants[{key!r}] names no field of its config")
    device_cls.name = name
    _REGISTRY[name] = Registration(name, config_cls, device_cls)


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
