"""ADC output quantization of mixed-signal CIM chips (MODEL.md section 3).

``adc_quantize`` is the maths; ``ADC`` holds the calibrated range. A model marks the points
where the authors' chip digitizes (block outputs) with ``ADC()`` modules: with ``levels=None``
they are the identity, so a digital model that carries them is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from cimsim.validation import check_int


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
        momentum: weight of each new batch in the moving average of the running min/max.
        placement: ``block`` for points a model marks itself, ``layer`` for the ADCs that
            ``convert_to_analog`` attaches after every analog layer.

    In ``train()`` mode the range tracks the batches (moving average) and the output is quantized
    with it, so a network can be trained with the ADC in the loop. In ``eval()`` mode the range is
    frozen and must have been calibrated (``calibrate_adc``) or tracked in training.
    """

    def __init__(self, levels: int | None = None, momentum: float = 0.1, placement: str = "block"):
        super().__init__()
        self.levels = levels
        self.momentum = momentum
        self.placement = placement
        self.active = True  # False when the model's placement is the other one
        self.observing = False  # calibration: track the range, output unquantized
        # The range is calibration state of one programmed chip, not a weight: not in state_dict.
        self.register_buffer("lo", torch.zeros(()), persistent=False)
        self.register_buffer("hi", torch.zeros(()), persistent=False)
        self.calibrated = False

    @property
    def enabled(self) -> bool:
        return self.active and self.levels is not None

    def reset_calibration(self) -> None:
        self.calibrated = False

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x.detach().float())
        if not self.calibrated:
            self.lo.copy_(lo)
            self.hi.copy_(hi)
            self.calibrated = True
        else:
            self.lo.lerp_(lo, self.momentum)
            self.hi.lerp_(hi, self.momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.training or self.observing:
            self._observe(x)
            if self.observing:
                return x
        elif not self.calibrated:
            raise RuntimeError(
                "ADC range is not calibrated: call cimsim.calibrate_adc(model, batches) after "
                "programming the chip (program_chip / set_noise / set_adc reset the calibration)"
            )
        return adc_quantize(x, self.lo, self.hi, self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, placement={self.placement!r}, active={self.active}"


def adcs(model: nn.Module, active_only: bool = True) -> list[ADC]:
    """The model's ADC modules (only those of its placement, by default)."""
    return [m for m in model.modules() if isinstance(m, ADC) and (m.active or not active_only)]


def set_adc(model: nn.Module, levels: int | None) -> nn.Module:
    """Set the number of ADC levels (``None`` = no ADC) of every active ADC, in place."""
    if levels is not None:
        check_int("adc_levels", levels, minimum=2)
    found = adcs(model)
    if levels is not None and not found:
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
def calibrate_adc(model: nn.Module, batches: Iterable, max_batches: int | None = None) -> int:
    """Calibrate every enabled ADC's range on data, with the chip as currently programmed.

    Runs the model in ``eval()`` mode over ``batches`` (tensors or ``(x, y)`` pairs), with the
    ADCs observing a moving average of their input's min/max and passing it through unquantized;
    the ranges are then frozen. Returns the number of batches used.
    """
    targets = [a for a in adcs(model) if a.enabled]
    if not targets:
        return 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for adc in targets:
        adc.reset_calibration()
        adc.observing = True
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
