"""The top floor: configs to runs.  A plain run, staged runs, rounds, peers and language-model runs, each on the
engine's Trainer through its task; the checks before resuming; ``kdzoo eval``; the demo."""
from __future__ import annotations

from pathlib import Path

from ..config import RunConfig
from ..engine.trainer import FitResult
from .build import build_data, build_distiller, build_methods, build_model, load_weights, model_meta
from .evaluate import evaluate_target, load_target
from .diffusion import run_diffusion, run_diffusion_distill
from .tasks import run_task
from .lm import run_feature_draft, run_lm
from .peers import train_peers
from .plain import record_summary, run_distiller, teacher_run, teacher_run_accuracy
from .resume import RESUMABLE, verify_checkpoint, verify_resume_config
from .rounds import train_rounds
from .stages import stage_dir, train_stages


def train_run(cfg: RunConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> FitResult:
    """``kdzoo train``: the run a config describes (stages, peers, rounds, or one plain run)."""
    if cfg.stages:
        return train_stages(cfg, run_dir, resume, verbose)
    if cfg.peers:  # students teaching each other
        return train_peers(cfg, run_dir, resume=resume, verbose=verbose)
    if cfg.rounds > 1:  # a student retrained in rounds, each taught by the previous one
        return train_rounds(cfg, run_dir, resume=resume, verbose=verbose)
    return run_distiller(cfg, run_dir, build_distiller, resume=resume, verbose=verbose)


__all__ = ["train_run", "run_distiller", "teacher_run", "run_lm", "run_feature_draft", "run_diffusion", "run_diffusion_distill", "run_task", "train_stages", "train_peers", "train_rounds",
           "evaluate_target", "load_target", "build_data", "build_model", "build_methods", "build_distiller", "load_weights",
           "model_meta", "record_summary", "teacher_run_accuracy", "verify_resume_config", "verify_checkpoint",
           "stage_dir", "RESUMABLE"]
