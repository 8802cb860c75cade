"""CTKD: Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023.

KD with a learnable temperature trained *adversarially*: the student minimises the KD loss while the
temperature maximises it, through a gradient reversal layer (identity forward, gradient times -lambda
backward).  lambda follows a curriculum, rising from lambda_min to lambda_max along a cosine over the first
`curriculum_epochs`, so the task starts easy and grows harder.

As in the authors' code (zhengli97/CTKD, ``models/temp_global.py``, ``scripts/run_cifar_distill.sh``):
one global temperature T = 1 + 20 * sigmoid(theta) with theta starting at 1 (T about 15.6), lambda from
0 to 1 over 10 epochs along the authors' ``CosineDecay(max=0, min=-1, loops=10)`` evaluated at the integer
epoch 1, 2, ... (``train_student.py``; its negative value is their reversal sign), CE 0.1 and KD 0.9.  The temperature is a parameter of this module, so it trains
with the student (same optimizer) and is saved in checkpoints.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ...registry import NonNegative, Positive, register_method
from ..base import Context, Method
from .kd import kd_loss

__all__ = ["curriculum_lambda", "reverse_gradient", "CTKD"]


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, strength) -> torch.Tensor:
        ctx.strength = strength
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (-ctx.strength * grad).to(grad.dtype), None


def reverse_gradient(x: torch.Tensor, strength) -> torch.Tensor:
    """Identity forward; multiplies the gradient by -strength backward."""
    return _GradientReversal.apply(x, strength)


def curriculum_lambda(epoch, lambda_min: float, lambda_max: float, curriculum_epochs: float) -> torch.Tensor:
    """The authors' ``CosineDecay``, held for a whole epoch: with i = floor(epoch) + 1 (our fractional epochs
    count from 0, the authors' loop from 1) clamped to [0, curriculum_epochs],
    lambda = lambda_min + (lambda_max - lambda_min) (1 - cos(pi i / curriculum_epochs)) / 2.

    So the first epoch already trains at lambda(1) (about 0.024 of the range over 10 epochs) and epoch 10
    onward at lambda_max.  `epoch` may be a float or a 0-d tensor; the result is a 0-d float32 tensor
    (computed with tensor ops, so a tensor epoch never leaves its device).
    """
    epoch = torch.as_tensor(epoch, dtype=torch.float32)
    if curriculum_epochs <= 0:
        return torch.full_like(epoch, lambda_max)
    step = torch.clamp(torch.floor(epoch) + 1, 0.0, float(curriculum_epochs))
    rise = (1 - torch.cos(step * (math.pi / curriculum_epochs))) / 2
    return lambda_min + (lambda_max - lambda_min) * rise


class GlobalTemperature(nn.Module):
    """One learnable temperature for every sample: T = min_temperature + temperature_range * sigmoid(theta).

    The sigmoid keeps T inside (min, min + range) however hard the adversary pushes.
    """

    def __init__(self, min_temperature: float = 1.0, temperature_range: float = 20.0):
        super().__init__()
        self.min_temperature = min_temperature
        self.temperature_range = temperature_range
        self.theta = nn.Parameter(torch.ones(()))  # the authors' start

    def forward(self, reversal_strength) -> torch.Tensor:
        theta = reverse_gradient(self.theta, reversal_strength)
        return self.min_temperature + self.temperature_range * torch.sigmoid(theta)

    def extra_repr(self) -> str:
        return f"min_temperature={self.min_temperature}, temperature_range={self.temperature_range}"


@register_method("ctkd", description="KD at a learned, adversarially trained temperature",
                 layers="logits only",
                 family="logit", paper="Li et al. AAAI 2023, Curriculum Temperature for Knowledge Distillation")
class CTKD(Method):
    """KD at a learned, adversarial temperature.  `temperature` holds the current value for logging.

    Options:
        weight: multiplier of the loss term (0 turns it off)
        min_temperature: lowest temperature: T = min_temperature + range * sigmoid(theta)
        temperature_range: span of the learnable temperature above min_temperature
        lambda_min: gradient-reversal strength at the start of the curriculum
        lambda_max: gradient-reversal strength at the end of the curriculum
        curriculum_epochs: epochs over which the reversal strength rises (cosine) from lambda_min to lambda_max
        standardize: z-score student and teacher logits before the softmax (logit standardization, Sun et al.
            CVPR 2024)
    """

    ce_weight = 0.1

    def __init__(self, weight: NonNegative = 0.9, min_temperature: Positive = 1.0, temperature_range: NonNegative = 20.0,
                 lambda_min: NonNegative = 0.0, lambda_max: NonNegative = 1.0, curriculum_epochs: NonNegative = 10.0,
                 standardize: bool = False):
        super().__init__()
        self.weight = weight
        self.lambda_min = lambda_min
        self.lambda_max = lambda_max
        self.curriculum_epochs = curriculum_epochs
        self.standardize = standardize
        self.learned_temperature = GlobalTemperature(min_temperature, temperature_range)

    @property
    def temperature(self) -> float:
        with torch.no_grad():
            return float(self.learned_temperature(0.0))

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        strength = curriculum_lambda(ctx.epoch, self.lambda_min, self.lambda_max, self.curriculum_epochs)
        strength = strength.to(self.learned_temperature.theta.device)
        temperature = self.learned_temperature(strength)
        # float32 with autocast off: a KL of bf16 logits softened by T ~ 15 is mostly rounding.
        with torch.autocast(ctx.student_logits.device.type, enabled=False):
            loss = kd_loss(ctx.student_logits.float(), ctx.teacher_logits.float(), temperature, self.standardize)
        return {"ctkd": self.weight * loss}
