"""DC-CLIP (Zhang et al. 2025, DC-CLIP: Multilingual CLIP Compression via vision-language distillation and
vision-language alignment, Pattern Recognition; arXiv 2404.11249): a lightweight bilingual CLIP trained in two
stages from a large multilingual teacher (AltCLIP):

* stage 1, vision-language feature distillation: the student's image and text features, through a 1x1 adapter into
  the teacher's width, regress the teacher's image and text features with SmoothL1
  (`losses.dc_clip_feature_distillation_loss`);
* stage 2, vision-language alignment: the student's image and (multilingual) text embeddings are aligned with
  CLIP's symmetric InfoNCE, ``Loss_CL = 1/2 (L_I-T + L_T-I)`` (`losses.clip_contrastive_loss`), without the
  teacher.

No code was published (none found under the paper's name), so everything below that the paper does not state is
OUR READING:

* the features of stage 1 are each tower's projected output before normalisation (``image_projections`` /
  ``text_projections``; the paper distils encoder feature maps, and these are our towers' last features); the
  adapter is a linear layer with bias per tower (a 1x1 convolution on a pooled vector), built when the student's
  width differs from the teacher's and trained in its own optimizer group; this is
  `feature.ClipFeatureDistillation`'s projection, reused (weight decay 0.01 as there);
* the two SmoothL1 terms have unit weights and PyTorch's beta 1; the weights of the stages (1 each) are ours;
* the stages: ``stage: 1`` or ``2`` runs one stage throughout, and ``align_from_step`` lets a ``stage: 1`` run
  switch to stage 2 at that global step, so one run can hold both (the paper's two stages are two trainings; a
  ``stage: 2`` run of its own needs a student that starts from a stage-1 run's weights); stage 2 uses the student's
  own logit scale and no teacher;
* the multilingual part: the paper's teacher reads both languages, so stage 1 distils the text features of every
  caption.  When the teacher reads only the first language, ``second_language_from`` marks the captions of the
  second language: those whose index in the run's caption pool is at least this value (for a labelled dataset
  the pool is template-major, caption ``t * C + c`` for template t and class c, so with the first language's
  templates listed first the value is their count times the number of classes; captioned images number their
  captions in the order they first appear in the file).  A second-language caption gets no text target from the
  teacher; instead its student text embedding (adapted, L2-normalised) is aligned with the teacher's image
  embeddings of the batch by a text-to-image InfoNCE, its own image the positive, at the teacher's logit scale
  (`cross_lingual_alignment_loss`, weight ``cross_lingual_weight``).  The text SmoothL1 keeps its mean over the
  whole batch, the second-language rows counting as zero.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ....errors import ConfigError
from ....registry import NonNegative, NonNegativeInt, Positive, register_clip_method
from ..losses import Scale, clip_contrastive_loss, dc_clip_feature_distillation_loss
from ..method_base import ClipBatch, ClipMethod
from ..models import ClipOutputs
from .feature import ClipFeatureDistillation


def cross_lingual_alignment_loss(student_text: torch.Tensor, teacher_image: torch.Tensor,
                                 second_language: torch.Tensor, scale: Scale) -> torch.Tensor:
    """Text-to-image InfoNCE of the second-language rows against the teacher's images (OUR READING of DC-CLIP's
    multilingual alignment for a teacher that cannot read the second language).

    With L2-normalised student text embeddings ``T_s`` (in the teacher's width), the teacher's L2-normalised image
    embeddings ``I_t`` and ``S`` the rows marked in `second_language`:
    ``L = -(1/|S|) sum_{i in S} log softmax_j(scale * T_s[i] . I_t[j])[i]``, the batch's images as the candidates;
    0 when ``S`` is empty.  Not in `losses`: no author wrote it (DC-CLIP published no code)."""
    if student_text.shape != teacher_image.shape or second_language.shape != student_text.shape[:1]:
        raise ValueError(f"cross_lingual_alignment_loss: text {tuple(student_text.shape)}, image "
                         f"{tuple(teacher_image.shape)} and mask {tuple(second_language.shape)} do not fit")
    rows = second_language.nonzero().flatten()
    if rows.numel() == 0:
        return student_text.new_zeros(())
    logits = scale * student_text[rows] @ teacher_image.detach().T
    return F.cross_entropy(logits, rows)


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32 if autocast left it in half precision (SmoothL1 of raw features, logits)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


@register_clip_method("dc_clip", paper="Zhang et al. 2025, DC-CLIP: Multilingual CLIP Compression via vision-language "
                                       "distillation and vision-language alignment (Pattern Recognition; arXiv "
                                       "2404.11249); no public code",
                      family="feature",
                      scope="OUR READING (no public code): stage 1 SmoothL1 on the towers' unnormalised projections "
                            "through a linear adapter, stage 2 CLIP InfoNCE, chosen by stage / align_from_step; "
                            "second-language captions (second_language_from) aligned to the teacher's image "
                            "embeddings instead of distilled; unit weights, beta 1",
                      description="stage 1: image and text features regress the teacher's (SmoothL1, linear adapter); "
                                  "stage 2: contrastive image-text alignment")
class DCClip(ClipFeatureDistillation):
    """DC-CLIP, our reading (see the module).

    Options:
        stage: 1 (feature distillation) or 2 (image-text alignment, no teacher) for the whole run
        align_from_step: with stage 1, the global step from which the run does stage 2 (None: never)
        distill_weight: weight of stage 1's SmoothL1(image) + SmoothL1(text) (ours: 1)
        beta: SmoothL1's threshold between its quadratic and linear parts (PyTorch's 1)
        align_weight: weight of stage 2's contrastive loss (ours: 1)
        second_language_from: first caption-pool index of the second language, whose captions the teacher cannot
            read (None: the teacher reads every caption, as DC-CLIP's does)
        cross_lingual_weight: weight of the second language's alignment to the teacher's images (ours: 1)
    """

    def __init__(self, stage: Literal[1, 2] = 1, align_from_step: Optional[NonNegativeInt] = None,
                 distill_weight: NonNegative = 1.0, beta: Positive = 1.0, align_weight: NonNegative = 1.0,
                 second_language_from: Optional[NonNegativeInt] = None, cross_lingual_weight: NonNegative = 1.0):
        super().__init__(fd_weight=distill_weight, contrastive_weight=align_weight)
        if stage == 2 and align_from_step is not None:
            raise ConfigError("dc_clip: align_from_step switches a stage-1 run to stage 2; with stage 2 leave it "
                              "unset")
        self.distill_weight, self.align_weight = distill_weight, align_weight  # the base's fd / contrastive weights
        self.stage, self.align_from_step, self.beta = stage, align_from_step, beta
        self.second_language_from, self.cross_lingual_weight = second_language_from, cross_lingual_weight
        # a stage-2 run needs no teacher (the task then skips its forward)
        self.needs_teacher = stage == 1

    def attach(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        if self.stage == 1:
            super().attach(student, teacher)  # the adapters when the widths differ
        else:
            ClipMethod.attach(self, student, teacher)

    def stage_at(self, step: int) -> int:
        """The stage the run is in at global `step`."""
        if self.stage == 1 and self.align_from_step is not None and step >= self.align_from_step:
            return 2
        return self.stage

    def adapted_features(self, student_out: ClipOutputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's unnormalised image and text projections in the teacher's width (through the adapters when
        the widths differ)."""
        image, text = _full_precision(student_out.image_projections), _full_precision(student_out.text_projections)
        if self.image_projection is None:
            return image, text
        return self.image_projection(image), self.text_projection(text)

    def second_language_rows(self, batch: ClipBatch) -> Optional[torch.Tensor]:
        """Which pairs of the batch have a second-language caption (None without a second language)."""
        if self.second_language_from is None:
            return None
        return batch.caption_index >= self.second_language_from

    def loss(self, batch: ClipBatch, student_out: ClipOutputs, teacher_out: Optional[ClipOutputs],
             step: int) -> dict[str, torch.Tensor]:
        if self.stage_at(step) == 2:
            return {"align": self.align_weight * clip_contrastive_loss(
                student_out.image_embeds, student_out.text_embeds, student_out.logit_scale)}
        image, text = self.adapted_features(student_out)
        teacher_image = _full_precision(teacher_out.image_projections)
        teacher_text = _full_precision(teacher_out.text_projections)
        second = self.second_language_rows(batch)
        if second is None:
            return {"distill": self.distill_weight * dc_clip_feature_distillation_loss(image, text, teacher_image,
                                                                                  teacher_text, self.beta)}
        # the teacher cannot read these captions: the student's own (detached) features stand in as their target,
        # so they add neither loss nor gradient, and the mean stays over the whole batch
        text_target = torch.where(second[:, None], text.detach(), teacher_text)
        terms = {"distill": self.distill_weight * dc_clip_feature_distillation_loss(image, text, teacher_image,
                                                                               text_target, self.beta)}
        if self.cross_lingual_weight > 0:
            terms["cross_lingual"] = self.cross_lingual_weight * cross_lingual_alignment_loss(
                F.normalize(text, dim=-1), teacher_out.image_embeds.to(text.dtype), second, teacher_out.logit_scale)
        return terms


__all__ = ["DCClip", "cross_lingual_alignment_loss"]
