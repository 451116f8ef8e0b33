"""The quantity HA-SGD penalizes, measured: Hutchinson estimates of Hessian traces.

For zero-mean noise ``E[J(w + dw)] ~ J(w) + sigma^2 / 2 * sum_t r_t^2 tr(H_t)`` where ``t`` runs
over the perturbed tensors, ``r_t`` is each one's noise scale (``noise_scales``: the bi-scale
mapping included) and ``H_t`` the diagonal block of the Hessian for that tensor. Hutchinson
(1990): for Rademacher probes ``v`` (entries +-1), ``E[v^T H v] = tr(H)``; ``H v`` comes from a
second backward pass (no Hessian is formed). Each probe costs about two backward passes.

Covered: the weights and biases of analog Conv2d/Linear layers (their noise scales are per
tensor, or per output channel with ``per_channel``). BatchNorm's chip affine and identity gains
are not parameters of the network, so their blocks are not estimated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cimsim.chip.conv_linear import AnalogConv2d, AnalogLinear
from cimsim.chip.noise import noise_scales
from cimsim.validation import check_int


@dataclass(frozen=True)
class TraceEstimate:
    """One tensor's ``tr(H_t)`` estimate and its noise scale.

    Attributes:
        name: the parameter's qualified name.
        trace: mean of ``v^T H_t v`` over the probes.
        stderr: its standard error (sample std / sqrt(probes)).
        r2: the squared noise scale (summed over rows with per-channel scales:
            ``sum_i r_i^2 tr(H_t,i)`` is then estimated in ``weighted``).
    """

    name: str
    trace: float
    stderr: float
    r2: float


def _rademacher(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    signs = torch.randint(0, 2, like.shape, generator=generator, device="cpu", dtype=torch.int8)
    return (signs.to(like.dtype) * 2 - 1).to(like.device)


def _mean_se(samples: list[float]) -> tuple[float, float]:
    n = len(samples)
    mean = math.fsum(samples) / n
    if n < 2:
        return mean, math.nan
    var = math.fsum((s - mean) ** 2 for s in samples) / (n - 1)
    return mean, math.sqrt(var / n)


def analog_tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``name -> (parameter, r^2)`` for every weight and bias of the analog Conv/Linear layers,
    with ``r`` the tensor's noise scale under the layer's chip (broadcastable to the tensor)."""
    out = {}
    for prefix, m in model.named_modules():
        if not isinstance(m, AnalogConv2d | AnalogLinear):
            continue
        c = m.config
        r_w, r_b = noise_scales(m.weight.detach(), m.bias, c.scale, c.per_channel, c.bias)
        dot = f"{prefix}." if prefix else ""
        out[f"{dot}weight"] = (m.weight, r_w.square())
        if m.bias is not None and r_b is not None:
            out[f"{dot}bias"] = (m.bias, r_b.square())
    return out


def hessian_traces(
    model: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    probes: int = 16,
    generator: torch.Generator | None = None,
) -> tuple[list[TraceEstimate], tuple[float, float]]:
    """Hutchinson estimates of ``tr(H_t)`` per analog tensor, and of the range-weighted total
    ``sum_t r_t^2 tr(H_t)`` that HA-SGD penalizes (with its standard error).

    Args:
        model: a converted model; evaluate it clean (``eval()``, no chip) for the Hessian at w.
        loss_fn: computes the loss at the current weights (e.g. one fixed batch).
        probes: Rademacher probes (>= 2 for a standard error).
        generator: source of the probes (reproducible estimates).

    Returns:
        The per-tensor estimates and ``(weighted_total, its_stderr)``.
    """
    check_int("probes", probes, minimum=1)
    tensors = analog_tensors(model)
    params = [p for p, _ in tensors.values()]
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    per_tensor: dict[str, list[float]] = {name: [] for name in tensors}
    weighted: list[float] = []
    for _ in range(probes):
        vs = [_rademacher(p, generator) for p in params]
        hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
        total = 0.0
        for (name, (_, r2)), v, hv in zip(tensors.items(), vs, hvs, strict=True):
            vhv = v * hv  # (same shape as the tensor): per-element terms of v^T H v
            per_tensor[name].append(vhv.sum().item())
            total += (r2 * vhv).sum().item()
        weighted.append(total)
    estimates = []
    for name, (_, r2) in tensors.items():
        mean, se = _mean_se(per_tensor[name])
        estimates.append(TraceEstimate(name, mean, se, float(r2.sum() if r2.dim() else r2)))
    return estimates, _mean_se(weighted)


def mean_loss(net: nn.Module, batches: list, device: torch.device) -> Callable[[], torch.Tensor]:
    """The loss whose Hessian is estimated: ``net``'s mean cross-entropy per sample over
    ``batches`` (``(x, y)`` pairs, moved to ``device``), so a short last batch weighs as many
    samples as it holds, as in the per-sample mean loss the chips measure."""
    count = sum(len(y) for _, y in batches)

    def loss() -> torch.Tensor:
        total = sum(
            F.cross_entropy(net(x.to(device)), y.to(device), reduction="sum") for x, y in batches
        )
        return total / count

    return loss


def clean_hessian_traces(
    net: nn.Module,
    batches: list,
    probes: int,
    seed: int = 0,
    device: torch.device | None = None,
) -> tuple[list[TraceEstimate], tuple[float, float]]:
    """``hessian_traces`` of ``mean_loss`` at ``net``'s clean weights (``eval()`` mode, no chip;
    its mode restored after), with probes seeded by ``seed``: what ``HessianMonitor`` logs and
    ``evaluate.py hessian=true`` reports."""
    device = device if device is not None else next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        with torch.enable_grad():
            g = torch.Generator().manual_seed(seed)
            return hessian_traces(net, mean_loss(net, batches, device), probes, g)
    finally:
        net.train(was_training)
