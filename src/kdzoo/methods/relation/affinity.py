"""Affinity mimicking, from TinyCLIP: Wu et al., "TinyCLIP: CLIP Distillation via Affinity Mimicking and
Weight Inheritance", ICCV 2023.

Two sets of L2-normalised embeddings A (N, D) and B (M, D) of one model define an affinity matrix
``scale * A B^T``; its row-softmax says how each A-item spreads over the B-items, its column-softmax the
reverse.  The student mimics the teacher's two softmaxes with soft-target cross-entropy:

    L = 1/2 [ CE(softmax_rows(s A_s B_s^T), softmax_rows(s_t A_t B_t^T))
            + CE(softmax_rows(s B_s A_s^T), softmax_rows(s_t B_t A_t^T)) ]

each CE summed over the row's entries and averaged over rows.  Only the affinities are compared, so the
student's and teacher's embeddings may have different widths, and any rotation of the student's space
leaves the loss unchanged.

As in the authors' code (microsoft/Cream, ``TinyCLIP/src/open_clip/clip_soft_loss.py``): cross-entropy
with the teacher's probabilities (not KL: the two differ by the teacher's entropy, a constant), both
directions weighted 1/2, each model's own logit scale.  In CLIP the two sets are image and text
embeddings; in a classifier, the method's default pairs the samples' embeddings (the classifier's input)
with the *class* embeddings (the rows of the classifier's weight), the classifier's counterpart of CLIP's
text embeddings of class names.  ``pair_with`` may instead name a second tap of the same width (a second
view or modality).  The student's scale is learnable, initialised and clamped as CLIP's
(1/0.07, at most 100); the teacher's is fixed at 1/`teacher_temperature`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import ConfigError
from ...registry import register_method
from ...taps import get_module, split_tap
from ..base import Context, Method, Setup
from ..embeddings import embedding_width, pool_embedding

__all__ = ["affinity_loss", "Affinity"]

MAX_SCALE = 100.0  # CLIP clamps its learned logit scale here


def affinity_loss(student_a: torch.Tensor, student_b: torch.Tensor, teacher_a: torch.Tensor,
                  teacher_b: torch.Tensor, student_scale=1.0, teacher_scale=1.0) -> torch.Tensor:
    """Mean of the A->B and B->A soft cross-entropies between the student's and the teacher's affinity
    softmaxes (see the module docstring).  Embeddings are L2-normalised here; the teacher is a constant."""
    student_a, student_b = F.normalize(student_a.float(), dim=1), F.normalize(student_b.float(), dim=1)
    teacher_a = F.normalize(teacher_a.detach().float(), dim=1)
    teacher_b = F.normalize(teacher_b.detach().float(), dim=1)
    teacher_scale = torch.as_tensor(teacher_scale).detach()
    student_affinity = student_scale * student_a @ student_b.T
    teacher_affinity = teacher_scale * teacher_a @ teacher_b.T

    def soft_cross_entropy(logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return -(F.softmax(teacher_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(dim=1).mean()

    return 0.5 * (soft_cross_entropy(student_affinity, teacher_affinity)
                  + soft_cross_entropy(student_affinity.T, teacher_affinity.T))


def _classifier_of(model: nn.Module, tap_path: str, role: str) -> nn.Linear:
    path, is_input = split_tap(tap_path)
    module = get_module(model, path) if is_input else None
    if not isinstance(module, nn.Linear):
        raise ConfigError(f"affinity: pair_with='classifier' needs the {role}'s embedding tap to be the input of "
                          f"its last Linear layer (the default 'penultimate'), got {tap_path!r}")
    return module


@register_method("affinity", description="mimic sample-to-class affinities (TinyCLIP)",
                 layers="penultimate on both models, paired with the classifier's class embeddings",
                 family="relation", paper="Wu et al. ICCV 2023, TinyCLIP: CLIP Distillation via "
                 "Affinity Mimicking and Weight Inheritance")
class Affinity(Method):
    """TinyCLIP's affinity mimicking.  ``pair_with: classifier`` (default) pairs sample embeddings with
    class embeddings; any other value is a tap spec read from both models as the second set.

    Options:
        weight: multiplier of the loss term (0 turns it off)
        embedding: tap giving the sample embeddings on both models
        pair_with: 'classifier' (class embeddings = classifier weight rows) or a second tap of the same width
        teacher_temperature: temperature of the teacher's affinities (scale 1 / T)
        learn_scale: learn the student's affinity scale (else fixed at 1 / 0.07)
    """

    def __init__(self, weight: float = 1.0, embedding: str = "penultimate", pair_with: str = "classifier",
                 teacher_temperature: float = 0.07, learn_scale: bool = True):
        super().__init__()
        self.weight = weight
        self.pair_with = pair_with
        self.teacher_temperature = teacher_temperature
        self.student_taps = (embedding,) if pair_with == "classifier" else (embedding, pair_with)
        self.teacher_taps = self.student_taps
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)), requires_grad=learn_scale)

    def build(self, setup: Setup) -> None:
        if self.pair_with == "classifier":
            # Plain tuples: the models' classifiers are read, never registered as parts of this method.
            self._classifiers = (_classifier_of(setup.student, setup.student_paths[self.student_taps[0]], "student"),
                                 _classifier_of(setup.teacher, setup.teacher_paths[self.teacher_taps[0]], "teacher"))
        else:
            for role, shapes in (("student", setup.student_shapes), ("teacher", setup.teacher_shapes)):
                widths = [embedding_width(shapes[spec], "affinity") for spec in self.student_taps]
                if widths[0] != widths[1]:
                    raise ConfigError(f"affinity: the {role}'s {self.student_taps[0]!r} and {self.pair_with!r} "
                                      f"embeddings differ in width ({widths[0]} vs {widths[1]})")

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        embedding = self.student_taps[0]
        student_a = pool_embedding(ctx.student[embedding], "affinity")
        teacher_a = pool_embedding(ctx.teacher[embedding], "affinity")
        if self.pair_with == "classifier":
            student_b, teacher_b = self._classifiers[0].weight, self._classifiers[1].weight
        else:
            student_b = pool_embedding(ctx.student[self.pair_with], "affinity")
            teacher_b = pool_embedding(ctx.teacher[self.pair_with], "affinity")
        scale = self.log_scale.exp().clamp(max=MAX_SCALE)
        loss = affinity_loss(student_a, student_b, teacher_a, teacher_b, scale, 1 / self.teacher_temperature)
        return {"affinity": self.weight * loss}
