"""Normalization layers on the chip (``analog_norm``): LayerNorm, GroupNorm and BatchNorm1d.

Each is digital by default (``AnalogConfig.analog_norm = False``). With ``analog_norm`` its
elementwise affine ``y = gamma * x_hat + beta`` runs on the chip, perturbed like BatchNorm's
(docs/model.md): ``gamma`` and ``beta`` are a per-channel weight and bias, ranged per tensor
(one value per row), the bias mapped by ``AnalogConfig.bias``. The statistics (``x_hat``) stay
digital: LayerNorm's and GroupNorm's are each sample's own, so unlike BatchNorm's running
statistics there is nothing to fold into the stored pair. ``AnalogBatchNorm1d`` is
``AnalogBatchNorm2d``'s fold ``w = gamma / sqrt(var + eps)``, ``b = beta - mean * w`` on
``(N, C)`` or ``(N, C, L)`` inputs, and stays analog under ``SyncBatchNorm`` conversion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cimsim.chip.batchnorm import AnalogBatchNorm2d, AnalogSyncBatchNorm, _swap_class
from cimsim.chip.layers import AnalogLayer


def _affine_tensors(self) -> dict[str, torch.Size]:
    shapes = {"weight": self.weight.shape}
    if self.bias is not None and self.config.bias != "digital":
        shapes["bias"] = self.bias.shape
    return shapes


class AnalogLayerNorm(AnalogLayer, nn.LayerNorm):
    """``nn.LayerNorm`` whose affine ``(gamma, beta)`` is stored on the chip."""

    per_channel_ranges = False  # one value per row: a per-row range would be 0
    analog_tensors = _affine_tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._noisy_parameters()
        return self._output(F.layer_norm(x, self.normalized_shape, weight, bias, self.eps))


class AnalogGroupNorm(AnalogLayer, nn.GroupNorm):
    """``nn.GroupNorm`` whose per-channel affine ``(gamma, beta)`` is stored on the chip."""

    per_channel_ranges = False
    analog_tensors = _affine_tensors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._noisy_parameters()
        return self._output(F.group_norm(x, self.num_groups, weight, bias, self.eps))


class AnalogBatchNorm1d(AnalogLayer, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` as ``AnalogBatchNorm2d``'s per-channel analog affine layer."""

    per_channel_ranges = False
    analog_tensors = AnalogBatchNorm2d.analog_tensors
    _syncs = AnalogBatchNorm2d._syncs
    _track = AnalogBatchNorm2d._track
    _train_batch_norm = AnalogBatchNorm2d._train_batch_norm
    _affine = AnalogBatchNorm2d._affine
    _noisy_affine = AnalogBatchNorm2d._noisy_affine
    forward = AnalogBatchNorm2d.forward  # its shapes follow x.dim(); the input check is 1d's


class AnalogSyncBatchNorm1d(AnalogBatchNorm1d):
    """``AnalogBatchNorm1d`` with its training statistics reduced over all processes
    (``AnalogSyncBatchNorm``'s exact, differentiable reduction on the input as ``(N, C, L, 1)``)."""

    process_group = None
    _syncs = AnalogSyncBatchNorm._syncs
    _world = AnalogSyncBatchNorm._world

    def _batch_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        return AnalogSyncBatchNorm._batch_moments(self, x.reshape(x.shape[0], x.shape[1], -1, 1))


def _keep_analog_1d(parent: nn.Module, name: str, module: nn.Module | None):
    """Global module-registration hook: an analog BatchNorm1d replaced by a plain
    ``SyncBatchNorm`` (``convert_sync_batchnorm``) stays analog (as ``batchnorm._keep_analog``)."""
    old = getattr(parent, "_modules", {}).get(name)
    if isinstance(old, AnalogBatchNorm1d) and type(module) is nn.SyncBatchNorm:
        return _swap_class(module, AnalogSyncBatchNorm1d, old)
    return None


nn.modules.module.register_module_module_registration_hook(_keep_analog_1d)
