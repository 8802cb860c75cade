"""MEAL V2: Shen & Savvides, "MEAL V2: Boosting Vanilla ResNet-50 to 80%+ Top-1 Accuracy on ImageNet without
Tricks", 2020.

The target is the average of every teacher's softmax; the student matches it with soft-target cross-entropy
on its final outputs, and a small discriminator tells the student's logits from the teachers' averaged
logits.  No hard labels (ce_weight 0).

From the authors' code (szq0214/MEAL-V2): ``extensions/teacher_wrapper.py`` averages the teachers' softmax
(target) and their raw logits (what the discriminator sees); ``extensions/kd_loss.py`` is
-sum(p_target * log_softmax(student)) averaged over the batch, temperature 1; ``models/discriminator.py`` is
three 1x1 convolutions on the logit vector (C -> C/K -> C/K^2 -> 2, each followed by ReLU, K = 8 for
ImageNet); ``loss.py`` trains it with BCE-with-logits against [1, 0] for the student and [0, 1] for the
teachers.  Their ``train.py`` adds that loss to the student's and minimises both with one optimizer; with
``adversarial: true`` (the default, the min-max the paper describes) the student's gradient through the
discriminator is reversed instead, so the student learns to fool it; ``adversarial: false`` is the code's
joint minimisation.  Deviations: hidden widths are at least 4 (C/K^2 is 0 for 10 classes), and the
discriminator shares the run's learning rate (the code gives it 1e-4).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...registry import NonNegative, PositiveInt, register_method
from ..base import Context, Method, Setup

__all__ = ["ensemble_probabilities", "soft_target_loss", "output_discriminator_loss", "OutputDiscriminator",
           "MEALV2"]


def ensemble_probabilities(teacher_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The average of the teachers' softmax (the MEAL V2 target), a constant."""
    return torch.stack([F.softmax(t.detach().float(), dim=1) for t in teacher_logits]).mean(0)


def soft_target_loss(student_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """-sum_c p_target(c) log softmax(student)(c), averaged over the batch."""
    return -(target_probs.detach() * F.log_softmax(student_logits.float(), dim=1)).sum(1).mean()


def output_discriminator_loss(discriminator: nn.Module, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                              adversarial: bool = True) -> torch.Tensor:
    """BCE-with-logits of `discriminator` labelling student logits [1, 0] and teacher logits [0, 1].

    With `adversarial`, the student receives the reversed gradient (its input is 2*s.detach() - s: the same
    values, gradient -1), so one minimisation trains the discriminator and pushes the student to fool it."""
    student = 2 * student_logits.detach() - student_logits if adversarial else student_logits
    inputs = torch.cat([student.float(), teacher_logits.detach().float()])
    n = len(student_logits)
    target = torch.zeros(2 * n, 2, device=inputs.device)
    target[:n, 0] = 1
    target[n:, 1] = 1
    return F.binary_cross_entropy_with_logits(discriminator(inputs), target)


class OutputDiscriminator(nn.Module):
    """The authors' discriminator on logit vectors: C -> C/K -> C/K^2 -> 2, ReLU after each layer (1x1
    convolutions on a 1x1 map are linear layers)."""

    def __init__(self, num_classes: int, reduction: int = 8, min_width: int = 4):
        super().__init__()
        hidden1 = max(num_classes // reduction, min_width)
        hidden2 = max(hidden1 // reduction, min_width)
        self.layers = nn.Sequential(nn.Linear(num_classes, hidden1), nn.ReLU(), nn.Linear(hidden1, hidden2),
                                    nn.ReLU(), nn.Linear(hidden2, 2), nn.ReLU())

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.layers(logits)


@register_method("meal_v2", family="scheme", cross_arch="logits",
                 description="average of several teachers + discriminator",
                 layers="logits only (every teacher's)",
                 paper="Shen & Savvides 2020, MEAL V2 (multi-teacher ensemble target)")
class MEALV2(Method):
    """Reads every teacher's logits (``teachers:`` in the config; one teacher works too).  Defaults: the
    authors' code (similarity weight 1, discriminator weight 1, K 8, no hard labels).

    Options:
        weight: multiplier of the soft cross-entropy to the teachers' averaged softmax
        discriminator_weight: multiplier of the output discriminator's loss
        reduction: hidden-size divisor of the discriminator (classes // reduction units)
        adversarial: the student gets the reversed gradient of the discriminator (learns to fool it)
    """

    ce_weight = 0.0
    reads_all_teachers = True

    def __init__(self, weight: NonNegative = 1.0, discriminator_weight: NonNegative = 1.0,
                 reduction: PositiveInt = 8, adversarial: bool = True):
        super().__init__()
        self.weight, self.discriminator_weight = weight, discriminator_weight
        self.reduction, self.adversarial = reduction, adversarial

    def build(self, setup: Setup) -> None:
        self.discriminator = OutputDiscriminator(setup.num_classes, self.reduction)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        teacher_logits = list(ctx.teacher_logits_by_name.values())
        losses = {"meal_v2": self.weight * soft_target_loss(ctx.student_logits, ensemble_probabilities(teacher_logits))}
        if self.discriminator_weight:
            mean_logits = torch.stack([t.float() for t in teacher_logits]).mean(0)
            losses["meal_v2_disc"] = self.discriminator_weight * output_discriminator_loss(
                self.discriminator, ctx.student_logits, mean_logits, self.adversarial)
        return losses
