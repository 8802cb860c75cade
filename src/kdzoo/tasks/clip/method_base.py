"""What a CLIP distillation method supplies (`ClipMethod`); CLIP's own contrastive loss, which most methods keep
beside their distillation terms, is `losses.clip_contrastive_loss` (re-exported here).  Each method is one file in
`kdzoo.tasks.clip.methods`, registered with `register_clip_method` beside its defaults (``kdzoo methods --clip``)."""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .losses import clip_contrastive_loss
from .models import ClipOutputs


@dataclass
class ClipBatch:
    """One micro-batch: images in the dataset's normalisation, their captions as the student's tokens (and the
    teacher's, whose tokenizer may differ), the captions' indices in the pool, and class labels when the data has
    them."""

    images: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    caption_index: torch.Tensor
    labels: Optional[torch.Tensor] = None
    teacher_input_ids: Optional[torch.Tensor] = None
    teacher_attention_mask: Optional[torch.Tensor] = None


class ClipMethod(nn.Module, ABC):
    """A student dual encoder trained against a frozen teacher.  The task calls `attach` once, before any checkpoint
    is restored (extra modules built there are part of the run's state), then per micro-batch `loss` with the
    student's outputs and, when `needs_teacher`, the teacher's (computed without gradient).  `teacher_features` /
    `student_features` ask for the towers' hidden states in those outputs (``image_features``, ``text_features``)."""

    needs_teacher: bool = True
    teacher_features: bool = False
    student_features: bool = False

    def attach(self, student: nn.Module, teacher: Optional[nn.Module]) -> None:
        """The student (trained) and the teacher (frozen; None for a method that needs none)."""
        # plain attributes, not submodules: the student is checkpointed by the task, the teacher is no run state
        self.__dict__.update(student=student, teacher=teacher)

    def parameter_groups(self) -> list[dict]:
        """Extra modules trained with the student (e.g. projections into the teacher's width), as optimizer groups
        ``{"params": [...], "lr_scale": factor of train.lr, "weight_decay": ...}``; called after `attach`."""
        return []

    def student_context(self, batch: ClipBatch, step: int) -> contextlib.AbstractContextManager:
        """A context around the student's forward of one micro-batch (e.g. masked image patches, CLIP-KD's MFD)."""
        return contextlib.nullcontext()

    @abstractmethod
    def loss(self, batch: ClipBatch, student_out: ClipOutputs, teacher_out: Optional[ClipOutputs],
             step: int) -> dict[str, torch.Tensor]:
        """The weighted loss terms of one micro-batch (their sum is minimised)."""


__all__ = ["ClipMethod", "ClipBatch", "clip_contrastive_loss"]
