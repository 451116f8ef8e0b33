"""Devices as plug-ins: the ``Device`` interface, its registry, the built-ins relative, pcm and
rram."""

# The built-in devices register themselves on import, the default first.
# isort: off
from cimsim.chip.devices import relative  # noqa: F401
from cimsim.chip.devices import pcm  # noqa: F401
from cimsim.chip.devices import rram  # noqa: F401

# isort: on
from cimsim.chip.devices.base import Device, Periphery, ProgrammedWeights
from cimsim.chip.devices.registry import (
    Registration,
    device_names,
    get_device,
    load_plugins,
    register_device,
    reserve_names,
    variant_lists,
)

__all__ = [
    "Device",
    "Periphery",
    "ProgrammedWeights",
    "Registration",
    "device_names",
    "get_device",
    "load_plugins",
    "register_device",
    "reserve_names",
    "variant_lists",
]
