"""The part every analog layer shares (``AnalogLayer``: chip, draws, perturbation) and identity."""

# Each analog layer keeps its digital parameters under the same names (a digital ``state_dict``
# loads as is) and perturbs them on the fly: in ``train()`` with fresh draws each forward (shared
# by the mini-batch), in ``eval()`` with the frozen draws of the programmed chip, or not at all
# when no chip is programmed. With ``sigma = mean_shift = 0`` each runs its exact digital op.
# Conv/Linear weights on a device with state of its own (``pcm``, plug-ins: ``config.device``)
# take that device's perturbation instead: a fresh chip at ``t_train`` per training forward, the
# programmed chip at its ``set_time`` in evaluation (``cimsim.chip.crossbar``).

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from cimsim.chip.adc import ADC
from cimsim.chip.config import AnalogConfig
from cimsim.chip.dac import DAC
from cimsim.chip.devices import ProgrammedWeights
from cimsim.chip.devices.conductance import chip_cells, fresh_cells, relative_cells
from cimsim.chip.noise import (
    chip_noise,
    noise_scales,
    perturbation,
    standard_noise,
    tensor_range,
)
from cimsim.chip.periphery import TileADC, layer_tiles


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
        # The weights' device state on a programmed chip (a device with state of its own), and
        # the weights it reads at the current chip time.
        self.device_state: ProgrammedWeights | None = None
        # A stateless device's frozen draws of pairs 2..N and fault codes (``config.faults``,
        # ``config.pairs``; ``cimsim.chip.devices.conductance.chip_cells``), set by ``program``.
        self.chip_cells: tuple | None = None
        self.chip_time: tuple[float, int] | None = None
        self.register_buffer("chip_read_weight", None, persistent=False)
        # Its compensation gain per tile (T, C_out or 1), when the tiles' outputs apply it.
        self.register_buffer("chip_read_alpha", None, persistent=False)

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
        self.chip_cells = None  # a stateless device's weights on pairs, with faults: more draws
        if self.uses_device and not self._device_weights and self.config.cells_active:
            self.chip_cells = chip_cells(seed, f"{prefix}.weight", self.chip_weight, self.config)

    def clear(self) -> None:
        self.chip_seed, self._chip_cache = None, None
        for name in self.analog_tensors():
            setattr(self, f"chip_{name}", None)
        self.device_state, self.chip_time, self.chip_read_weight = None, None, None
        self.chip_read_alpha, self.chip_cells = None, None

    @property
    def _device_weights(self) -> bool:
        """Whether the weights take their device's own perturbation (``Device.stateful``)."""
        return self.uses_device and self.config.device_model.stateful

    @property
    def perturbed(self) -> bool:
        """Whether this forward perturbs: noise is set and (training or a chip is programmed)."""
        faulty = self.uses_device and self.config.faults.active
        noisy = self.config.noisy or self._device_weights or faulty
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
        if self._device_weights:  # the bias keeps the relative model (digital at sigma = mu = 0)
            nu_w = self._device_perturbation(weight)
        else:
            if self._tiles is not None:  # each tile relative to its own range
                r_w = self._tile_ranges(weight, per_channel)
            cells = self.uses_device and cfg.cells_active
            nu_w = self._cells_nu(weight, r_w) if cells else self._nu("weight", weight, r_w)
        nu_b = None if r_b is None or not cfg.noisy else self._nu("bias", bias, r_b)
        return nu_w, nu_b

    def _cells_nu(self, weight: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """The relative perturbation of weights on ``config.pairs`` with ``config.faults``
        (``relative_cells``): a fresh draw per pair and fresh faults in training, else the
        programmed chip's."""
        cfg, (eps, _) = self.config, self._eps("weight", weight)
        extra, codes = fresh_cells(weight, cfg) if self.training else self.chip_cells
        f, sigma, mu = cfg.pairs.f, cfg.sigma, cfg.mean_shift
        return relative_cells(weight, r, [eps, *extra], sigma, mu, f, codes, self._tiles)

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
            lambda: self._noisy_weight_bias(*sources), *sources, self.chip_read_weight
        )

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.adc is None else self.adc(y)

    def extra_repr(self) -> str:
        c = self.config
        chip = "none" if self.chip_seed is None else self.chip_seed
        return f"{super().extra_repr()}, sigma={c.sigma}, mean_shift={c.mean_shift}, chip={chip}"


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
