"""``rounds: N`` in a run config: the student is trained N times, round r+1 taught by round r's student.

Round r lives in RUN_DIR/round_r (a complete run directory: config, metrics, checkpoints, student.safetensors).
Round 1 uses the config's teacher if it has one; without one it trains the student on the labels alone
(cross-entropy, no method), the "initial fit" of iterative self-distillation.  Round r >= 2 builds a fresh student
(seed train.seed + r - 1) and a teacher of the student's architecture loaded from RUN_DIR/round_{r-1}.  The last
round's student is copied to RUN_DIR/student.safetensors.

RUN_DIR/checkpoint.pt records the loop itself (rounds finished), so ``--resume`` finds the run: finished rounds
are kept, the unfinished one continues from its own checkpoint, later ones start.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from .config import ModelConfig, RunConfig, save_config
from .errors import ConfigError
from .runner import RUN_CONFIG, verify_resume_config
from .train import FitResult
from .train.checkpoint import load_checkpoint, save_checkpoint
from .train.trainer import CHECKPOINT, METRICS


def round_dir(run_dir: Path, r: int) -> Path:
    return Path(run_dir) / f"round_{r}"


def round_config(cfg: RunConfig, r: int, run_dir: Path) -> RunConfig:
    """The plain one-round config of round r (1-based)."""
    base = dataclasses.replace(cfg, rounds=1, name=None, output_dir=str(run_dir))
    if r == 1:
        if cfg.teacher is not None:
            return base
        return dataclasses.replace(base, methods=[], ce_weight=cfg.ce_weight if cfg.ce_weight is not None else 1.0)
    teacher = ModelConfig(cfg.student.name, str(round_dir(run_dir, r - 1)), dict(cfg.student.options))
    train = dataclasses.replace(cfg.train, seed=cfg.train.seed + r - 1)
    return dataclasses.replace(base, teacher=teacher, train=train,
                               student=dataclasses.replace(cfg.student, weights=None, init_from=None))


def round_finished(path: Path) -> bool:
    return (path / "student.safetensors").is_file() and (path / "summary.json").is_file()


def train_rounds(cfg: RunConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> FitResult:
    from .runner import train_run

    run_dir = Path(run_dir)
    main_process = int(os.environ.get("RANK", "0")) == 0
    if resume:
        verify_resume_config(cfg, run_dir)
        done = load_checkpoint(run_dir / CHECKPOINT).get("rounds_finished")
        if not isinstance(done, int):
            raise ConfigError(f"--resume: {run_dir / CHECKPOINT} is not the checkpoint of a run with rounds")
    elif main_process:
        save_config(cfg, run_dir / RUN_CONFIG)
    if main_process and not resume:
        save_checkpoint(run_dir / CHECKPOINT, {"rounds_finished": 0, "rounds": cfg.rounds})
    result = None
    for r in range(1, cfg.rounds + 1):
        path = round_dir(run_dir, r)
        if round_finished(path):
            continue
        if verbose:
            print(f"round {r}/{cfg.rounds} -> {path}")
        path.mkdir(parents=True, exist_ok=True)
        continuing = (path / CHECKPOINT).is_file()
        result = train_run(round_config(cfg, r, run_dir), path, resume=continuing, verbose=verbose)
        if main_process:
            save_checkpoint(run_dir / CHECKPOINT, {"rounds_finished": r, "rounds": cfg.rounds})
    last = round_dir(run_dir, cfg.rounds)
    if main_process:
        shutil.copyfile(last / "student.safetensors", run_dir / "student.safetensors")
        shutil.copyfile(last / "summary.json", run_dir / "summary.json")
        shutil.copyfile(last / METRICS, run_dir / METRICS)
    if result is None:  # every round had finished: report the last one
        summary = json.loads((last / "summary.json").read_text())
        result = FitResult(summary["last_top1"], summary["best_top1"], summary["best_epoch"], summary["last_top5"],
                        [], summary["seconds"], last)
    return result


__all__ = ["train_rounds", "round_config", "round_dir"]
