"""``AnalogConfig``: what the chip does to a network (see MODEL.md sections 1 and 3)."""

from __future__ import annotations

from dataclasses import dataclass

from cimsim.validation import check_choice, check_int, check_number

DISTRIBUTIONS = ("gaussian", "uniform")
SCALES = ("half_range", "abs_max")
BIAS_MODES = ("separate", "shared", "digital")
ADC_PLACEMENTS = ("block", "layer")


@dataclass(frozen=True)
class AnalogConfig:
    """A typed, validated description of an analog compute-in-memory chip.

    Attributes:
        sigma: relative std of the programming/drift perturbation, as a fraction of each tensor's
            range (``0.05`` = 5 % of the range). Must be >= 0.
        mean_shift: relative mean of the perturbation (systematic drift), same units, any sign.
        distribution: ``gaussian`` (default) or ``uniform`` with the same std.
        scale: the range ``r`` noise is relative to: ``half_range`` = (max - min) / 2 (default,
            the authors'), or ``abs_max`` = max |p| (aihwkit, Joshi et al. 2020).
        per_channel: one range per output channel (row of the crossbar) instead of per tensor.
        bias: ``separate`` = bi-scale mapping [W b/s], bias perturbed relative to its own range
            (default, Wan et al. 2022); ``shared`` = relative to the weights' range (the naive
            mapping); ``digital`` = bias not perturbed.
        analog_bn: BatchNorm runs on the chip as a per-channel affine layer (default true).
        identity_noise: identity shortcuts get multiplicative noise ``x * (1 + mu + sigma*eps)``.
        adc_levels: ``None`` = no ADC; else the number of uniform ADC output levels (>= 2).
        adc_placement: ``block`` = at the points a model marks with ``ADCPoint`` (the authors'
            WRN: first conv, each residual block, before the classifier); ``layer`` = after every
            analog Conv/Linear/BatchNorm.
    """

    sigma: float = 0.0
    mean_shift: float = 0.0
    distribution: str = "gaussian"
    scale: str = "half_range"
    per_channel: bool = False
    bias: str = "separate"
    analog_bn: bool = True
    identity_noise: bool = True
    adc_levels: int | None = None
    adc_placement: str = "block"

    def __post_init__(self):
        check_number("sigma", self.sigma, minimum=0.0)
        check_number("mean_shift", self.mean_shift)
        check_choice("distribution", self.distribution, DISTRIBUTIONS)
        check_choice("scale", self.scale, SCALES)
        check_choice("per_channel", self.per_channel, (True, False))
        check_choice("bias", self.bias, BIAS_MODES)
        check_choice("analog_bn", self.analog_bn, (True, False))
        check_choice("identity_noise", self.identity_noise, (True, False))
        if self.adc_levels is not None:
            check_int("adc_levels", self.adc_levels, minimum=2)
        check_choice("adc_placement", self.adc_placement, ADC_PLACEMENTS)

    @property
    def noisy(self) -> bool:
        """Whether the perturbation is non-zero (otherwise layers run their digital op exactly)."""
        return self.sigma != 0.0 or self.mean_shift != 0.0
