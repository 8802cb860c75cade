"""``train.mixup``: timm's Mixup/CutMix on each training batch, and the student's cross-entropy on the soft targets.

DeiT and DeiT-LT mix every training batch with ``timm.data.Mixup`` and give the class head timm's
SoftTargetCrossEntropy (val-iisc/DeiT-LT main.py lines 158-172 and 236-238, engine.py lines 97-101); the teacher
gets the same mixed images (engine.py line 161, ``samples_teacher = samples_student``): that is DeiT-LT's
out-of-distribution distillation, the CNN teacher labelling mixed images it never trained on.  Here the task mixes
the batch before the teacher's forward (`ClassificationTask.batches`), so every teacher, and every method, sees
the mixed images.

What the soft targets reach: the cross-entropy term (``ce``) alone, replaced by `soft_target_cross_entropy` with
the distiller's ce_weight.  Every other consumer of labels gets the argmax of the mixed target (the dominant
class): methods through ``ctx.labels`` and the training accuracy.  Methods that declare ``reads_labels`` (their
loss reads the labels) are refused instead, since a mixed image has no single label for them; so are students
trained as peers or stacked students' own losses other than ``ce`` (see `check_mixup`).

Each batch's draw is seeded by (seed, epoch, batch), with numpy's global generator (which timm's Mixup reads)
saved and restored around it, so a resumed run mixes exactly as the uninterrupted one.  timm's Mixup needs an
even batch: in an odd one the last sample stays unmixed, with its smoothed one-hot target.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...config import MixupConfig
from ...data import labels_of
from ...data.semi import UNLABELLED
from ...distiller import Distiller
from ...errors import ConfigError

CE_TERM = "ce"  # the Distiller's name for its cross-entropy on the labels


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean_i sum_c -targets_ic log softmax(logits_i)_c (timm's SoftTargetCrossEntropy)."""
    return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()


def split_targets(labels: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(hard labels, soft targets or None): mixed targets (B, classes) give their argmax as the labels; anything
    else (class indices, masks, a detector's list of box targets) passes through."""
    if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.is_floating_point():
        return labels.argmax(dim=1), labels
    return labels, None


def with_soft_targets(losses: dict[str, torch.Tensor], logits: torch.Tensor, targets: Optional[torch.Tensor],
                      ce_weight: float) -> dict[str, torch.Tensor]:
    """`losses` with the cross-entropy term on the soft `targets` (unchanged without targets)."""
    if targets is None or CE_TERM not in losses:
        return losses
    return {**losses, CE_TERM: ce_weight * soft_target_cross_entropy(logits, targets)}


def build_mixup(cfg: MixupConfig, num_classes: int) -> Any:
    """timm's Mixup for `cfg` (the optional extra kdzoo[timm])."""
    try:
        from timm.data import Mixup
    except ImportError:
        raise ConfigError("train.mixup needs timm, the optional extra: pip install 'kdzoo[timm]'") from None
    return Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.prob,
                 switch_prob=cfg.switch_prob, mode=cfg.mode, label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)


def mixing_seed(seed: int, epoch: int, batch: int) -> int:
    """The seed of one batch's mixing draw: a function of (seed, epoch, batch) alone."""
    return (seed * 1_000_003 + epoch * 100_003 + batch) % 2**32


class BatchMixer:
    """Mixes one training batch at a time (see the module docstring)."""

    def __init__(self, cfg: MixupConfig, num_classes: int, seed: int):
        self.cfg, self.num_classes, self.seed = cfg, num_classes, seed
        self.mixup = build_mixup(cfg, num_classes)

    def active(self, epoch: int) -> bool:
        return self.cfg.until_epoch is None or epoch < self.cfg.until_epoch

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, epoch: int,
                 batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed images, soft targets (B, classes), float32)."""
        images = images.clone()  # timm mixes in place
        even = len(labels) - len(labels) % 2
        state = np.random.get_state()
        np.random.seed(mixing_seed(self.seed, epoch, batch))
        try:
            head, head_targets = self.mixup(images[:even], labels[:even]) if even else (images[:0], None)
        finally:
            np.random.set_state(state)
        targets = self.smoothed(labels)
        if head_targets is not None:
            images[:even] = head
            targets[:even] = head_targets
        return images, targets

    def smoothed(self, labels: torch.Tensor) -> torch.Tensor:
        """One-hot targets with the label smoothing timm's mixup_target applies (off = s / C, on = 1 - s + s / C)."""
        off = self.cfg.label_smoothing / self.num_classes
        targets = torch.full((len(labels), self.num_classes), off, device=labels.device)
        return targets.scatter_(1, labels.long().view(-1, 1), 1.0 - self.cfg.label_smoothing + off)


def check_mixup(distillers: Sequence[Any], data: Any, teacher_cache: Any) -> None:
    """Refuse what mixing cannot serve: other labels than classes, unlabelled samples, students that are not
    plain `Distiller`s (peers: their cross-entropy terms are their own), methods whose loss reads the labels, and
    a teacher cache (its outputs are of the unmixed images)."""
    if data.task != "classification":
        raise ConfigError(f"train.mixup: mixing needs class labels, not {data.task} labels")
    if teacher_cache is not None:
        raise ConfigError("train.mixup: a teacher cache holds the teacher's outputs on unmixed images; train "
                          "without one")
    for k, distiller in enumerate(distillers):
        if not isinstance(distiller, Distiller):
            raise ConfigError(f"train.mixup: student {k} is a {type(distiller).__name__}; mixed targets reach the "
                              "cross-entropy of a plain Distiller only (not peers)")
        for name, method in distiller.methods.items():
            if method.reads_labels:
                raise ConfigError(f"train.mixup: method {name} reads every sample's label, which a mixed image does "
                                  "not have; train it without train.mixup")
    if bool((labels_of(data.train) == UNLABELLED).any()):
        raise ConfigError("train.mixup: some training samples are unlabelled (data.labelled_fraction < 1); mixing "
                          "needs every label")


__all__ = ["soft_target_cross_entropy", "split_targets", "with_soft_targets", "build_mixup", "BatchMixer",
           "check_mixup", "mixing_seed"]
