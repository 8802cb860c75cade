"""``kdzoo lm train | distill``: one language-model run on the engine's Trainer, with the same run-folder rules
as every other run (the config compared before resuming, written before the first step)."""
from __future__ import annotations

from pathlib import Path

from ..engine.trainer import FitResult
from ..tasks.lm.config import LMRunConfig
from ..tasks.lm.draft_task import FeatureDraftRunConfig, build_feature_draft_task
from ..tasks.lm.draft_task import loop_config as draft_loop_config
from ..tasks.lm.task import build_lm_task, loop_config
from .tasks import run_task


def run_lm(cfg: LMRunConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> FitResult:
    """Train `cfg.model` (alone, or from `cfg.teacher` with `cfg.losses`) into `run_dir`."""
    return run_task(cfg, run_dir, resume, verbose, lambda device: build_lm_task(cfg, Path(run_dir), device),
                    loop_config(cfg))


def run_feature_draft(cfg: FeatureDraftRunConfig, run_dir: Path, resume: bool = False,
                      verbose: bool = True) -> FitResult:
    """Train a feature draft head for `cfg.target` into `run_dir`."""
    return run_task(cfg, run_dir, resume, verbose, lambda device: build_feature_draft_task(cfg, device),
                    draft_loop_config(cfg))


__all__ = ["run_lm", "run_feature_draft"]
