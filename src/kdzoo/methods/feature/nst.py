"""NST: Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer", 2017."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ...adapters import match_spatial
from ...registry import NonNegative, register_method
from ...taps import stage_taps
from ..base import Context, Method

__all__ = ["polynomial_kernel", "nst_loss", "NST"]


def polynomial_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x . y)^2 between every row of `a` (B, Na, D) and of `b` (B, Nb, D): (B, Na, Nb)."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2)


def nst_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
    """Squared MMD, polynomial kernel of degree 2, between the student's and the teacher's channel distributions.

    Each channel's activation map is one sample of its network's distribution: flattened and L2-normalised
    (the larger map is first pooled to the smaller's size).  Computed per image, averaged over the batch.
    The teacher-teacher term is a constant; it makes the loss zero when the distributions match.
    The Gram matrices are computed in float32 with autocast off: the loss is a small difference of large
    kernel means, which bf16 rounding would swamp.
    """
    s, t = match_spatial(student_feature, teacher_feature)
    with torch.autocast(s.device.type, enabled=False):
        s = F.normalize(s.float().flatten(2), dim=2)
        t = F.normalize(t.float().flatten(2), dim=2)
        return (polynomial_kernel(s, s).mean() + polynomial_kernel(t, t).mean().detach()
                - 2 * polynomial_kernel(s, t).mean())


@register_method("nst", description="match neuron selectivity patterns (MMD)",
                 layers="every stage after the stem on both models, paired from the deepest back",
                 family="feature",
                 paper="Huang & Wang 2017, Like What You Like: Knowledge Distill via Neuron Selectivity Transfer")
class NST(Method):
    """Sum of `nst_loss` over every stage after the stem (RepDistiller and mdistiller), unless layers are named.

    Options:
        weight: multiplier of the loss term (0 turns it off)
        student_layers: student taps, paired in order with teacher_layers; null: every stage after the stem,
            paired from the deepest back
        teacher_layers: teacher taps, one per entry of student_layers; null: chosen with student_layers
    """

    ce_weight = 1.0

    def __init__(self, weight: NonNegative = 50.0, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__()
        self.weight = weight
        self.student_layers = student_layers
        self.teacher_layers = teacher_layers

    def choose_taps(self, student_layout, teacher_layout) -> None:
        self.student_taps, self.teacher_taps = stage_taps("nst", student_layout, teacher_layout,
                                                          self.student_layers, self.teacher_layers)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        total = sum(nst_loss(ctx.student[s], ctx.teacher[t]) for s, t in zip(self.student_taps, self.teacher_taps))
        return {"nst": self.weight * total}
