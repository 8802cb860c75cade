"""Optimizers in the form the step runs best, their state in checkpoints, and the scheduled learning rate.

`build_optimizer` makes SGD or AdamW as an `OptimizerSpec` says:

- CUDA eager: fused, the learning rate a 0-d device tensor (the kernels read it; no host sync), found_inf
  honoured (see `step.TrainStep`);
- compiled: foreach with a 0-d tensor learning rate, which torch.compile turns into a few generated kernels and
  a CUDA graph replays with the current rate (AdamW also capturable: its step counter on the device);
- CPU eager, AdamW compiled on the CPU (a foreach AdamW takes a tensor lr only when capturable, which the CPU
  is not), and FSDP2-sharded (DTensor) parameters: torch's default implementation with a float learning rate,
  the update left uncompiled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn

OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.05
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    decay_1d: bool = True  # false: biases and normalisation weights (tensors of < 2 dimensions) get no decay


def parameter_groups(params: Iterable[nn.Parameter], spec: OptimizerSpec) -> list[dict]:
    """The trainable parameters in one group, or (``decay_1d=False``) two: matrices with weight decay, then the
    tensors of fewer than 2 dimensions without."""
    params = [p for p in params if p.requires_grad]
    if spec.decay_1d:
        return [{"params": params}]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": spec.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def build_optimizer(params: Iterable[nn.Parameter], spec: OptimizerSpec, device: Optional[torch.device] = None,
                    compile_mode: str = "off") -> torch.optim.Optimizer:
    """SGD or AdamW over `params` as `spec` says, in the form the step runs best (see the module's docstring)."""
    groups = parameter_groups(params, spec)
    first = next((p for g in groups for p in g["params"]), None)
    device = device or (first.device if first is not None else torch.device("cpu"))
    on_cuda = device.type == "cuda"
    sharded = any(hasattr(p, "device_mesh") for g in groups for p in g["params"])  # DTensors of FSDP2
    if sharded:
        kind = {}
    elif compile_mode != "off" and (spec.name == "sgd" or on_cuda):
        kind = {"foreach": True, **({"capturable": True} if spec.name == "adamw" else {})}
    elif on_cuda:
        kind = {"fused": True}
    else:
        kind = {}
    lr = torch.tensor(spec.lr, dtype=torch.float32, device=device) if kind else spec.lr
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=spec.momentum, nesterov=spec.nesterov,
                               weight_decay=spec.weight_decay, **kind)
    if spec.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay, **kind)
    raise ValueError(f"unknown optimizer {spec.name!r} ({', '.join(OPTIMIZERS)})")


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with tensor learning rates as floats, so checkpoints do not depend on the mode."""
    state = optimizer.state_dict()
    state["param_groups"] = [{**g, "lr": float(g["lr"])} for g in state["param_groups"]]
    return state


# Choices of how an optimizer runs, not of what it computes: a checkpoint from another device or compile mode
# must not bring its own.
IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state, keeping this optimizer's lr objects (a device tensor may be read
    by a compiled step) and its implementation (fused, foreach, capturable)."""
    own = [dict(g) for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, before in zip(optimizer.param_groups, own):
        lr = before["lr"]
        if isinstance(lr, torch.Tensor):
            lr.fill_(float(group["lr"]))
        group["lr"] = lr
        group.update({key: before[key] for key in IMPLEMENTATION_KEYS if key in before})


def descend(optimizers: Sequence[torch.optim.Optimizer], loss: torch.Tensor) -> None:
    """One plain update outside the Trainer's loop (a condenser's synthetic images, DC's inner network): the
    optimizers' gradients freed, `loss` back-propagated, each optimizer stepped."""
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()


class LearningRate:
    """Sets the scheduled learning rate before each step, in place when it is a tensor."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Callable[[int], float]):
        self.optimizer, self.schedule = optimizer, schedule
        self._filled: Optional[float] = None  # the value last written into the tensors

    def set(self, step: int) -> float:
        lr = self.schedule(step)
        for group in self.optimizer.param_groups:
            scaled = lr * group.get("lr_scale", 1.0)  # a group trained at a multiple of the rate (e.g. a score model)
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = scaled
            elif lr != self._filled:  # a step schedule changes it rarely: no kernel launch otherwise
                group["lr"].fill_(scaled)  # the value travels as a kernel argument, not a copy from the host
        self._filled = lr
        return lr


class OptimizerSlot:
    """How a run's optimizer state is read for its checkpoint and restored from it."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def state(self) -> dict:
        return optimizer_state(self.optimizer)

    def load(self, state: dict) -> None:
        load_optimizer_state(self.optimizer, state)


__all__ = ["OptimizerSpec", "OPTIMIZERS", "build_optimizer", "parameter_groups", "optimizer_state",
           "load_optimizer_state", "descend", "LearningRate", "OptimizerSlot"]
