"""CC: Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019.

Two forms of the correlation term:

- ``"repdistiller"`` (default): the authors' code as shared with RepDistiller, whose CIFAR-100 numbers
  (and its weight 0.02) are our targets.  Both penultimate features are embedded by a linear layer to a
  common width; the loss correlates the student-teacher differences of neighbouring samples in the batch.
- ``"taylor_rbf"``: the paper's formula.  The batch correlation matrix uses a Gaussian RBF kernel
  exp(-gamma ||a - b||^2) on L2-normalised features, approximated by its order-P Taylor expansion
  (P = 2, gamma = 0.4 in the paper); the loss is the mean squared difference of the two matrices.  It
  compares batch x batch matrices only, so it reads the raw features and needs no embedding.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...registry import NonNegative, Positive, PositiveInt, register_method
from ..base import Context, Method, Setup

__all__ = ["cc_loss", "cc_rbf_loss", "rbf_correlation", "CC"]

CORRELATIONS = ("repdistiller", "taylor_rbf")


def cc_loss(student_embedding: torch.Tensor, teacher_embedding: torch.Tensor) -> torch.Tensor:
    """RepDistiller's correlation congruence: mean over i of sum_d |s_i - t_i|_d * |s_{i+1} - t_{i+1}|_d (float32)."""
    delta = (student_embedding.flatten(1).float() - teacher_embedding.flatten(1).float()).abs()
    if len(delta) < 2:  # a batch of one has no neighbouring pair
        return delta.sum() * 0.0
    return (delta[:-1] * delta[1:]).sum(1).mean()


def rbf_correlation(feature: torch.Tensor, gamma: float = 0.4, order: int = 2) -> torch.Tensor:
    """Order-P Taylor expansion of exp(-gamma ||u_i - u_j||^2) for L2-normalised rows u: (B, ...) -> (B, B).

    With unit rows, ||u_i - u_j||^2 = 2 - 2 u_i.u_j, so the kernel is exp(-2 gamma) exp(2 gamma u_i.u_j)
    and the expansion is sum_p exp(-2 gamma) (2 gamma)^p / p! (u_i.u_j)^p.
    """
    unit = F.normalize(feature.flatten(1), p=2, dim=1)
    cosine = unit @ unit.t()
    return sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) * cosine.pow(p) for p in range(order + 1))


def cc_rbf_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, gamma: float = 0.4,
                order: int = 2) -> torch.Tensor:
    """The paper's loss: ||C_teacher - C_student||^2 / batch^2, in float32 with autocast off."""
    with torch.autocast(student_feature.device.type, enabled=False):
        return F.mse_loss(rbf_correlation(student_feature.float(), gamma, order),
                          rbf_correlation(teacher_feature.float(), gamma, order))


@register_method("cc", description="match correlations between samples in a batch",
                 layers="penultimate (classifier input) on both models",
                 family="relation", paper="Peng et al. 2019, Correlation Congruence for Knowledge Distillation")
class CC(Method):
    """Match correlations between samples in a batch.

    Options:
        weight: multiplier of the loss term (0 turns it off)
        correlation: 'repdistiller' (the authors' code, embedded) or 'taylor_rbf' (paper formula)
        embed_dim: width of the shared embedding ('repdistiller' form)
        gamma: RBF kernel scale ('taylor_rbf' form)
        order: Taylor expansion order P ('taylor_rbf' form)
        student_layer: student tap read (default: the embedding that enters the classifier)
        teacher_layer: teacher tap read (default: the embedding that enters the classifier)
    """

    ce_weight = 1.0

    def __init__(self, weight: NonNegative = 0.02, correlation: Literal["repdistiller", "taylor_rbf"] = "repdistiller", embed_dim: PositiveInt = 128,
                 gamma: Positive = 0.4, order: PositiveInt = 2, student_layer: str = "penultimate",
                 teacher_layer: str = "penultimate"):
        super().__init__()
        if correlation not in CORRELATIONS:
            raise ConfigError(f"cc: correlation must be one of {', '.join(CORRELATIONS)}, got {correlation!r}")
        self.weight = weight
        self.correlation = correlation
        self.embed_dim = embed_dim
        self.gamma = gamma
        self.order = order
        self.student_taps = (student_layer,)
        self.teacher_taps = (teacher_layer,)

    def build(self, setup: Setup) -> None:
        if self.correlation == "repdistiller":
            self.embed_student = nn.Linear(setup.student_shapes[self.student_taps[0]][1:].numel(), self.embed_dim)
            self.embed_teacher = nn.Linear(setup.teacher_shapes[self.teacher_taps[0]][1:].numel(), self.embed_dim)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        s, t = ctx.student[self.student_taps[0]], ctx.teacher[self.teacher_taps[0]]
        if self.correlation == "taylor_rbf":
            return {"cc": self.weight * cc_rbf_loss(s, t, self.gamma, self.order)}
        return {"cc": self.weight * cc_loss(self.embed_student(s.flatten(1)), self.embed_teacher(t.flatten(1)))}
