"""Distillation from the digital teacher (Hinton et al. 2015) for noise-aware training."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor, beta: float, T: float
) -> torch.Tensor:
    """``(1 - beta) CE(student, target) + beta T^2 KL(softmax(teacher/T) || softmax(student/T))``.

    The ``T^2`` keeps the soft term's gradient scale independent of the temperature.

    Args:
        student: (B, classes) logits of the noisy student.
        teacher: (B, classes) logits of the digital teacher (no gradient).
        target: (B,) class labels.
        beta: weight of the soft term, in [0, 1].
        T: temperature, > 0.
    """
    hard = F.cross_entropy(student, target)
    soft = F.kl_div(
        F.log_softmax(student / T, dim=1),
        F.log_softmax(teacher.detach() / T, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1 - beta) * hard + beta * T * T * soft
