"""HA-SGD (Hessian-Aware SGD, Wan et al. 2022, Algorithm 1) as a plain function.

Per mini-batch: L forward/backward passes, each at ``w + dw_l`` with a fresh perturbation
``dw_l ~ q`` (the analog layers draw it in ``train()`` mode), the gradients averaged by
back-propagating ``loss / L`` each time, then one optimizer step on the clean ``w``. For
zero-mean noise this minimises ``E[J(w + dw)] ~ J(w) + sigma^2/2 * sum_l r_l^2 tr(H_l)``: a
range-weighted Hessian-trace penalty without ever forming the Hessian.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch


def _always(enabled: bool) -> AbstractContextManager:
    return nullcontext()


def hasgd_backward(
    closure: Callable[[], torch.Tensor],
    samples: int,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    grad_sync: Callable[[bool], AbstractContextManager] = _always,
) -> torch.Tensor:
    """Accumulate the HA-SGD gradient ``1/L sum_l grad J(w + dw_l)`` into ``.grad``.

    Each sample is backpropagated before the next forward, so memory does not grow with L.

    Args:
        closure: runs one forward with a fresh perturbation and returns the loss.
        samples: L, the number of perturbation samples (>= 1).
        backward: how to backpropagate (``LightningModule.manual_backward`` under Lightning).
        grad_sync: ``grad_sync(enabled)`` is a context in which backward does (or does not)
            all-reduce gradients across data-parallel ranks: off for the first L - 1 samples, on
            for the last, so ranks synchronize once per step, not L times.

    Returns:
        The mean loss over the samples (detached).
    """
    if samples < 1:
        raise ValueError(f"samples={samples!r} is invalid: must be an integer >= 1")
    total = None
    for i in range(samples):
        with grad_sync(i == samples - 1):
            loss = closure()
            backward(loss / samples)
        total = loss.detach() if total is None else total + loss.detach()
    return total / samples
