"""FSP: Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and Transfer
Learning", CVPR 2017."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ...adapters import feature_parameters, match_spatial
from ...errors import ConfigError
from ...registry import NonNegative, NonNegativeInt, Positive, register_method
from ...taps import stage_taps
from ..base import Context, InitStage, Method

__all__ = ["fsp_matrix", "fsp_loss", "FSP"]


def fsp_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """The "flow of solution procedure" between two feature maps: G[b, i, j] = mean over positions of
    first[b, i] * second[b, j], (B, C1, C2); the larger map is average-pooled to the smaller's size."""
    a, b = match_spatial(first, second)
    return torch.einsum("bihw,bjhw->bij", a, b) / (a.shape[-2] * a.shape[-1])


def fsp_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum over consecutive pairs of stages of the mean squared difference of FSP matrices (RepDistiller)."""
    return sum((fsp_matrix(s1, s2) - fsp_matrix(t1, t2)).pow(2).mean()
               for s1, s2, t1, t2 in zip(student_features, student_features[1:],
                                         teacher_features, teacher_features[1:]))


@register_method("fsp", description="match flow-of-solution matrices between stages",
                 layers="every stage, the stem included, on both models (equal widths needed)",
                 family="feature",
                 paper="Yim et al. 2017, A Gift from Knowledge Distillation: Fast Optimization, Network "
                       "Minimization and Transfer Learning")
class FSP(Method):
    """Two stages, as in the paper: the init stage (`init_epochs`, RepDistiller: 30) trains the student's
    feature layers on `fsp_loss` alone; distillation then adds ``weight`` x `fsp_loss` to cross-entropy --
    0 by default, because RepDistiller's loop drops the term after the init stage (its ``-b 50`` is unused).

    Taps: every stage, the stem included (RepDistiller's ``feat[:-1]``).  FSP matrices are compared entry by
    entry, so the student's and the teacher's stages must have equal widths (RepDistiller refuses otherwise).

    Options:
        weight: multiplier of the term during distillation (0: used in the init stage only)
        init_epochs: epochs of the init stage that trains on this loss alone before distillation (0: none)
        init_lr: learning rate of the init stage; null: the run's train.lr
        student_layers: student taps, consecutive pairs form FSP matrices; null: every stage, the stem included
        teacher_layers: teacher taps, one per entry of student_layers; null: chosen with student_layers
    """

    ce_weight = 1.0

    def __init__(self, weight: NonNegative = 0.0, init_epochs: NonNegativeInt = 30, init_lr: Optional[Positive] = None,
                 student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None):
        super().__init__()
        self.weight = weight
        self.init_epochs = init_epochs
        self.init_lr = init_lr
        self.student_layers = student_layers
        self.teacher_layers = teacher_layers

    def choose_taps(self, student_layout, teacher_layout) -> None:
        self.student_taps, self.teacher_taps = stage_taps("fsp", student_layout, teacher_layout, self.student_layers,
                                                          self.teacher_layers, skip_stem=False)
        self._student_penultimate = student_layout.penultimate

    def build(self, setup) -> None:
        if len(self.student_taps) < 2:
            raise ConfigError("fsp: needs at least two stages to form a flow matrix")
        student_widths = [setup.student_shapes[s][1] for s in self.student_taps]
        teacher_widths = [setup.teacher_shapes[t][1] for t in self.teacher_taps]
        if student_widths != teacher_widths:
            raise ConfigError(f"fsp: stage widths differ (student {student_widths}, teacher {teacher_widths}); "
                              "FSP pairs networks of equal widths")

    def init_stage(self, student: nn.Module) -> Optional[InitStage]:
        return InitStage(self.init_epochs, feature_parameters(student, self._student_penultimate), self.init_lr)

    def init_loss(self, ctx: Context) -> torch.Tensor:
        return fsp_loss([ctx.student[s] for s in self.student_taps], [ctx.teacher[t] for t in self.teacher_taps])

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        if not self.weight:
            return {}
        return {"fsp": self.weight * self.init_loss(ctx)}
