"""Several students in one process: ``fit_many(distillers, data, cfg, run_dirs)``.

The students (different seeds, or different methods) share one teacher module and see the same batches,
so the teacher runs once per batch for all of them (`TeacherFeed`).  Each keeps its own optimizer state,
run directory, metrics, checkpoints and exports, in exactly the format `fit` writes, so any of them can be
continued alone with ``fit(..., resume=True)``.

Students of one architecture whose methods read only logits (no student taps, no trainable method
parameters, no init stage) are *stacked*: their parameters and buffers become one tensor with a leading
student dimension, the K forwards become one `torch.func.vmap` of `functional_call` (a convolution over K
students is one grouped convolution), the K backwards one backward and the K optimizer steps one step
over the stacks (SGD and AdamW act element-wise, so this is the same update as K optimizers).  Each
student's own modules are left holding views of their slice, so evaluation, checkpoints and exports see
their current values.  Other students are stepped one after another on the shared teacher outputs.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ..config import TrainConfig
from ..data import DataSplits
from ..errors import ConfigError
from .fast_step import LearningRate, TrainStep, build_optimizer, load_optimizer_state, optimizer_state
from .teacher_cache import TeacherCache
from .trainer import FitResult, OptimizerSlot, StepGroup, separate_steps, train_runs


def stacking_obstacle(distillers: Sequence[nn.Module]) -> Optional[str]:
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
        if getattr(d, "_student_paths", None) is None:
            return "a student is not in a Distiller"
        if d._student_paths:  # a vmapped forward cannot fill a student's forward hooks
            return "a method reads student features (taps)"
        if any(p.requires_grad for p in d.methods.parameters()):
            return "a method has trainable parameters"
        if any((stage := m.init_stage(d.student)) is not None and stage.epochs > 0 for m in d.methods.values()):
            return "a method has an init stage"
    return None


class _StudentReplay(nn.Module):
    """Stands in for a stacked student inside its Distiller: returns its slice of the vmapped logits."""

    def __init__(self):
        super().__init__()
        self.logits: Optional[torch.Tensor] = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits


class StudentStack:
    """K students' parameters and buffers stacked along a new first dimension (the trained leaves), with each
    student's own tensors turned into views of its slice."""

    def __init__(self, students: Sequence[nn.Module]):
        self.students = list(students)
        self.params, self.buffers = stack_module_state(self.students)
        for k, student in enumerate(self.students):
            for name, tensor in (*student.named_parameters(), *student.named_buffers()):
                stacked = self.params.get(name, self.buffers.get(name))
                tensor.data = stacked[k]  # shares the stack's memory: loads and evaluation see the stack
        self.template = copy.deepcopy(self.students[0]).to("meta")  # the architecture; its tensors are never used
        self.template.train()

    def logits(self, params: dict, buffers: dict, images: torch.Tensor) -> torch.Tensor:
        """(K, batch, classes); BatchNorm statistics are updated in place in the stacked buffers."""
        def one(p, b, x):
            return functional_call(self.template, (p, b), (x,))

        return vmap(one, in_dims=(0, 0, None), randomness="different")(params, buffers, images)

    def unstack(self) -> None:
        """Give every student its own memory again."""
        for student in self.students:
            for tensor in (*student.parameters(), *student.buffers()):
                tensor.data = tensor.data.clone()


class _StackedForward:
    def __init__(self, distillers: Sequence[nn.Module], stack: StudentStack, compile_mode: str):
        self.distillers, self.stack = list(distillers), stack
        self.replays = []
        for distiller in self.distillers:
            replay = _StudentReplay()
            distiller.student = replay
            self.replays.append(replay)
        self._logits = stack.logits
        if compile_mode != "off":
            import torch._dynamo

            for tensor in (*stack.params.values(), *stack.buffers.values()):
                torch._dynamo.mark_static_address(tensor)  # updated in place, read in place by CUDA graphs
            self._logits = torch.compile(stack.logits, mode=None if compile_mode == "default" else compile_mode,
                                         dynamic=False)

    def __call__(self, images, labels, index, epoch):
        logits = self._logits(self.stack.params, self.stack.buffers, images)
        outputs = []
        for k, (distiller, replay) in enumerate(zip(self.distillers, self.replays)):
            replay.logits = logits[k]
            out = distiller(images, labels, index=index, epoch=epoch)
            outputs.append((out.logits, out.losses))
        return outputs

    def restore(self) -> None:
        for distiller, student in zip(self.distillers, self.stack.students):
            distiller.student = student
        self.stack.unstack()


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


def stacked_steps(distillers: Sequence[nn.Module], cfg: TrainConfig, device: torch.device, compile_mode: str,
                  schedule: Callable[[int], float]) -> list[StepGroup]:
    """One vmapped step for all students (see the module's docstring)."""
    stack = StudentStack([d.student for d in distillers])
    optimizer = build_optimizer(stack.params.values(), cfg, device, compile_mode)
    forward = _StackedForward(distillers, stack, compile_mode)
    step = TrainStep(forward, optimizer, device, cfg.amp, compile_mode)
    pending: dict[int, dict] = {}
    slots = [_StackedSlot(optimizer, k, pending) for k in range(len(distillers))]
    return [StepGroup(step, LearningRate(optimizer, schedule), list(range(len(distillers))), slots,
                      finish_loading=lambda: _load_stacked(optimizer, pending), close=forward.restore)]


def fit_many(distillers: Sequence[nn.Module], data: DataSplits, cfg: TrainConfig,
             run_dirs: Optional[Sequence[Optional[str | Path]]] = None, *, resume: bool = False,
             export_metas: Optional[Sequence[Optional[dict]]] = None, on_step: Optional[Callable[[int], None]] = None,
             verbose: bool = True, teacher_cache: Optional[TeacherCache] = None,
             stack: str | bool = "auto") -> list[FitResult]:
    """Train K distillers that share one teacher module on the same batches; one `FitResult` each.

    `stack`: "auto" stacks the students when they allow it (`stacking_obstacle`), True insists (a
    `ConfigError` says why not), False steps them one after another.  A non-finite loss in any student
    stops them all, naming it; every checkpoint on disk stays the last good one.
    """
    run_dirs = list(run_dirs) if run_dirs is not None else [None] * len(distillers)
    if len(run_dirs) != len(distillers):
        raise ConfigError(f"fit_many: {len(distillers)} distillers but {len(run_dirs)} run directories")
    obstacle = stacking_obstacle(distillers)
    if stack is True and obstacle:
        raise ConfigError(f"fit_many(stack=True): cannot stack these students: {obstacle}")
    use_stack = stack is not False and obstacle is None
    labels = [f"[{Path(r).name if r is not None else f'student {k}'}] " for k, r in enumerate(run_dirs)]
    return train_runs(distillers, data, cfg, run_dirs, resume=resume, export_metas=export_metas, on_step=on_step,
                      verbose=verbose, teacher_cache=teacher_cache,
                      build_steps=stacked_steps if use_stack else separate_steps, labels=labels)


__all__ = ["fit_many", "stacking_obstacle", "StudentStack", "stacked_steps"]
