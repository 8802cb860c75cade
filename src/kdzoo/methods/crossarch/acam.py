"""ACAM-KD: Lan & Tian, "ACAM-KD: Adaptive and Cooperative Attention Masking for Knowledge Distillation",
ICCV 2025 (arXiv 2503.06307), applied to classification feature maps.

No code has been published; this follows the paper's description (the abstract in
shared/reference/seed-papers.txt and its method section):
- STCA-FF: the teacher's feature gives the queries, the (aligned) student's feature the keys and values of a
  cross-attention over spatial positions; the fused feature carries both models' state.
- ASCM: M selection units read the fused feature; each gives a spatial mask (1x1 conv, sigmoid) and a channel
  mask (MLP on the pooled feature, sigmoid).  The distillation loss is the squared error between the aligned
  student and the teacher, weighted by each mask and normalised by the mask's mass (a masked mean), averaged
  over the units; a Dice diversity loss keeps the units' masks apart.
Choices the paper leaves open, and ours: the mask generators and the attention are trained jointly with the
student on these losses (the masks follow the student as it learns, the paper's point); the student is
aligned by a 1x1 conv + BN to the teacher's width and resized to its grid (`FeatureBridge`, which also views a
ViT student's tokens as a map); per-sample normalisation, mean over the batch.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...adapters import FeatureBridge
from ...registry import register_method
from ...taps import Layout, map_to_tokens
from ..base import Context, Method

__all__ = ["acam_mask_loss", "mask_diversity_loss"]

MASK_FLOOR = 1e-6


def acam_mask_loss(student_map: torch.Tensor, teacher_map: torch.Tensor, spatial_masks: torch.Tensor,
                   channel_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(spatial term, channel term) of ACAM-KD's masked feature loss.

    student_map, teacher_map: (B, C, H, W); spatial_masks: (B, M, H, W); channel_masks: (B, M, C).
    spatial = mean_b 1/M sum_m  sum_{c,h,w} S_m[h,w] (T - S)^2 / (C * sum_{h,w} S_m[h,w])
    channel = mean_b 1/M sum_m  sum_{c,h,w} K_m[c]   (T - S)^2 / (H*W * sum_c K_m[c])
    """
    channels, height, width = teacher_map.shape[1:]
    error = (teacher_map.detach() - student_map).pow(2)  # (B, C, H, W)
    per_position = error.sum(1)  # (B, H, W)
    per_channel = error.sum((2, 3))  # (B, C)
    # a mask that saturates to ~0 everywhere would divide 0 by 0: its mass is floored at MASK_FLOOR
    spatial_mass = spatial_masks.sum((2, 3)).clamp_min(MASK_FLOOR)
    channel_mass = channel_masks.sum(2).clamp_min(MASK_FLOOR)
    spatial = (spatial_masks * per_position[:, None]).sum((2, 3)) / (channels * spatial_mass)
    channel = (channel_masks * per_channel[:, None]).sum(2) / (height * width * channel_mass)
    return spatial.mean(), channel.mean()


def mask_diversity_loss(masks: torch.Tensor) -> torch.Tensor:
    """Mean Dice similarity 2<a, b> / (|a|^2 + |b|^2) over the pairs of different masks of each sample.

    masks: (B, M, ...) with M >= 2; 0 when the masks are disjoint, 1 when they are all equal."""
    flat = masks.flatten(2)
    count = flat.shape[1]
    overlap = flat @ flat.transpose(1, 2)  # (B, M, M)
    energy = overlap.diagonal(dim1=1, dim2=2)
    dice = 2 * overlap / (energy[:, :, None] + energy[:, None, :]).clamp_min(MASK_FLOOR)
    off_diagonal = ~torch.eye(count, dtype=torch.bool, device=masks.device)
    return dice[:, off_diagonal].mean()


class CrossAttentionFusion(nn.Module):
    """STCA-FF: queries from the teacher, keys and values from the student, attention over positions."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.query = nn.Conv2d(channels, dim, 1)
        self.key = nn.Conv2d(channels, dim, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.scale = dim ** -0.5

    def forward(self, student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
        q = map_to_tokens(self.query(teacher_map))
        k = map_to_tokens(self.key(student_map))
        v = map_to_tokens(self.value(student_map))
        fused = (q @ k.transpose(1, 2) * self.scale).softmax(-1) @ v  # (B, HW, C)
        return fused.transpose(1, 2).reshape_as(teacher_map)


class MaskUnits(nn.Module):
    """ASCM: `count` selection units, each a spatial mask (B, H, W) and a channel mask (B, C) in (0, 1)."""

    def __init__(self, channels: int, count: int, reduction: int = 4):
        super().__init__()
        self.count = count
        self.spatial = nn.Conv2d(channels, count, 1)
        hidden = max(channels // reduction, 4)
        self.channel = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, count * channels))

    def forward(self, fused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spatial = torch.sigmoid(self.spatial(fused))
        channel = torch.sigmoid(self.channel(fused.mean((2, 3)))).view(len(fused), self.count, -1)
        return spatial, channel


@register_method("acam", description="attention-masked features, diverse masks",
                 layers="student stage:-1 -> teacher stage:-1 (the last stage)",
                 family="feature", cross_arch=False,
                 paper="Lan & Tian 2025, ACAM-KD: Adaptive and Cooperative Attention Masking for Knowledge "
                       "Distillation")
class ACAMKD(Method):
    """Masked feature distillation at one stage (default the last of each model).  Losses: `weight` x (spatial +
    channel masked terms) and `diversity_weight` x the Dice diversity of the spatial and the channel masks.
    ``num_masks`` selection units; ``attention_dim`` None: the teacher's width // 2 (at least 8).

    Options:
        weight: multiplier of the masked feature terms (spatial + channel)
        diversity_weight: weight of the Dice diversity loss between masks
        num_masks: number of selection units (mask pairs)
        attention_dim: width of the cross-attention; null: teacher width // 2 (at least 8)
        student_layer: student tap (aligned to the teacher's width and size)
        teacher_layer: teacher tap
    """

    ce_weight = 1.0

    def __init__(self, weight: float = 1.0, diversity_weight: float = 1.0, num_masks: int = 4,
                 attention_dim: Optional[int] = None, student_layer: str = "stage:-1",
                 teacher_layer: str = "stage:-1"):
        super().__init__()
        self.weight = weight
        self.diversity_weight = diversity_weight
        self.num_masks = num_masks
        self.attention_dim = attention_dim
        self.student_taps = (student_layer,)
        self.teacher_taps = (teacher_layer,)

    def choose_taps(self, student_layout: Layout, teacher_layout: Layout) -> None:
        self.student_layout, self.teacher_layout = student_layout, teacher_layout

    def build(self, setup) -> None:
        teacher_shape = self.teacher_layout.map_shape(setup.teacher_shapes[self.teacher_taps[0]])
        channels = teacher_shape[1]
        self.align = FeatureBridge(setup.student_shapes[self.student_taps[0]], teacher_shape,
                                   self.student_layout.num_prefix_tokens, image_size=self.student_layout.image_size)
        self.fusion = CrossAttentionFusion(channels, self.attention_dim or max(channels // 2, 8))
        self.masks = MaskUnits(channels, self.num_masks)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        student = self.align(ctx.student[self.student_taps[0]])
        teacher = self.teacher_layout.feature_map(ctx.teacher[self.teacher_taps[0]]).detach()
        spatial_masks, channel_masks = self.masks(self.fusion(student, teacher))
        spatial, channel = acam_mask_loss(student, teacher, spatial_masks, channel_masks)
        losses = {"acam": self.weight * (spatial + channel)}
        if self.num_masks > 1 and self.diversity_weight:
            diversity = mask_diversity_loss(spatial_masks) + mask_diversity_loss(channel_masks)
            losses["acam_diversity"] = self.diversity_weight * diversity
        return losses
