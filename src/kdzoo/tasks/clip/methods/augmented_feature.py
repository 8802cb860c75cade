"""CLIP-KD's augmented feature distillation, AFD (Yang et al. 2024, CLIP-KD: An Empirical Study of CLIP Model
Distillation, CVPR): each of the student's normalised embeddings is concatenated with the teacher's, mapped back to
the student's width by a learnable linear layer per tower, normalised, and the fused image and text embeddings are
trained contrastively, beside the student's own contrastive loss:

    F_I = normalize(W_I [I_s; I_t] + b_I),   F_T = normalize(W_T [T_s; T_t] + b_T)
    L = L_contrastive(student) + afd_weight * 1/2 [CE(c F_I F_T^T, diag) + CE(c F_T F_I^T, diag)]

Read from the authors' code (github.com/winycg/CLIP-KD, src/open_clip/loss.py): the two fusion layers
``Linear(s_embed_dim + t_embed_dim, s_embed_dim)`` with bias (lines 237-239), the fusion logit scale a learnable
parameter initialised to ln(1/0.07) and multiplied in as it is, without exp (lines 245, 347), the half-sum of the two
cross-entropies (lines 339-353); the layers and the scale train in the loss's optimizer group (AdamW's default decay
0.01, main_kd.py line 223).

Ours: their fusion concatenates the student's embedding *after* the projection into the teacher's width when the
widths differ, which does not fit their fusion layers' input width (their students share the teacher's width); here
the student's own normalised embedding is used, the same thing when the widths agree.  The weight: their
script/methods/AFD.sh is a copy of CRD.sh (it sets ``--alpha_ckd_loss 1.`` and no AFD weight), so the weight 1 is
our choice.  One process.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ....registry import NonNegative, register_clip_method
from ..losses import clip_contrastive_loss
from ..method_base import ClipBatch, ClipMethod
from ..models import ClipOutputs
from .feature import PROJECTION_WEIGHT_DECAY

FUSION_SCALE_INIT = math.log(1 / 0.07)  # loss.py line 245


def fused_embeddings(student: torch.Tensor, teacher: torch.Tensor, fusion: nn.Module) -> torch.Tensor:
    """normalize(fusion([student; teacher])), the teacher constant."""
    dtype = fusion.weight.dtype
    return F.normalize(fusion(torch.cat([student.to(dtype), teacher.detach().to(dtype)], dim=-1)), dim=-1)


@register_clip_method("clip_afd", paper="Yang et al. 2024, CLIP-KD: An Empirical Study of CLIP Model Distillation "
                                        "(CVPR); code github.com/winycg/CLIP-KD",
                      family="feature",
                      scope="CLIP-KD's augmented feature distillation (AFD) with its contrastive task loss; the "
                            "weight is ours (their AFD.sh is a copy of CRD.sh); one process",
                      description="the student's and the teacher's embeddings fused by a learnable layer and trained "
                                  "contrastively, plus the student's contrastive loss")
class ClipAugmentedFeatureDistillation(ClipMethod):
    """CLIP-KD's AFD (see the module).

    Options:
        afd_weight: weight of the fused embeddings' contrastive loss (ours: 1)
        contrastive_weight: weight of the student's own contrastive loss (CLIP-KD's 1)
    """

    def __init__(self, afd_weight: NonNegative = 1.0, contrastive_weight: NonNegative = 1.0):
        super().__init__()
        self.afd_weight, self.contrastive_weight = afd_weight, contrastive_weight

    def attach(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        super().attach(student, teacher)
        width = student.embed_dim + teacher.embed_dim
        self.image_fusion = nn.Linear(width, student.embed_dim)
        self.text_fusion = nn.Linear(width, student.embed_dim)
        self.fusion_scale = nn.Parameter(torch.tensor(FUSION_SCALE_INIT))

    def parameter_groups(self) -> list[dict]:
        return [{"params": list(self.parameters()), "lr_scale": 1.0, "weight_decay": PROJECTION_WEIGHT_DECAY}]

    def loss(self, batch: ClipBatch, student_out: ClipOutputs, teacher_out: Optional[ClipOutputs],
             step: int) -> dict[str, torch.Tensor]:
        image = fused_embeddings(student_out.image_embeds, teacher_out.image_embeds, self.image_fusion)
        text = fused_embeddings(student_out.text_embeds, teacher_out.text_embeds, self.text_fusion)
        contrastive = clip_contrastive_loss(student_out.image_embeds, student_out.text_embeds,
                                            student_out.logit_scale)
        return {"contrastive": self.contrastive_weight * contrastive,
                "afd": self.afd_weight * clip_contrastive_loss(image, text, self.fusion_scale)}


__all__ = ["ClipAugmentedFeatureDistillation", "fused_embeddings", "FUSION_SCALE_INIT"]
