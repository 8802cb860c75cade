"""Pair-wise distillation: Liu, Chen, Liu, Qin, Luo, Wang, "Structured Knowledge Distillation for Semantic
Segmentation", CVPR 2019 (extended as "Structured Knowledge Distillation for Dense Prediction", TPAMI 2020)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ...registry import Fraction, NonNegative, register_method
from ..base import Context, Method

__all__ = ["PairWise", "pairwise_similarity", "pairwise_similarity_loss", "patch_size", "pool_to_patches"]

NORM_EPSILON = 1e-8  # added to each position's L2 norm, as the authors' `L2`, so an all-zero position divides safely


def patch_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The side of one graph node in feature pixels: ``int(side * scale)`` per axis (the authors' rule), so
    ``scale`` 0.5 cuts the map into a 2 x 2 grid of nodes."""
    return int(height * scale), int(width * scale)


def pool_to_patches(feature: torch.Tensor, scale: float) -> torch.Tensor:
    """Max-pool a (B, C, H, W) map over non-overlapping patches of `patch_size`; a partial patch at the border
    is kept (ceil mode), as the authors' ``MaxPool2d(..., ceil_mode=True)``."""
    patch = patch_size(feature.shape[-2], feature.shape[-1], scale)
    if min(patch) < 1:
        raise ConfigError(f"pairwise: scale {scale} gives an empty patch on a {tuple(feature.shape[-2:])} map; "
                          f"raise scale to at least 1/{min(feature.shape[-2:])}")
    return F.max_pool2d(feature, kernel_size=patch, stride=patch, ceil_mode=True)


def pairwise_similarity(feature: torch.Tensor, detach_norm: bool = True) -> torch.Tensor:
    """Cosine similarity between every pair of positions of a (B, C, h, w) map: a (B, N, N) matrix with
    N = h * w, entry (i, j) = f_i . f_j / ((|f_i| + eps) (|f_j| + eps)).

    Computed in float32 (the authors cast with ``.float()``).  ``detach_norm``: the norms are constants for the
    gradient, as the authors' ``L2(feat).detach()``; the value is the same either way."""
    feature = feature.float()
    norm = feature.norm(dim=1, keepdim=True) + NORM_EPSILON
    if detach_norm:
        norm = norm.detach()
    unit = (feature / norm).flatten(2)  # (B, C, N)
    return unit.transpose(1, 2) @ unit


def pairwise_similarity_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, scale: float,
                             detach_norm: bool = True) -> torch.Tensor:
    """The paper's pair-wise term: both maps max-pooled to patches (`pool_to_patches`), then

        l_pa = 1 / (B N^2) * sum_b sum_{i,j} (a^T_bij - a^S_bij)^2

    with a_ij the cosine similarity of nodes i and j (`pairwise_similarity`) and N the number of nodes, i.e. the
    mean squared difference of the two (B, N, N) similarity matrices (the authors' ``sim_dis_compute``: the sum
    divided by (h w)^2 and by the batch).  Channels may differ: the matrices are N x N either way.  A student map
    whose spatial size differs from the teacher's is adaptive-max-pooled to the teacher's node grid (a kdzoo
    choice; the authors' models give maps of one size).  No gradient reaches `teacher_map`."""
    teacher_nodes = pool_to_patches(teacher_map.detach(), scale)
    if student_map.shape[-2:] == teacher_map.shape[-2:]:
        student_nodes = pool_to_patches(student_map, scale)
    else:
        student_nodes = F.adaptive_max_pool2d(student_map, teacher_nodes.shape[-2:])
    difference = pairwise_similarity(teacher_nodes, detach_norm) - pairwise_similarity(student_nodes, detach_norm)
    return difference.pow(2).mean()


@register_method("pairwise", description="pairwise patch similarities of a feature map",
                 layers="student decoder:0 -> teacher decoder:0 (the feature entering the classifier)",
                 family="dense", paper="Liu et al. 2019, Structured Knowledge Distillation for Semantic Segmentation")
class PairWise(Method):
    """The pair-wise term of structured knowledge distillation (`pairwise_similarity_loss`) on the feature that
    enters the segmenter's classifier (the authors' ``feat_ind=-5``: the PSP module's output, before ``head``).

    Defaults from the authors' code (irfanICMLL/structure_knowledge_distillation, master): ``scale`` 0.5 (their
    ``--pool-scale``, train options and ``run_train_val.sh``), weight 0.5 (``--lambda-pa 0.5`` in
    ``run_train_val.sh``, the recipe they ran; the argparse default is 1.0), cross-entropy weight 1.  The norms
    are detached in the gradient as the authors' ``similarity`` (`pairwise_similarity`).

    Implements the pair-wise term only.  The paper's pixel-wise term is the existing ``kd`` method at
    ``temperature=1`` applied per pixel (authors: ``lambda_pi`` 10, their ``CriterionPixelWise`` sums over pixels
    and divides by H W, so it also grows with the batch size; ``kd`` averages over pixels).  The holistic term
    (adversarial training against a GAN discriminator, ``lambda_d`` 0.1) is not implemented.

    Options:
        weight: multiplier of the loss term (0 turns it off)
        scale: side of one graph node as a fraction of the map side (max-pooled patches; 0.5: a 2 x 2 grid)
        student_layer: student tap whose patches are compared
        teacher_layer: teacher tap whose patches are compared
    """

    ce_weight = 1.0
    reads_teacher_logits = False  # features only
    tasks = frozenset({"segmentation"})

    def __init__(self, weight: NonNegative = 0.5, scale: Fraction = 0.5, student_layer: str = "decoder:0",
                 teacher_layer: str = "decoder:0"):
        super().__init__()
        self.weight = weight
        self.scale = scale
        self.student_taps = (student_layer,)
        self.teacher_taps = (teacher_layer,)

    def build(self, setup) -> None:
        student_shape = tuple(setup.student_shapes[self.student_taps[0]])
        teacher_shape = tuple(setup.teacher_shapes[self.teacher_taps[0]])
        if len(student_shape) != 4 or len(teacher_shape) != 4:
            raise ConfigError(f"pairwise: student_layer and teacher_layer must give (B, C, H, W) maps, got "
                              f"{student_shape} and {teacher_shape}")
        # fail before training when the patches would be empty or the grid a single node
        patches = patch_size(teacher_shape[2], teacher_shape[3], self.scale)
        grid = [-(-side // patch) if patch else 0 for side, patch in zip(teacher_shape[2:], patches)]
        if min(patches) < 1 or grid[0] * grid[1] < 2:
            raise ConfigError(f"pairwise: scale {self.scale} on the teacher's {teacher_shape[2:]} map gives a "
                              f"{grid[0]} x {grid[1]} node grid; choose a scale that gives at least 2 nodes")

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        loss = pairwise_similarity_loss(ctx.student[self.student_taps[0]], ctx.teacher[self.teacher_taps[0]],
                                        self.scale)
        return {"pairwise": self.weight * loss}
