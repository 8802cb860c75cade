"""CLIP-KD's feature distillation, FD (Yang et al. 2024, CLIP-KD: An Empirical Study of CLIP Model Distillation,
CVPR): the student's L2-normalised image and text embeddings are pulled onto the teacher's by mean squared error,
beside the student's own contrastive loss:

    L = L_contrastive(student) + fd_weight * (MSE(I_s, I_t) + MSE(T_s, T_t)),

MSE the mean over batch and embedding dimensions (`losses.feature_mse_loss`).  Read from the authors' code
(github.com/winycg/CLIP-KD, src/open_clip/loss.py, ``KDClipLoss.forward``; src/training/main_kd.py;
script/methods/FD.sh):

* the weight 2000 (``--alpha_fd_loss 2000.`` in script/methods/FD.sh; loss.py line 358) and the contrastive
  ("task") loss at weight 1 (src/training/train.py line 202 sums them);
* when the student's embedding width differs from the teacher's, a linear layer with bias per tower maps the
  student's unnormalised projections into the teacher's width before they are normalised (loss.py lines 234-235,
  290-295); the contrastive loss keeps the student's own embeddings.  The two layers train with the student, in
  an optimizer group that gets AdamW's default weight decay 0.01 (main_kd.py line 223 passes no decay for it);
* the teacher's embeddings are its normalised outputs, computed without gradient (train.py line 196).

Ours: one process (CLIP-KD gathers features over GPUs, so its batch of negatives is the global batch; here it is
the batch); the logit-scale clamp and the schedule are the task's (see `kdzoo.tasks.clip.task`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ....registry import NonNegative, register_clip_method
from ..losses import clip_contrastive_loss, feature_mse_loss
from ..method_base import ClipBatch, ClipMethod
from ..models import ClipOutputs

PROJECTION_WEIGHT_DECAY = 0.01  # AdamW's default, which CLIP-KD's group of loss parameters inherits


@register_clip_method("clip_fd", paper="Yang et al. 2024, CLIP-KD: An Empirical Study of CLIP Model Distillation "
                                       "(CVPR); code github.com/winycg/CLIP-KD",
                      family="feature",
                      scope="CLIP-KD's feature distillation (FD) with its contrastive task loss; one process",
                      description="MSE between the student's and the teacher's normalised image and text embeddings, "
                                  "plus the contrastive loss")
class ClipFeatureDistillation(ClipMethod):
    """CLIP-KD's FD (see the module).

    Options:
        fd_weight: weight of MSE(image) + MSE(text) between normalised embeddings (CLIP-KD's 2000)
        contrastive_weight: weight of the student's own contrastive loss (CLIP-KD's 1)
    """

    def __init__(self, fd_weight: NonNegative = 2000.0, contrastive_weight: NonNegative = 1.0):
        super().__init__()
        self.fd_weight, self.contrastive_weight = fd_weight, contrastive_weight
        self.image_projection: Optional[nn.Module] = None
        self.text_projection: Optional[nn.Module] = None

    def attach(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        super().attach(student, teacher)
        if student.embed_dim != teacher.embed_dim:  # CLIP-KD's visual_proj / text_proj
            self.image_projection = nn.Linear(student.embed_dim, teacher.embed_dim)
            self.text_projection = nn.Linear(student.embed_dim, teacher.embed_dim)

    def parameter_groups(self) -> list[dict]:
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr_scale": 1.0, "weight_decay": PROJECTION_WEIGHT_DECAY}] if params else []

    def student_embeddings(self, student_out: ClipOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's normalised embeddings in the teacher's width (projected first when widths differ)."""
        if self.image_projection is None:
            return student_out.image_embeds, student_out.text_embeds
        image = self.image_projection(student_out.image_projections.float())
        text = self.text_projection(student_out.text_projections.float())
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1)

    def loss(self, batch: ClipBatch, student_out: ClipOutputs, teacher_out: Optional[ClipOutputs],
             step: int) -> dict[str, torch.Tensor]:
        image, text = self.student_embeddings(student_out)
        fd = feature_mse_loss(image, text, teacher_out.image_embeds, teacher_out.text_embeds)
        contrastive = clip_contrastive_loss(student_out.image_embeds, student_out.text_embeds,
                                            student_out.logit_scale)
        return {"contrastive": self.contrastive_weight * contrastive, "fd": self.fd_weight * fd}


__all__ = ["ClipFeatureDistillation"]
