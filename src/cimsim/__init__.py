"""cimsim: simulate analog compute-in-memory chips, train networks that survive them (HA-SGD),
and measure their robustness by Monte Carlo over programmed chip instances."""

from cimsim.chip.adc import ADC, adc_quantize, calibrate_adc, set_adc
from cimsim.chip.attention import AnalogMultiheadAttention
from cimsim.chip.batchnorm import AnalogBatchNorm2d
from cimsim.chip.config import AnalogConfig
from cimsim.chip.conv1d import AnalogConv1d
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
from cimsim.chip.coverage import Coverage, coverage
from cimsim.chip.devices import Device, ProgrammedWeights, device_names, register_device
from cimsim.chip.layers import AnalogIdentity, AnalogLayer
from cimsim.chip.norm import AnalogBatchNorm1d, AnalogGroupNorm, AnalogLayerNorm
from cimsim.validation import ConfigError

__all__ = [
    "ADC",
    "AnalogBatchNorm1d",
    "AnalogBatchNorm2d",
    "AnalogConfig",
    "AnalogConv1d",
    "AnalogConv2d",
    "AnalogGroupNorm",
    "AnalogIdentity",
    "AnalogLayer",
    "AnalogLayerNorm",
    "AnalogLinear",
    "AnalogMultiheadAttention",
    "ConfigError",
    "Coverage",
    "Device",
    "ProgrammedWeights",
    "adc_quantize",
    "analog_layers",
    "calibrate_adc",
    "clear_chip",
    "convert_to_analog",
    "coverage",
    "device_names",
    "program_chip",
    "register_device",
    "set_adc",
    "set_noise",
    "set_time",
    "systematic_chip",
]
