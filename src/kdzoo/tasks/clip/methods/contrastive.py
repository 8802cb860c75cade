"""The plain CLIP baseline (Radford et al. 2021, Learning Transferable Visual Models From Natural Language
Supervision): the student trained alone with the symmetric InfoNCE over the image-caption pairs of each batch,
no teacher.  The loss is `losses.clip_contrastive_loss` (open_clip's ``ClipLoss`` on one process, which CLIP-KD's
baselines also train with: winycg/CLIP-KD src/open_clip/loss.py); the task clamps the log logit scale to
[0, ln 100] after every update, as CLIP and open_clip do.  ``kdzoo clip teacher`` trains teachers with it, and as a
``kdzoo clip distill`` method it is the no-distillation baseline of a student on the same data and schedule.
"""
from __future__ import annotations

from typing import Optional

import torch

from ....registry import register_clip_method
from ..method_base import ClipBatch, ClipMethod, clip_contrastive_loss
from ..models import ClipOutputs


@register_clip_method("contrastive", paper="Radford et al. 2021, Learning Transferable Visual Models From Natural "
                                           "Language Supervision (CLIP)",
                      family="baseline",
                      scope="the whole baseline: symmetric InfoNCE with a learnable, clamped logit scale",
                      description="CLIP's symmetric contrastive loss alone (no teacher): the baseline")
class Contrastive(ClipMethod):
    """CLIP's contrastive loss alone; no options."""

    needs_teacher = False

    def loss(self, batch: ClipBatch, student_out: ClipOutputs, teacher_out: Optional[ClipOutputs],
             step: int) -> dict[str, torch.Tensor]:
        return {"contrastive": clip_contrastive_loss(student_out.image_embeds, student_out.text_embeds,
                                                     student_out.logit_scale)}


__all__ = ["Contrastive"]
