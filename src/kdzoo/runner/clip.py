"""``kdzoo clip teacher | distill``: one dual-encoder run on the engine's Trainer; ``kdzoo clip continual``: a
sequence of them, one per task."""
from __future__ import annotations

from pathlib import Path

from ..engine.trainer import FitResult
from ..tasks.clip.config import ClipDistillConfig, ClipRunConfig
from ..tasks.clip.continual import ClipContinualConfig, ForgettingTable, run_sequence
from ..tasks.clip.task import build_distill_task, build_teacher_task, loop_config
from .resume import record_run_config, report_changes, verify_resume_config
from .tasks import run_task


def run_clip_teacher(cfg: ClipRunConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> FitResult:
    """Train `cfg.model` contrastively on `cfg.data` into `run_dir`."""
    return run_task(cfg, run_dir, resume, verbose, lambda device: build_teacher_task(cfg, device), loop_config(cfg))


def run_clip_distill(cfg: ClipDistillConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> FitResult:
    """Train a student dual encoder against `cfg.teacher` with `cfg.method` into `run_dir`."""
    return run_task(cfg, run_dir, resume, verbose, lambda device: build_distill_task(cfg, device), loop_config(cfg))


def run_clip_continual(cfg: ClipContinualConfig, run_dir: Path, resume: bool = False,
                       verbose: bool = True) -> ForgettingTable:
    """Train `cfg.method` on `cfg.tasks` in order into `run_dir` (one run folder per step, each a kdzoo run with
    its own config and checkpoint); the forgetting table.  With `resume` a step that has a checkpoint continues."""
    report_changes(verify_resume_config(cfg, run_dir) if resume else [], verbose)
    record_run_config(cfg, Path(run_dir), resume)

    def run_step(step_cfg, folder, step_resume, build):
        return run_task(step_cfg, folder, step_resume, verbose, build, loop_config(step_cfg))

    return run_sequence(cfg, run_dir, resume, verbose, run_step)


__all__ = ["run_clip_teacher", "run_clip_distill", "run_clip_continual"]
