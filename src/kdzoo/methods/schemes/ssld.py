"""SSLD: Cui et al., "Beyond Self-Supervision: A Simple Yet Effective Network Distillation Alternative to
Improve Backbones", 2021 (PaddleClas).

Prediction-only distillation: the student matches the teacher's predictions on labelled and unlabelled
images alike, and no ground truth enters the loss (ce_weight 0).  Unlabelled images (label -1, e.g. from
``data.labelled_fraction``) are as useful as labelled ones here.

The divergence, from PaddleClas: ``symmetric_kl`` is PaddleClas 1.x ``ppcls/modeling/loss.py``'s
``JSDivLoss`` (the SSLD recipe then), whose ``_jsdiv`` is in fact (KL(t||s) + KL(s||t)) / 2 of the two
softmaxes; ``ce`` is PaddleClas 2.x's ``DistillationCELoss`` (soft-target cross-entropy with the teacher's
softmax), both at temperature 1.  Deviation: PaddleClas 1.x sums over batch and classes and multiplies by the
number of classes; here it is summed over classes and averaged over the batch (a constant factor on the lr).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ...registry import NonNegative, Positive, register_method
from ..base import Context, Method

__all__ = ["ssld_loss", "SSLD"]


def ssld_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: str = "symmetric_kl",
              temperature: float = 1.0) -> torch.Tensor:
    """Prediction-only distillation loss, summed over classes, averaged over the batch; the teacher is a
    constant.  `symmetric_kl`: (KL(p_t||p_s) + KL(p_s||p_t)) / 2; `ce`: -sum p_t log p_s."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    if divergence == "ce":
        return -(log_t.exp() * log_s).sum(1).mean()
    teacher_to_student = (log_t.exp() * (log_t - log_s)).sum(1)
    student_to_teacher = (log_s.exp() * (log_s - log_t)).sum(1)
    return (0.5 * (teacher_to_student + student_to_teacher)).mean()


@register_method("ssld", family="scheme", cross_arch="logits",
                 description="label-free KD on labelled + unlabelled data",
                 layers="logits only", paper="Cui et al. 2021, Beyond Self-Supervision (SSLD, label-free KD)")
class SSLD(Method):
    """No ground truth in the loss (ce_weight 0); weight 1, temperature 1 as PaddleClas.

    Options:
        weight: multiplier of the loss term
        divergence: symmetric_kl (the mean of both KLs) or ce (cross-entropy to the teacher)
        temperature: softmax temperature of both distributions
    """

    ce_weight = 0.0

    def __init__(self, weight: NonNegative = 1.0, divergence: Literal["symmetric_kl", "ce"] = "symmetric_kl",
                 temperature: Positive = 1.0):
        super().__init__()
        self.weight, self.divergence, self.temperature = weight, divergence, temperature

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        return {"ssld": self.weight * ssld_loss(ctx.student_logits, ctx.teacher_logits, self.divergence,
                                                self.temperature)}
