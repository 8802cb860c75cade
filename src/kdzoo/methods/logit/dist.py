"""DIST: Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022.

Instead of matching probabilities exactly (KL), DIST matches their *relations* with Pearson correlation
on softmax(logits / T):
- inter-class relation: per sample, the correlation across classes of student and teacher predictions;
- intra-class relation: per class, the correlation across the batch.
Loss = T^2 * (beta * (1 - mean inter correlation) + gamma * (1 - mean intra correlation)), as in the
authors' loss (hunto/image_classification_sota, ``lib/models/losses/dist_kd.py``, eps 1e-8 in the
denominator).  The intra-class term needs a batch of more than one sample.
"""
from __future__ import annotations

import torch

from ...registry import NonNegative, Positive, register_method
from ..base import Context, Method
from .standardize import prepare_logits

PEARSON_EPS = 1e-8  # the authors' value; keeps a constant row finite


def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of `a` with the same row of `b`."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + PEARSON_EPS)


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
               standardize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Unweighted (inter-class, intra-class) relation losses, each times T^2."""
    student_logits, teacher_logits = prepare_logits(student_logits, teacher_logits, standardize)
    p_student = torch.softmax(student_logits / temperature, dim=1)
    p_teacher = torch.softmax(teacher_logits / temperature, dim=1)
    inter = 1 - pearson_rows(p_student, p_teacher).mean()
    intra = 1 - pearson_rows(p_student.t(), p_teacher.t()).mean()
    return inter * temperature**2, intra * temperature**2


def dist_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, gamma: float,
              temperature: float, standardize: bool = False) -> torch.Tensor:
    """beta * inter-class + gamma * intra-class relation loss."""
    inter, intra = dist_terms(student_logits, teacher_logits, temperature, standardize)
    return beta * inter + gamma * intra


@register_method("dist", description="correlation of predictions within/across classes",
                 layers="logits only",
                 family="logit",
                 paper="Huang et al. NeurIPS 2022, Knowledge Distillation from A Stronger Teacher")
class DIST(Method):
    """Defaults: the authors' CIFAR-100 setting (CE 1, beta = gamma = 2, T 4); their ImageNet
    setting is beta = gamma = 1, T 1.

    Options:
        beta: weight of the inter-class term (each sample's class distribution)
        gamma: weight of the intra-class term (each class's distribution over the batch)
        temperature: softmax temperature T (loss scaled by T^2)
        standardize: z-score student and teacher logits before the softmax (logit standardization, Sun et al.
            CVPR 2024)
    """

    ce_weight = 1.0
    tasks = frozenset({"classification", "segmentation"})  # per pixel on a segmenter

    def __init__(self, beta: NonNegative = 2.0, gamma: NonNegative = 2.0, temperature: Positive = 4.0, standardize: bool = False):
        super().__init__()
        self.beta = beta
        self.gamma = gamma
        self.temperature = temperature
        self.standardize = standardize

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        inter, intra = dist_terms(ctx.student_logits, ctx.teacher_logits, self.temperature, self.standardize)
        return {"dist_inter": self.beta * inter, "dist_intra": self.gamma * intra}
