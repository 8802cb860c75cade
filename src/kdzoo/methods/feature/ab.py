"""AB: Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons",
AAAI 2019."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ...adapters import feature_parameters, regressor
from ...registry import NonNegative, NonNegativeInt, Positive, register_method
from ...taps import stage_taps
from ..base import Context, InitStage, Method

__all__ = ["activation_boundary_loss", "ab_loss", "ab_connector", "AB"]


def activation_boundary_loss(source: torch.Tensor, target: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """The paper's alternative L2 loss: where the teacher's neuron is active (pre-activation > 0) the student's
    pre-activation is pulled up to +margin, where it is inactive down to -margin; a student already beyond
    the margin costs nothing.  Summed over neurons, averaged over the batch."""
    active = target > 0
    push_up = active & (source <= margin)
    push_down = ~active & (source > -margin)
    loss = (source - margin).pow(2) * push_up + (source + margin).pow(2) * push_down
    return loss.sum() / source.shape[0]


def ab_loss(sources: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], margin: float = 1.0) -> torch.Tensor:
    """RepDistiller's sum over stages: the deepest weighs 1, each shallower one half the next, all x 3/1000."""
    n = len(sources)
    return 3e-3 * sum(2.0 ** (i - n + 1) * activation_boundary_loss(s, t, margin)
                      for i, (s, t) in enumerate(zip(sources, targets)))


def ab_connector(student_shape, teacher_shape) -> nn.Module:
    """RepDistiller's choice: identity when channels and height agree, else ConvReg (conv + BN, no ReLU; see
    `adapters.regressor` for shapes it has no layer for); a (B, D) vector pair gets a linear map unless the
    widths agree."""
    if len(student_shape) == 4 and len(teacher_shape) == 4:
        if student_shape[1] == teacher_shape[1] and student_shape[2] == teacher_shape[2]:
            return nn.Identity()
    elif tuple(student_shape[1:]) == tuple(teacher_shape[1:]):
        return nn.Identity()
    return regressor(student_shape, teacher_shape, relu=False)


@register_method("ab", description="transfer activation boundaries (pre-ReLU)",
                 layers="pre-ReLU output of every stage after the stem (the family's 'preact' list)",
                 family="feature",
                 paper="Heo et al. 2019, Knowledge Transfer via Distillation of Activation Boundaries Formed by "
                       "Hidden Neurons")
class AB(Method):
    """Connectors map the student's pre-ReLU stage outputs to the teacher's, as RepDistiller's ``Connector``:
    none (identity) where the channels and the size already match, else `ConvReg` without ReLU (its conv
    chosen from the two sizes, then BN).
    The init stage (`init_epochs`, RepDistiller: 30) trains the student's feature layers and the connectors on
    `ab_loss` alone; distillation then adds ``weight`` x `ab_loss` to cross-entropy -- 0 by default, because
    RepDistiller's loop drops the term after the init stage (its ``-b 1`` flag is unused for AB).

    Taps: the "preact" list the model family publishes, every stage after the stem; models without one need
    ``student_layers`` / ``teacher_layers``, e.g. the input of each stage's last ReLU.

    Options:
        weight: multiplier of the term during distillation (0: used in the init stage only)
        margin: margin around the activation boundary in the hinge-like loss
        init_epochs: epochs of the init stage that trains on this loss alone before distillation (0: none)
        init_lr: learning rate of the init stage; null: the run's train.lr
        student_layers: student taps (pre-ReLU stage outputs); null: the 'preact' list the model family
            publishes, every stage after the stem
        teacher_layers: teacher taps, one per entry of student_layers; null: the teacher's 'preact' list
    """

    ce_weight = 1.0

    def __init__(self, weight: NonNegative = 0.0, margin: NonNegative = 1.0, init_epochs: NonNegativeInt = 30,
                 init_lr: Optional[Positive] = None, student_layers: Optional[Sequence[str]] = None,
                 teacher_layers: Optional[Sequence[str]] = None):
        super().__init__()
        self.weight = weight
        self.margin = margin
        self.init_epochs = init_epochs
        self.init_lr = init_lr
        self.student_layers = student_layers
        self.teacher_layers = teacher_layers

    def choose_taps(self, student_layout, teacher_layout) -> None:
        self.student_taps, self.teacher_taps = stage_taps(
            "ab", student_layout, teacher_layout, self.student_layers, self.teacher_layers,
            student_kind="preact", teacher_kind="preact")
        self._student_penultimate = student_layout.penultimate

    def build(self, setup) -> None:
        self.connectors = nn.ModuleList(
            ab_connector(setup.student_shapes[s], setup.teacher_shapes[t])
            for s, t in zip(self.student_taps, self.teacher_taps))

    def init_stage(self, student: nn.Module) -> Optional[InitStage]:
        parameters = feature_parameters(student, self._student_penultimate) + list(self.connectors.parameters())
        return InitStage(self.init_epochs, parameters, self.init_lr)

    def init_loss(self, ctx: Context) -> torch.Tensor:
        sources = [c(ctx.student[s]) for c, s in zip(self.connectors, self.student_taps)]
        return ab_loss(sources, [ctx.teacher[t] for t in self.teacher_taps], self.margin)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        if not self.weight:
            return {}
        return {"ab": self.weight * self.init_loss(ctx)}
