"""PCM drift compensation (aihwkit's ``inference/compensation/drift.py``): what it reads out and
the gain ``alpha`` it applies, per tensor, per output channel or per crossbar tile."""

from __future__ import annotations

import torch

from cimsim.chip.noise import tensor_seed
from cimsim.validation import ConfigError, check_choice

DRIFT_COMPENSATIONS = ("none", "global", "per_channel")
# aihwkit clamps every compensation read-out (reference and current) at this value.
_READOUT_FLOOR = 1e-4


def per_tile(w: torch.Tensor, tiles: list[slice], reduce: str, per_channel: bool = False):
    """``max`` or ``mean`` of ``|w|`` over each tile's input columns (dim 1), per output channel
    too when ``per_channel``, expanded back over the tile's columns: ``(1 or C_out, C_in, 1, ...)``,
    broadcastable against ``w``."""
    a, parts = w.abs(), []
    for sl in tiles:
        part = a[:, sl]
        dims = tuple(range(1 if per_channel else 0, part.dim()))
        v = part.amax(dim=dims, keepdim=True) if reduce == "amax" else part.mean(dims, True)
        parts.append(v.expand(v.shape[0], part.shape[1], *v.shape[2:]))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def compensation_readout(
    w: torch.Tensor, per_channel: bool = False, tiles: list[slice] | None = None
) -> torch.Tensor:
    """What drift compensation measures: ``max(mean|W|, 1e-4)`` per tensor (0-d) or per output
    channel ((C_out, 1, ..., 1)); with ``tiles``, per tile (``per_tile``'s shape). aihwkit reads
    it out with one-hot inputs, whose outputs are the columns of W, and takes the mean absolute
    output (``GlobalDriftCompensation.readout``), each tile of a tiled layer its own."""
    if tiles is not None:
        return per_tile(w, tiles, "mean", per_channel).clamp_min(_READOUT_FLOOR)
    if not per_channel:
        return w.abs().mean().clamp_min(_READOUT_FLOOR)
    per_row = w.abs().reshape(w.shape[0], -1).mean(dim=1).clamp_min(_READOUT_FLOOR)
    return per_row.reshape((-1,) + (1,) * (w.dim() - 1))


@torch.no_grad()
def compensation_factor(
    reference: torch.Tensor, w_t: torch.Tensor, mode: str, tiles: list[slice] | None = None
) -> torch.Tensor:
    """The drift-compensation gain ``alpha = ref / max(mean|W_t|, 1e-4)`` (aihwkit's
    ``BaseDriftCompensation.apply``), broadcastable against ``w_t``; 1 for ``mode = none``.

    ``reference`` is ``compensation_readout`` of the programmed weights (already floored, as
    aihwkit floors both read-outs). ``alpha`` multiplies the analog output ``W_t x`` before any
    digital bias is added, which equals multiplying the weights by it.
    """
    check_choice("drift_compensation", mode, DRIFT_COMPENSATIONS)
    if mode == "none":
        return torch.ones((), dtype=w_t.dtype, device=w_t.device)
    return reference / compensation_readout(w_t, mode == "per_channel", tiles)


class PeripheryCompensated:
    """What a programmed tensor of a compensated device (``PCMWeights``, ``RRAMWeights``) shares:
    it has ``seed``, ``name``, ``cfg`` (``drift_compensation``), ``tiles``,
    ``programmed_weights``, ``periphery_reference`` (None until the first periphery read) and
    ``read_out(t, repetition) -> (W_t, alpha)``."""

    def _read_generator(self, t: float, repetition: int) -> torch.Generator:
        """The generator of read-out ``repetition`` at ``t`` s (the same arguments, the same
        draws); a ``ConfigError`` for a repetition that is not an integer >= 0."""
        if isinstance(repetition, bool) or not isinstance(repetition, int) or repetition < 0:
            raise ConfigError("repetition", repetition, "must be an integer >= 0")
        key = f"{self.name}/read@t={float(t)!r}/rep={repetition}"
        return torch.Generator(device="cpu").manual_seed(tensor_seed(self.seed, key))

    def weights_at(self, t_inference: float, repetition: int = 0) -> torch.Tensor:
        """The weights the chip computes with at ``t_inference`` s: read and compensated."""
        w_t, alpha = self.read_out(t_inference, repetition)
        return w_t * alpha

    @torch.no_grad()
    def _periphery_alpha(self, w_t: torch.Tensor, read: str, periphery) -> torch.Tensor:
        """The reference (the programmed weights, read once per chip) over this read-out, each
        the compensation read-out of the weights' one-hot reads through ``periphery`` (output
        noise drawn from the chip's seed, the tensor's name and ``read``)."""

        def readout(w: torch.Tensor, key: str) -> torch.Tensor:
            g = torch.Generator().manual_seed(tensor_seed(self.seed, f"{self.name}/comp/{key}"))
            per_channel = self.cfg.drift_compensation == "per_channel"
            return compensation_readout(periphery(w, g), per_channel, self.tiles)

        if self.periphery_reference is None:
            self.periphery_reference = readout(self.programmed_weights, "reference")
        return self.periphery_reference / readout(w_t, read)
