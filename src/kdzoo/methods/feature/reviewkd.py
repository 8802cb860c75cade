"""ReviewKD: Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...registry import NonNegative, PositiveInt, register_method
from ...taps import stage_taps
from ..base import Context, Method, warmup_factor
from .normalize import layer_normalized_loss

__all__ = ["hcl_loss", "hcl_terms", "ReviewKD"]


def hcl_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
             levels: Sequence[int] = (4, 2, 1)) -> torch.Tensor:
    """Hierarchical context loss, summed over pairs of maps of equal shape (see `hcl_terms`)."""
    return sum(hcl_terms(student_features, teacher_features, levels))


def hcl_terms(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
              levels: Sequence[int] = (4, 2, 1)) -> list[torch.Tensor]:
    """The hierarchical context loss of each pair of maps of equal shape.

    Per pair: the MSE of the maps plus the MSEs of both maps average-pooled to each size in `levels` that is
    smaller than the map's (shorter) side, weighted 1/2, 1/4, ... in that order, all divided by the sum of
    the weights (1 included).
    """
    terms = []
    for s, t in zip(student_features, teacher_features):
        loss, weight, weights = F.mse_loss(s, t), 1.0, 1.0
        for size in levels:
            if size >= min(s.shape[-2:]):
                continue
            weight /= 2
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size))
            weights += weight
        terms.append(loss / weights)
    return terms


class AttentionFusion(nn.Module):
    """ABF: the student's feature, 1x1 conv + BN to `mid_channels`, is fused with the deeper level's fused
    feature (nearest-upsampled to its size) through two sigmoid attention maps computed from both; the
    result is resized (nearest) to the teacher's size and a 3x3 conv + BN maps it to the teacher's width.
    Returns (output for the loss, fused feature for the next shallower level).  Subclasses change the fusion
    rule alone (`build_fusion`, `combine`: TransKD's selective-kernel CSF)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, out_size: Sequence[int], fuse: bool):
        super().__init__()
        self.out_size = tuple(out_size)
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.project = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                     nn.BatchNorm2d(out_channels))
        for conv in (self.reduce[0], self.project[0]):
            nn.init.kaiming_uniform_(conv.weight, a=1)  # the authors' init
        self.fuse = fuse
        self.attention: Optional[nn.Module] = None  # ABF's; the deepest level fuses nothing
        if fuse:
            self.build_fusion(mid_channels)

    def build_fusion(self, mid_channels: int) -> None:
        self.attention = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid())

    def combine(self, x: torch.Tensor, deeper: torch.Tensor) -> torch.Tensor:
        """The fused feature of this level's `x` and the deeper level's (already at x's size)."""
        w = self.attention(torch.cat([x, deeper], dim=1))
        return x * w[:, :1] + deeper * w[:, 1:]

    def forward(self, x: torch.Tensor, deeper: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.reduce(x)
        if self.fuse:
            x = self.combine(x, F.interpolate(deeper, size=x.shape[-2:], mode="nearest"))
        if tuple(x.shape[-2:]) != self.out_size:
            x = F.interpolate(x, size=self.out_size, mode="nearest")
        return self.project(x), x


def as_map(feature: torch.Tensor) -> torch.Tensor:
    """A pooled (B, C) feature as a (B, C, 1, 1) map; maps pass unchanged."""
    return feature[:, :, None, None] if feature.dim() == 2 else feature


def map_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape `as_map` gives a feature of `shape`."""
    return (*shape, 1, 1) if len(shape) == 2 else tuple(shape)


@register_method("reviewkd", description="fused student stages match each teacher stage",
                 layers="every stage after the stem plus the penultimate feature (teacher: pre-ReLU where published)",
                 family="feature", paper="Chen et al. 2021, Distilling Knowledge via Knowledge Review")
class ReviewKD(Method):
    """Levels: every stage after the stem plus the pooled penultimate feature (mdistiller).  The student's
    levels (post-ReLU) are fused from the deepest back by `AttentionFusion` modules and each output is
    matched to the teacher's level by `hcl_loss`.  The teacher's stages are its pre-ReLU outputs (the
    published "preact" list) when the model family has one, else its stage outputs.  The term is ramped in
    over `warmup_epochs`.  ``mid_channels`` None: min(512, the student's penultimate width).
    ``normalize_layers``: each level's term divided by the mean square of the teacher's feature there
    (`layer_normalized_loss`, LAPTOP-Diff).

    Options:
        weight: multiplier of the loss term (0 turns it off)
        warmup_epochs: epochs over which the loss ramps linearly up to full weight
        mid_channels: width of the fusion modules; null: min(512, student penultimate width)
        normalize_layers: divide each layer's term by the mean square of the teacher's feature there (evens out
            layer sizes)
        student_layers: student taps, paired in order with teacher_layers; null: every stage after the stem,
            paired from the deepest back
        teacher_layers: teacher taps, one per entry of student_layers; null: chosen with student_layers
    """

    ce_weight = 1.0

    def __init__(self, weight: NonNegative = 1.0, warmup_epochs: NonNegative = 20.0, mid_channels: Optional[PositiveInt] = None,
                 normalize_layers: bool = False, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__()
        self.weight = weight
        self.warmup_epochs = warmup_epochs
        self.mid_channels = mid_channels
        self.normalize_layers = normalize_layers
        self.student_layers = student_layers
        self.teacher_layers = teacher_layers

    def choose_taps(self, student_layout, teacher_layout) -> None:
        teacher_kind = "preact" if "preact" in teacher_layout.extra else "stage"
        student, teacher = stage_taps("reviewkd", student_layout, teacher_layout, self.student_layers,
                                      self.teacher_layers, teacher_kind=teacher_kind)
        self.student_taps = student + ("penultimate",)
        self.teacher_taps = teacher + ("penultimate",)

    def build(self, setup) -> None:
        student_shapes = [map_shape(setup.student_shapes[s]) for s in self.student_taps]
        teacher_shapes = [map_shape(setup.teacher_shapes[t]) for t in self.teacher_taps]
        mid = self.mid_channels or min(512, student_shapes[-1][1])
        deepest = len(student_shapes) - 1
        self.fusions = nn.ModuleList(
            AttentionFusion(s[1], mid, t[1], t[2:], fuse=i < deepest)
            for i, (s, t) in enumerate(zip(student_shapes, teacher_shapes)))

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        outputs, fused = [], None
        for fusion, spec in zip(reversed(self.fusions), reversed(self.student_taps)):
            out, fused = fusion(as_map(ctx.student[spec]), fused)
            outputs.append(out)
        teacher = [as_map(ctx.teacher[t]) for t in self.teacher_taps]
        loss = layer_normalized_loss(hcl_terms(outputs[::-1], teacher), teacher, self.normalize_layers)
        return {"reviewkd": self.weight * warmup_factor(ctx.epoch, self.warmup_epochs) * loss}
