"""Residual feature distillation, from FROSTER: Huang et al., "FROSTER: Frozen CLIP Is A Strong Teacher
for Open-Vocabulary Action Recognition", ICLR 2024.

A small residual branch on the student's feature is matched to the frozen teacher's feature by cosine
distance:

    L = (1/B) sum_b [ 1 - cos(s_b + alpha * r(s_b), t_b) ]

so the student's own feature only has to stay *near* the teacher's (the branch absorbs the difference)
rather than copy it, which keeps room for the student's task while keeping the teacher's knowledge.

As in the authors' code (Visual-AI/FROSTER, ``slowfast/models/temporalclip_video_model.py`` and
``tools/train_net.py``): r is Linear -> GELU -> Linear without biases, the first layer He-normal, the last
zero-initialised (the branch starts as the identity), alpha = 0.1, and the student's feature is
L2-normalised before the branch (their ``img_encode`` is).  FROSTER's student and teacher share a width;
when they do not, the identity shortcut becomes a learnable bias-free linear map to the teacher's width
(our choice: the smallest change that keeps the residual form), and r maps to that width too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...registry import register_method
from ..base import Context, Method, Setup
from ..embeddings import embedding_width, pool_embedding

__all__ = ["residual_feature_loss", "ResidualBranch", "ResidualFeature"]


def residual_feature_loss(student_feature: torch.Tensor, residual: torch.Tensor, teacher_feature: torch.Tensor,
                          alpha: float = 0.1) -> torch.Tensor:
    """Mean over the batch of 1 - cos(student + alpha * residual, teacher).  The teacher is a constant."""
    mixed = student_feature.float() + alpha * residual.float()
    return (1 - F.cosine_similarity(mixed, teacher_feature.detach().float(), dim=1)).mean()


class ResidualBranch(nn.Module):
    """r(x) = W2 GELU(W1 x), no biases, W1 He-normal, W2 zero; `shortcut` maps x to the teacher's width
    (the identity when the widths match)."""

    def __init__(self, in_width: int, out_width: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_width, in_width, bias=False), nn.GELU(),
                                  nn.Linear(in_width, out_width, bias=False))
        nn.init.kaiming_normal_(self.body[0].weight)
        nn.init.zeros_(self.body[2].weight)
        self.shortcut = nn.Identity() if in_width == out_width else nn.Linear(in_width, out_width, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shortcut(x), r(x))."""
        return self.shortcut(x), self.body(x)


@register_method("residual_feature", description="cosine match through a residual branch (FROSTER)",
                 layers="penultimate (classifier input) on both models; maps and tokens pooled",
                 family="feature", paper="Huang et al. ICLR 2024, FROSTER: Frozen CLIP Is "
                 "A Strong Teacher for Open-Vocabulary Action Recognition")
class ResidualFeature(Method):
    """FROSTER's residual feature distillation on one tap of each model (default: the embedding that
    enters the classifier; maps and tokens are pooled).  Weight 1 as the authors' distillation ratio.

    Options:
        weight: multiplier of the loss term (0 turns it off)
        alpha: scale of the residual branch added to the student feature
        student_layer: student tap read (default: the embedding that enters the classifier)
        teacher_layer: teacher tap read (default: the embedding that enters the classifier)
        normalize: L2-normalise the student feature before the branch
    """

    def __init__(self, weight: float = 1.0, alpha: float = 0.1, student_layer: str = "penultimate",
                 teacher_layer: str = "penultimate", normalize: bool = True):
        super().__init__()
        self.weight = weight
        self.alpha = alpha
        self.normalize = normalize
        self.student_taps = (student_layer,)
        self.teacher_taps = (teacher_layer,)

    def build(self, setup: Setup) -> None:
        self.branch = ResidualBranch(embedding_width(setup.student_shapes[self.student_taps[0]], "residual_feature"),
                                     embedding_width(setup.teacher_shapes[self.teacher_taps[0]], "residual_feature"))

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        student = pool_embedding(ctx.student[self.student_taps[0]], "residual_feature")
        if self.normalize:
            student = F.normalize(student.float(), dim=1)
        teacher = pool_embedding(ctx.teacher[self.teacher_taps[0]], "residual_feature")
        shortcut, residual = self.branch(student)
        loss = residual_feature_loss(shortcut, residual, teacher, self.alpha)
        return {"residual_feature": self.weight * loss}
