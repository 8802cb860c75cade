"""Iterative self-distillation with ground truth: Borup & Andersen, "Even your Teacher Needs Guidance:
Ground-Truth Targets Dampen Regularization Imposed by Self-Distillation", NeurIPS 2021.

Round t trains a fresh student on the weighted squared error
    alpha * ||softmax(s) - onehot(y)||^2 + (1 - alpha) * ||softmax(s) - softmax(f_{t-1})||^2,
f_{t-1} the previous round's student (the teacher), as the authors' ``self_distiller.py``
(Kennethborup/self_distillation: ``F.mse_loss`` of the softmax against the one-hot target, times alpha, plus
(1-alpha) times ``F.mse_loss`` against the teacher's softmax; alpha weights the ground truth; 0.6 in their README's
command).  Up to a constant the loss is the squared error to the mixed target alpha*y + (1-alpha)*softmax(f_{t-1}),
so it trains toward the mix the paper analyses.  Rounds come from ``rounds:`` in a run config
(``kdzoo.runner.rounds``); round 1 has no teacher and trains on the labels with this loss at alpha = 1, as the
authors' step 0.

The paper's weight: in its kernel setting the round-t fit is affine in alpha, f_t(alpha) = f_t(0) +
alpha * (f_t(1) - f_t(0)), so the alpha that brings it closest (squared error) to the targets is the 1-D least
squares `optimal_ground_truth_weight`; f_t(1) is the labels-only fit (round 1's student, the same in every round)
and f_t(0) the fit to the teacher alone, which replaces a grid over alpha by one extra fit per round.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ...registry import NonNegative, UnitInterval, register_method
from ..base import Context, Method


def isd_loss(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], labels: torch.Tensor,
             alpha: float | torch.Tensor) -> torch.Tensor:
    """alpha * MSE(softmax(s), onehot(y)) + (1 - alpha) * MSE(softmax(s), softmax(t)), each MSE a mean over
    samples and classes (``F.mse_loss``); the teacher is a constant target.  Without a teacher (None) only
    alpha = 1, the labels alone, is defined: the authors' first step, trained before any teacher exists."""
    p = F.softmax(student_logits, dim=1)
    onehot = F.one_hot(labels, student_logits.shape[1]).to(p.dtype)
    if teacher_logits is None:
        if alpha != 1:
            raise ConfigError(f"isd: alpha {alpha} weighs a teacher, but there is none (only alpha 1 trains alone)")
        return F.mse_loss(p, onehot)
    return alpha * F.mse_loss(p, onehot) + (1 - alpha) * F.mse_loss(p, F.softmax(teacher_logits.detach(), dim=1))


def optimal_ground_truth_weight(labels_fit: torch.Tensor, teacher_fit: torch.Tensor,
                                targets: torch.Tensor) -> float:
    """argmin over alpha of ||teacher_fit + alpha * (labels_fit - teacher_fit) - targets||^2:
    <labels_fit - teacher_fit, targets - teacher_fit> / ||labels_fit - teacher_fit||^2, clipped to [0, 1]
    (the weighted loss above is defined for alpha in [0, 1]).  The three tensors are predictions and targets
    on the same samples (e.g. softmax outputs and one-hot labels); 1 when the two fits coincide."""
    direction = (labels_fit - teacher_fit).double().flatten()
    norm = direction.dot(direction)
    if norm == 0:
        return 1.0
    alpha = direction.dot((targets - teacher_fit).double().flatten()) / norm
    return float(alpha.clamp(0.0, 1.0))


@register_method("isd", family="scheme", cross_arch="logits",
                 description="rounds: last student teaches next, labels mixed",
                 layers="logits only",
                 paper="Borup & Andersen 2021, Even your Teacher Needs Guidance (iterative self-distillation)")
class ISD(Method):
    """`alpha`: the weight of the ground truth, or ``estimate`` (the default): `kdzoo.runner.rounds` sets it in each round
    from `optimal_ground_truth_weight` (the authors' README command fixes 0.6).  At alpha 1 no teacher is read,
    so a teacher-less first round trains on the labels with this same loss, as the authors' step 0.

    Options:
        alpha: weight of the ground truth in the target (1 - alpha: the teacher); estimate: the paper's closed form
            from held-out samples, each round
        weight: multiplier of the loss term
    """

    reads_labels = True
    ce_weight = 0.0  # the labels are inside the loss
    ground_truth_weight = "alpha"

    def __init__(self, alpha: Union[UnitInterval, Literal["estimate"]] = "estimate", weight: NonNegative = 1.0):
        super().__init__()
        self.alpha, self.weight = alpha, weight
        self.needs_teacher = alpha != 1

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        if isinstance(self.alpha, str):
            raise ConfigError("isd: alpha 'estimate' is set in each round by 'rounds:' (>= 2); give a number otherwise")
        return {"isd": self.weight * isd_loss(ctx.student_logits, ctx.teacher_logits, ctx.labels, self.alpha)}
