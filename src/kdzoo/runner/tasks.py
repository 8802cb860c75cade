"""One run of any task on the engine's Trainer, with the run-folder rules every kdzoo run follows: the config
compared with the run directory's before resuming (`kdzoo.runner.resume`), written before the first step."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..engine.distributed import Distributed
from ..engine.runtime import resolve_device
from ..engine.trainer import FitResult, LoopConfig, Run, Task, Trainer
from .resume import record_run_config, report_changes, verify_resume_config


def run_task(cfg: Any, run_dir: Path, resume: bool, verbose: bool, build: Callable[[torch.device], Task],
             loop: LoopConfig) -> FitResult:
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
        record_run_config(cfg, run_dir, resume)
    trainer = Trainer(task, loop, [Run(run_dir=run_dir)], resume=resume, verbose=verbose, group=group)
    return trainer.run()[0]


__all__ = ["run_task"]
