"""KD: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015."""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F

from ...registry import NonNegative, Positive, register_method
from ..base import Context, Method
from .standardize import prepare_logits


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: Union[float, torch.Tensor],
            standardize: bool = False) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened distributions, summed over classes, mean over
    the batch, times T^2 so gradients keep their scale as T changes.

    `temperature` may be a tensor (CTKD learns it).  `standardize` z-scores both logits per sample first
    (logit standardization; `temperature` is then the paper's base temperature).  The teacher is a
    constant target: no gradient reaches `teacher_logits`.
    """
    student_logits, teacher_logits = prepare_logits(student_logits, teacher_logits, standardize)
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


@register_method("kd", description="KL between softened teacher and student outputs",
                 layers="logits only",
                 family="logit", paper="Hinton et al. 2015, Distilling the Knowledge in a Neural Network")
class KD(Method):
    """Defaults: the RepDistiller/mdistiller CIFAR-100 recipe (CE 0.1, KD 0.9, T 4).  With
    ``standardize=True`` the logit-standardization paper uses T 2 and weight 9.

    Options:
        weight: multiplier of the loss term (0 turns it off)
        temperature: softmax temperature T (loss scaled by T^2)
        standardize: z-score student and teacher logits before the softmax (logit standardization, Sun et al.
            CVPR 2024)
    """

    ce_weight = 0.1
    tasks = frozenset({"classification", "segmentation"})  # per pixel on a segmenter

    def __init__(self, weight: NonNegative = 0.9, temperature: Positive = 4.0, standardize: bool = False):
        super().__init__()
        self.weight = weight
        self.temperature = temperature
        self.standardize = standardize

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        loss = kd_loss(ctx.student_logits, ctx.teacher_logits, self.temperature, self.standardize)
        return {"kd": self.weight * loss}
