"""A run config with ``peers:`` -> students trained jointly (`kdzoo.train.peers.PeerDistiller`).

Student 0 is ``student:``, students 1.. are ``peers:``; each gets the run's ``methods:`` (its own instances)
and its own weights initialisation from the run's seed.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from .config import RunConfig, save_config
from .data import DataSplits
from .runner import (RUN_CONFIG, build_data, build_distiller, model_meta, verify_checkpoint, verify_resume_config)
from .runtime import seed_everything
from .train import FitResult, fit
from .train.peers import PeerCallback, PeerDistiller
from .train.trainer import default_callbacks


def build_peer_distiller(cfg: RunConfig, data: DataSplits, run_dir: Path | None = None) -> PeerDistiller:
    models = [cfg.student, *cfg.peers]
    distillers = []
    for k, model in enumerate(models):
        one = dataclasses.replace(cfg, student=model, peers=[], teacher=None)
        distillers.append(build_distiller(one, data, run_dir))
    return PeerDistiller(distillers)


def train_peers(cfg: RunConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> FitResult:
    """`train_run` for a config with peers: the same checks before resuming, every student exported."""
    notes = verify_resume_config(cfg, run_dir) if resume else []
    data = build_data(cfg.data)
    seed_everything(cfg.train.seed)  # initial weights depend on the seed alone
    distiller = build_peer_distiller(cfg, data, run_dir)
    if resume:
        verify_checkpoint(run_dir, {"student": distiller.student, "methods": distiller.methods}, cfg.train.epochs)
    main_process = int(os.environ.get("RANK", "0")) == 0
    if verbose:
        for note in notes:
            print(f"resume: {note}")
    if main_process:
        save_config(cfg, run_dir / RUN_CONFIG)
    metas = [model_meta(model, data, cfg.data) for model in (cfg.student, *cfg.peers)]
    callbacks = [PeerCallback(metas), *default_callbacks(run_dir, None, verbose)]
    return fit(distiller, data, cfg.train, run_dir, resume=resume, verbose=verbose, callbacks=callbacks)


__all__ = ["build_peer_distiller", "train_peers"]
