"""Running a condenser: its outer iterations with a progress bar, atomic checkpoints and exact resume, and the
final set (with a committee's soft labels when asked for)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm import tqdm

from ..engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from ..engine.stopping import stop_requests
from ..errors import ConfigError, TrainingDiverged
from .base import Condenser, SyntheticSet, build_condenser, jsonable
from .soft_labels import committee_soft_labels


def final_set(condenser: Condenser) -> SyntheticSet:
    """The condenser's synthetic set; with `committee_labels`, labelled by a committee's vote on the final
    images (fixed soft labels, not per batch)."""
    synthetic = condenser.result()
    if condenser.committee_labels:
        synthetic.labels = committee_soft_labels(condenser, condenser.final_images().detach().clone()).cpu()
    return synthetic


# Options that may change between a run and its resume.
RESUMABLE_CHANGES = ("iterations", "device")


def run_condenser(condenser: Condenser, checkpoint: Optional[str | Path] = None, checkpoint_every: int = 0,
                  resume: bool = False, progress: bool = True) -> SyntheticSet:
    """Run the outer iterations with a progress bar; every `checkpoint_every` iterations (and at the end)
    write an atomic checkpoint; `resume` continues from it exactly (images, optimizers, RNG)."""
    name = condenser.registry_name
    condenser.progress = progress
    start = 0
    if resume:
        if checkpoint is None:
            raise ConfigError(f"{name}: resume needs a checkpoint path")
        state = load_checkpoint(checkpoint)
        saved = {k: v for k, v in state["options"].items() if k not in RESUMABLE_CHANGES}
        now = {k: v for k, v in jsonable(condenser.options()).items() if k not in RESUMABLE_CHANGES}
        if state["method"] != name or saved != now:
            changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
            raise ConfigError(f"{checkpoint}: written by {state['method']!r} with other options "
                              f"({', '.join(changed) or 'method'}); resume with the same method and options")
        condenser.load_state_dict(state["condenser"])
        set_rng_state(state["rng"])
        start = state["iteration"]
    bar = tqdm(range(start, condenser.iterations), initial=start, total=condenser.iterations,
               desc=f"condense {name}", disable=not progress, dynamic_ncols=True)
    with stop_requests() as stop:  # SIGTERM / SIGINT: a checkpoint after this iteration, then stop
        for iteration in bar:
            loss = condenser.step()
            if not math.isfinite(loss):
                raise TrainingDiverged(f"{name}: the matching loss became {loss} at iteration {iteration}; "
                                       "lower lr_img (or lr_lr)")
            condenser.history.append(loss)
            recent = condenser.history[-20:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4g}", refresh=False)
            done = iteration + 1
            due = checkpoint_every and (done % checkpoint_every == 0 or done == condenser.iterations)
            if checkpoint and (due or stop.requested):
                save_condense_checkpoint(condenser, checkpoint, done)
            if stop.requested and done < condenser.iterations:
                saved = f"; the checkpoint is in {checkpoint}" if checkpoint else ""
                raise stop.interrupted(f"after iteration {done}/{condenser.iterations}{saved}")
    return final_set(condenser)


def save_condense_checkpoint(condenser: Condenser, path: str | Path, iteration: int) -> None:
    """The condenser's whole state after `iteration`, atomically; synthetic images that are not finite (a step
    can diverge without its loss showing it yet) are refused before anything is written."""
    state = condenser.state_dict()
    bad = [key for key, value in state.items()
           if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(value.isfinite().all())]
    if bad:
        raise TrainingDiverged(f"{condenser.registry_name}: {bad[0]} is not finite after iteration {iteration}; "
                               f"nothing was saved (an earlier checkpoint at {path} is intact); lower lr_img (or lr_lr)")
    save_checkpoint(path, {"method": condenser.registry_name, "options": jsonable(condenser.options()),
                           "iteration": iteration, "condenser": state, "rng": rng_state()})


def condense(method: str, data, ipc: int, *, checkpoint: Optional[str | Path] = None, checkpoint_every: int = 0,
             resume: bool = False, progress: bool = True, **options: Any) -> SyntheticSet:
    """Distil `data` (a `DataSplits`) into `ipc` synthetic images per class with a registered method."""
    condenser = build_condenser(method, data, ipc, **options)
    return run_condenser(condenser, checkpoint, checkpoint_every, resume, progress)


__all__ = ["run_condenser", "condense", "final_set", "save_condense_checkpoint", "RESUMABLE_CHANGES"]
