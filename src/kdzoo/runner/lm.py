"""``kdzoo lm train | distill``: one language-model run on the engine's Trainer, with the same run-folder rules
as every other run (the config compared before resuming, written before the first step)."""
from __future__ import annotations

from pathlib import Path

from ..config import save_config
from ..engine.distributed import Distributed
from ..engine.rundir import RUN_CONFIG
from ..engine.runtime import resolve_device
from ..engine.trainer import FitResult, LoopConfig, Run, Trainer
from ..tasks.lm.config import LMRunConfig
from ..tasks.lm.draft_task import FeatureDraftRunConfig, build_feature_draft_task
from ..tasks.lm.draft_task import loop_config as draft_loop_config
from ..tasks.lm.task import build_lm_task, loop_config
from .resume import report_changes, verify_resume_config


def _run(cfg, run_dir: Path, resume: bool, verbose: bool, build, loop: LoopConfig) -> FitResult:
    """One run of a task built by `build(device)` into `run_dir`, with the run-folder rules of every kdzoo run."""
    run_dir = Path(run_dir)
    notes = verify_resume_config(cfg, run_dir) if resume else []
    group = Distributed.from_env(cfg.train.device)
    try:
        task = build(group.device(resolve_device(cfg.train.device)))
    except BaseException:
        group.close()
        raise
    report_changes(notes, verbose)
    if group.is_main:
        save_config(cfg, run_dir / RUN_CONFIG)
    trainer = Trainer(task, loop, [Run(run_dir=run_dir)], resume=resume, verbose=verbose, group=group)
    return trainer.run()[0]


def run_lm(cfg: LMRunConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> FitResult:
    """Train `cfg.model` (alone, or from `cfg.teacher` with `cfg.losses`) into `run_dir`."""
    return _run(cfg, run_dir, resume, verbose, lambda device: build_lm_task(cfg, Path(run_dir), device),
                loop_config(cfg))


def run_feature_draft(cfg: FeatureDraftRunConfig, run_dir: Path, resume: bool = False,
                      verbose: bool = True) -> FitResult:
    """Train a feature draft head for `cfg.target` into `run_dir`."""
    return _run(cfg, run_dir, resume, verbose, lambda device: build_feature_draft_task(cfg, device),
                draft_loop_config(cfg))


__all__ = ["run_lm", "run_feature_draft"]
