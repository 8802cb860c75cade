"""Hybrid sampling from "Distilling Diversity and Control in Diffusion Models" (Gandikota & Bau 2025): the base
(teacher) model takes the first step(s) of a distilled student's sampler, where the sample's layout and so its
diversity are decided, and the student takes the rest.  Works with any method's sampler: the network the sampler
calls is swapped for one that runs the teacher for its first `lead` evaluations, and the sampler reads that output
exactly as it reads the student's (same prediction type), e.g. a consistency sampler takes the teacher's clean-image
prediction at the first timestep and re-noises it."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...errors import ConfigError
from .method_base import DiffusionMethod


class LeadSwitch(nn.Module):
    """The teacher for the first `lead` calls, the student after; `.config` and `train()` are the student's (the
    teacher stays in eval mode)."""

    def __init__(self, teacher: nn.Module, student: nn.Module, lead: int):
        super().__init__()
        self.teacher, self.student, self.lead, self.calls = teacher, student, lead, 0

    @property
    def config(self):
        return self.student.config

    def train(self, mode: bool = True) -> "LeadSwitch":
        self.training = mode
        self.student.train(mode)
        return self

    def forward(self, *args, **kwargs):
        network = self.teacher if self.calls < self.lead else self.student
        self.calls += 1
        return network(*args, **kwargs)


@torch.no_grad()
def hybrid_sample(method: DiffusionMethod, teacher: nn.Module, lead: int, labels: Optional[torch.Tensor], steps: int,
                  generator: torch.Generator, count: Optional[int] = None) -> torch.Tensor:
    """The method's `steps`-step samples with the teacher making the first `lead` network evaluations."""
    if not 0 <= lead <= steps:
        raise ConfigError(f"--teacher-lead: {lead} teacher steps do not fit in {steps} sampling steps")
    student = method.student
    teacher.eval()
    method.__dict__["student"] = LeadSwitch(teacher, student, lead)
    try:
        return method.sample(labels, steps, generator, count)
    finally:
        method.__dict__["student"] = student


__all__ = ["LeadSwitch", "hybrid_sample"]
