"""What a diffusion distillation method supplies (`DiffusionMethod`); each method is one file in
`kdzoo.tasks.diffusion.methods`, registered with `register_diffusion_method` beside its defaults."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ...engine.runtime import atomic_write
from ...errors import CheckpointError
from .models import sample


class DiffusionMethod(nn.Module):
    """A few-step student trained from a many-step teacher.  The task calls `attach` once (before any
    checkpoint is restored), then per optimizer step `loss` on a micro-batch of clean images in [-1, 1], and
    `after_step` after each update; `sample` draws the student's images with its own sampler.  Anything the method
    keeps across steps (an EMA target, the current teacher of a round) is a submodule or buffer, so the run's
    checkpoint holds it and a resume is exact."""

    student_steps: int = 1  # sampling steps the student is trained for (and evaluated at by default)
    # submodules the student's sampler needs besides the UNet (e.g. an extra time embedding): saved beside the
    # pipeline as method.safetensors and loaded back by `kdzoo diffusion eval / sample`
    exported_modules: tuple[str, ...] = ()
    max_sampling_steps: Optional[int] = None  # a generator that only reads pure noise (BOOT) samples in 1 step

    def prepare_student(self, student: nn.Module, teacher: nn.Module, scheduler: Any, images: torch.Tensor,
                        labels: torch.Tensor) -> nn.Module:
        """The network to train, built before `attach` from the default student (a copy of the teacher or the
        config's `model`) and the training images in [-1, 1]; e.g. a pruned copy.  Must give the same network on
        a resume (deterministic in the data and options)."""
        return student

    def parameter_groups(self) -> list[dict]:
        """Extra networks trained with the student (e.g. SwiftBrush's score model), as optimizer groups
        ``{"params": [...], "lr_scale": factor of train.lr}``; called after `attach`."""
        return []

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


METHOD_FILE = "method.safetensors"


def save_method_modules(method: DiffusionMethod, run_dir: Path) -> None:
    """The method's `exported_modules` as ``run_dir/method.safetensors`` (nothing when it has none)."""
    if not method.exported_modules:
        return
    tensors = {f"{name}.{key}": value.detach().cpu().contiguous()
               for name in method.exported_modules for key, value in getattr(method, name).state_dict().items()}
    atomic_write(Path(run_dir) / METHOD_FILE, lambda tmp: save_file(tensors, str(tmp)))


def load_method_modules(method: DiffusionMethod, run_dir: Path) -> None:
    """Load what `save_method_modules` wrote into an attached method (an error naming the file when absent)."""
    if not method.exported_modules:
        return
    path = Path(run_dir) / METHOD_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the student's sampler needs its "
                              f"{', '.join(method.exported_modules)} (written at the end of kdzoo diffusion distill)")
    tensors = load_file(str(path))
    for name in method.exported_modules:
        prefix = f"{name}."
        getattr(method, name).load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
