"""cimsim: simulate analog compute-in-memory chips, train networks that survive them (HA-SGD),
and measure their robustness by Monte Carlo over programmed chip instances."""

from cimsim.chip.adc import ADC, adc_quantize, calibrate_adc, set_adc
from cimsim.chip.batchnorm import AnalogBatchNorm2d
from cimsim.chip.config import AnalogConfig
from cimsim.chip.conv_linear import AnalogConv2d, AnalogLinear
from cimsim.chip.convert import (
    analog_layers,
    clear_chip,
    convert_to_analog,
    program_chip,
    set_noise,
    set_time,
    systematic_chip,
)
from cimsim.chip.devices import Device, ProgrammedWeights, device_names, register_device
from cimsim.chip.layers import AnalogIdentity, AnalogLayer
from cimsim.validation import ConfigError

__all__ = [
    "ADC",
    "AnalogBatchNorm2d",
    "AnalogConfig",
    "AnalogConv2d",
    "AnalogIdentity",
    "AnalogLayer",
    "AnalogLinear",
    "ConfigError",
    "Device",
    "ProgrammedWeights",
    "adc_quantize",
    "analog_layers",
    "calibrate_adc",
    "clear_chip",
    "convert_to_analog",
    "device_names",
    "program_chip",
    "register_device",
    "set_adc",
    "set_noise",
    "set_time",
    "systematic_chip",
]
