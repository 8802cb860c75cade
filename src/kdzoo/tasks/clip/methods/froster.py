"""FROSTER (Huang et al., ICLR 2024, "FROSTER: Frozen CLIP Is A Strong Teacher for Open-Vocabulary Action
Recognition"): a CLIP model fine-tuned on base classes while a frozen copy of it teaches through residual features,
so the fine-tuned model keeps the frozen one's generalisation to classes it never trains on (open vocabulary).

One training step, with `I` the fine-tuned model's normalised image embeddings of the batch, `P` its class
embeddings (each class's prompts over every template, normalised, averaged and normalised again, with gradient),
`I_r` and `P_r` the frozen model's, and `r_v`, `r_t` two residual branches (Linear -> GELU -> Linear, no biases,
the first He-normal, the last zero: `kdzoo.methods.feature.residual.ResidualBranch`):

    L = CE(s I P^T, y) + ratio * ( [1 - cos(I + alpha r_v(I), I_r)]_mean over images
                                  + [1 - cos(P + alpha r_t(P), P_r)]_mean over classes )

then, after training, the weights at the ends of epochs `average_from`.. are averaged (SWA) into the model that is
evaluated and exported.

From the authors' code (github.com/Visual-AI/FROSTER):

* slowfast/models/temporalclip_video_model.py: the two projectors ``projector_v`` / ``projector_t`` (lines 71-85),
  ``pred = logit_scale.exp() * img_encode @ dynamic_classifier_new.T`` from the normalised image embedding and the
  trainable class matrix (lines 234-255) -- computed *before* the residual is added; alpha = 0.1 and the residual
  added to both (lines 260-275); the frozen model's image embedding normalised and its class matrix built the same
  way without gradient; ``achieve_csf_matrix`` (lines 392-406): each prompt type's class embeddings normalised,
  the mean over prompt types normalised again;
* tools/train_net.py lines 473-489: ``1 - F.cosine_similarity(img_encode, raw_img_encode).mean()`` plus the same on
  the text side, times ``MODEL.DISTILLATION_RATIO`` (2.0 in every script, e.g.
  script/training/temporal_b16/train_clip_B2N_k400.sh), added to the classification loss;
* the SWA: Open-VCLIP's ``weight_average_tool.py`` (README line 309) averages the checkpoints of epochs
  ``wa_start = 2`` .. ``wa_end`` (the frozen CLIP, id 0, falls outside), every state entry an equal share.

OUR READING / not the same: images, not videos (their temporal adapters and clip averaging do not apply); the class
prompts are the data's templates, not their rephrased action descriptions; AdamW and the schedule are the task's;
every weight trains, the logit scale included (their model's parameters all require gradient; the task clamps the
scale to ln 100).  Run it under ``kdzoo clip continual`` (one task = the base classes, ``zero_shot_tasks`` the novel
ones: their base-to-novel protocol).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ....errors import ConfigError
from ....methods.feature.residual import ResidualBranch, residual_feature_loss
from ....registry import NonNegative, NonNegativeInt, UnitInterval, register_clip_method
from ..losses import weight_ensemble_update
from ..method_base import ClipBatch
from ..models import ClipOutputs
from .zscl import PromptFineTuning, ReferenceSet, prompt_cross_entropy

PAPER = ("Huang et al. 2024, FROSTER: Frozen CLIP Is A Strong Teacher for Open-Vocabulary Action Recognition "
         "(ICLR); code github.com/Visual-AI/FROSTER")


def prompt_ensemble(prompt_embeds: torch.Tensor) -> torch.Tensor:
    """(C, D) class embeddings from (C, T, D) prompt embeddings: each normalised, the mean over the T templates
    normalised again (``achieve_csf_matrix``); differentiable."""
    return F.normalize(F.normalize(prompt_embeds, dim=-1).mean(dim=1), dim=-1)


def froster_distillation_loss(image_embeds: torch.Tensor, image_residual: torch.Tensor, frozen_image: torch.Tensor,
                              class_embeds: torch.Tensor, class_residual: torch.Tensor, frozen_classes: torch.Tensor,
                              alpha: float = 0.1) -> torch.Tensor:
    """``[1 - cos(I + alpha r_v, I_r)].mean() + [1 - cos(P + alpha r_t, P_r)].mean()`` (the frozen sides constant)."""
    return (residual_feature_loss(image_embeds, image_residual, frozen_image, alpha)
            + residual_feature_loss(class_embeds, class_residual, frozen_classes, alpha))


@register_clip_method("froster", paper=PAPER, family="continual",
                      scope="FROSTER's image-level recipe: prompt cross-entropy over every template, residual "
                            "feature distillation from the frozen model on image and class embeddings (ratio 2, "
                            "alpha 0.1), SWA of the epochs from the second; no video parts; kdzoo clip continual "
                            "(base classes trained, novel classes as zero_shot_tasks)",
                      description="fine-tuning on the base classes while a frozen copy teaches through residual "
                                  "image and class features, then weight averaging over epochs")
class Froster(PromptFineTuning):
    """FROSTER (see the module): the frozen model is the run's initial model (``kdzoo clip continual``'s
    ``initial``).

    Options:
        distillation_ratio: weight of the two residual feature terms together (the authors' scripts: 2.0)
        alpha: scale of the residual branches (their code: 0.1)
        label_smoothing: label smoothing of the classification cross-entropy (theirs: none)
        average_from: the first epoch whose final weights enter the weight average (weight_average_tool.py's
            wa_start 2); 0: no average, the trained model is exported
    """

    all_templates = True  # the continual step binds every template's prompts, (C, T, L)

    def __init__(self, distillation_ratio: NonNegative = 2.0, alpha: NonNegative = 0.1,
                 label_smoothing: UnitInterval = 0.0, average_from: NonNegativeInt = 2):
        super().__init__(label_smoothing)
        self.distillation_ratio, self.alpha, self.average_from = distillation_ratio, alpha, average_from
        self.frozen_classes: Optional[torch.Tensor] = None
        self.register_buffer("averaged", torch.zeros((), dtype=torch.long))  # epochs in the average (run state)

    def attach(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        super().attach(student, teacher)
        student.logit_scale.requires_grad_(True)  # their model trains every weight
        if teacher is None:
            raise ConfigError("method froster: distils from the frozen initial model, and none was given")
        width = student.embed_dim
        self.image_branch, self.class_branch = ResidualBranch(width, width), ResidualBranch(width, width)
        # the epoch average, part of the run's state so a resumed run continues it
        self.average = copy.deepcopy(student).requires_grad_(False) if self.average_from else None

    def parameter_groups(self) -> list[dict]:
        return [{"params": list(self.image_branch.parameters()) + list(self.class_branch.parameters())}]

    def bind(self, prompt_tokens: tuple[torch.Tensor, torch.Tensor], reference: Optional[ReferenceSet], seed: int,
             device: torch.device, steps_per_epoch: int = 0) -> None:
        super().bind(prompt_tokens, reference, seed, device, steps_per_epoch)
        if prompt_tokens[0].dim() != 3:
            raise ConfigError("method froster: needs every template's class prompts (C, T, L)")
        self.teacher.to(device)

    def class_embeddings(self, model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        ids, mask = self.prompt_tokens
        classes, templates = ids.shape[:2]
        embeds = model.encode_text(ids.flatten(0, 1), mask.flatten(0, 1)).to(dtype)
        return prompt_ensemble(embeds.view(classes, templates, -1))

    def loss(self, batch: ClipBatch, student_out: ClipOutputs, teacher_out: Optional[ClipOutputs],
             step: int) -> dict[str, torch.Tensor]:
        if self.prompt_tokens is None:
            raise ConfigError("method froster: needs the task's class prompts, which kdzoo clip continual gives it; "
                              "run it with kdzoo clip continual")
        self.step = step
        dtype = student_out.image_embeds.dtype
        classes = self.class_embeddings(self.student, dtype)
        terms = {"ce": prompt_cross_entropy(student_out.image_embeds, classes, student_out.logit_scale, batch.labels,
                                            self.label_smoothing)}
        if self.distillation_ratio:
            with torch.no_grad():
                frozen_image = F.normalize(self.teacher.encode_image(batch.images).to(dtype), dim=-1)
                if self.frozen_classes is None:  # the frozen model's class matrix is a constant
                    self.frozen_classes = self.class_embeddings(self.teacher, dtype)
            image_embeds = student_out.image_embeds
            terms["distillation"] = self.distillation_ratio * froster_distillation_loss(
                image_embeds, self.image_branch(image_embeds)[1], frozen_image,
                classes, self.class_branch(classes)[1], self.frozen_classes, self.alpha)
        return terms

    def after_update(self) -> None:
        """At the last step of epoch `average_from` or later, fold the weights into the average (SWA)."""
        if self.average is None or self.step is None or (self.step + 1) % max(self.steps_per_epoch, 1):
            return
        if (self.step + 1) // self.steps_per_epoch < self.average_from:
            return
        count = int(self.averaged)
        if count == 0:
            self.average.load_state_dict(self.student.state_dict())
        else:
            self.average.load_state_dict(weight_ensemble_update(self.average.state_dict(), self.student.state_dict(),
                                                                count))
        self.averaged += 1

    def evaluated_model(self) -> nn.Module:
        """The epoch average once it holds an epoch (before that, and without one, the trained model)."""
        return self.average if self.average is not None and int(self.averaged) > 0 else self.student


__all__ = ["Froster", "froster_distillation_loss", "prompt_ensemble"]
