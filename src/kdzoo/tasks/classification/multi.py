"""Several students in one process: ``fit_many(distillers, data, cfg, run_dirs)``.

The students (different seeds, or different methods) share one teacher module and see the same batches,
so the teacher runs once per batch for all of them (`TeacherFeed`), its outputs passed to each distiller.  Each keeps its own optimizer state,
run directory, metrics, checkpoints and exports, in exactly the format `fit` writes, so any of them can be
continued alone with ``fit(..., resume=True)``.

Students of one architecture whose methods read only logits (no student taps, no trainable method
parameters, no init stage) are *stacked*: their parameters and buffers become one tensor with a leading
student dimension (`StackedModels`, the engine condense evaluation also uses), the K forwards become one
`torch.func.vmap` of `functional_call`, whose slices reach each Distiller as `student_logits`, the K backwards
one backward and the K optimizer steps one step over the stacks (SGD and AdamW act element-wise, so this is
the same update as K optimizers).  Each student's own modules are left holding views of their slice, so
evaluation, checkpoints and exports see their current values.  Other students are stepped one after another
on the shared teacher outputs.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from ...config import TrainConfig
from ...data import DataSplits
from ...distiller import Distiller
from ...engine.optim import LearningRate, OptimizerSlot, build_optimizer, load_optimizer_state, optimizer_state
from ...engine.stacked import StackedModels
from ...engine.step import TrainStep, mark_static
from ...engine.trainer import FitResult, StepGroup, Trainer
from ...errors import ConfigError
from .mixing import split_targets, with_soft_targets
from .task import ClassificationTask, FitOptions, has_init_stage, optimizer_spec, separate_steps, task_class, train_runs


def stacking_obstacle(distillers: Sequence[Distiller]) -> Optional[str]:
    """Why these students cannot be stacked into one vmapped model, or None if they can."""
    if len(distillers) < 2:
        return "there is only one student"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return "stacked students run in one process (no torchrun)"
    first = distillers[0].student
    layout = [(k, v.shape, v.dtype) for k, v in first.state_dict().items()]
    for d in distillers:
        if type(d.student) is not type(first) or [(k, v.shape, v.dtype) for k, v in d.student.state_dict().items()] != layout:
            return "the students differ in architecture"
        if d.student_paths:  # a vmapped forward cannot fill a student's forward hooks
            return "a method reads student features (taps)"
        if any(p.requires_grad for p in d.methods.parameters()):
            return "a method has trainable parameters"
        if has_init_stage(d):
            return "a method has an init stage"
    return None


def stacked_forward(distillers: Sequence[Distiller], stack: StackedModels):
    """The step forward of stacked students: one forward of the stack, then each distiller's losses on its
    slice of the logits (passed as `student_logits`) and the shared teacher outputs."""

    def forward(images, labels, index, teacher_outputs, epoch):
        labels, targets = split_targets(labels)  # mixed soft targets (train.mixup) feed the cross-entropy
        logits = stack(images)
        outputs = []
        for k, distiller in enumerate(distillers):
            out = distiller(images, labels, index=index, epoch=epoch, student_logits=logits[k],
                            teacher_outputs=teacher_outputs if distiller.needs_teacher else None)
            outputs.append((out.logits, with_soft_targets(out.losses, out.logits, targets, distiller.ce_weight)))
        return outputs

    return forward


class _StackedSlot(OptimizerSlot):
    """Student k's share of the stacked optimizer, as the state dict a one-student optimizer would have."""

    def __init__(self, optimizer: torch.optim.Optimizer, k: int, pending: dict[int, dict]):
        super().__init__(optimizer)
        self.k, self.pending = k, pending

    def state(self) -> dict:
        full = optimizer_state(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        sliced = {i: {key: value[self.k].clone() if _per_element(value, params[i]) else value
                      for key, value in entry.items()} for i, entry in full["state"].items()}
        return {"state": sliced, "param_groups": full["param_groups"]}

    def load(self, state: dict) -> None:
        self.pending[self.k] = state  # stacked once every student's state is in: see `_load_stacked`


def _per_element(value, stacked_param: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == stacked_param.shape


def _load_stacked(optimizer: torch.optim.Optimizer, pending: dict[int, dict]) -> None:
    states = [pending[k] for k in sorted(pending)]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    merged = {}
    for i, entry in states[0]["state"].items():
        merged[i] = {key: torch.stack([s["state"][i][key] for s in states])
                     if isinstance(value, torch.Tensor) and value.shape == params[int(i)].shape[1:] else value
                     for key, value in entry.items()}
    load_optimizer_state(optimizer, {"state": merged, "param_groups": states[0]["param_groups"]})
    pending.clear()


def stacked_steps(task: ClassificationTask, trainer: Trainer) -> list[StepGroup]:
    """One vmapped step for all students (see the module's docstring)."""
    distillers = task.distillers
    stack = StackedModels([d.student for d in distillers], vectorize=True, tie=True)
    optimizer = build_optimizer(stack.parameters(), optimizer_spec(task.cfg), trainer.device, trainer.compile_mode)
    if trainer.compile_mode != "off":
        mark_static([*stack.params.values(), *stack.buffers.values()])  # updated in place, read live by CUDA graphs
    step = TrainStep(stacked_forward(distillers, stack), optimizer, trainer.device, task.step_options(trainer))
    pending: dict[int, dict] = {}
    slots = [_StackedSlot(optimizer, k, pending) for k in range(len(distillers))]
    return [StepGroup(step, LearningRate(optimizer, trainer.schedule), list(range(len(distillers))), slots,
                      finish_loading=lambda: _load_stacked(optimizer, pending), close=stack.untie)]


def fit_many(distillers: Sequence[nn.Module], data: DataSplits, cfg: TrainConfig,
             run_dirs: Optional[Sequence[Optional[str | Path]]] = None, *, resume: bool = False,
             verbose: bool = True, stack: str | bool = "auto", options: Optional[FitOptions] = None) -> list[FitResult]:
    """Train K distillers that share one teacher module on the same batches; one `FitResult` each.

    `stack`: "auto" stacks the students when they allow it (`stacking_obstacle`), True insists (a
    `ConfigError` says why not), False steps them one after another.  `options`: `FitOptions` with one
    export_meta / callbacks entry per student.  A non-finite loss in any student stops them all, naming it;
    every checkpoint on disk stays the last good one.
    """
    run_dirs = list(run_dirs) if run_dirs is not None else [None] * len(distillers)
    if len(run_dirs) != len(distillers):
        raise ConfigError(f"fit_many: {len(distillers)} distillers but {len(run_dirs)} run directories")
    obstacle = stacking_obstacle(distillers)
    if obstacle is None and cfg.sam_rho > 0:  # one norm over the stack would couple the students' perturbations
        obstacle = "SAM (train.sam_rho) perturbs each student by its own gradient's norm"
    if stack is True and obstacle:
        raise ConfigError(f"fit_many(stack=True): cannot stack these students: {obstacle}")
    use_stack = stack is not False and obstacle is None
    options = options or FitOptions()
    labels = [f"[{Path(r).name if r is not None else f'student {k}'}] " for k, r in enumerate(run_dirs)]
    task = task_class(data)(distillers, data, cfg, options.teacher_cache,
                            stacked_steps if use_stack else separate_steps)
    return train_runs(task, run_dirs, resume=resume, verbose=verbose, options=options, labels=labels)


__all__ = ["fit_many", "stacking_obstacle", "stacked_steps"]
