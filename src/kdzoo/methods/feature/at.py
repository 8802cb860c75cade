"""AT: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ...adapters import match_spatial
from ...registry import NonNegative, Positive, register_method
from ...taps import stage_taps
from ..base import Context, Method
from .normalize import layer_normalized_loss

__all__ = ["attention_map", "at_loss", "AT"]


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention: channel mean of |f|^p, flattened and L2-normalised per sample."""
    return F.normalize(feature.abs().pow(p).mean(1).flatten(1), dim=1)


def at_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared difference of attention maps; the larger map is pooled to the smaller's size."""
    s, t = match_spatial(student_feature, teacher_feature)
    return (attention_map(s, p) - attention_map(t, p)).pow(2).mean()


@register_method("at", description="match spatial attention maps of the stages",
                 layers="every stage after the stem on both models, paired from the deepest back",
                 family="feature", paper="Zagoruyko & Komodakis 2017, Paying More Attention to Attention")
class AT(Method):
    """Sum of `at_loss` over every stage after the stem (RepDistiller, mdistiller), weight 1000.
    ``normalize_layers``: each stage's term divided by the mean square of the teacher's attention map
    (`layer_normalized_loss`, LAPTOP-Diff), which evens out maps of different sizes.

    Options:
        weight: multiplier of the loss term (0 turns it off)
        p: power of |feature| averaged over channels to form the attention map
        normalize_layers: divide each layer's term by the mean square of the teacher's feature there (evens out
            layer sizes)
        student_layers: student taps, paired in order with teacher_layers; null: every stage after the stem,
            paired from the deepest back
        teacher_layers: teacher taps, one per entry of student_layers; null: chosen with student_layers
    """

    ce_weight = 1.0

    def __init__(self, weight: NonNegative = 1000.0, p: Positive = 2.0, normalize_layers: bool = False,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None):
        super().__init__()
        self.weight = weight
        self.p = p
        self.normalize_layers = normalize_layers
        self.student_layers = student_layers
        self.teacher_layers = teacher_layers

    def choose_taps(self, student_layout, teacher_layout) -> None:
        # every stage after the stem, paired from the deepest back, unless layers are named
        self.student_taps, self.teacher_taps = stage_taps("at", student_layout, teacher_layout,
                                                          self.student_layers, self.teacher_layers)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        pairs = [(ctx.student[s], ctx.teacher[t]) for s, t in zip(self.student_taps, self.teacher_taps)]
        terms = [at_loss(s, t, self.p) for s, t in pairs]
        targets = [attention_map(match_spatial(s, t)[1], self.p) for s, t in pairs] if self.normalize_layers else terms
        return {"at": self.weight * layer_normalized_loss(terms, targets, self.normalize_layers)}
