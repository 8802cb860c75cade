"""VID: Ahn et al., "Variational Information Distillation for Knowledge Transfer", CVPR 2019."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...adapters import resize_like
from ...registry import NonNegative, Positive, register_method
from ...taps import stage_taps
from ..base import Context, Method, Setup

__all__ = ["gaussian_nll", "VID"]


def gaussian_nll(predicted_mean: torch.Tensor, variance: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over all elements of 0.5 * ((target - mean)^2 / variance + log variance).

    This is -log N(target; mean, variance) without its constant 0.5 log(2 pi), as in the authors' code;
    `variance` broadcasts (one value per channel: shape (1, C, 1, 1)).
    """
    predicted_mean, variance, target = predicted_mean.float(), variance.float(), target.float()
    return (0.5 * ((target - predicted_mean).pow(2) / variance + variance.log())).mean()


def inverse_softplus(value: float) -> float:
    return math.log(math.expm1(value))


class VariationalRegressor(nn.Module):
    """Predicts the teacher feature's mean from the student's (three 1x1 convs, ReLU between, no bias)
    and holds a learnable per-channel variance softplus(log_scale) + eps, initialised to `init_variance`."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, init_variance: float = 5.0,
                 eps: float = 1e-5):
        super().__init__()
        self.mean = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, 1, bias=False),
        )
        self.log_scale = nn.Parameter(torch.full((out_channels,), inverse_softplus(init_variance - eps)))
        self.eps = eps

    def variance(self) -> torch.Tensor:
        return (F.softplus(self.log_scale) + self.eps).view(1, -1, 1, 1)

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        """The NLL of the teacher feature; the larger of the two maps is pooled to the smaller's size."""
        size = min(student_feature.shape[-2:], teacher_feature.shape[-2:])
        target = resize_like(teacher_feature, size)
        return gaussian_nll(self.mean(resize_like(student_feature, size)), self.variance(), target)


@register_method("vid", description="mutual information via a Gaussian bound",
                 layers="every stage after the stem on both models, paired from the deepest back",
                 family="relation",
                 paper="Ahn et al. 2019, Variational Information Distillation for Knowledge Transfer")
class VID(Method):
    """Mutual information via a Gaussian bound.

    Options:
        weight: multiplier of the loss term (0 turns it off)
        init_variance: initial per-channel variance of the Gaussian
        eps: smallest variance (added to the learned one)
        student_layers: student taps, paired in order with teacher_layers; null: every stage after the stem,
            paired from the deepest back
        teacher_layers: teacher taps, one per entry of student_layers; null: chosen with student_layers
    """

    ce_weight = 1.0

    def __init__(self, weight: NonNegative = 1.0, init_variance: Positive = 5.0, eps: Positive = 1e-5,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None):
        super().__init__()
        self.weight = weight
        self.init_variance = init_variance
        self.eps = eps
        self.student_layers = student_layers
        self.teacher_layers = teacher_layers

    def choose_taps(self, student_layout, teacher_layout) -> None:
        self.student_taps, self.teacher_taps = stage_taps("vid", student_layout, teacher_layout,
                                                          self.student_layers, self.teacher_layers)

    def build(self, setup: Setup) -> None:
        # As RepDistiller: the regressor's hidden width is the teacher's channel count.
        self.regressors = nn.ModuleList(
            VariationalRegressor(setup.student_shapes[s][1], setup.teacher_shapes[t][1], setup.teacher_shapes[t][1],
                                 self.init_variance, self.eps)
            for s, t in zip(self.student_taps, self.teacher_taps)
        )

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        total = sum(regressor(ctx.student[s], ctx.teacher[t])
                    for regressor, s, t in zip(self.regressors, self.student_taps, self.teacher_taps))
        return {"vid": self.weight * total}
