"""ADC output quantization of mixed-signal CIM chips (docs/model.md, "ADC quantization").

``adc_quantize`` is the maths; ``ADC`` holds the calibrated range. A model marks the points
where the authors' chip digitizes (block outputs) with ``ADC()`` modules: with ``levels=None``
they are the identity, so a digital model that carries them is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from cimsim.validation import ConfigError, check_int, check_number


def adc_quantize(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, levels: int) -> torch.Tensor:
    """Uniform affine quantization of ``x`` to ``levels`` values over ``[lo, hi]``.

    The range is widened to include 0 and nudged so that 0 is exactly one of the levels (an
    integer zero point, as in integer-arithmetic quantization). Values outside are clipped.
    The gradient is straight-through inside the range and zero outside (clipped STE), so the
    ADC can be trained through.
    """
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    step = torch.clamp((hi - lo) / (levels - 1), min=torch.finfo(torch.float32).tiny)
    zero_point = torch.round(-lo / step)  # integer in [0, levels - 1]
    lo_q = -zero_point * step
    hi_q = (levels - 1 - zero_point) * step
    lo_q, hi_q = lo_q.to(x.dtype), hi_q.to(x.dtype)
    with torch.no_grad():
        q = torch.round(torch.clamp(x, lo_q, hi_q) / step) * step
    inside = (x >= lo_q) & (x <= hi_q)
    # Value exactly q; gradient 1 inside the range (x - x.detach() is 0 with d/dx = 1), else 0.
    return torch.where(inside, x - x.detach() + q, q)


class ADC(nn.Module):
    """Per-tensor N-level ADC with a calibrated, then frozen, range.

    Args:
        levels: number of output levels (>= 2), or ``None`` for no ADC (identity).
        momentum: weight of each new batch in the moving average of the running min/max while
            training with the ADC in the loop (0.01, the constant of the authors' observer).
        placement: ``block`` for points a model marks itself, ``layer`` for the ADCs that
            ``convert_to_analog`` attaches after every analog layer.

    In ``train()`` mode the range tracks the batches (moving average) and the output is quantized
    with it, so a network can be trained with the ADC in the loop. In ``eval()`` mode the range is
    frozen and must have been calibrated (``calibrate_adc``) or tracked in training. The range is
    part of the state_dict, so a network trained in the loop checkpoints and resumes with it.
    """

    def __init__(self, levels: int | None = None, momentum: float = 0.01, placement: str = "block"):
        super().__init__()
        self.levels = levels
        self.momentum = momentum
        self.placement = placement
        self.active = True  # False when the model's placement is the other one
        self.observing = False  # calibration: track the range (with calib_momentum)
        self.calib_momentum = momentum
        self.tracking = True  # False: train-mode forwards quantize without moving the range
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("_calibrated", torch.zeros((), dtype=torch.bool))

    @property
    def enabled(self) -> bool:
        return self.active and self.levels is not None

    @property
    def calibrated(self) -> bool:
        return bool(self._calibrated)

    @calibrated.setter
    def calibrated(self, value: bool) -> None:
        self._calibrated.fill_(bool(value))

    def reset_calibration(self) -> None:
        self.calibrated = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the range was saved: load as uncalibrated.
        for key, value in (("lo", 0.0), ("hi", 0.0), ("_calibrated", False)):
            state_dict.setdefault(prefix + key, torch.tensor(value))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def _observe(self, x: torch.Tensor, momentum: float) -> None:
        lo, hi = torch.aminmax(x.detach().float())
        if not self.calibrated:
            self.lo.copy_(lo)
            self.hi.copy_(hi)
            self.calibrated = True
        else:
            self.lo.lerp_(lo, momentum)
            self.hi.lerp_(hi, momentum)

    @property
    def calibratable(self) -> bool:
        """Whether ``calibrate_adc`` sets this range from data (a learned range is not)."""
        return True

    def _update_range(self, x: torch.Tensor) -> None:
        """Observe ``x`` when calibrating or training in the loop; else require a range."""
        if self.observing:
            self._observe(x, self.calib_momentum)
        elif self.training and (self.tracking or not self.calibrated):
            self._observe(x, self.momentum)
        elif not self.calibrated:
            raise RuntimeError(
                f"{type(self).__name__} range is not calibrated: call "
                "cimsim.calibrate_adc(model, batches) after programming the chip (program_chip "
                "/ set_noise / set_adc reset the calibration)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        self._update_range(x)
        return adc_quantize(x, self.lo, self.hi, self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, placement={self.placement!r}, active={self.active}"


CHIP_PLACEMENTS = ("block", "layer")  # the chip's ADC; "tile" and "dac" are the periphery's


def adcs(model: nn.Module, active_only: bool = True) -> list[ADC]:
    """The model's ADC modules, periphery converters (tile ADCs, DACs) included (only those of
    its placement, by default)."""
    return [m for m in model.modules() if isinstance(m, ADC) and (m.active or not active_only)]


def set_adc(model: nn.Module, levels: int | None, kind: str = "chip") -> nn.Module:
    """Set the number of ADC levels (``None`` = no ADC) of every active ADC, in place: the
    chip's block/layer ADCs (``kind='chip'``) or the crossbar tiles' ADCs (``kind='tile'``)."""
    if levels is not None:
        check_int("adc_levels", levels, minimum=2)
    placements = CHIP_PLACEMENTS if kind == "chip" else (kind,)
    found = [a for a in adcs(model) if a.placement in placements]
    if levels is not None and not found:
        if kind == "tile":
            raise ValueError(
                f"tile adc_levels={levels!r} is invalid for this model: it has no tile ADCs. "
                "Convert it with tile_adc_levels (or out_noise) set"
            )
        raise ValueError(
            f"adc_levels={levels!r} is invalid for this model: it has no ADC points. Convert it "
            "with adc_placement='layer', or mark block outputs with cimsim.ADC() modules"
        )
    for adc in found:
        adc.levels = levels
        adc.reset_calibration()
    return model


def _input_of(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, list | tuple) else batch


@torch.no_grad()
def calibrate_adc(
    model: nn.Module, batches: Iterable, max_batches: int | None = None, momentum: float = 0.01
) -> int:
    """Calibrate every enabled ADC's range on data, with the chip as currently programmed.

    Runs the model in ``eval()`` mode over ``batches`` (tensors or ``(x, y)`` pairs; training or
    validation data, never the test set). Sequentially, as the chip digitizes: on each batch an
    ADC first moves its range (the first batch sets it to the batch's min/max, later ones move
    it by ``momentum``, the moving average of the authors' observer) and then quantizes with it,
    so every ADC sees its upstream ADCs already quantizing. The ranges are then frozen.

    Args:
        model: a converted model with enabled ADCs.
        batches: calibration data in a fixed order (the ranges are then reproducible).
        max_batches: use only the first ``max_batches`` batches (None = all).
        momentum: weight of each batch after the first in the moving min/max, in (0, 1].

    Returns:
        The number of batches used.
    """
    targets = [a for a in adcs(model) if a.enabled and a.calibratable]
    if not targets:
        return 0
    check_number("calib_momentum", momentum, minimum=0.0, maximum=1.0)
    if momentum == 0:
        raise ConfigError("calib_momentum", momentum, "must be in (0, 1]")
    device = next(iter(model.parameters()), targets[0].lo).device
    was_training = model.training
    model.eval()
    for adc in targets:
        adc.reset_calibration()
        adc.observing, adc.calib_momentum = True, momentum
    n = 0
    try:
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            model(_input_of(batch).to(device))
            n += 1
    finally:
        for adc in targets:
            adc.observing = False
        model.train(was_training)
    if n == 0:
        raise ValueError("calibrate_adc got no batches: pass a non-empty loader or list")
    return n
