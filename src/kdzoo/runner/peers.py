"""A run config with ``peers:`` -> students trained jointly (`kdzoo.tasks.classification.PeerDistiller`).

Student 0 is ``student:``, students 1.. are ``peers:``; each gets the run's ``methods:`` (its own instances)
and its own weights initialisation from the run's seed.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from ..config import RunConfig
from ..data import DataSplits
from ..engine.trainer import ConsoleLog, FitResult
from ..tasks.classification import PeerCallback, PeerDistiller, default_callbacks, task_class
from ..tasks.classification.peers import PeerConsoleLog
from ..tasks.dense import PredictionPictures, SegmentationTask
from .build import build_data, build_distiller, model_meta
from .plain import run_distiller


def build_peer_distiller(cfg: RunConfig, data: DataSplits, run_dir: Path | None = None) -> PeerDistiller:
    return PeerDistiller([build_distiller(dataclasses.replace(cfg, student=model, peers=[], teacher=None), data,
                                          run_dir) for model in (cfg.student, *cfg.peers)])


def train_peers(cfg: RunConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> FitResult:
    """`train_run` for a config with peers: the same checks before resuming, the plan of every student
    (plan.md), a console line per student per epoch, every student exported and drawn (curves.png)."""
    data = build_data(cfg.data, cfg.task)
    metas = [model_meta(model, data, cfg.data) for model in (cfg.student, *cfg.peers)]

    def callbacks(distiller: PeerDistiller) -> list:
        pictures = [PredictionPictures(distiller)] if issubclass(task_class(data), SegmentationTask) else []  # student 0
        defaults = default_callbacks(distiller, run_dir, metas[0], verbose, export=False)
        if verbose:  # each student's line right under the run's own
            after = next((i + 1 for i, c in enumerate(defaults) if isinstance(c, ConsoleLog)), len(defaults))
            defaults.insert(after, PeerConsoleLog([meta["model"] for meta in metas]))
        return [PeerCallback(metas), *defaults, *pictures]

    return run_distiller(cfg, run_dir, build_peer_distiller, resume=resume, verbose=verbose, data=data,
                         callbacks=callbacks)


__all__ = ["build_peer_distiller", "train_peers"]
