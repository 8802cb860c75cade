"""``kdzoo diffusion teacher | distill``: one diffusion run on the engine's Trainer."""
from __future__ import annotations

from pathlib import Path

from ..engine.trainer import FitResult
from ..tasks.diffusion.config import DiffusionDistillConfig, DiffusionRunConfig
from ..tasks.diffusion.task import build_diffusion_task, build_distill_task, loop_config
from .tasks import run_task


def run_diffusion(cfg: DiffusionRunConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> FitResult:
    """Train `cfg.model` to denoise `cfg.data` into `run_dir` (a diffusers pipeline folder at the end)."""
    return run_task(cfg, run_dir, resume, verbose, lambda device: build_diffusion_task(cfg, device),
                    loop_config(cfg))



def run_diffusion_distill(cfg: DiffusionDistillConfig, run_dir: Path, resume: bool = False,
                          verbose: bool = True) -> FitResult:
    """Distil a few-step student from `cfg.teacher` with `cfg.method` into `run_dir`."""
    return run_task(cfg, run_dir, resume, verbose, lambda device: build_distill_task(cfg, device), loop_config(cfg))


__all__ = ["run_diffusion", "run_diffusion_distill"]
