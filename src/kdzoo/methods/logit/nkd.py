"""NKD: Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with
Normalized Loss and Customized Soft Labels", ICCV 2023.

KD's loss splits into a target term and a non-target term whose two distributions (teacher's and
student's non-target probabilities) have different sums, so they can never be equal.  NKD renormalises
the non-target probabilities of both over the non-target classes alone:

    NKD = -(1/B) sum_b p^t_target log p^s_target
          - gamma * T^2 * (1/B) sum_b sum_{k != target} q^t_k(T) log q^s_k(T)

with p = softmax(z) (T = 1 for the target term) and q(T) = softmax over the non-target logits / T.

As in the authors' code (yzd-v/cls_KD, ``mmcls/models/dis_losses/nkd.py``): the target term is taken at
temperature 1 whatever T, the teacher's target probability is a constant weight, and both terms are
means over the batch.  Defaults are their CIFAR-100 setting (T 3, gamma 3.5, with the usual CE of
weight 1); their ImageNet setting is T 1, gamma 1.5.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...registry import register_method
from ..base import Context, Method

__all__ = ["nkd_terms", "nkd_loss", "NKD"]


def nkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted (target term, non-target term); the non-target term includes T^2, not gamma."""
    student_logits, teacher_logits = student_logits.float(), teacher_logits.detach().float()
    batch, classes = student_logits.shape
    target = labels.view(-1, 1)
    log_p_student_target = F.log_softmax(student_logits, dim=1).gather(1, target)
    p_teacher_target = F.softmax(teacher_logits, dim=1).gather(1, target)
    target_term = -(p_teacher_target * log_p_student_target).mean()

    non_target = ~F.one_hot(labels, classes).bool()  # the target column is dropped, not masked
    student_rest = student_logits[non_target].view(batch, classes - 1) / temperature
    teacher_rest = teacher_logits[non_target].view(batch, classes - 1) / temperature
    cross_entropy = -(F.softmax(teacher_rest, dim=1) * F.log_softmax(student_rest, dim=1)).sum(dim=1).mean()
    return target_term, cross_entropy * temperature**2


def nkd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             temperature: float = 3.0, gamma: float = 3.5) -> torch.Tensor:
    """Target term + gamma * normalised non-target term (see the module docstring)."""
    target_term, non_target_term = nkd_terms(student_logits, teacher_logits, labels, temperature)
    return target_term + gamma * non_target_term


@register_method("nkd", description="KD with renormalised non-target probabilities",
                 layers="logits only",
                 family="logit", paper="Yang et al. ICCV 2023, From Knowledge Distillation to "
                 "Self-Knowledge Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels")
class NKD(Method):
    """Normalized KD.  `weight` scales both terms (the authors use 1).

    Options:
        weight: multiplier of both terms (target and non-target)
        temperature: temperature of the non-target term (the target term is at T 1)
        gamma: weight of the non-target term
    """

    reads_labels = True
    ce_weight = 1.0

    def __init__(self, weight: float = 1.0, temperature: float = 3.0, gamma: float = 3.5):
        super().__init__()
        self.weight = weight
        self.temperature = temperature
        self.gamma = gamma

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        target_term, non_target_term = nkd_terms(ctx.student_logits, ctx.teacher_logits, ctx.labels,
                                                 self.temperature)
        return {"nkd_target": self.weight * target_term,
                "nkd_non_target": self.weight * self.gamma * non_target_term}
