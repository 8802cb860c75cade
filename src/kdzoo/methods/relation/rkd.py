"""RKD: Park et al., "Relational Knowledge Distillation", CVPR 2019."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...registry import NonNegative, register_method
from ..base import Context, Method

__all__ = ["rkd_distance_loss", "rkd_angle_loss", "RKD"]


def pairwise_distances(embedding: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between all rows, zero on the diagonal."""
    squared = embedding.pow(2).sum(1)
    d2 = (squared[:, None] + squared[None, :] - 2 * embedding @ embedding.t()).clamp(min=eps)
    d = d2.sqrt().clone()
    d[range(len(embedding)), range(len(embedding))] = 0
    return d


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between pairwise distances, each normalised by its mean off-diagonal distance.

    In float32 with autocast off, as every RKD term: ||a||^2 + ||b||^2 - 2 a.b cancels catastrophically in bf16.
    """
    with torch.autocast(student.device.type, enabled=False):
        student, teacher = student.flatten(1).float(), teacher.flatten(1).float()
        with torch.no_grad():
            t_d = pairwise_distances(teacher)
            t_d = t_d / t_d[t_d > 0].mean()
        s_d = pairwise_distances(student)
        s_d = s_d / s_d[s_d > 0].mean()
        return F.smooth_l1_loss(s_d, t_d)


def triplet_angles(embedding: torch.Tensor) -> torch.Tensor:
    """cos of the angle at j between (i - j) and (k - j) for every triplet, flattened."""
    diff = F.normalize(embedding[None, :, :] - embedding[:, None, :], p=2, dim=2)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between the triplet angle structures of the two embeddings (float32, autocast off)."""
    with torch.autocast(student.device.type, enabled=False):
        student, teacher = student.flatten(1).float(), teacher.flatten(1).float()
        with torch.no_grad():
            t_angle = triplet_angles(teacher)
        return F.smooth_l1_loss(triplet_angles(student), t_angle)


@register_method("rkd", description="match pairwise distances and triplet angles",
                 layers="penultimate (classifier input) on both models",
                 family="relation", paper="Park et al. 2019, Relational Knowledge Distillation")
class RKD(Method):
    """Match pairwise distances and triplet angles.

    Options:
        weight: multiplier of both terms
        distance_weight: weight of the distance-wise term
        angle_weight: weight of the angle-wise term
        student_layer: student tap read (default: the embedding that enters the classifier)
        teacher_layer: teacher tap read (default: the embedding that enters the classifier)
    """

    ce_weight = 1.0

    def __init__(self, weight: NonNegative = 1.0, distance_weight: NonNegative = 25.0, angle_weight: NonNegative = 50.0,
                 student_layer: str = "penultimate", teacher_layer: str = "penultimate"):
        super().__init__()
        self.weight = weight
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight
        self.student_taps = (student_layer,)
        self.teacher_taps = (teacher_layer,)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        s, t = ctx.student[self.student_taps[0]], ctx.teacher[self.teacher_taps[0]]
        return {
            "rkd_distance": self.weight * self.distance_weight * rkd_distance_loss(s, t),
            "rkd_angle": self.weight * self.angle_weight * rkd_angle_loss(s, t),
        }
