"""A layer's input DAC (docs/model.md, "The crossbar periphery"): per input vector, calibrated or
learned ranges, on ``cimsim.chip.periphery``'s symmetric quantizer."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from cimsim.chip.adc import ADC
from cimsim.chip.periphery import symmetric_quantize, track_bound


class DAC(ADC):
    """A layer's input DAC: ``x`` clipped to ``[-b_in, b_in]`` and rounded to ``levels`` values.

    ``mode="per_vector"`` (aihwkit's ``noise_management=abs_max``): ``b_in`` is each input
    vector's own max ``|x|``, given by the layer per call (``forward(x, bound)``); nothing to
    calibrate, and the end levels are exactly ``+-max|x|``.
    ``mode="calibrated"``: ``b_in`` is calibrated on data like an ADC range (the moving max of
    ``|x|``; ``calibrate_adc`` after programming, tracked while training in the loop).
    ``mode="learned"``: ``b_in`` is a parameter set from the first batch's max ``|x|`` it sees
    (the max over processes under DDP), then trained through the straight-through gradient
    (``symmetric_quantize``: the clipped inputs pass ``sign(x) * grad`` to it, two-sided and
    unscaled; aihwkit-lightning's input-range learning is one-sided, scaled and decayed, and
    starts from a multiple of the std); it is part of the trained network, so programming a chip
    does not reset it.
    """

    def __init__(self, levels: int | None, mode: str = "calibrated", momentum: float = 0.01):
        super().__init__(levels, momentum=momentum, placement="dac")
        self.mode = mode
        if mode == "learned":
            self.b_in = nn.Parameter(torch.ones(()))

    @property
    def learned(self) -> bool:
        return self.mode == "learned"

    @property
    def calibratable(self) -> bool:
        return self.mode == "calibrated"

    def reset_calibration(self) -> None:
        if not self.learned:
            super().reset_calibration()

    @torch.no_grad()
    def _observe(self, x: torch.Tensor, momentum: float) -> None:
        track_bound(self, x.detach().abs().amax().float(), momentum)

    def bound(self, x: torch.Tensor) -> torch.Tensor:
        """``b_in`` of a static range (calibrated or learned) for ``x``, setting it first where
        this forward does (calibration, training, a learned range's first batch)."""
        if self.learned:
            if not self.calibrated:  # the first batch it sees (training, or a sanity check)
                with torch.no_grad():
                    self.b_in.copy_(x.detach().abs().amax().float())
                    if dist.is_available() and dist.is_initialized():  # one range on all ranks
                        dist.all_reduce(self.b_in.data, op=dist.ReduceOp.MAX)
                self.calibrated = True
            return self.b_in
        self._update_range(x)
        return self.hi

    def forward(self, x: torch.Tensor, bound: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` through the DAC; ``bound`` is the per-vector ``b_in`` (``per_vector`` only,
        broadcastable against ``x``)."""
        if not self.enabled:
            return x
        if self.mode == "per_vector":
            return symmetric_quantize(x, bound, self.levels)
        return symmetric_quantize(x, self.bound(x), self.levels)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, mode={self.mode!r}"
