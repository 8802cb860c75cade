"""FitNet: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...adapters import make_adapter
from ...registry import NonNegative, register_method
from ..base import Context, Method


def hint_loss(adapted_student: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the regressed student hint and the teacher's guided layer."""
    return F.mse_loss(adapted_student, teacher_feature)


@register_method("fitnet", family="feature", paper="Romero et al. 2015, FitNets: Hints for Thin Deep Nets")
class FitNet(Method):
    ce_weight = 1.0

    def __init__(self, weight: NonNegative = 100.0, student_layer: str = "stage:-2", teacher_layer: str = "stage:-2"):
        super().__init__()
        self.weight = weight
        self.student_taps = (student_layer,)
        self.teacher_taps = (teacher_layer,)

    def build(self, setup) -> None:
        self.regressor = make_adapter(setup.student_shapes[self.student_taps[0]],
                                      setup.teacher_shapes[self.teacher_taps[0]])

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        hint = self.regressor(ctx.student[self.student_taps[0]])
        return {"fitnet": self.weight * hint_loss(hint, ctx.teacher[self.teacher_taps[0]])}
