"""ZSCL (Zheng et al., ICCV 2023, Preventing Zero-Shot Transfer Degradation in Continual Learning of Vision-Language
Models) and the plain fine-tuning it is compared with: a CLIP model fine-tuned on one task after another, each
task a classification over its class prompts, while keeping what it could do zero-shot before.

One step of the sequence (one task) trains the current model (a copy of the previous step's) with

    L = CE_eps(s I P^T, y) + l2_weight * sum_k ||w_k - w_k^start||^2
        + distillation_weight * T^2 [CE(z_c / T, softmax(z_r / T)) + CE(z_c^T / T, softmax(z_r^T / T))]

* ``CE_eps``: cross-entropy with label smoothing eps over the task's classes, `I` the current model's normalised
  image embeddings of the batch, `P` its normalised text embeddings of one prompt per class (the task's first
  template), `s` the model's logit scale (frozen) -- `prompt_cross_entropy`;
* the L2 consolidation pulls the weights toward the step's starting weights (`losses.l2_weight_consolidation_loss`);
* the distillation (`losses.zscl_distillation_loss`) is computed on a *reference set* unrelated to the tasks: a
  batch of reference images goes through the current model (``z_c = s I_c T_r^T``) and through the frozen initial
  model (``z_r = s I_r T_r^T``), both against the frozen initial model's embeddings of every reference text; the
  image side matches each image's distribution over the texts, the text side each text's over the images;
* a weight ensemble: every `average_every` steps (steps 0, A, 2A, ... of the task) the running mean of the model's
  weights, started from the step's starting weights, takes in the current weights
  (`losses.weight_ensemble_update`).  The ensemble, not the trained model, is what is evaluated, exported, and
  where the next task starts.

Read from the authors' code (github.com/Thunderbeee/ZSCL, mtil/):

* src/models/finetune.py: the logit scale is left out of the optimizer (lines 82-85) and the same
  ``logit_scale.exp()`` multiplies every logit (97, 223, 266-267); one prompt per class from the dataset's first
  template (103-104; src/datasets/collections.py lines 60-64), embedded by the trained model at every step with
  gradient, and ``F.cross_entropy(..., label_smoothing=args.ls)`` (215-224); the L2 term against a copy of the
  model taken when the task starts (34-37, 226-228); the reference model is the zero-shot CLIP, frozen
  (110-118, 125-127: ``--ref-model`` unset in ZSCL.sh), the reference images a shuffled loader cycled without end
  (145, 233-246) with the training batch size, every reference text embedded by the frozen model at each step
  (248-257); the two distillation sides, weight 1 each (265-290, ``--image_loss --text_loss``, no
  ``--weight_adjust``); the ensemble ``we_model`` is a copy of the model at the task's start (24-33), merged
  after the optimizer step when ``iteration % avg_freq == 0`` (309-320), evaluated (182-186) and saved in place of
  the model (344-351), so the next task ``--load``s it;
* src/models/helpers.py: ``merge_we`` (31-34), ``l2_loss`` (47-51), ``distillation`` (64-67);
* src/args.py and scripts/ZSCL.sh, scripts/finetune.sh: label smoothing 0.2 (``--ls 0.2`` in both scripts),
  T = 2 (args.py line 103), ``--avg_freq 100``, ``--l2 1``, reference images ImageNet and reference texts the
  Conceptual Captions validation captions (ZSCL.sh); batch 64, AdamW with betas (0.9, 0.999) and no weight
  decay, 100 warm-up steps then cosine (args.py lines 11-17), 1000 iterations per task at lr 1e-5 (5e-5 for
  Aircraft and MNIST).  The optimizer and schedule are the task's (`kdzoo.tasks.clip.continual` sets the betas).

OUR READING / not the same:

* the reference set is configured by the run (``reference:`` of ``kdzoo clip continual``: images of a dataset or
  of some of its classes, texts given, or class names through "a photo of a {}.") instead of ImageNet and
  Conceptual Captions; the frozen reference texts' embeddings are computed once, at the first step, not at every
  step (the same values: the model is frozen);
* the reference order is a permutation of the reference images per pass, seeded by (train.seed, pass), cut into
  consecutive batches with a shorter last one (their loader's shuffle, made a function of the step so a resumed
  run draws the same batches);
* their loop runs ``iterations + 1`` optimizer steps (0..N), so its last step is merged into the ensemble; here a
  task runs exactly its configured steps and merges at steps 0, A, 2A, ... below that number;
* their ``merge_we`` averages ``parameters()``; here every floating-point state entry (the same for these models);
* one process; the data's templates give the prompts (their per-dataset templates, e.g. 'a photo of the number:
  "{}".' for MNIST, are not copied).

Both methods need the task's class prompts and (ZSCL) the reference set, which ``kdzoo clip continual`` hands
them (`PromptFineTuning.bind`); under ``kdzoo clip distill`` they stop at the first step with a ConfigError.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ....errors import ConfigError
from ....registry import NonNegative, NonNegativeInt, Positive, UnitInterval, register_clip_method
from ..data import PairSplit, epoch_order
from ..losses import l2_weight_consolidation_loss, weight_ensemble_update, zscl_distillation_loss
from ..method_base import ClipBatch, ClipMethod
from ..models import ClipOutputs

PAPER = ("Zheng et al. 2023, Preventing Zero-Shot Transfer Degradation in Continual Learning of Vision-Language "
         "Models (ZSCL, ICCV); code github.com/Thunderbeee/ZSCL")
REFERENCE_SALT = 104_729  # the reference images' order differs from the training shuffle of the same seed
TEXT_CHUNK = 256  # reference texts embedded at once


def prompt_cross_entropy(image_embeds: torch.Tensor, prompt_embeds: torch.Tensor, logit_scale: torch.Tensor | float,
                         labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """ZSCL's task loss: cross-entropy of the logits ``z = s I P^T`` (normalised image embeddings `I` (B, D), one
    normalised prompt embedding per class `P` (C, D), scale `s`) against `labels`, with label smoothing eps:
    ``mean_i [ -(1 - eps) log p_i[y_i] - (eps / C) sum_c log p_i[c] ]``, p = softmax(z)
    (``F.cross_entropy(..., label_smoothing=eps)``; mtil/src/models/finetune.py lines 223-224)."""
    return F.cross_entropy(logit_scale * image_embeds @ prompt_embeds.T, labels, label_smoothing=label_smoothing)


@functools.lru_cache(maxsize=1)
def _pass_order(size: int, seed: int, index: int) -> torch.Tensor:
    return epoch_order(size, seed + REFERENCE_SALT, index)  # one permutation per pass, not per step


def reference_rows(size: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The reference images of `step`: the reference set is read in passes, each a permutation seeded by
    (seed, pass) cut into consecutive batches of `batch_size`, the last one shorter when it does not divide."""
    per_pass = -(-size // batch_size)
    order = _pass_order(size, seed, step // per_pass)
    start = (step % per_pass) * batch_size
    return order[start:start + batch_size]


def _unit(embeds: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """L2-normalised rows in `dtype` (the outputs' float32 under bf16 autocast)."""
    return F.normalize(embeds.to(dtype), dim=-1)


@dataclass
class ReferenceSet:
    """ZSCL's reference data: the images of `images` (a split; its captions and labels are not used) and the
    frozen initial model's tokens of the reference texts."""

    images: PairSplit
    text_ids: torch.Tensor
    text_mask: torch.Tensor

    def __post_init__(self):
        if len(self.images) == 0 or len(self.text_ids) == 0:
            raise ConfigError(f"reference: needs images and texts, got {len(self.images)} images and "
                              f"{len(self.text_ids)} texts")


@register_clip_method("finetune", paper=PAPER, family="continual",
                      scope="the fine-tuning baseline of ZSCL's code (mtil/scripts/finetune.sh): cross-entropy over "
                            "one prompt per class with label smoothing, logit scale frozen; kdzoo clip continual",
                      description="cross-entropy of the image embeddings against the task's class prompts (CLIP "
                                  "fine-tuning on a classification task, the continual-learning baseline)")
class PromptFineTuning(ClipMethod):
    """The task's classification loss alone (see the module).

    Options:
        label_smoothing: label smoothing of the cross-entropy over the class prompts (ZSCL's scripts: 0.2)
    """

    needs_teacher = False
    all_templates = False  # the prompts bound: the first template's (ZSCL's `dataset.template`)

    def __init__(self, label_smoothing: UnitInterval = 0.2):
        super().__init__()
        self.label_smoothing = label_smoothing
        self.prompt_tokens: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.step: Optional[int] = None  # the step of the last loss: the update `after_update` follows

    def attach(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        super().attach(student, teacher)
        student.logit_scale.requires_grad_(False)  # ZSCL's code leaves it out of the optimizer

    def bind(self, prompt_tokens: tuple[torch.Tensor, torch.Tensor], reference: Optional[ReferenceSet], seed: int,
             device: torch.device, steps_per_epoch: int = 0) -> None:
        """The task's prompts in class order ((ids, mask) for the student's tokenizer: one per class, (C, L), or
        every template's, (C, T, L), for a method whose `all_templates` is true), the reference set, and the
        optimizer steps of an epoch; called by the continual step after `attach`, before training."""
        self.prompt_tokens = tuple(t.to(device) for t in prompt_tokens)
        self.steps_per_epoch = steps_per_epoch

    def prompt_loss(self, batch: ClipBatch, student_out: ClipOutputs) -> torch.Tensor:
        if self.prompt_tokens is None:
            raise ConfigError(f"method {self.registry_name}: needs the task's class prompts, which kdzoo clip "
                              "continual gives it; run it with kdzoo clip continual")
        prompts = _unit(self.student.encode_text(*self.prompt_tokens), student_out.image_embeds.dtype)
        return prompt_cross_entropy(student_out.image_embeds, prompts, student_out.logit_scale, batch.labels,
                                    self.label_smoothing)

    def loss(self, batch: ClipBatch, student_out: ClipOutputs, teacher_out: Optional[ClipOutputs],
             step: int) -> dict[str, torch.Tensor]:
        self.step = step
        return {"ce": self.prompt_loss(batch, student_out)}

    def after_update(self) -> None:
        """After the optimizer step that followed `loss` (nothing to do here)."""

    def evaluated_model(self) -> nn.Module:
        """The model evaluated and exported: the trained one."""
        return self.student


@register_clip_method("zscl", paper=PAPER, family="continual",
                      scope="ZSCL's MTIL recipe (mtil/scripts/ZSCL.sh): prompt cross-entropy, reference-set "
                            "distillation from the frozen initial model (image and text sides), weight ensemble, "
                            "L2 consolidation; the reference set is the run's (ours); kdzoo clip continual",
                      description="fine-tuning on the class prompts while distilling the initial model's "
                                  "image-text distributions on reference data, with a weight ensemble")
class ZSCL(PromptFineTuning):
    """ZSCL (see the module): the frozen initial model is the run's teacher (``kdzoo clip continual``'s initial
    model).

    Options:
        label_smoothing: label smoothing of the cross-entropy over the class prompts (ZSCL.sh: 0.2)
        distillation_weight: weight of the reference-set distillation, image and text sides together (1:
            --image_loss --text_loss without --weight_adjust)
        temperature: temperature T of the distillation (args.py --T 2)
        average_every: steps between updates of the weight ensemble (ZSCL.sh --avg_freq 100); 0: no ensemble
        l2_weight: weight of the L2 distance to the task's starting weights (ZSCL.sh --l2 1)
        reference_batch_size: reference images per step (0: as many as the training batch, their one --batch-size)
    """

    def __init__(self, label_smoothing: UnitInterval = 0.2, distillation_weight: NonNegative = 1.0,
                 temperature: Positive = 2.0, average_every: NonNegativeInt = 100, l2_weight: NonNegative = 1.0,
                 reference_batch_size: NonNegativeInt = 0):
        super().__init__(label_smoothing)
        self.distillation_weight, self.temperature = distillation_weight, temperature
        self.average_every, self.l2_weight = average_every, l2_weight
        self.reference_batch_size = reference_batch_size
        self.ensemble: Optional[nn.Module] = None
        self.reference: Optional[ReferenceSet] = None
        self.seed = 0
        self.reference_texts: Optional[torch.Tensor] = None  # the frozen model's, computed at the first step

    def attach(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        super().attach(student, teacher)
        if teacher is None and self.distillation_weight:
            raise ConfigError("method zscl: distils from the frozen initial model, and none was given")
        if self.average_every:  # part of the run's state: a resumed run continues the same average
            self.ensemble = copy.deepcopy(student).requires_grad_(False)
        anchor = {name: p.detach().clone() for name, p in student.named_parameters() if p.requires_grad}
        self.__dict__["anchor"] = anchor if self.l2_weight else {}  # the start, rebuilt identically on resume

    def bind(self, prompt_tokens: tuple[torch.Tensor, torch.Tensor], reference: Optional[ReferenceSet], seed: int,
             device: torch.device, steps_per_epoch: int = 0) -> None:
        super().bind(prompt_tokens, reference, seed, device, steps_per_epoch)
        if self.distillation_weight:
            if reference is None:
                raise ConfigError("reference: zscl distils on a reference set of images and texts; set "
                                  "reference.data (or method.distillation_weight=0)")
            self.teacher.to(device)
        self.reference, self.seed = reference, seed
        self.__dict__["anchor"] = {name: t.to(device) for name, t in self.anchor.items()}

    def frozen_reference_texts(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The frozen initial model's normalised embeddings of every reference text (computed once)."""
        if self.reference_texts is None:
            ids, mask = self.reference.text_ids, self.reference.text_mask
            with torch.no_grad():
                parts = [self.teacher.encode_text(ids[i:i + TEXT_CHUNK].to(device), mask[i:i + TEXT_CHUNK].to(device))
                         for i in range(0, len(ids), TEXT_CHUNK)]
            self.reference_texts = _unit(torch.cat(parts), dtype)
        return self.reference_texts

    def distillation(self, step: int, batch_size: int, student_out: ClipOutputs) -> torch.Tensor:
        """`losses.zscl_distillation_loss` on the reference batch of `step`."""
        size = self.reference_batch_size or batch_size
        dtype, scale = student_out.image_embeds.dtype, student_out.logit_scale
        images = self.reference.images.images_at(reference_rows(len(self.reference.images), size, self.seed, step))
        images = images.to(scale.device)
        current = _unit(self.student.encode_image(images), dtype)
        with torch.no_grad():
            frozen = _unit(self.teacher.encode_image(images), dtype)
        return zscl_distillation_loss(current, frozen, self.frozen_reference_texts(images.device, dtype), scale,
                                      self.temperature)

    def loss(self, batch: ClipBatch, student_out: ClipOutputs, teacher_out: Optional[ClipOutputs],
             step: int) -> dict[str, torch.Tensor]:
        terms = super().loss(batch, student_out, teacher_out, step)
        if self.l2_weight:
            weights = {name: p for name, p in self.student.named_parameters() if name in self.anchor}
            terms["l2"] = self.l2_weight * l2_weight_consolidation_loss(weights, self.anchor)
        if self.distillation_weight:
            terms["distillation"] = self.distillation_weight * self.distillation(step, len(batch.images),
                                                                                 student_out)
        return terms

    def after_update(self) -> None:
        """Fold the weights just updated into the ensemble when the step is a multiple of `average_every`; the
        ensemble then holds its start and the weights after steps 0, A, ..., so it already counts
        1 + step // A models (their ``we_n``)."""
        if self.ensemble is None or self.step is None or self.step % self.average_every:
            return
        count = 1 + self.step // self.average_every
        self.ensemble.load_state_dict(weight_ensemble_update(self.ensemble.state_dict(), self.student.state_dict(),
                                                             count))

    def evaluated_model(self) -> nn.Module:
        """The weight ensemble (the trained model without one), as their code evaluates and saves."""
        return self.ensemble if self.ensemble is not None else self.student


__all__ = ["PromptFineTuning", "ZSCL", "ReferenceSet", "prompt_cross_entropy", "reference_rows"]
