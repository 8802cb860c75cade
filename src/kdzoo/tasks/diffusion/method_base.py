"""What a diffusion distillation method supplies (`DiffusionMethod`); each method is one file in
`kdzoo.tasks.diffusion.methods`, registered with `register_diffusion_method` beside its defaults."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .models import sample


class DiffusionMethod(nn.Module):
    """A few-step student trained from a many-step teacher.  The task calls `attach` once (before any
    checkpoint is restored), then per optimizer step `loss` on a micro-batch of clean images in [-1, 1], and
    `after_step` after each update; `sample` draws the student's images with its own sampler.  Anything the method
    keeps across steps (an EMA target, the current teacher of a round) is a submodule or buffer, so the run's
    checkpoint holds it and a resume is exact."""

    student_steps: int = 1  # sampling steps the student is trained for (and evaluated at by default)

    def attach(self, student: nn.Module, teacher: nn.Module, scheduler: Any) -> None:
        """The student (trained), the teacher (frozen) and the forward process (a diffusers DDPMScheduler)."""
        # plain attributes, not submodules: the student is checkpointed by the task, the teacher is no run state
        self.__dict__.update(student=student, teacher=teacher, scheduler=scheduler)

    def loss(self, clean: torch.Tensor, labels: Optional[torch.Tensor], generator: torch.Generator,
             step: int) -> dict[str, torch.Tensor]:
        """The weighted loss terms of one micro-batch; random draws come from `generator` (CPU, seeded by the
        step) so a resumed run draws what the uninterrupted one did."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """After optimizer step `step` (0-based): e.g. an EMA update."""

    @torch.no_grad()
    def sample(self, labels: Optional[torch.Tensor], steps: int, generator: torch.Generator,
               count: Optional[int] = None) -> torch.Tensor:
        """The student's images in [-1, 1] with `steps` steps (DDIM by default)."""
        return sample(self.student, self.scheduler.config, labels, steps, generator, count)
