"""HA-SGD (Hessian-Aware SGD, Wan et al. 2022, Algorithm 1) as plain functions.

Per mini-batch: L forward/backward passes, each at ``w + dw_l`` with a fresh perturbation
``dw_l ~ q`` (the analog layers draw it in ``train()`` mode), the gradients averaged by
back-propagating ``loss / L`` each time, then one optimizer step on the clean ``w``. For
zero-mean noise this minimises ``E[J(w + dw)] ~ J(w) + sigma^2/2 * sum_l r_l^2 tr(H_l)``: a
range-weighted Hessian-trace penalty without ever forming the Hessian.

The L samples are one step: running statistics (BatchNorm, ADC ranges) are updated by the first
sample only, gradients are all-reduced across data-parallel ranks once, by the last backward,
and buffers are made identical across ranks after the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cimsim.chip.adc import ADC
from cimsim.chip.noise import antithetic as antithetic_draws


@contextmanager
def frozen_running_stats(model: nn.Module | None) -> Iterator[None]:
    """Forward passes inside use, but do not update, running statistics: BatchNorm layers
    normalize by the batch without tracking it (``track_running_stats=False`` in ``train()``
    mode) and ADCs quantize with their current range without moving it."""
    if model is None:
        yield
        return
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    converters = [m for m in model.modules() if isinstance(m, ADC) and m.tracking]
    for m in norms:
        m.track_running_stats = False
    for a in converters:
        a.tracking = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True
        for a in converters:
            a.tracking = True


def ddp_grad_sync(
    ddp: DistributedDataParallel | None,
) -> Callable[[bool], AbstractContextManager] | None:
    """``grad_sync`` for ``hasgd_backward`` under DDP: within ``grad_sync(enabled)`` a forward and
    backward all-reduce gradients only when ``enabled`` (DDP's ``require_backward_grad_sync``,
    which its forward reads). ``None`` without DDP."""
    if ddp is None:
        return None

    @contextmanager
    def grad_sync(enabled: bool) -> Iterator[None]:
        previous, ddp.require_backward_grad_sync = ddp.require_backward_grad_sync, enabled
        try:
            yield
        finally:
            ddp.require_backward_grad_sync = previous

    return grad_sync


def hasgd_backward(
    closure: Callable[[], torch.Tensor],
    L: int,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    grad_sync: Callable[[bool], AbstractContextManager] | None = None,
    model: nn.Module | None = None,
    antithetic: bool = False,
    sample: Callable[[int], AbstractContextManager] | None = None,
) -> torch.Tensor:
    """Accumulate the HA-SGD gradient ``1/L sum_l grad J(w + dw_l)`` into ``.grad``.

    Each sample is backpropagated before the next forward, so memory does not grow with L.

    Args:
        closure: runs one forward with a fresh perturbation and returns the loss.
        L: the number of perturbation samples (>= 1).
        backward: how to backpropagate (``LightningModule.manual_backward`` under Lightning).
        grad_sync: ``grad_sync(enabled)`` is a context in which backward does (or does not)
            all-reduce gradients across data-parallel ranks: off for the first L - 1 samples, on
            for the last, so ranks synchronize once per step, not L times.
        model: the network; samples after the first run under ``frozen_running_stats(model)``
            so its running statistics move once per step, as with a digital step.
        antithetic: samples come in pairs ``+dw, -dw`` (the same draws negated; L even): the
            pair's mean cancels the first-order noise term ``H dw`` of the gradient exactly and
            keeps the curvature term, so the estimate is unbiased with lower variance, at the
            same cost.
        sample: ``sample(i)`` is a context around sample ``i``'s forward and backward (the
            training methods' ``TrainingMethods.sample``: antithetic pairs among them).

    Returns:
        The mean loss over the samples (detached).
    """
    if L < 1:
        raise ValueError(f"L={L!r} is invalid: must be an integer >= 1")
    if antithetic and L % 2:
        raise ValueError(f"L={L!r} is invalid with antithetic pairs: must be even")
    total = None
    for i in range(L):
        sync = grad_sync(i == L - 1) if grad_sync is not None else nullcontext()
        pair = antithetic_draws("replay" if i % 2 else "record") if antithetic else nullcontext()
        each = sample(i) if sample is not None else nullcontext()
        with sync, pair, each, frozen_running_stats(model if i > 0 else None):
            loss = closure()
            backward(loss / L)
        total = loss.detach() if total is None else total + loss.detach()
    return total / L


@contextmanager
def sam_ascent(params: list[torch.Tensor], rho: float, adaptive: bool = False) -> Iterator[None]:
    """Within: the weights moved by the sharpness-aware ascent step (Foret et al. 2021), from the
    gradients already in ``.grad``; restored on exit. ``e = rho g / ||g||``; ASAM (Kwon et al.
    2021, ``adaptive``) scales by the weights: ``e = rho |w|^2 g / || |w| g ||``. The caller
    clears ``.grad`` inside, computes the gradient at ``w + e``, and steps on the restored
    ``w`` (one extra forward-backward pass: L + 1 per step). Unlike Kwon et al.'s reference code
    (``|w| + eta`` for weights, no scaling for biases), ASAM here scales every tensor by ``|w|``,
    so zero-initialized biases are not moved by the ascent until they grow."""
    with torch.no_grad():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        scaled = [g * p.abs() if adaptive else g for g, p in zip(grads, params, strict=True)]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s) for s in scaled]))
        steps = [
            rho * (s * p.abs() if adaptive else s) / (norm + 1e-12)
            for s, p in zip(scaled, params, strict=True)
        ]
        originals = [p.detach().clone() for p in params]  # exact restore: w + e - e != w
        for p, e in zip(params, steps, strict=True):
            p.add_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, w in zip(params, originals, strict=True):
                p.copy_(w)


@torch.no_grad()
def sync_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy every buffer (BatchNorm running statistics, ADC ranges) from rank ``src`` to all
    ranks, as DDP's own buffer broadcast would at the next forward: after a step, every rank
    then holds the same model (what validation, chips and checkpoints see). No-op without an
    initialized process group of more than one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in model.buffers():
        by_dtype.setdefault(b.dtype, []).append(b)
    for dtype, tensors in by_dtype.items():  # one broadcast per dtype, not one per buffer
        flat = torch.cat([t.reshape(-1) for t in tensors])
        wire = flat.to(torch.uint8) if dtype == torch.bool else flat  # not every backend has bool
        dist.broadcast(wire, src=src)
        flat = wire.to(dtype)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
