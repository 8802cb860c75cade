"""SP: Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...registry import NonNegative, register_method
from ..base import Context, Method

__all__ = ["sp_loss", "SP"]


def similarity_matrix(feature: torch.Tensor) -> torch.Tensor:
    """Batch Gram matrix of the flattened features, each row L2-normalised: (B, ...) -> (B, B)."""
    flat = feature.flatten(1)
    return F.normalize(flat @ flat.t(), p=2, dim=1)


def sp_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius distance between the two similarity matrices, divided by batch^2.

    Only the batch x batch similarities are compared, so the feature shapes may differ.  Computed in
    float32 with autocast off: the loss is small and bf16 Gram matrices would swamp it.
    """
    batch = student_feature.shape[0]
    with torch.autocast(student_feature.device.type, enabled=False):
        difference = similarity_matrix(teacher_feature.float()) - similarity_matrix(student_feature.float())
        return difference.pow(2).sum() / batch**2


@register_method("sp", description="match batch similarity matrices",
                 layers="student stage:-1 -> teacher stage:-1 (the last stage)",
                 family="relation", paper="Tung & Mori 2019, Similarity-Preserving Knowledge Distillation")
class SP(Method):
    """Match batch similarity matrices.

    Options:
        weight: multiplier of the loss term (0 turns it off)
        student_layer: student tap whose batch similarity matrix is matched
        teacher_layer: teacher tap giving the target similarity matrix
    """

    ce_weight = 1.0

    def __init__(self, weight: NonNegative = 3000.0, student_layer: str = "stage:-1", teacher_layer: str = "stage:-1"):
        super().__init__()
        self.weight = weight
        self.student_taps = (student_layer,)
        self.teacher_taps = (teacher_layer,)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        return {"sp": self.weight * sp_loss(ctx.student[self.student_taps[0]], ctx.teacher[self.teacher_taps[0]])}
