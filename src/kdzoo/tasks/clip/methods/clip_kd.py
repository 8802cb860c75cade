"""CLIP-KD's relational, interactive and gradient distillation and its recommended combination (Yang et al. 2024,
CLIP-KD: An Empirical Study of CLIP Model Distillation, CVPR).  Every method keeps the student's own contrastive
("task") loss at weight 1 (src/training/train.py line 202 sums it with the distillation terms) and adds:

* ``clip_crd``, contrastive relational distillation: KL between the teacher's and the student's image-to-text and
  text-to-image contrastive distributions, each side with its own logit scale (`losses.crd_loss`, their
  ``ckd_loss``), weight 1 (script/methods/CRD.sh line 25);
* ``clip_icl``, interactive contrastive learning: the student's image embedding contrasted with the teacher's text
  embeddings and the student's text embedding with the teacher's image embeddings (`losses.icl_loss`), weight 1
  (script/methods/ICL.sh line 25), through a learnable cross logit scale initialised to ln(1/0.07) and multiplied in
  as it is, without exp (src/open_clip/loss.py line 244, lines 298-299);
* ``clip_gd``, gradient distillation: MSE between the closed-form gradients of the contrastive loss with respect to
  the student's and the teacher's embeddings (`losses.gradient_distillation_loss`), weight 1e8
  (script/methods/GD.sh line 25);
* ``clip_kd``, the combination the README reports as "CLIP-KD" for every teacher-student pair: task + CRD + ICL +
  2000 x FD (every script under script/ViT_B_16_KD, script/RN101_KD and script/ViT_*_KD_Laion passes
  ``--alpha_ckd_loss 1. --alpha_icl_loss 1. --alpha_fd_loss 2000.``, e.g. script/ViT_B_16_KD/ViT_T_16_kd.sh
  lines 25-27); GD is available at weight 0, its default in
  src/training/params.py line 174.

Read from src/open_clip/loss.py, ``KDClipLoss.forward`` (lines 248-362) and src/training/main_kd.py:

* CRD compares the student's similarity matrix from its own normalised embeddings (before any
  projection; lines 262-272, 317-318) with its learnable ``logit_scale.exp()`` to the teacher's (normalised
  embeddings, the teacher's own exp scale, computed without gradient; train.py line 196), at temperature 1
  (``DistillKL(T=1)``, line 243);
* ICL, FD and GD use the student's embeddings in the teacher's width: when the widths differ a linear layer with
  bias per tower maps the student's unnormalised projections first, then they are normalised (lines 289-294);
  this is `feature.ClipFeatureDistillation`'s projection, reused here;
* GD passes the exponentiated logit scales as the *temperature* of its logits (lines 328-332 hand ``logit_scale``
  and ``t_logit_scale`` to get_grad, which divides by them), so its logits are cosines divided by the scale; we do
  the same, and the student's scale gets gradient through it as in their code;
* the projections and the cross logit scale train in the optimizer group of the loss's parameters, which gets
  AdamW's default weight decay 0.01 and the base learning rate (main_kd.py line 223); here the cross scale is a
  group of its own beside the projections' group, with the same decay and rate.  The cross scale is never clamped
  (train.py line 227 clamps only the model's logit scale).

Ours: one process, so the negatives are the batch (their single-process branch, loss.py lines 273-275, refers to
names that only the multi-process branch defines; we follow the multi-process branch on one process).  AFD and MFD
are `clip_afd` and `clip_mfd`; not implemented: the ``cross_kd`` term (weight 0 in every script).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ....errors import ConfigError
from ....registry import NonNegative, Positive, register_clip_method
from ..losses import clip_contrastive_loss, crd_loss, feature_mse_loss, gradient_distillation_loss, icl_loss
from ..method_base import ClipBatch, ClipMethod
from ..models import ClipOutputs
from .feature import PROJECTION_WEIGHT_DECAY, ClipFeatureDistillation

PAPER = "Yang et al. 2024, CLIP-KD: An Empirical Study of CLIP Model Distillation (CVPR); code github.com/winycg/CLIP-KD"
CROSS_SCALE_INIT = math.log(1 / 0.07)  # CLIP-KD loss.py line 244: the cross logit scale starts at ln(1/0.07)


class ClipKDTerms(ClipFeatureDistillation):
    """CLIP-KD's loss with a weight per term (a term of weight 0 is not computed); the registered methods below fix
    which weights a config may set.  Builds the projections into the teacher's width only for a term that works in
    it (FD, ICL, GD), and the cross logit scale only for ICL."""

    def __init__(self, contrastive_weight: float, fd_weight: float = 0.0, crd_weight: float = 0.0,
                 icl_weight: float = 0.0, gd_weight: float = 0.0, crd_temperature: float = 1.0):
        super().__init__(fd_weight=fd_weight, contrastive_weight=contrastive_weight)
        self.crd_weight, self.icl_weight, self.gd_weight = crd_weight, icl_weight, gd_weight
        self.crd_temperature = crd_temperature
        if not any((contrastive_weight, fd_weight, crd_weight, icl_weight, gd_weight)):
            raise ConfigError(f"{getattr(self, 'registry_name', 'clip_kd')}: every loss weight is 0; "
                              "give at least one a positive weight")
        self.cross_logit_scale: Optional[nn.Parameter] = None
        if icl_weight > 0:
            self.cross_logit_scale = nn.Parameter(torch.tensor(CROSS_SCALE_INIT))

    @property
    def uses_teacher_width(self) -> bool:
        """Whether a term compares the student's embeddings with the teacher's entry by entry (FD, ICL, GD)."""
        return self.fd_weight > 0 or self.icl_weight > 0 or self.gd_weight > 0

    def attach(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        if self.uses_teacher_width:
            super().attach(student, teacher)  # the projections when the widths differ
        else:  # CRD alone compares similarity matrices: no projections needed
            ClipMethod.attach(self, student, teacher)

    def parameter_groups(self) -> list[dict]:
        groups = []
        projections = [p for module in (self.image_projection, self.text_projection) if module is not None
                       for p in module.parameters()]
        if projections:
            groups.append({"params": projections, "lr_scale": 1.0, "weight_decay": PROJECTION_WEIGHT_DECAY})
        if self.cross_logit_scale is not None:  # CLIP-KD trains it in the same group as the projections
            groups.append({"params": [self.cross_logit_scale], "lr_scale": 1.0,
                           "weight_decay": PROJECTION_WEIGHT_DECAY})
        return groups

    def loss(self, batch: ClipBatch, student_out: ClipOutputs, teacher_out: Optional[ClipOutputs],
             step: int) -> dict[str, torch.Tensor]:
        s, t = student_out, teacher_out
        terms = {}
        if self.contrastive_weight > 0:
            terms["contrastive"] = self.contrastive_weight * clip_contrastive_loss(s.image_embeds, s.text_embeds,
                                                                                   s.logit_scale)
        if self.crd_weight > 0:
            terms["crd"] = self.crd_weight * crd_loss(s.image_embeds, s.text_embeds, t.image_embeds, t.text_embeds,
                                                      s.logit_scale, t.logit_scale, self.crd_temperature)
        if not self.uses_teacher_width:
            return terms
        image, text = self.student_embeddings(s)
        if self.fd_weight > 0:
            terms["fd"] = self.fd_weight * feature_mse_loss(image, text, t.image_embeds, t.text_embeds)
        if self.icl_weight > 0:
            terms["icl"] = self.icl_weight * icl_loss(image, text, t.image_embeds, t.text_embeds,
                                                      self.cross_logit_scale)
        if self.gd_weight > 0:  # the exp logit scales as temperatures, as CLIP-KD passes them to get_grad
            terms["gd"] = self.gd_weight * gradient_distillation_loss(image, text, t.image_embeds, t.text_embeds,
                                                                      s.logit_scale, t.logit_scale)
        return terms


@register_clip_method("clip_crd", paper=PAPER, family="relation",
                      scope="CLIP-KD's contrastive relational distillation (CRD, their ckd_loss, T = 1) with the "
                            "contrastive task loss; one process (the batch's negatives)",
                      description="KL from the teacher's image-text contrastive distributions to the student's, plus "
                                  "the contrastive loss")
class ClipCRD(ClipKDTerms):
    """CLIP-KD's CRD (see the module).

    Options:
        crd_weight: weight of the CRD KL (CLIP-KD's 1, script/methods/CRD.sh)
        contrastive_weight: weight of the student's own contrastive loss (CLIP-KD's 1)
        temperature: temperature of the two softmaxes (CLIP-KD's DistillKL(T=1))
    """

    def __init__(self, crd_weight: NonNegative = 1.0, contrastive_weight: NonNegative = 1.0,
                 temperature: Positive = 1.0):
        super().__init__(contrastive_weight, crd_weight=crd_weight, crd_temperature=temperature)


@register_clip_method("clip_icl", paper=PAPER, family="contrastive",
                      scope="CLIP-KD's interactive contrastive learning (ICL) with its learnable, unclamped cross logit "
                            "scale (ln(1/0.07) at the start, multiplied without exp) and the contrastive task loss; "
                            "one process",
                      description="student images against teacher captions and student captions against teacher "
                                  "images (InfoNCE), plus the contrastive loss")
class ClipICL(ClipKDTerms):
    """CLIP-KD's ICL (see the module).

    Options:
        icl_weight: weight of the interactive contrastive loss (CLIP-KD's 1, script/methods/ICL.sh)
        contrastive_weight: weight of the student's own contrastive loss (CLIP-KD's 1)
    """

    def __init__(self, icl_weight: NonNegative = 1.0, contrastive_weight: NonNegative = 1.0):
        super().__init__(contrastive_weight, icl_weight=icl_weight)


@register_clip_method("clip_gd", paper=PAPER, family="gradient",
                      scope="CLIP-KD's gradient distillation (GD) at their weight 1e8, with their code's temperature "
                            "(the exp logit scale divides the cosines) and the contrastive task loss; one process",
                      description="MSE between the contrastive loss's gradients w.r.t. the student's and the teacher's "
                                  "embeddings, plus the contrastive loss")
class ClipGD(ClipKDTerms):
    """CLIP-KD's GD (see the module).

    Options:
        gd_weight: weight of the four gradient MSEs (CLIP-KD's 1e8, script/methods/GD.sh)
        contrastive_weight: weight of the student's own contrastive loss (CLIP-KD's 1)
    """

    def __init__(self, gd_weight: NonNegative = 1e8, contrastive_weight: NonNegative = 1.0):
        super().__init__(contrastive_weight, gd_weight=gd_weight)


@register_clip_method("clip_kd", paper=PAPER, family="combined",
                      scope="CLIP-KD's recommended combination (README 'CLIP-KD' rows; script/ViT_B_16_KD/*.sh): task + "
                            "CRD + ICL + 2000 FD, GD optional (0); AFD, MFD and cross-KD not implemented; one process",
                      description="CLIP-KD: contrastive loss + CRD + ICL + feature distillation (FD), the authors' "
                                  "weights")
class ClipKD(ClipKDTerms):
    """CLIP-KD's combined loss (see the module).

    Options:
        fd_weight: weight of FD, the MSE between normalised embeddings (CLIP-KD's 2000)
        crd_weight: weight of CRD (CLIP-KD's 1)
        icl_weight: weight of ICL (CLIP-KD's 1)
        gd_weight: weight of GD (0 in their combination scripts, params.py's default)
        contrastive_weight: weight of the student's own contrastive loss (CLIP-KD's 1)
        temperature: temperature of CRD's softmaxes (CLIP-KD's 1)
    """

    def __init__(self, fd_weight: NonNegative = 2000.0, crd_weight: NonNegative = 1.0, icl_weight: NonNegative = 1.0,
                 gd_weight: NonNegative = 0.0, contrastive_weight: NonNegative = 1.0, temperature: Positive = 1.0):
        super().__init__(contrastive_weight, fd_weight=fd_weight, crd_weight=crd_weight, icl_weight=icl_weight,
                         gd_weight=gd_weight, crd_temperature=temperature)


__all__ = ["ClipKDTerms", "ClipCRD", "ClipICL", "ClipGD", "ClipKD", "CROSS_SCALE_INIT"]
