"""CLIP-Refine (Yamaguchi et al. 2025, Post-pre-training for Modality Alignment in Vision-Language Foundation
Models, CVPR): a short post-pre-training of a pre-trained CLIP that closes the gap between its image and text
features without forgetting its zero-shot ability.  The model being refined starts as the pre-trained model and the
frozen initial model is its teacher:

    L = rafa_weight * RaFA + hycd_weight * HyCD + contrastive_weight * L_contrastive,

* RaFA, random feature alignment (`losses.rafa_loss`): the image and the text features of every pair are both
  pulled by MSE to one random reference vector drawn afresh per batch from N(0, 1), one draw shared by the two
  modalities;
* HyCD, hybrid contrastive-distillation (`losses.hycd_loss`): KL from targets that blend the ground-truth pairing
  with the frozen model's similarity distribution, ``alpha * Id + (1 - alpha) * softmax(z_t / T)``, to the
  model's own, both directions.

Read from github.com/yshinya6/clip-refine (updater/contrastive.py, ``RandRegUpdater`` lines 154-247 on
``CLIPUpdater`` lines 31-151; config/01_post-pre-training/clip-refine.yaml; model/mod_clip.py):

* the defaults: ``alpha_blending 0.5`` (yaml line 50), ``lambda_kd 1`` with ``distill_loss: kd`` (lines 48-49),
  ``lambda_rand 1`` (line 47), ``lambda_cont 0`` (line 46: the plain CLIP loss is off), ``strategy std_sample``
  with ``mu 0, sigma 1`` (line 45; updater lines 160-174) and ``share_random_feat True`` (line 161), the
  temperature 1 (the updater's default, line 39);
* every term works on the *unnormalised* projections (mod_clip.py forward, lines 63-66), ours
  ``image_projections`` / ``text_projections``; the contrastive term, when weighted, is their ``clip_loss``
  (updater lines 75-83) on the same unnormalised features with the model's logit scale;
* the teacher is a frozen copy of the model taken before training (updater line 50, evaluated under no_grad),
  so here the student must start as the teacher: leave ``model`` unset in the distill config (kdzoo then copies
  the teacher, weights included); `attach` refuses any other student.

Ours: the reference is drawn from a CPU generator seeded by the global step, so a resumed run draws what the
uninterrupted one did and every device sees the same numbers (theirs comes from torch's global generator).  The
optimisation (AdamW with the task's betas, one process; theirs lr 1e-6, weight decay 0.1, batch 512, one epoch of
COCO Captions, yaml lines 3-4, 35-39) is the config's.  Not implemented: the other reference strategies
(``uniform_*``, ``precomputed_*``), separate draws per modality and the optional linear decay of the RaFA weight
(``regularization_decay``, off in their config).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ....errors import ConfigError
from ....registry import NonNegative, Positive, UnitInterval, register_clip_method
from ..losses import clip_contrastive_loss, hycd_loss, rafa_loss
from ..method_base import ClipBatch, ClipMethod
from ..models import ClipOutputs


def rafa_reference(shape: torch.Size, step: int, like: torch.Tensor) -> torch.Tensor:
    """RaFA's random reference of `step`: entries drawn i.i.d. from N(0, 1) by a CPU generator seeded by the step
    alone (the same draw on any device and after any resume), in `like`'s dtype and device."""
    generator = torch.Generator().manual_seed(step)
    return torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(like.device, like.dtype)


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 if autocast left it in half precision (the logits of raw features overflow bf16 quickly)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def same_weights(student: nn.Module, teacher: nn.Module) -> bool:
    """Whether the two modules hold the same tensors under the same names."""
    mine, theirs = student.state_dict(), teacher.state_dict()
    return mine.keys() == theirs.keys() and all(
        mine[k].shape == theirs[k].shape and torch.equal(mine[k].cpu(), theirs[k].cpu()) for k in mine)


@register_clip_method("clip_refine", paper="Yamaguchi et al. 2025, Post-pre-training for Modality Alignment in "
                                           "Vision-Language Foundation Models (CLIP-Refine, CVPR); code "
                                           "github.com/yshinya6/clip-refine",
                      family="post-pre-training",
                      scope="CLIP-Refine's RaFA + HyCD on unnormalised features with the authors' defaults; the "
                            "student is a copy of the teacher (model unset); reference N(0, 1) from a generator "
                            "seeded by the step; only the std_sample strategy, no RaFA decay",
                      description="refines a pre-trained CLIP: features pulled to a shared random reference (RaFA) and "
                                  "distilled from the frozen initial model with blended targets (HyCD)")
class ClipRefine(ClipMethod):
    """CLIP-Refine (see the module).

    Options:
        alpha: weight of the ground-truth pairing in HyCD's blended targets (CLIP-Refine's alpha_blending 0.5)
        rafa_weight: weight of RaFA (their lambda_rand 1)
        hycd_weight: weight of HyCD (their lambda_kd 1)
        contrastive_weight: weight of the plain CLIP loss on the unnormalised features (their lambda_cont 0)
        temperature: temperature of HyCD's softmaxes (their updater's default 1)
    """

    def __init__(self, alpha: UnitInterval = 0.5, rafa_weight: NonNegative = 1.0, hycd_weight: NonNegative = 1.0,
                 contrastive_weight: NonNegative = 0.0, temperature: Positive = 1.0):
        super().__init__()
        if not any((rafa_weight, hycd_weight, contrastive_weight)):
            raise ConfigError("clip_refine: rafa_weight, hycd_weight and contrastive_weight are all 0; give at "
                              "least one a positive weight")
        self.alpha, self.temperature = alpha, temperature
        self.rafa_weight, self.hycd_weight, self.contrastive_weight = rafa_weight, hycd_weight, contrastive_weight

    def attach(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        # called before any checkpoint is restored, so a resumed run's student is still the fresh copy here
        if teacher is None or not same_weights(student, teacher):
            raise ConfigError("clip_refine: the student must start as a copy of the teacher (CLIP-Refine refines the "
                              "pre-trained model itself); leave model unset in the distill config")
        super().attach(student, teacher)

    def loss(self, batch: ClipBatch, student_out: ClipOutputs, teacher_out: Optional[ClipOutputs],
             step: int) -> dict[str, torch.Tensor]:
        image = _full_precision(student_out.image_projections)
        text = _full_precision(student_out.text_projections)
        terms = {}
        if self.rafa_weight > 0:
            reference = rafa_reference(image.shape, step, image)
            terms["rafa"] = self.rafa_weight * rafa_loss(image, text, reference)
        if self.hycd_weight > 0:
            teacher_image = _full_precision(teacher_out.image_projections)
            teacher_text = _full_precision(teacher_out.text_projections)
            terms["hycd"] = self.hycd_weight * hycd_loss(image, text, teacher_image, teacher_text, self.alpha,
                                                         self.temperature)
        if self.contrastive_weight > 0:
            terms["contrastive"] = self.contrastive_weight * clip_contrastive_loss(image, text,
                                                                                   student_out.logit_scale)
        return terms


__all__ = ["ClipRefine", "rafa_reference", "same_weights"]
