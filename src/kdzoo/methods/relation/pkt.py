"""PKT: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018."""
from __future__ import annotations

import torch

from ...registry import NonNegative, register_method
from ..base import Context, Method

__all__ = ["pkt_loss", "PKT"]


def cosine_probabilities(feature: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Conditional probabilities p(j | i) from cosine similarities shifted to [0, 1], rows summing to 1."""
    flat = feature.flatten(1)
    unit = flat / (flat.norm(dim=1, keepdim=True) + eps)
    similarity = (unit @ unit.t() + 1.0) / 2.0
    return similarity / similarity.sum(dim=1, keepdim=True)


def pkt_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """KL(teacher || student) between the two probability matrices, averaged over all batch^2 entries.

    The mean over entries (not the sum per row) follows the authors' code that RepDistiller uses; its
    weight of 30000 is tuned to it.  Computed in float32 with autocast off: the loss is of order 1e-4.
    """
    with torch.autocast(student_feature.device.type, enabled=False):
        p_student = cosine_probabilities(student_feature.float(), eps)
        p_teacher = cosine_probabilities(teacher_feature.float(), eps)
        return (p_teacher * torch.log((p_teacher + eps) / (p_student + eps))).mean()


@register_method("pkt", description="match distributions of cosine similarities",
                 layers="penultimate (classifier input) on both models",
                 family="relation",
                 paper="Passalis & Tefas 2018, Learning Deep Representations with Probabilistic Knowledge Transfer")
class PKT(Method):
    """Match distributions of cosine similarities.

    Options:
        weight: multiplier of the loss term (0 turns it off)
        student_layer: student tap read (default: the embedding that enters the classifier)
        teacher_layer: teacher tap read (default: the embedding that enters the classifier)
    """

    ce_weight = 1.0

    def __init__(self, weight: NonNegative = 30000.0, student_layer: str = "penultimate",
                 teacher_layer: str = "penultimate"):
        super().__init__()
        self.weight = weight
        self.student_taps = (student_layer,)
        self.teacher_taps = (teacher_layer,)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        return {"pkt": self.weight * pkt_loss(ctx.student[self.student_taps[0]], ctx.teacher[self.teacher_taps[0]])}
