"""AT: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ...adapters import resize_like
from ...registry import register_method
from ...taps import paired_stages
from ..base import Context, Method


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention: channel mean of |f|^p, flattened and L2-normalised per sample."""
    return F.normalize(feature.abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared difference of attention maps; the larger map is pooled to the smaller's size."""
    size = min(student_feature.shape[-2:], teacher_feature.shape[-2:])
    s = resize_like(student_feature, size)
    t = resize_like(teacher_feature, size)
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


@register_method("at", family="feature", paper="Zagoruyko & Komodakis 2017, Paying More Attention to Attention")
class AT(Method):
    ce_weight = 1.0

    def __init__(self, weight: float = 1000.0, p: float = 2.0, stages: Optional[Sequence[int]] = None):
        super().__init__()
        self.weight = weight
        self.p = p
        self.stages = stages

    def choose_taps(self, student_layout, teacher_layout) -> None:
        self.student_taps = self.teacher_taps = paired_stages(student_layout, teacher_layout, self.stages)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        total = sum(at_loss(ctx.student[s], ctx.teacher[t], self.p) for s, t in zip(self.student_taps, self.teacher_taps))
        return {"at": self.weight * total}
