"""The crossbar path of Conv/Linear (``CrossbarLayer``): tiles, DAC, tile outputs, device reads."""

from __future__ import annotations

import torch

from cimsim.chip.compensation import per_tile
from cimsim.chip.devices import Periphery
from cimsim.chip.layers import AnalogLayer
from cimsim.chip.periphery import periphery_readout, tiled_sum
from cimsim.chip.readout_noise import read_noise


class CrossbarLayer(AnalogLayer):
    """A Conv/Linear on crossbar tiles: its weights follow ``config.device``, and its products go
    through the periphery (DAC, per-tile partial sums, output and read noise, tile ADC) when
    ``config.periphery`` is on. Subclasses give the grouped products."""

    uses_device = True

    def program(self, seed: int, prefix: str) -> None:
        """Draw and freeze this layer's standard draws for chip ``seed``; program its weights on
        their device when it has state of its own, read at ``t = 0``."""
        super().program(seed, prefix)
        if self._device_weights:
            device = self.config.device_model
            self.device_state = device.program(self.weight, seed, f"{prefix}.weight", self._tiles)
            self.set_time(0.0)

    def set_time(self, t_inference: float, repetition: int = 0) -> None:
        """Read the programmed device ``t_inference`` seconds after programming (read noise of
        read-out ``repetition``); computed once here, used by every forward until the next."""
        w_t, alpha = self.device_state.read(t_inference, repetition, self._periphery_reader())
        if not isinstance(alpha, torch.Tensor):  # a plug-in's plain gain
            alpha = torch.tensor(float(alpha), dtype=w_t.dtype, device=w_t.device)
        like = {"device": self.weight.device, "dtype": self.weight.dtype}
        if self.config.tile_outputs:  # digital, after each tile's ADC (aihwkit's order)
            self.chip_read_weight, self.chip_read_alpha = w_t.to(**like), self._per_tile(alpha)
        else:  # the same as scaling every tile's output: on the weights, once
            self.chip_read_weight, self.chip_read_alpha = (w_t * alpha).to(**like), None
        self.chip_time, self._chip_cache = (float(t_inference), int(repetition)), None

    def _periphery_reader(self) -> Periphery | None:
        """One-hot read-outs through the tiles' outputs (noise, ADC; normalized units), as a
        device's drift compensation reads (aihwkit's); None when the tiles' outputs have neither."""
        adc = self.tile_adc
        if adc is None or not adc.enabled or adc.ref != "normalized":
            return None
        tiles = self._tiles or [slice(0, self.weight.shape[1])]
        units = per_tile(self.weight.detach(), tiles, "amax")  # each column's tile w_max

        def through(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            return periphery_readout(w.to(units.dtype), units, adc, generator)

        return through

    def _grouped(self, x: torch.Tensor, weight: torch.Tensor) -> tuple:
        """Inputs and weights laid out as ``T`` equal tile groups (``periphery.to_groups``)."""
        raise NotImplementedError

    def _products(self, xg: torch.Tensor, wg: torch.Tensor) -> torch.Tensor:
        """Every tile's partial sums ``(B, T, C_out, ...)`` in one grouped product (a conv as a
        grouped convolution: no im2col)."""
        raise NotImplementedError

    def _products_backward(self, g, xg, wg, needs) -> tuple:
        """The gradients of ``_products`` to ``(xg, wg)`` (None where not ``needs``)."""
        raise NotImplementedError

    def _mvm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """The crossbar's matrix-vector products: the layer's op on ``x`` with these tensors."""
        raise NotImplementedError

    def _vector_bounds(self, x: torch.Tensor) -> torch.Tensor:
        """Each input vector's max ``|x|`` over each tile's inputs (aihwkit's abs_max noise
        management), expanded over the tile's inputs: ``(B, C_in, 1, ...)``. A vector of zeros
        gets 1, as in aihwkit."""
        tiles = self._tiles or [slice(0, x.shape[1])]
        flat = x.detach().abs().flatten(2) if x.dim() > 2 else x.detach().abs().unsqueeze(-1)
        peaks = torch.stack([flat[:, sl].amax(dim=(1, 2)) for sl in tiles], dim=1)  # (B, T)
        peaks = torch.where(peaks > 0, peaks, torch.ones_like(peaks))
        sizes = torch.tensor([sl.stop - sl.start for sl in tiles], device=x.device)
        expanded = peaks.repeat_interleave(sizes, dim=1)  # (B, C_in)
        return expanded.reshape(expanded.shape + (1,) * (x.dim() - 2))

    def _input_scales(self, x: torch.Tensor, xg: torch.Tensor) -> torch.Tensor:
        """``s_x`` of every partial sum, broadcastable against them ``(B, T, 1, ...)``: the DAC's
        static ``b_in``, else each input vector's max ``|x|`` over its tile (a conv's vector is
        the patch of one output position)."""
        peaks = self._patch_peaks(xg)
        if self.dac is not None and self.dac.enabled and self.dac.mode != "per_vector":
            b = self.dac.b_in if self.dac.learned else self.dac.hi
            return b.detach().to(peaks.dtype).reshape((1,) * peaks.dim())
        return peaks

    def _patch_peaks(self, xg: torch.Tensor) -> torch.Tensor:
        """Each input vector's max ``|x|`` per tile ``(B, T, 1, ...)`` (zeros read as 1)."""
        raise NotImplementedError

    def _per_tile(self, alpha: torch.Tensor) -> torch.Tensor:
        """A compensation gain broadcastable against the weights (0-d, per output channel, per
        tile's input columns) as ``(T, C_out or 1)``: the gain of each tile's outputs."""
        a = alpha.reshape(alpha.shape + (1,) * (self.weight.dim() - alpha.dim()))
        a = a.expand(-1 if a.shape[0] > 1 else 1, self.weight.shape[1], *a.shape[2:])
        columns = [sl.start for sl in self._tiles or [slice(0, 1)]]
        per_tile = a[:, columns].reshape(a.shape[0], len(columns), -1)[..., 0]  # (C_out|1, T)
        return per_tile.t().to(device=self.weight.device, dtype=self.weight.dtype).contiguous()

    @torch.no_grad()
    def _tile_peaks(self, weight: torch.Tensor) -> torch.Tensor:
        """Each tile's ``w_max = max |w|``, ``(T,)``."""
        w_abs = weight.detach().abs()
        return torch.stack([w_abs[:, sl].amax() for sl in self._tiles or [slice(None)]])

    @torch.no_grad()
    def _output_units(self, x: torch.Tensor, xg: torch.Tensor) -> torch.Tensor:
        """aihwkit's normalized unit ``w_max * s_x`` of every partial sum: the tile's largest
        ``|w|`` of the clean (mapped) weights times the input vector's scale."""
        w_max = self._tile_peaks(self.weight)
        scales = self._input_scales(x, xg)
        return scales * w_max.reshape((1, -1) + (1,) * (scales.dim() - 2)).to(scales.dtype)

    def _crossbar(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """The layer through the periphery: DAC, per-tile partial sums with read noise, output
        noise and tile ADC, the device's drift compensation (digital, after the ADC), their sum and
        the bias (added by the digital periphery)."""
        if self.dac is not None:
            per_vector = self.dac.mode == "per_vector"
            x = self.dac(x, self._vector_bounds(x) if per_vector and self.dac.enabled else None)
        cfg = self.config
        if not cfg.tile_outputs:  # tiles then change only the weights' ranges: one product
            return self._mvm(x, weight, bias)
        reads = self.training or self.chip_seed is not None  # a chip is read: noise per read
        xg, wg = self._grouped(x, weight)
        adc = self.tile_adc if self.tile_adc is not None and self.tile_adc.enabled else None
        if adc is not None:
            adc.noisy = reads
        units = self._output_units(x, xg) if adc is not None and adc.ref == "normalized" else None
        read = cfg.w_read_noise > 0 and reads
        if read:
            w_max = self._tile_peaks(weight)
        alpha = self._tile_compensation()
        grads = torch.is_grad_enabled() and (xg.requires_grad or wg.requires_grad)  # else no mask

        def post_(y: torch.Tensor) -> torch.Tensor | None:
            if read:  # aihwkit's PCM_READ noise of each tile, a constant for autograd
                squares = self._products(xg.detach().square(), wg.detach().abs())
                shape = (1, -1) + (1,) * (y.dim() - 2)
                y.add_(read_noise(y, squares, w_max.reshape(shape), cfg.w_read_noise))
            inside = None if adc is None else adc.digitize_(y, units, mask=grads)
            if alpha is not None:  # digital, after the tile's ADC (aihwkit's order)
                y.mul_(alpha.reshape((1,) + alpha.shape + (1,) * (y.dim() - 3)))
            return inside

        y = tiled_sum(xg, wg, self._products, self._products_backward, post_)
        if bias is None:
            return y
        return y + bias.reshape((1, -1) + (1,) * (y.dim() - 2))

    def _tile_compensation(self) -> torch.Tensor | None:
        """The programmed device's compensation per tile, ``(T, C_out or 1)``, applied to the
        tiles' digitized outputs; None when the weights carry it (no chip, no such device)."""
        return None if self.training else self.chip_read_alpha

    def _analog_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Conv/Linear: the perturbed parameters, through the periphery when it is on."""
        weight, bias = self._noisy_parameters()
        if not self.config.periphery:
            return self._output(self._mvm(x, weight, bias))
        return self._output(self._crossbar(x, weight, bias))

    @torch.no_grad()
    def _device_perturbation(self, weight: torch.Tensor) -> torch.Tensor:
        """``W_chip - W``: a fresh chip of the device (read at ``t_train``) in training, else the
        programmed chip at its current time (``set_time``)."""
        if self.training:
            cfg = self.config
            return cfg.device_model.training_perturbation(weight, cfg.t_train, self._tiles)
        return self.chip_read_weight - weight
