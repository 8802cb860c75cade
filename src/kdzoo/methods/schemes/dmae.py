"""DMAE: Bai et al. 2023, "Masked Autoencoders Enable Efficient Knowledge Distillers" (masked-input feature
distillation), the first stage of a two-stage recipe (``stages:`` in the run config; G2SD's generic stage reads
the same way).

The student sees the image with a random 75% of its patches masked (MAE's ``random_masking``: per-sample
uniform noise, the lowest-noise patches kept; ``--mask_ratio 0.75`` in DMAE's scripts); the teacher sees the
whole image.  A projector (a linear map per token, DMAE's ``aligned_feature_projection``) carries the student's
intermediate feature to the teacher's width, and an L1 distance (DMAE's ``--embedding_distillation_func L1``)
aligns it with the teacher's intermediate feature on the visible patches.  DMAE aligns student block 8 of 12
with teacher block 17 of 24 (``--aligned_blks_indices 8 --teacher_aligned_blks_indices 17``): about two thirds
and three quarters deep, our ``stage:-2`` (end of the third of four block groups) on both sides.  The teacher
is run only to its tapped layer (no method here reads its logits).

Masking is done in pixels (masked patches set to 0, the normalised mean) so any student takes it; DMAE's MAE
encoder instead drops the masked tokens, and adds a pixel-reconstruction decoder that is not reproduced here.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...registry import Fraction, NonNegative, PositiveInt, register_method
from ..base import Context, Method, Setup

__all__ = ["random_patch_mask", "mask_patches", "masked_feature_l1", "DMAE"]


def random_patch_mask(batch: int, grid: tuple[int, int], ratio: float, generator: Optional[torch.Generator] = None,
                      device=None) -> torch.Tensor:
    """(B, h, w) of 1 = masked, 0 = visible: exactly round(ratio * h * w) masked patches per sample, chosen as
    MAE's random_masking (argsort of uniform noise, the first to keep)."""
    count = grid[0] * grid[1]
    keep = count - int(round(ratio * count))
    noise = torch.rand(batch, count, generator=generator, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each patch's noise
    return (ranks >= keep).float().view(batch, *grid)


def mask_patches(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`images` (B, C, H, W) with the patches where `mask` (B, h, w) is 1 set to zero."""
    pixels = F.interpolate(mask[:, None], size=images.shape[-2:], mode="nearest")
    return images * (1 - pixels.to(images.dtype))


def masked_feature_l1(student_map: torch.Tensor, teacher_map: torch.Tensor,
                      weight_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean absolute difference of two (B, C, h, w) maps, over the positions where `weight_map` (B, h, w) is 1
    (all positions when None).  The teacher is a constant."""
    diff = (student_map - teacher_map.detach()).abs().mean(dim=1)  # (B, h, w)
    if weight_map is None:
        return diff.mean()
    return (diff * weight_map).sum() / weight_map.sum().clamp(min=1)


@register_method("dmae", family="scheme", description="masked student input aligns teacher features",
                 layers="stage:-2 on both models",
                 paper="Bai et al. 2023, Masked Autoencoders Enable Efficient Knowledge Distillers (DMAE)")
class DMAE(Method):
    """``mask_ratio`` of the student's patches (of ``patch_size`` pixels; default: one patch per token of the
    student's tapped feature) are masked; ``align``: the L1 over visible patches (DMAE) or all of them.
    No cross-entropy (``ce_weight`` 0): the stage is pre-training; a later stage fine-tunes.

    Options:
        weight: multiplier of the L1 feature alignment
        mask_ratio: share of the student's input patches masked
        patch_size: side of a masked patch in pixels; null: one patch per token of the tapped feature
        student_layer: the student tap aligned
        teacher_layer: the teacher tap it is aligned with (the teacher runs only up to it)
        align: visible: L1 over visible patches (DMAE); all: over every patch
    """

    ce_weight = 0.0
    reads_teacher_logits = False

    def __init__(self, weight: NonNegative = 1.0, mask_ratio: Fraction = 0.75, patch_size: Optional[PositiveInt] = None,
                 student_layer: str = "stage:-2", teacher_layer: str = "stage:-2",
                 align: Literal["visible", "all"] = "visible"):
        super().__init__()
        self.weight = weight
        self.mask_ratio = mask_ratio
        self.patch_size = patch_size
        self.align = align
        self.student_taps = (student_layer,)
        self.teacher_taps = (teacher_layer,)
        self._mask: Optional[torch.Tensor] = None  # the last batch's mask, read by forward

    def choose_taps(self, student_layout, teacher_layout) -> None:
        self.layouts = (student_layout, teacher_layout)

    def build(self, setup: Setup) -> None:
        s_layout, t_layout = self.layouts
        s_shape = s_layout.map_shape(setup.student_shapes[self.student_taps[0]])
        t_shape = t_layout.map_shape(setup.teacher_shapes[self.teacher_taps[0]])
        height, width = setup.example_input.shape[-2:]
        if self.patch_size is None:
            if height % s_shape[2] or width % s_shape[3]:
                raise ConfigError(f"dmae: the student feature's {s_shape[2]}x{s_shape[3]} grid does not tile the "
                                  f"{height}x{width} image; give patch_size")
            self.patch_size = height // s_shape[2]
        if height % self.patch_size or width % self.patch_size:
            raise ConfigError(f"dmae: patch_size {self.patch_size} does not tile the {height}x{width} image")
        self.grid = (height // self.patch_size, width // self.patch_size)
        self.projector = nn.Conv2d(s_shape[1], t_shape[1], 1)  # a linear map per token

    def student_input(self, images: torch.Tensor) -> torch.Tensor:
        self._mask = random_patch_mask(len(images), self.grid, self.mask_ratio, device=images.device)
        return mask_patches(images, self._mask)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        s_layout, t_layout = self.layouts
        student = self.projector(s_layout.feature_map(ctx.student[self.student_taps[0]]))
        teacher = t_layout.feature_map(ctx.teacher[self.teacher_taps[0]])
        if student.shape[-2:] != teacher.shape[-2:]:
            student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
        visible = None
        if self.align == "visible" and self._mask is not None and len(self._mask) == len(student):
            visible = 1 - F.interpolate(self._mask[:, None], size=teacher.shape[-2:], mode="nearest")[:, 0]
        return {"dmae": self.weight * masked_feature_l1(student, teacher, visible)}
