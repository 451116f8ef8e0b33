"""The crossbar path of Conv/Linear (``CrossbarLayer``): tiles, DAC, tile outputs, device reads."""

from __future__ import annotations

import torch

from cimsim.chip.compensation import per_tile
from cimsim.chip.devices import Periphery
from cimsim.chip.fused import stack_tiles
from cimsim.chip.ir_drop import apply_ir_drop_
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

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with the padding the product does not do itself (a conv's non-zero padding
        mode); the products then run unpadded."""
        return x

    def _prepare(self, x, weight, levels: int | None, peaks: bool, apart: bool = False):
        """The tiles' operands, no gradient: ``(xg, wg, w_pad, s)``. ``xg``: the inputs laid out
        as ``T`` equal groups of input lines (the smaller tiles padded with zero lines), through
        the per-vector DAC when ``levels`` (with ``apart``, a conv's as the list of its groups,
        for ``_tile_products``); ``wg``: the weights grouped for ``_products``;
        ``w_pad``: the weights with the same padded input lines, ungrouped (``(C_out, T*w,
        ...)``); ``s``: with ``peaks``, each input vector's max ``|x|`` per tile ``(B, T, 1,
        ...)`` (zeros read as 1; a conv's vector is the patch of one output position)."""
        raise NotImplementedError

    def _products(self, xg: torch.Tensor, wg: torch.Tensor) -> torch.Tensor:
        """Every tile's partial sums ``(B, T, C_out, ...)`` in one grouped product (a conv as a
        grouped convolution: no im2col)."""
        raise NotImplementedError

    def _tile_products(self, xg: torch.Tensor, wg: torch.Tensor) -> list[torch.Tensor]:
        """``_products`` as the list of the ``T`` tiles' partial sums ``(B, C_out, ...)`` (a conv
        as ``T`` dense convolutions: faster than one grouped, and nothing is stacked)."""
        return list(self._products(xg, wg).unbind(1))

    def _products_backward(self, g, xg, wg, needs) -> tuple:
        """The gradients of ``_products`` to ``(xg, wg)`` (None where not ``needs``), in the
        padded layouts of ``xg`` and ``w_pad``."""
        raise NotImplementedError

    def _dense_backward(self, g, xg, w_pad, needs) -> tuple:
        """The gradients of the dense product of the padded operands (``xg`` ungrouped: its
        input lines in order, ``w_pad``) for the output gradient ``g``, in their layouts: the
        tiled sum's where nothing clipped."""
        raise NotImplementedError

    def _ungroup(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """A gradient in a padded layout (input lines on dim 1, ``T`` groups of ``w``) with the
        padding lines dropped."""
        tiles = self._tiles
        if t is None or tiles is None:
            return t
        width = max(sl.stop - sl.start for sl in tiles)
        if all(sl.stop - sl.start == width for sl in tiles):
            return t
        parts = [t.narrow(1, i * width, sl.stop - sl.start) for i, sl in enumerate(tiles)]
        return torch.cat(parts, dim=1)

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

    def _crossbar(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """The layer through the periphery: DAC, per-tile partial sums with IR drop and read
        noise, output noise and tile ADC, the device's drift compensation (digital, after the
        ADC), their sum and the bias (added by the digital periphery)."""
        cfg, dac = self.config, self.dac if self.dac is not None and self.dac.enabled else None
        per_vector = dac is not None and dac.mode == "per_vector"
        if dac is not None and not per_vector:  # a static range: before the tiles, in autograd
            x = dac(x)
        if not cfg.tile_outputs:  # tiles then change only the weights' ranges: one product
            if per_vector:
                x = dac(x, self._vector_bounds(x))
            return self._mvm(x, weight, bias)
        reads = self.training or self.chip_seed is not None  # a chip is read: noise per read
        adc = self.tile_adc if self.tile_adc is not None and self.tile_adc.enabled else None
        if adc is not None:
            adc.noisy = reads
        normalized = adc is not None and adc.ref == "normalized"
        ir, read = cfg.ir_drop > 0, cfg.w_read_noise > 0 and reads
        static = None if dac is None or per_vector else dac.b_in if dac.learned else dac.hi
        peaks = (normalized or ir) and static is None
        w_max = self._tile_peaks(self.weight)  # of the clean (mapped) weights
        alpha = self._tile_compensation()

        def post_(y, xg, wg, s, grads: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
            if not isinstance(y, torch.Tensor) and (ir or read or adc is None):
                y = stack_tiles(y)  # the tiles' products apart: in place needs them whole
                xg = torch.cat(xg, dim=1) if isinstance(xg, list) else xg
            tile = y if isinstance(y, torch.Tensor) else y[0]  # (B, T, C_out, ...) or a tile's
            rank = tile.dim() + (tile is not y)  # of (B, T, C_out, ...)
            units = None  # aihwkit's normalized unit w_max * s_x of every partial sum
            if normalized or ir:
                s = s if static is None else static.detach()  # float32 or wider (autocast)
                dtype = torch.promote_types(tile.dtype, torch.float32)
                units = s.to(dtype) * w_max.reshape((1, -1) + (1,) * (rank - 2)).to(dtype)
            if ir:  # aihwkit's IR drop, before read and output noise and ADC; a constant
                drop = (cfg.ir_drop, cfg.ir_drop_g_ratio)
                apply_ir_drop_(y, xg, wg, self._products, units, self._tiles, *drop)
            if read:  # aihwkit's PCM_READ noise of each tile, a constant for autograd
                squares = self._products(xg.square(), wg.abs())
                shape = (1, -1) + (1,) * (y.dim() - 2)
                w_read = self._tile_peaks(weight).reshape(shape)
                y.add_(read_noise(y, squares, w_read, cfg.w_read_noise))
            gain = None  # the drift compensation: digital, after the tile's ADC (aihwkit's order)
            if alpha is not None:
                gain = alpha.reshape((1, *alpha.shape) + (1,) * (rank - 3))
            if adc is not None:  # output noise, ADC, gain and the sum over tiles: one pass
                return adc.finish(y, units if normalized else None, gain, mask=grads)
            return (y if gain is None else y.mul_(gain)).sum(dim=1), None

        levels = dac.levels if per_vector else None
        y = tiled_sum(self._pad(x), weight, self, levels, peaks, post_)
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
