"""CLIP-KD's masked feature distillation, MFD (Yang et al. 2024, CLIP-KD: An Empirical Study of CLIP Model
Distillation, CVPR): FD (`feature.ClipFeatureDistillation`) with the student's image tower shown only a random
quarter of its patch tokens, the teacher seeing the whole image:

    L = L_contrastive(student on masked images) + fd_weight * (MSE(I_s(masked), I_t) + MSE(T_s, T_t)).

Read from the authors' code (github.com/winycg/CLIP-KD): script/methods/MFD.sh passes ``--alpha_fd_loss 2000.
--mask_ratio 0.75``; src/training/train.py line 193 runs the student with ``mask_ratio`` for the whole loss (its
contrastive term too) and the teacher without (line 196); src/open_clip/transformer.py ``mask_forward`` and
``random_masking`` (lines 303-377): position embeddings added to the patch tokens, then per image the tokens with the
smallest ``int(L * (1 - mask_ratio))`` of L uniform draws kept (argsort of the noise), the class token (with its
position embedding) put first, then the usual pre-norm, transformer, post-norm and projection.

Ours: the draws come from a generator seeded by the step (resume gives the same masks); one process; a transformers
image tower (open_clip's would need its own hook).
"""
from __future__ import annotations

import contextlib

from ....registry import Fraction, NonNegative, register_clip_method
from ..method_base import ClipBatch
from ..models import masked_image_patches
from .feature import ClipFeatureDistillation

MASK_SALT = 1_000_003  # the masks' generator differs from every other seeded draw of the same step


@register_clip_method("clip_mfd", paper="Yang et al. 2024, CLIP-KD: An Empirical Study of CLIP Model Distillation "
                                        "(CVPR); code github.com/winycg/CLIP-KD",
                      family="feature",
                      scope="CLIP-KD's masked feature distillation (MFD): FD with 75% of the student's patch tokens "
                            "dropped, the contrastive task loss on the masked images too; one process",
                      description="feature distillation from the teacher's full-image embeddings to the student's "
                                  "embeddings of randomly masked images")
class ClipMaskedFeatureDistillation(ClipFeatureDistillation):
    """CLIP-KD's MFD (see the module).

    Options:
        fd_weight: weight of MSE(image) + MSE(text) between normalised embeddings (MFD.sh: 2000)
        contrastive_weight: weight of the student's own contrastive loss (CLIP-KD's 1)
        mask_ratio: share of the student's patch tokens dropped per image (MFD.sh: 0.75)
    """

    def __init__(self, fd_weight: NonNegative = 2000.0, contrastive_weight: NonNegative = 1.0,
                 mask_ratio: Fraction = 0.75):
        super().__init__(fd_weight, contrastive_weight)
        self.mask_ratio = mask_ratio

    def student_context(self, batch: ClipBatch, step: int) -> contextlib.AbstractContextManager:
        return masked_image_patches(self.student, self.mask_ratio, MASK_SALT + step)


__all__ = ["ClipMaskedFeatureDistillation", "MASK_SALT"]
