"""``kdzoo clip teacher | distill``: one dual-encoder run on the engine's Trainer."""
from __future__ import annotations

from pathlib import Path

from ..engine.trainer import FitResult
from ..tasks.clip.config import ClipDistillConfig, ClipRunConfig
from ..tasks.clip.task import build_distill_task, build_teacher_task, loop_config
from .tasks import run_task


def run_clip_teacher(cfg: ClipRunConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> FitResult:
    """Train `cfg.model` contrastively on `cfg.data` into `run_dir`."""
    return run_task(cfg, run_dir, resume, verbose, lambda device: build_teacher_task(cfg, device), loop_config(cfg))


def run_clip_distill(cfg: ClipDistillConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> FitResult:
    """Train a student dual encoder against `cfg.teacher` with `cfg.method` into `run_dir`."""
    return run_task(cfg, run_dir, resume, verbose, lambda device: build_distill_task(cfg, device), loop_config(cfg))


__all__ = ["run_clip_teacher", "run_clip_distill"]
