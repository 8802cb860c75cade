"""DeiT: Touvron et al. 2021, "Training data-efficient image transformers & distillation through attention";
DeiT-LT: Rangwani et al. 2024, "DeiT-LT: Distillation Strikes Back for Vision Transformer Training on Long-Tailed
Datasets".

The student is a ViT with a distillation token (``vit:*`` with ``distillation_token: true``): the class head
learns from the labels (the Distiller's cross-entropy, weight 1 - alpha) and the distillation head, read here
through its tap ``head_dist``, from the teacher (weight alpha).  At inference the model averages both heads.
Losses follow facebookresearch/deit ``losses.py`` (DistillationLoss): hard = cross-entropy with the teacher's
argmax; soft = KL at temperature T, summed and divided by the number of logits (batch x classes), times T^2;
alpha 0.5 and T 1 are its defaults (``--distillation-alpha``, ``--distillation-tau``).

DeiT-LT re-weights the distillation head's loss toward tail classes with the class-balanced weights of Cui et
al. 2019 (effective number of samples, beta 0.9999) by the class the teacher predicts, switched on from a
chosen epoch (deferred re-weighting, LDAM-DRW's schedule which DeiT-LT follows).  The class counts are those
of the training labels the Distiller passes in `Setup.train_labels`.

``deit_lt`` is DeiT-LT whole, as val-iisc/DeiT-LT (commit bc36970) has it; its three parts:

- re-weighted hard distillation (this module): the DIST head's cross-entropy with the teacher's argmax, weighted
  by class (``F.cross_entropy(..., weight=per_cls_weights)``, torch's weighted mean; losses.py lines 97-108),
  weights ``(1 - beta) / (1 - beta^n_c)`` scaled to sum to the class count, beta 0.9999 (main.py lines 97-101,
  arguments.py line 422); plain before the DRW epoch and weighted from it (main.py lines 329-334 and 421-474:
  ``epoch >= args.drw``); alpha 0.5 for the DIST head and 1 - alpha for the CLS head (losses.py line 110,
  arguments.py line 310).  The CIFAR-LT scripts train 1200 epochs with ``--drw 1100`` (sh/train_c10_if100.sh
  lines 4, 17, 22; ImageNet-LT: 1400 and 1200), hence ``reweight_from_epoch`` 1100: set it for a shorter run.
- out-of-distribution distillation: every batch goes through timm's Mixup/CutMix (mixup 0.8, cutmix 1.0, prob 1,
  switch 0.5, per batch, label smoothing 0.1: arguments.py lines 208-210 and 250-292, main.py lines 158-172), the
  CLS head takes SoftTargetCrossEntropy (main.py lines 236-238), and the teacher labels the same mixed images
  (engine.py lines 97-101 and 161, ``samples_teacher = samples_student``).  The CIFAR scripts stop mixing at the
  DRW epoch (``--no-mixup-drw``, engine.py lines 131-136; the CLS head then takes plain cross-entropy, main.py
  lines 458-459); ImageNet-LT keeps it.  In kdzoo this is the training option ``train.mixup`` (its defaults are
  these; ``until_epoch`` is --no-mixup-drw), which the recipe turns on (configs/examples/deit_lt_digits.yaml):
  a method cannot mix the batch the teacher sees.  The student's images are also augmented with timm's
  RandAugment rand-m9-mstd0.5-inc1, colour jitter 0.3 and random erasing 0.25 (datasets.py lines 597-610):
  ``data.options.rand_augment: true`` on the uint8 datasets is torchvision's RandAugment with 2 operations at
  magnitude 9 (no magnitude noise, no colour jitter or erasing: our reading).  The teacher sees the student's
  view: ``teacher_transform`` is built (datasets.py lines 456-461) but never applied (lines 213-215, 294-296),
  so there is no teacher-only view to support.
- a flat teacher trained with SAM: DeiT-LT ships no teacher training, only checkpoints of PaCo + SAM ResNets
  (README).  Its authors' SAM is val-iisc/Saddle-LongTail's ``sam.py`` (SGD base, momentum 0.9, weight decay
  2e-4, cifar_train_sam.py lines 56-62 and 140) with rho 0.1 for plain cross-entropy on CIFAR-10-LT (run.sh line
  7; 0.5 with DRW, 0.8 with LDAM-DRW); in kdzoo ``train.sam_rho`` / ``train.sam_adaptive`` of any ``kdzoo
  teacher`` run (kdzoo.engine.sam; configs/examples/teacher_digits_sam.yaml).  PaCo's loss is not in kdzoo: our
  teacher is trained with cross-entropy.
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

from ...errors import ConfigError
from ...registry import Fraction, NonNegative, Positive, register_method
from ..base import Context, Method, Setup

__all__ = ["deit_hard_loss", "deit_soft_loss", "effective_number_weights", "DeiT", "DeiTLT"]


def deit_hard_loss(dist_logits: torch.Tensor, teacher_logits: torch.Tensor,
                   class_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Cross-entropy of the distillation head with the teacher's top-1 class as the label; with `class_weights`
    torch's weighted mean (sum of w[y_i] * ce_i over sum of w[y_i])."""
    return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=1), weight=class_weights)


def deit_soft_loss(dist_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                   class_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(teacher_T || student_T) summed, divided by batch x classes, times T^2 (DeiT's normalisation).
    `class_weights` weigh each sample by the teacher's top-1 class (a weighted mean over the batch)."""
    log_p_student = F.log_softmax(dist_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    per_sample = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=1)
    if class_weights is None:
        mean = per_sample.mean()
    else:
        w = class_weights[teacher_logits.argmax(dim=1)]
        mean = (w * per_sample).sum() / w.sum()
    return mean / dist_logits.shape[1] * temperature ** 2


def effective_number_weights(labels: torch.Tensor, num_classes: int, beta: float = 0.9999) -> torch.Tensor:
    """Class-balanced weights (Cui et al. 2019): (1 - beta) / (1 - beta^n_c), scaled to sum to the class count.
    Negative labels (unlabelled samples) are not counted; an absent class counts as one sample."""
    counts = torch.bincount(labels[labels >= 0].long(), minlength=num_classes)[:num_classes].clamp(min=1)
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts.double()))
    return (weights / weights.sum() * num_classes).float()


@register_method("deit", family="scheme", cross_arch=True,
                 description="ViT distillation token learns the teacher",
                 layers="the student's head_dist (distillation token head)",
                 paper="Touvron et al. 2021, DeiT; tail re-weighting: Rangwani et al. 2024, DeiT-LT",
                 student={"name": "vit:nano", "options": {"distillation_token": True}})  # its student
class DeiT(Method):
    """``distillation``: hard (the paper's best) or soft; ``weight``: alpha (the class head's cross-entropy gets
    1 - alpha through ``ce_weight``, 0.5 by default); ``student_layer``: the distillation head's tap.
    ``tail_weighting: effective_number`` turns on DeiT-LT's re-weighting from ``reweight_from_epoch``.

    Options:
        distillation: hard (the teacher's argmax as label) or soft (KL to the teacher's softmax)
        weight: alpha, the distillation head's share (the class head's cross-entropy gets ce_weight)
        temperature: softmax temperature of soft distillation
        student_layer: tap of the distillation head's logits
        tail_weighting: none, or effective_number (DeiT-LT: class weights from effective sample counts)
        beta: the effective-number decay of tail weighting
        reweight_from_epoch: epoch from which the tail weighting applies
    """

    ce_weight = 0.5

    def __init__(self, distillation: Literal["hard", "soft"] = "hard", weight: NonNegative = 0.5,
                 temperature: Positive = 1.0, student_layer: str = "head_dist",
                 tail_weighting: Literal["none", "effective_number"] = "none", beta: Fraction = 0.9999,
                 reweight_from_epoch: NonNegative = 0.0):
        super().__init__()
        self.distillation = distillation
        self.weight = weight
        self.temperature = temperature
        self.tail_weighting = tail_weighting
        self.beta = beta
        self.reweight_from_epoch = reweight_from_epoch
        self.student_taps = (student_layer,)
        self.register_buffer("class_weights", torch.ones(0), persistent=False)

    def build(self, setup: Setup) -> None:
        shape = setup.student_shapes[self.student_taps[0]]
        if tuple(shape[1:]) != (setup.num_classes,):
            raise ConfigError(f"student_layer {self.student_taps[0]!r} gives {list(shape)}, not logits over "
                              f"{setup.num_classes} classes: give the student a distillation head (vit: models: "
                              "distillation_token: true)")
        if self.tail_weighting == "effective_number":
            if setup.train_labels is None:
                raise ConfigError("tail_weighting needs the training labels to count classes")
            self.class_weights = effective_number_weights(setup.train_labels, setup.num_classes, self.beta)

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        dist_logits = ctx.student[self.student_taps[0]]
        weights = None
        if self.class_weights.numel():
            # deferred re-weighting: plain until `reweight_from_epoch`, as a tensor blend so a compiled step
            # never specialises on the epoch
            on = (torch.as_tensor(ctx.epoch, device=dist_logits.device) >= self.reweight_from_epoch).float()
            weights = on * self.class_weights.to(dist_logits.device) + (1 - on)
        if self.distillation == "hard":
            loss = deit_hard_loss(dist_logits, ctx.teacher_logits, weights)
        else:
            loss = deit_soft_loss(dist_logits, ctx.teacher_logits, self.temperature, weights)
        return {type(self).registry_name: self.weight * loss}  # deit, deit_lt


@register_method("deit_lt", family="scheme", cross_arch=True,
                 description="DeiT on mixed images, tail-weighted after DRW",
                 layers="the student's head_dist (distillation token head)",
                 paper="Rangwani et al. 2024, DeiT-LT: Distillation Strikes Back for Vision Transformer Training on "
                       "Long-Tailed Datasets",
                 scope="DeiT-LT's loss with its authors' defaults (val-iisc/DeiT-LT); its out-of-distribution images "
                       "are the recipe's train.mixup and data.options.rand_augment, its flat teacher a kdzoo teacher "
                       "run with train.sam_rho.  Our reading: torchvision's RandAugment (2 ops, magnitude 9) for "
                       "timm's rand-m9-mstd0.5-inc1 without colour jitter or random erasing, and a cross-entropy + "
                       "SAM teacher for the authors' PaCo + SAM checkpoints (their teacher training is not released)",
                 student={"name": "vit:nano", "options": {"distillation_token": True}})
class DeiTLT(DeiT):
    """DeiT with DeiT-LT's defaults: hard distillation, the distillation head re-weighted by effective numbers
    (beta 0.9999) from epoch 1100 of the authors' 1200 (``--drw 1100``; set it for a shorter run).  Turn on
    ``train.mixup`` (DeiT's Mixup/CutMix; ``until_epoch`` at the same epoch for the CIFAR scripts' --no-mixup-drw)
    so the teacher labels out-of-distribution images, and train the teacher with ``train.sam_rho``.

    Options:
        distillation: hard (the teacher's argmax as label, DeiT-LT's) or soft
        weight: alpha, the distillation head's share (the class head's cross-entropy gets ce_weight)
        temperature: softmax temperature of soft distillation
        student_layer: tap of the distillation head's logits
        tail_weighting: effective_number (DeiT-LT's class-balanced weights) or none
        beta: the effective-number decay of tail weighting
        reweight_from_epoch: the deferred re-weighting (DRW) epoch, 0-based, from which the weights apply
    """

    ce_weight = 0.5

    def __init__(self, distillation: Literal["hard", "soft"] = "hard", weight: NonNegative = 0.5,
                 temperature: Positive = 1.0, student_layer: str = "head_dist",
                 tail_weighting: Literal["none", "effective_number"] = "effective_number", beta: Fraction = 0.9999,
                 reweight_from_epoch: NonNegative = 1100.0):
        super().__init__(distillation, weight, temperature, student_layer, tail_weighting, beta, reweight_from_epoch)
