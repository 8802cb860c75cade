"""A staged run (``stages:`` in a run config): each stage a plain run in its own folder whose student starts from
the previous stage's exported weights (G2SD's generic then specific distillation, DMAE's masked pre-training then
fine-tuning).  The run's folder holds the last stage's student, every stage's plan (plan.md) and every stage's
curves one after the other (curves.png)."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..config import RunConfig
from ..engine.rundir import CHECKPOINT
from ..engine.runtime import atomic_write, is_main_process
from ..engine.trainer import FitResult
from .build import build_distiller
from .plain import record_parts, run_distiller
from .resume import record_run_config, report_changes, verify_resume_config

STAGES_DIR = "stages"


def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    """Where stage `index` of a staged run keeps its checkpoint, config, metrics and weights."""
    return Path(run_dir) / STAGES_DIR / f"{index}-{name}"


def train_stages(cfg: RunConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> FitResult:
    """Run the stages in order; the last stage's weights are copied to the run directory.  With `resume` a stage
    that has a checkpoint continues from it (a finished one only re-exports), the others start afresh."""
    notes = verify_resume_config(cfg, run_dir) if resume else []
    report_changes(notes, verbose)
    if is_main_process():
        record_run_config(cfg, run_dir, resume)
    weights, result = cfg.student.weights, None
    for i, stage in enumerate(cfg.stages):
        folder = stage_dir(run_dir, i, stage.name)
        folder.mkdir(parents=True, exist_ok=True)
        if verbose:
            print(f"stage {i + 1}/{len(cfg.stages)}: {stage.name} ({folder})")
        stage_cfg = cfg.stage_config(i, weights if i else None)
        result = run_distiller(stage_cfg, folder, build_distiller, resume=resume and (folder / CHECKPOINT).is_file(),
                               verbose=verbose)
        weights = str(folder / "student.safetensors")
    if is_main_process():  # the run directory's weights are the last stage's student
        atomic_write(run_dir / "student.safetensors", lambda tmp: shutil.copyfile(weights, tmp))
        record_parts(run_dir, [(f"stage {i + 1}/{len(cfg.stages)}: {stage.name}", stage_dir(run_dir, i, stage.name))
                               for i, stage in enumerate(cfg.stages)], "stages")
    result.run_dir = run_dir
    return result


__all__ = ["train_stages", "stage_dir", "STAGES_DIR"]
