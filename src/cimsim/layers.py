"""Analog counterparts of Conv2d, Linear, BatchNorm2d and identity shortcuts.

Each keeps its digital parameters under the same names (a digital ``state_dict`` loads as is)
and perturbs them on the fly: in ``train()`` with fresh draws each forward (shared by the
mini-batch), in ``eval()`` with the frozen draws of the programmed chip, or not at all when no
chip is programmed. With ``sigma = mean_shift = 0`` each runs its exact digital op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cimsim.adc import ADC
from cimsim.config import AnalogConfig
from cimsim.noise import chip_noise, perturbation, standard_noise, tensor_range


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

    def _init_analog(self, config: AnalogConfig) -> None:
        self.config = config
        self.chip_seed: int | None = None
        self._chip_cache: tuple | None = None  # see _on_chip
        self.adc: ADC | None = None
        if config.adc_placement == "layer" and self.has_adc:
            self.adc = ADC(config.adc_levels, placement="layer")
        for name in self.analog_tensors():
            # Frozen draws of a programmed chip: moved by .to(), never saved in a state_dict.
            self.register_buffer(f"chip_{name}", None, persistent=False)

    def analog_tensors(self) -> dict[str, torch.Size]:
        raise NotImplementedError

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

    def clear(self) -> None:
        self.chip_seed, self._chip_cache = None, None
        for name in self.analog_tensors():
            setattr(self, f"chip_{name}", None)

    @property
    def perturbed(self) -> bool:
        """Whether this forward perturbs: noise is set and (training or a chip is programmed)."""
        return self.config.noisy and (self.training or self.chip_seed is not None)

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

    def _noisy_weight_bias(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """``(W + nu_W, b + nu_b)`` under the bi-scale mapping (MODEL.md section 1)."""
        cfg = self.config
        if not self.perturbed:
            return weight, bias
        r_w = tensor_range(weight, cfg.scale, cfg.per_channel)
        nu_w = self._nu("weight", weight, r_w)
        if nu_w is not None:
            weight = weight + nu_w
        if bias is not None and cfg.bias != "digital":
            # separate: [W b/s] with s matching the ranges -> bias noise relative to r(b);
            # shared: one scale for the augmented row -> relative to the row's weight range.
            r_b = tensor_range(bias, cfg.scale) if cfg.bias == "separate" else r_w.reshape(-1)
            nu_b = self._nu("bias", bias, r_b)
            if nu_b is not None:
                bias = bias + nu_b
        return weight, bias

    def _noisy_parameters(self):
        """This forward's ``(weight, bias)`` (a programmed chip's are computed once)."""
        if not self.perturbed:
            return self.weight, self.bias
        sources = (self.weight, self.bias)
        return self._on_chip(lambda: self._noisy_weight_bias(*sources), *sources)

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.adc is None else self.adc(y)

    def extra_repr(self) -> str:
        c = self.config
        chip = "none" if self.chip_seed is None else self.chip_seed
        return f"{super().extra_repr()}, sigma={c.sigma}, mean_shift={c.mean_shift}, chip={chip}"


class AnalogConv2d(AnalogLayer, nn.Conv2d):
    """``nn.Conv2d`` on an analog crossbar."""

    def analog_tensors(self):
        shapes = {"weight": self.weight.shape}
        if self.bias is not None and self.config.bias != "digital":
            shapes["bias"] = self.bias.shape
        return shapes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._noisy_parameters()
        return self._output(self._conv_forward(x, weight, bias))


class AnalogLinear(AnalogLayer, nn.Linear):
    """``nn.Linear`` on an analog crossbar."""

    analog_tensors = AnalogConv2d.analog_tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._noisy_parameters()
        return self._output(F.linear(x, weight, bias))


class AnalogBatchNorm2d(AnalogLayer, nn.BatchNorm2d):
    """BatchNorm as a per-channel analog affine layer ``y = w x + b`` with
    ``w = gamma / sqrt(var + eps)`` and ``b = beta - mean * w`` (MODEL.md section 1).

    The perturbed affine is folded back into BatchNorm's own parameters, so the layer costs
    one ``F.batch_norm`` like the digital one:
    ``gamma' = gamma + nu_w * s`` and ``beta' = beta + nu_b + mean * nu_w`` with
    ``s = sqrt(var + eps)``. In ``eval()`` this is exactly ``(w + nu_w) x + (b + nu_b)``. In
    ``train()`` BatchNorm normalizes by batch statistics; the ranges and the fold use the running
    statistics, so the noise is that of the chip's affine up to the ratio of running to batch std.
    """

    def analog_tensors(self):
        shapes = {"weight": torch.Size([self.num_features])}
        if self.config.bias != "digital":
            shapes["bias"] = torch.Size([self.num_features])
        return shapes

    @torch.no_grad()
    def _perturbed_affine(self, gamma: torch.Tensor, beta: torch.Tensor):
        """(delta_gamma, delta_beta) that realise the analog perturbation (when perturbed)."""
        cfg = self.config
        std = torch.sqrt(self.running_var + self.eps)
        w = gamma / std
        b = beta - self.running_mean * w
        # One value per channel: a per-channel range would be degenerate, so BN is per tensor.
        r_w = tensor_range(w, cfg.scale)
        nu_w = self._nu("weight", w, r_w)
        nu_b = None
        if cfg.bias != "digital":
            nu_b = self._nu(
                "bias", b, tensor_range(b, cfg.scale) if cfg.bias == "separate" else r_w
            )
        d_beta = self.running_mean * nu_w
        if nu_b is not None:
            d_beta = d_beta + nu_b
        return nu_w * std, d_beta

    def _noisy_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This forward's perturbed ``(gamma', beta')``."""
        gamma = self.weight if self.weight is not None else torch.ones_like(self.running_var)
        beta = self.bias if self.bias is not None else torch.zeros_like(self.running_mean)
        d_gamma, d_beta = self._perturbed_affine(gamma.detach(), beta.detach())
        return gamma + d_gamma, beta + d_beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.perturbed:
            return self._output(super().forward(x))
        sources = (self.weight, self.bias, self.running_mean, self.running_var)
        gamma, beta = self._on_chip(self._noisy_affine, *sources)
        return self._output(self._batch_norm(x, gamma, beta))

    def _batch_norm(self, x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor):
        """``nn.BatchNorm2d.forward`` (with running statistics) for the given affine."""
        self._check_input_dim(x)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as torch
                factor = 1.0 / float(self.num_batches_tracked)
        return F.batch_norm(
            x, self.running_mean, self.running_var, gamma, beta, self.training, factor, self.eps
        )


class AnalogIdentity(AnalogLayer, nn.Identity):
    """An identity shortcut on the chip: ``x * (1 + mu + sigma * eps)``, one draw per channel
    (the diagonal of an identity crossbar), shared by the batch and spatial positions."""

    has_adc = False

    def _init_analog(self, config: AnalogConfig) -> None:
        super()._init_analog(config)
        self._chip_name, self.chip_gain = "", None

    def analog_tensors(self):
        return {}

    def program(self, seed: int, prefix: str) -> None:
        # The channel count is known only at the first forward: draw then, from (seed, name).
        self.chip_seed, self._chip_name, self.chip_gain = seed, f"{prefix}.gain", None

    def clear(self) -> None:
        self.chip_seed, self.chip_gain = None, None

    def _gain(self, x: torch.Tensor) -> torch.Tensor | None:
        c = self.config
        channels = x.shape[1]
        if not c.noisy:
            return None
        if self.training:
            eps = standard_noise((channels,), c.distribution, device=x.device, dtype=x.dtype)
        elif self.chip_seed is None:
            return None
        else:
            if self.chip_gain is None or self.chip_gain.shape[0] != channels:
                self.chip_gain = chip_noise(
                    self.chip_seed,
                    self._chip_name,
                    (channels,),
                    c.distribution,
                    device=x.device,
                    dtype=x.dtype,
                )
            eps = self.chip_gain
        gain = perturbation(
            eps, torch.ones((), device=x.device, dtype=x.dtype), c.sigma, c.mean_shift
        ).add_(1.0)
        return gain.reshape((1, channels) + (1,) * (x.dim() - 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gain = self._gain(x)
        return x if gain is None else x * gain

    def extra_repr(self) -> str:
        c = self.config
        return f"sigma={c.sigma}, mean_shift={c.mean_shift}"
