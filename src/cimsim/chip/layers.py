"""Analog counterparts of Conv2d, Linear, BatchNorm2d and identity shortcuts.

Each keeps its digital parameters under the same names (a digital ``state_dict`` loads as is)
and perturbs them on the fly: in ``train()`` with fresh draws each forward (shared by the
mini-batch), in ``eval()`` with the frozen draws of the programmed chip, or not at all when no
chip is programmed. With ``sigma = mean_shift = 0`` each runs its exact digital op. Under
``device='pcm'`` Conv/Linear weights follow the PCM model instead (``cimsim.chip.devices.pcm``): a
fresh chip at ``t_train`` per training forward, the programmed chip at its ``set_time`` in evaluation.

The file is over 350 lines because the four layer types share one mixin (ranges, draws, the
programmed chip, its cache) and the BatchNorm has two training paths (one process, synchronized);
splitting them would scatter one model across files.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn

from cimsim.chip.adc import ADC
from cimsim.chip.compensation import compensation_readout, per_tile
from cimsim.chip.config import AnalogConfig
from cimsim.chip.dac import DAC
from cimsim.chip.devices.pcm import PCMWeights, pcm_training_perturbation
from cimsim.chip.noise import (
    chip_noise,
    noise_scales,
    perturbation,
    standard_noise,
    tensor_range,
    tensor_seed,
)
from cimsim.chip.periphery import TileADC, layer_tiles, periphery_readout, tiled_sum, to_groups
from cimsim.chip.readout_noise import read_noise


def _fingerprint(t: torch.Tensor) -> tuple:
    """What identifies a tensor's values without reading them (while its storage is alive)."""
    return (t.data_ptr(), t._version, t.shape, t.stride(), t.dtype, t.device)


class AnalogLayer:
    """Mixin holding the chip configuration and the programmed draws of one layer.

    Subclasses list their stored tensors in ``analog_tensors`` (name -> shape) and read the
    draws for one forward with ``_eps(name, like)``.
    """

    config: AnalogConfig
    has_adc = True  # whether ``adc_placement='layer'`` puts an ADC after this layer
    uses_device = False  # whether the weights follow ``config.device`` (crossbar Conv/Linear)

    def _init_analog(self, config: AnalogConfig) -> None:
        self.config = config
        self.chip_seed: int | None = None
        self._chip_cache: tuple | None = None  # see _on_chip
        self.adc: ADC | None = None
        if config.adc_placement == "layer" and self.has_adc:
            self.adc = ADC(config.adc_levels, placement="layer")
        # The crossbar periphery (cimsim.chip.periphery): tiles, input DAC, tile ADCs.
        self._tiles: list[slice] | None = None
        self.dac: DAC | None = None
        self.tile_adc: TileADC | None = None
        if self.uses_device and config.periphery:
            self._tiles = layer_tiles(self, config.tile_rows)
            if config.dac_levels is not None:
                self.dac = DAC(config.dac_levels, mode=config.dac_range)
            if config.tile_adc_levels is not None or config.out_noise > 0:
                tiles = 1 if self._tiles is None else len(self._tiles)
                self.tile_adc = TileADC(
                    tiles,
                    config.tile_adc_levels,
                    config.out_noise,
                    ref=config.out_ref,
                    out_bound=config.out_bound,
                )
        for name in self.analog_tensors():
            # Frozen draws of a programmed chip: moved by .to(), never saved in a state_dict.
            self.register_buffer(f"chip_{name}", None, persistent=False)
        # A programmed PCM chip: its device state, and its weights at the current chip time.
        self._pcm: PCMWeights | None = None
        self.chip_time: tuple[float, int] | None = None
        self.register_buffer("chip_pcm_weight", None, persistent=False)
        # Its drift compensation per tile (T, C_out or 1), when the tiles' outputs apply it.
        self.register_buffer("chip_pcm_alpha", None, persistent=False)

    def analog_tensors(self) -> dict[str, torch.Size]:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint trained with a periphery this chip lacks (evaluate.py chip.dac_levels=null,
        # chip.tile_rows=... without tile outputs): its DAC / tile-ADC state does not apply.
        for name in ("dac", "tile_adc"):
            if getattr(self, name, None) is None:
                for key in [k for k in state_dict if k.startswith(f"{prefix}{name}.")]:
                    del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def program(self, seed: int, prefix: str) -> None:
        """Draw and freeze this layer's standard draws for chip ``seed``."""
        self.chip_seed, self._chip_cache = seed, None
        # The tensor whose device/dtype the draws take: a parameter, else a running statistic.
        like = next(iter(self.parameters(recurse=False)), None)
        if like is None:
            like = next(iter(self.buffers(recurse=False)))
        for name, shape in self.analog_tensors().items():
            eps = chip_noise(
                seed,
                f"{prefix}.{name}",
                shape,
                self.config.distribution,
                device=like.device,
                dtype=like.dtype,
            )
            setattr(self, f"chip_{name}", eps)
        if self._pcm_weights:
            self._pcm = PCMWeights(
                self.weight, self.config.pcm, seed, f"{prefix}.weight", self._tiles
            )
            self.set_time(0.0)

    def set_time(self, t_inference: float, repetition: int = 0) -> None:
        """Read the programmed PCM chip ``t_inference`` seconds after programming (read noise of
        read-out ``repetition``); computed once here, used by every forward until the next."""
        w_t, alpha = self._pcm.read_out(t_inference, repetition)
        if self._reads_compensation_through_periphery:
            alpha = self._periphery_alpha(w_t, f"t={float(t_inference)!r}/rep={repetition}")
        like = {"device": self.weight.device, "dtype": self.weight.dtype}
        if self.config.tile_outputs:  # digital, after each tile's ADC (aihwkit's order)
            self.chip_pcm_weight, self.chip_pcm_alpha = w_t.to(**like), self._per_tile(alpha)
        else:  # the same as scaling every tile's output: on the weights, once
            self.chip_pcm_weight, self.chip_pcm_alpha = (w_t * alpha).to(**like), None
        self.chip_time, self._chip_cache = (float(t_inference), int(repetition)), None

    @property
    def _reads_compensation_through_periphery(self) -> bool:
        pcm, adc = self.config.pcm, self.tile_adc
        has_outputs = adc is not None and adc.enabled and adc.ref == "normalized"
        on = pcm.compensation_read == "periphery" and pcm.drift_compensation != "none"
        return has_outputs and on

    @torch.no_grad()
    def _periphery_alpha(self, w_t: torch.Tensor, read: str) -> torch.Tensor:
        """aihwkit's compensation gain with both read-outs through the tile's noisy periphery:
        the reference (the programmed weights, read once per chip) over this read-out."""
        chip, cfg = self._pcm, self.config.pcm
        tiles = self._tiles or [slice(0, self.weight.shape[1])]
        units = per_tile(self.weight.detach(), tiles, "amax")  # each column's tile w_max

        def readout(w: torch.Tensor, key: str) -> torch.Tensor:
            g = torch.Generator().manual_seed(tensor_seed(chip.seed, f"{chip.name}/comp/{key}"))
            y = periphery_readout(w.to(units.dtype), units, self.tile_adc, g)
            return compensation_readout(y, cfg.drift_compensation == "per_channel", chip.tiles)

        if chip.periphery_reference is None:
            chip.periphery_reference = readout(chip.programmed_weights, "reference")
        return chip.periphery_reference / readout(w_t, read)

    def clear(self) -> None:
        self.chip_seed, self._chip_cache = None, None
        for name in self.analog_tensors():
            setattr(self, f"chip_{name}", None)
        self._pcm, self.chip_time, self.chip_pcm_weight = None, None, None
        self.chip_pcm_alpha = None

    @property
    def _pcm_weights(self) -> bool:
        return self.uses_device and self.config.pcm_device

    @property
    def perturbed(self) -> bool:
        """Whether this forward perturbs: noise is set and (training or a chip is programmed)."""
        noisy = self.config.noisy or self._pcm_weights
        return noisy and (self.training or self.chip_seed is not None)

    def _on_chip(self, compute: Callable[[], tuple], *sources: torch.Tensor | None) -> tuple:
        """``compute()``, kept and reused while the programmed chip's perturbed tensors cannot have
        changed: in ``eval()`` without autograd (a chip evaluation pass then costs what the
        digital pass costs). The key is the config (``set_noise``) and each source tensor's storage,
        in-place version counter and layout; ``program``/``clear`` drop the cache. The sources
        are kept alive with it, so a freed storage address cannot be reused and match. Under
        ``torch.compile`` the graph recomputes (and fuses) the perturbation instead: pointer
        comparisons would break the graph at every layer."""
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return compute()
        key = (self.config,) + tuple(None if t is None else _fingerprint(t) for t in sources)
        if self._chip_cache is None or self._chip_cache[0] != key:
            sources = tuple(None if t is None else t.detach() for t in sources)
            self._chip_cache = (key, sources, compute())
        return self._chip_cache[2]

    def _eps(self, name: str, like: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """The standard draws for tensor ``name`` in this forward, and whether they are fresh
        (fresh ones may be overwritten in place)."""
        if not self.perturbed:
            return None, False
        if self.training:
            return standard_noise(
                like.shape, self.config.distribution, device=like.device, dtype=like.dtype
            ), True
        return getattr(self, f"chip_{name}"), False

    def _nu(self, name: str, like: torch.Tensor, r: torch.Tensor) -> torch.Tensor | None:
        """The perturbation ``r * (mu + sigma * eps)`` of tensor ``name`` (None when clean)."""
        eps, fresh = self._eps(name, like)
        if eps is None:
            return None
        return perturbation(
            eps, r, self.config.sigma, self.config.mean_shift, out=eps if fresh else None
        )

    per_channel_ranges = True  # False where a row holds one value (BatchNorm's affine)

    def _perturbations(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """``(nu_W, nu_b)`` under the configured bias mapping (``noise_scales``); None = clean."""
        if not self.perturbed:
            return None, None
        cfg = self.config
        per_channel = cfg.per_channel and self.per_channel_ranges
        r_w, r_b = noise_scales(weight, bias, cfg.scale, per_channel, cfg.bias)
        if self._pcm_weights:  # the bias keeps the relative model (digital at sigma = mu = 0)
            nu_w = self._pcm_perturbation(weight)
        else:
            if self._tiles is not None:  # each tile relative to its own range
                r_w = self._tile_ranges(weight, per_channel)
            nu_w = self._nu("weight", weight, r_w)
        nu_b = None if r_b is None or not cfg.noisy else self._nu("bias", bias, r_b)
        return nu_w, nu_b

    @torch.no_grad()
    def _tile_ranges(self, weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
        """The range of every weight's tile: ``(1 or C_out, C_in, 1, ...)``, broadcastable
        against ``weight``, each tile's columns holding that tile's (per-channel) range."""
        parts = []
        for sl in self._tiles:
            w = weight[:, sl]
            r = tensor_range(w, self.config.scale, per_channel)  # 0-d or (C_out, 1, ...)
            shape = (weight.shape[0] if per_channel else 1, w.shape[1]) + (1,) * (w.dim() - 2)
            parts.append(r.reshape((-1,) + (1,) * (w.dim() - 1)).expand(shape))
        return torch.cat(parts, dim=1)

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
        noise and tile ADC, the PCM drift compensation (digital, after the ADC), their sum and
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
        """The programmed PCM chip's drift compensation per tile, ``(T, C_out or 1)``, applied
        to the tiles' digitized outputs; None when the weights carry it (no chip, no PCM)."""
        return None if self.training else self.chip_pcm_alpha

    def _analog_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Conv/Linear: the perturbed parameters, through the periphery when it is on."""
        weight, bias = self._noisy_parameters()
        if not self.config.periphery:
            return self._output(self._mvm(x, weight, bias))
        return self._output(self._crossbar(x, weight, bias))

    @torch.no_grad()
    def _pcm_perturbation(self, weight: torch.Tensor) -> torch.Tensor:
        """``W_chip - W``: a fresh PCM chip at ``t_train`` in training, else the programmed chip
        at its current time (``set_time``)."""
        if self.training:
            cfg = self.config
            return pcm_training_perturbation(weight, cfg.pcm, cfg.t_train, tiles=self._tiles)
        return self.chip_pcm_weight - weight

    def _noisy_weight_bias(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """``(W + nu_W, b + nu_b)``: the perturbation is a constant, the gradient reaches W, b."""
        nu_w, nu_b = self._perturbations(weight, bias)
        if nu_w is not None:
            weight = weight + nu_w
        if nu_b is not None:
            bias = bias + nu_b
        return weight, bias

    def _noisy_parameters(self):
        """This forward's ``(weight, bias)`` (a programmed chip's are computed once)."""
        if not self.perturbed:
            return self.weight, self.bias
        sources = (self.weight, self.bias)
        return self._on_chip(
            lambda: self._noisy_weight_bias(*sources), *sources, self.chip_pcm_weight
        )

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.adc is None else self.adc(y)

    def extra_repr(self) -> str:
        c = self.config
        chip = "none" if self.chip_seed is None else self.chip_seed
        return f"{super().extra_repr()}, sigma={c.sigma}, mean_shift={c.mean_shift}, chip={chip}"


class AnalogConv2d(AnalogLayer, nn.Conv2d):
    """``nn.Conv2d`` on an analog crossbar."""

    uses_device = True

    def analog_tensors(self):
        shapes = {"weight": self.weight.shape}
        if self.bias is not None and self.config.bias != "digital":
            shapes["bias"] = self.bias.shape
        return shapes

    def _grouped(self, x, weight):
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        if self._tiles is None:
            return x, weight
        tiles = len(self._tiles)
        xg = to_groups(x, self._tiles, 1)
        wg = to_groups(weight, self._tiles, 1)  # (C_out, T * c, k, k)
        c_out, width = wg.shape[0], wg.shape[1] // tiles
        wg = wg.reshape(c_out, tiles, width, *wg.shape[2:]).transpose(0, 1)
        wg = wg.reshape(tiles * c_out, width, *wg.shape[3:])
        # Channels-last: oneDNN's grouped convolution (and its backward) then runs about as fast
        # as the dense one; channels-first it is up to 2x slower.
        cl = torch.channels_last
        return xg.contiguous(memory_format=cl), wg.contiguous(memory_format=cl)

    def _conv_args(self, tiles: int) -> tuple:
        padding = self.padding if self.padding_mode == "zeros" else 0
        return self.stride, padding, self.dilation, tiles * self.groups  # tiles > 1: groups 1

    def _products(self, xg, wg):
        tiles = 1 if self._tiles is None else len(self._tiles)
        y = F.conv2d(xg, wg, None, *self._conv_args(tiles))
        return y.reshape(y.shape[0], tiles, -1, *y.shape[2:])

    def _products_backward(self, g, xg, wg, needs):
        tiles = g.shape[1]
        stride, padding, dilation, groups = self._conv_args(tiles)
        padding = (padding,) * 2 if isinstance(padding, int) else padding  # 0 after F.pad
        g = g.reshape(g.shape[0], -1, *g.shape[3:])
        if tiles > 1:  # already channels-last when it comes from the mask (a view then)
            g = g.contiguous(memory_format=torch.channels_last)
        gx, gw, _ = torch.ops.aten.convolution_backward(
            g,
            xg,
            wg,
            None,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            groups,
            [needs[0], needs[1], False],
        )
        return gx, gw

    def _patch_peaks(self, xg):
        tiles = 1 if self._tiles is None else len(self._tiles)
        m = xg.detach().abs().unflatten(1, (tiles, -1)).amax(dim=2)  # (B, T, H, W)
        stride, padding, dilation, _ = self._conv_args(tiles)
        peaks = F.max_pool2d(m, self.kernel_size, stride, padding, dilation)  # (B, T, H', W')
        return torch.where(peaks > 0, peaks, torch.ones_like(peaks)).unsqueeze(2)

    def _mvm(self, x, weight, bias):
        return self._conv_forward(x, weight, bias)

    forward = AnalogLayer._analog_forward


class AnalogLinear(AnalogLayer, nn.Linear):
    """``nn.Linear`` on an analog crossbar."""

    uses_device = True

    analog_tensors = AnalogConv2d.analog_tensors

    def _grouped(self, x, weight):  # x: (N, C_in) (``_crossbar`` flattens the rest)
        if self._tiles is None:
            return x.unsqueeze(1), weight.unsqueeze(1)
        tiles = len(self._tiles)
        xg = to_groups(x, self._tiles, 1).reshape(x.shape[0], tiles, -1)
        return xg, to_groups(weight, self._tiles, 1).reshape(weight.shape[0], tiles, -1)

    def _products(self, xg, wg):  # (N, T, c) x (C_out, T, c) -> (N, T, C_out)
        return torch.einsum("ntc,otc->nto", xg, wg)

    def _products_backward(self, g, xg, wg, needs):
        gx = torch.einsum("nto,otc->ntc", g, wg) if needs[0] else None
        gw = torch.einsum("nto,ntc->otc", g, xg) if needs[1] else None
        return gx, gw

    def _vector_bounds(self, x):  # the features are the last dim: one vector per row
        flat = x.reshape(-1, x.shape[-1])
        return super()._vector_bounds(flat).reshape(x.shape)

    def _patch_peaks(self, xg):  # (N, T, c) -> (N, T, 1)
        peaks = xg.detach().abs().amax(dim=2, keepdim=True)
        return torch.where(peaks > 0, peaks, torch.ones_like(peaks))

    def _mvm(self, x, weight, bias):
        return F.linear(x, weight, bias)

    def _crossbar(self, x, weight, bias):
        if x.dim() <= 2 or not self.config.tile_outputs:
            return super()._crossbar(x, weight, bias)
        y = super()._crossbar(x.reshape(-1, x.shape[-1]), weight, bias)  # (N, C_out)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    forward = AnalogLayer._analog_forward


class AnalogBatchNorm2d(AnalogLayer, nn.BatchNorm2d):
    """BatchNorm as a per-channel analog affine layer ``y = w x + b`` (docs/model.md).

    ``w = gamma / sqrt(var + eps)`` and ``b = beta - mean * w`` are perturbed like any weight and
    bias (the bi-scale rule of ``AnalogConfig.bias`` applies to the pair), as the authors'
    ``NoisyBN``. In ``train()`` mean and var are the batch statistics, so the noise is relative
    to the fold of the batch statistics and the gradient flows through them as in BatchNorm; a
    fresh BN is perturbed from the first step. In ``eval()`` they are the running statistics,
    and a programmed chip's perturbed ``(w, b)`` is computed once. Unperturbed, the layer is
    ``nn.BatchNorm2d`` exactly. Running statistics are updated only while
    ``track_running_stats`` is true (HA-SGD clears it for all but one of its L samples).
    """

    # One value per channel: a per-channel range would be 0 (no noise). BN's w and b are ranged
    # per tensor even with per_channel=True, as the authors' NoisyBN.
    per_channel_ranges = False

    def analog_tensors(self):
        shapes = {"weight": torch.Size([self.num_features])}
        if self.config.bias != "digital":
            shapes["bias"] = torch.Size([self.num_features])
        return shapes

    def _syncs(self) -> bool:
        """Whether batch statistics are reduced across processes (``AnalogSyncBatchNorm``)."""
        return False

    def _batch_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Per-channel batch mean, biased variance and the element count per channel."""
        return x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False), x.numel() // x.shape[1]

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        """Update the running statistics as ``nn.BatchNorm2d`` does (unbiased running var)."""
        if not self.track_running_stats:
            return
        self.num_batches_tracked.add_(1)
        factor = self.momentum
        if factor is None:  # cumulative moving average, as torch
            factor = 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(var * (n / max(n - 1, 1)), factor)

    def _train_batch_norm(self, x: torch.Tensor):
        """``nn.BatchNorm2d``'s training forward, also returning the batch mean and 1/std."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as torch
                factor = 1.0 / float(self.num_batches_tracked)
        track = self.track_running_stats
        return torch.native_batch_norm(
            x,
            self.weight,
            self.bias,
            self.running_mean if track else None,
            self.running_var if track else None,
            True,
            factor,
            self.eps,
        )

    def _affine(self, mean: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chip's per-channel ``(w, b)`` for these statistics."""
        gamma = self.weight if self.weight is not None else torch.ones_like(var)
        beta = self.bias if self.bias is not None else torch.zeros_like(mean)
        w = gamma / torch.sqrt(var + self.eps)
        return w, beta - mean * w

    def _noisy_affine(self, mean: torch.Tensor, var: torch.Tensor):
        """``(w + nu_w, b + nu_b)``: the perturbation is a constant, the gradient reaches w, b."""
        w, b = self._affine(mean, var)
        return self._noisy_weight_bias(w, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self.training and self._syncs():
            mean, var, n = self._batch_moments(x)  # (C,), (C,): over every process
            self._track(mean.detach(), var.detach(), n)
            w, b = self._noisy_affine(mean, var)
            return self._output(torch.addcmul(b.reshape(shape), x, w.reshape(shape)))
        if self.training and self.perturbed:
            # (w + nu_w) x + (b + nu_b) = BN(x) + nu_w x + nu_b: BatchNorm's fused kernel (and its
            # gradient through the batch statistics), plus the constant perturbation of the fold,
            # added in place (BatchNorm's backward does not need its output).
            y, mean, invstd = self._train_batch_norm(x)
            with torch.no_grad():
                nu_w, nu_b = self._perturbations(*self._affine(mean, invstd.pow(-2) - self.eps))
            y = y.addcmul_(x, nu_w.reshape(shape).to(y.dtype))
            if nu_b is not None:
                y = y.add_(nu_b.reshape(shape).to(y.dtype))
            return self._output(y)
        if self.perturbed:  # a programmed chip
            sources = (self.weight, self.bias, self.running_mean, self.running_var)
            w, b = self._on_chip(
                lambda: self._noisy_affine(self.running_mean, self.running_var), *sources
            )
            return self._output(torch.addcmul(b.reshape(shape), x, w.reshape(shape)))
        return self._output(nn.BatchNorm2d.forward(self, x))


class AnalogSyncBatchNorm(AnalogBatchNorm2d):
    """``AnalogBatchNorm2d`` whose training batch statistics are reduced over all processes.

    What ``sync_batchnorm=True`` (Lightning's ``TorchSyncBatchNorm``, i.e.
    ``nn.SyncBatchNorm.convert_sync_batchnorm``) turns an analog BatchNorm into: cimsim
    intercepts that conversion (``_keep_analog``) so synchronized BN stays on the chip. The
    reduction is a differentiable all-reduce of the per-channel sums over ``process_group`` (the
    whole world when None), so it runs on any backend (gloo on CPU too); in ``eval()`` it is
    ``AnalogBatchNorm2d``. Not an ``nn.SyncBatchNorm`` subclass: DDP refuses those on the CPU.
    """

    process_group = None

    def _syncs(self) -> bool:
        return dist.is_available() and dist.is_initialized() and self._world() > 1

    def _world(self) -> int:
        return dist.get_world_size(self.process_group or dist.group.WORLD)

    def _batch_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Global per-channel mean and biased variance: each rank's (count, mean, var) in fp32
        (stable under bf16 inputs), gathered differentiably and combined exactly (Chan et al.)."""
        group = self.process_group or dist.group.WORLD
        var, mean = torch.var_mean(x.float(), dim=(0, 2, 3), unbiased=False)  # (C,), (C,)
        count = torch.full_like(mean, x.numel() // x.shape[1])
        parts = dist_fn.all_gather(torch.stack([count, mean, var]), group=group)  # world x (3, C)
        counts, means, variances = torch.stack(parts).unbind(1)  # (world, C) each
        n = counts.sum(0)
        global_mean = (counts * means).sum(0) / n
        m2 = (counts * (variances + (means - global_mean) ** 2)).sum(0)
        return global_mean, m2 / n, int(n[0].item())


def _swap_class(new: nn.Module, cls: type, old: AnalogLayer) -> nn.Module:
    """Make ``new`` (a freshly converted BatchNorm) an analog layer carrying ``old``'s chip."""
    new.__class__ = cls
    new._init_analog(old.config)
    new.adc = old.adc  # a layer ADC keeps its calibrated range (restored from a checkpoint)
    new.training = old.training
    if old.chip_seed is not None:
        new.chip_seed = old.chip_seed
        for name in old.analog_tensors():
            setattr(new, f"chip_{name}", getattr(old, f"chip_{name}"))
    return new


def _keep_analog(parent: nn.Module, name: str, module: nn.Module | None):
    """Global module-registration hook: keep BatchNorm analog through SyncBatchNorm conversion.

    ``nn.SyncBatchNorm.convert_sync_batchnorm`` builds a new plain ``SyncBatchNorm`` with the old
    one's parameters and buffers and registers it in place of the old: that would silently take
    BN off the chip. While the old module is still registered under ``name``
    we can see it was analog, and return the analog counterpart instead.
    """
    old = getattr(parent, "_modules", {}).get(name)
    if not isinstance(old, AnalogBatchNorm2d) or module is None or isinstance(module, AnalogLayer):
        return None
    if type(module) is nn.SyncBatchNorm:  # keeps its process_group attribute
        return _swap_class(module, AnalogSyncBatchNorm, old)
    return None


nn.modules.module.register_module_module_registration_hook(_keep_analog)


class AnalogIdentity(AnalogLayer, nn.Identity):
    """An identity shortcut on the chip: ``x * (1 + sigma * eps)`` (docs/model.md).

    ``identity_draws='element'`` (default, as the authors' ``NoisyIdentity``): one draw per
    activation element (C, H, W); ``'channel'``: one gain per channel, the diagonal of an
    identity crossbar. Either way a draw is shared by the samples of a batch: fresh every
    forward in training, frozen for a programmed chip (drawn from the chip seed at the first
    forward, when the shape is known). The mean shift applies only with
    ``identity_mean_shift`` (the authors' identity ignores it).
    """

    has_adc = False

    def _init_analog(self, config: AnalogConfig) -> None:
        super()._init_analog(config)
        self._chip_name, self.chip_gain = "", None

    def analog_tensors(self):
        return {}

    def program(self, seed: int, prefix: str) -> None:
        # The shape is known only at the first forward: draw then, from (seed, name).
        self.chip_seed, self._chip_name, self.chip_gain = seed, f"{prefix}.gain", None

    def clear(self) -> None:
        self.chip_seed, self.chip_gain = None, None

    @property
    def _mean_shift(self) -> float:
        return self.config.mean_shift if self.config.identity_mean_shift else 0.0

    def _gain(self, x: torch.Tensor) -> torch.Tensor | None:
        c = self.config
        if c.sigma == 0.0 and self._mean_shift == 0.0:
            return None
        shape = (x.shape[1],) if c.identity_draws == "channel" else tuple(x.shape[1:])
        if self.training:
            eps = standard_noise(shape, c.distribution, device=x.device, dtype=x.dtype)
        elif self.chip_seed is None:
            return None
        else:
            if self.chip_gain is None or tuple(self.chip_gain.shape) != shape:
                # kept in fp32 and cast per forward: the chip does not depend on the first
                # forward's dtype (bf16 autocast) or device
                self.chip_gain = chip_noise(self.chip_seed, self._chip_name, shape, c.distribution)
            eps = self.chip_gain.to(device=x.device, dtype=x.dtype)
        one = torch.ones((), device=x.device, dtype=x.dtype)
        gain = perturbation(eps, one, c.sigma, self._mean_shift).add_(1.0)
        if c.identity_draws == "channel":
            return gain.reshape((1, -1) + (1,) * (x.dim() - 2))  # (1, C, 1, 1)
        return gain.unsqueeze(0)  # (1, C, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gain = self._gain(x)
        return x if gain is None else x * gain

    def extra_repr(self) -> str:
        c = self.config
        return f"sigma={c.sigma}, mean_shift={self._mean_shift}, draws={c.identity_draws}"
