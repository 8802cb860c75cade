"""One engine for K networks of one architecture trained side by side.

Their parameters and buffers are stacked along a new first dimension (`torch.func.stack_module_state`); the
stacks are the leaves real `torch.optim` optimizers update (SGD and AdamW act element-wise, so one optimizer
over the stacks is the same update as K optimizers).  A forward is one `vmap` of `functional_call` over the
stack (a convolution over K networks becomes one grouped convolution), or, where that is slower (vmap's
batched convolutions on a CPU), the same `functional_call` on each network's slice in turn: both write
BatchNorm statistics into the stacked buffers and send gradients to the stacked leaves.

Used by `fit_many` (K students on the same batches, `tie=True` so each student module reads its slice), by
dataset-distillation evaluation (K fresh networks, each its own batch order), by the soft-label committee and
by the MTT/FTD experts.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from ..errors import ConfigError

Tensors = dict[str, torch.Tensor]


def member(stacked: Tensors, k: int) -> Tensors:
    """Network `k`'s tensors of a stack (views: in-place updates reach the stack)."""
    return {name: tensor[k] for name, tensor in stacked.items()}


class StackedModels:
    """K same-architecture modules as stacked tensors, with a parameter-free template for their forward.

    - `parameters()`: the stacked leaves, for an optimizer; `params` / `buffers` by name.
    - `forward(x)`: (K, batch, ...) outputs; `x` shared by all (batch, ...) or one per network (K, batch, ...).
    - `gradients(fn, x, y)`: per-network gradients of a pure loss `fn(params, buffers, x, y)` (torch.func), for
      updates that need them apart (sharpness-aware training); assign them to `.grad` and step the optimizer.
    - `tie=True` leaves each original module's tensors as views of its slice, so evaluating, checkpointing or
      exporting a module reads the stack's current values; `untie()` gives them their own memory again.
    """

    def __init__(self, modules: Sequence[nn.Module], *, vectorize: Optional[bool] = None, tie: bool = False):
        modules = list(modules)
        if not modules:
            raise ConfigError("StackedModels: no modules to stack")
        first = modules[0]
        layout = [(k, v.shape, v.dtype) for k, v in first.state_dict().items()]
        for module in modules[1:]:
            if type(module) is not type(first) or [(k, v.shape, v.dtype) for k, v in module.state_dict().items()] != layout:
                raise ConfigError("StackedModels: every module must share one architecture")
        self.modules = modules
        params, buffers = stack_module_state(modules)  # detached copies; params are leaves requiring grad
        self.params: Tensors = params
        self.buffers: Tensors = buffers
        device = next(iter(params.values())).device
        self.vectorize = device.type == "cuda" if vectorize is None else vectorize
        self.template = copy.deepcopy(first).to("meta")  # the architecture; its tensors are never read
        self.template.train()
        self.tied = False
        if tie:
            for k, module in enumerate(modules):
                for name, tensor in (*module.named_parameters(), *module.named_buffers()):
                    stacked = params.get(name, buffers.get(name))
                    tensor.data = stacked[k]  # shares the stack's memory
            self.tied = True

    def __len__(self) -> int:
        return len(self.modules)

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def train(self, mode: bool = True) -> "StackedModels":
        self.template.train(mode)
        return self

    def eval(self) -> "StackedModels":
        return self.train(False)

    def _call(self, params: Tensors, buffers: Tensors, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, (params, buffers), (x,))

    def forward(self, x: torch.Tensor, *, per_model: bool = False, params: Optional[Tensors] = None) -> torch.Tensor:
        """Outputs (K, batch, ...) of every network; `per_model`: `x` is (K, batch, ...), one batch each.
        `params` replaces the stacked parameters (e.g. perturbed ones); buffers are always the stack's."""
        params = self.params if params is None else params
        if self.vectorize:
            return vmap(self._call, in_dims=(0, 0, 0 if per_model else None), randomness="different")(
                params, self.buffers, x)
        return torch.stack([self._call(member(params, k), member(self.buffers, k), x[k] if per_model else x)
                            for k in range(len(self))])

    __call__ = forward

    def gradients(self, fn: Callable[[Tensors, Tensors, torch.Tensor, torch.Tensor], Tensors], x: torch.Tensor,
                  y: torch.Tensor) -> Tensors:
        """Stacked per-network results of `fn(params, buffers, x, y)` (a torch.func gradient function) on one
        batch per network (`x`: (K, batch, ...))."""
        if self.vectorize:
            return vmap(fn, randomness="different")(self.params, self.buffers, x, y)
        each = [fn(member(self.params, k), member(self.buffers, k), x[k], y[k]) for k in range(len(self))]
        return {name: torch.stack([g[name] for g in each]) for name in each[0]}

    @torch.no_grad()
    def predict(self, x: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """Eval-mode outputs (K, N, ...) of every network on every input, in chunks that bound the memory."""
        chunk = chunk or max(16, 2048 // len(self))
        was_training = self.template.training
        self.eval()
        try:
            return torch.cat([self.forward(part) for part in x.split(chunk)], 1)
        finally:
            self.train(was_training)

    def untie(self) -> None:
        """Give every tied module its own memory again (its current values)."""
        if not self.tied:
            return
        for module in self.modules:
            for tensor in (*module.parameters(), *module.buffers()):
                tensor.data = tensor.data.clone()
        self.tied = False

    def write_back(self) -> None:
        """Copy each network's current values into its original module (untied stacks)."""
        with torch.no_grad():
            for k, module in enumerate(self.modules):
                for name, tensor in (*module.named_parameters(), *module.named_buffers()):
                    tensor.copy_(self.params.get(name, self.buffers.get(name))[k])


def loss_gradient(template: nn.Module, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """The gradient of `loss(template(x), y)` as a pure function of (params, buffers, x, y)."""

    def value(params: Tensors, buffers: Tensors, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss(functional_call(template, (params, buffers), (x,)), y)

    return grad(value)


def set_gradients(stack: StackedModels, gradients: Tensors) -> None:
    """Put stacked per-network gradients where an optimizer over `stack.parameters()` reads them."""
    for name, tensor in stack.params.items():
        tensor.grad = gradients[name].detach()


__all__ = ["StackedModels", "member", "loss_gradient", "set_gradients"]
