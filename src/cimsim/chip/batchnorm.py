"""BatchNorm on the chip: ``AnalogBatchNorm2d`` (a per-channel affine) and its synchronized twin."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from cimsim.chip.layers import AnalogLayer


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
