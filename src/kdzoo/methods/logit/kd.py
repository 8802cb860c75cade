"""KD: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...registry import register_method
from ..base import Context, Method


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened distributions, summed over classes, mean over
    the batch, times T^2 so gradients keep their scale as T changes."""
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


@register_method("kd", family="logit", paper="Hinton et al. 2015, Distilling the Knowledge in a Neural Network")
class KD(Method):
    ce_weight = 0.1

    def __init__(self, weight: float = 0.9, temperature: float = 4.0):
        super().__init__()
        self.weight = weight
        self.temperature = temperature

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        return {"kd": self.weight * kd_loss(ctx.student_logits, ctx.teacher_logits, self.temperature)}
