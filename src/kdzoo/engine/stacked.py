"""One engine for K networks of one architecture trained side by side.

Their parameters and buffers are stacked along a new first dimension (`torch.func.stack_module_state`); the
stacks are the leaves real `torch.optim` optimizers update (SGD and AdamW act element-wise, so one optimizer
over the stacks is the same update as K optimizers).  A forward is one `vmap` of `functional_call` over the
stack (a convolution over K networks becomes one grouped convolution), or, where that is slower (vmap's
batched convolutions on a CPU), the same `functional_call` on each network's slice in turn: both write
BatchNorm statistics into the stacked buffers and send gradients to the stacked leaves.

Used by `fit_many` (K students on the same batches, `tie=True` so each student module reads its slice), and,
through `train_stack` (K networks trained on in-memory tensors, each its own batch order and augmentation), by
dataset-distillation evaluation, the soft-label committee and the MTT/FTD experts.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap
from tqdm import tqdm

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


OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "half_cosine", "linear")


def schedule_factor(schedule: str, epoch: int, epochs: int, decay_epoch: Optional[int] = None,
                    decay_factor: float = 0.1) -> float:
    """The learning-rate multiplier of `epoch` (stepped once per epoch, as a LambdaLR): ``step`` x`decay_factor`
    from `decay_epoch` on (DatasetCondensation's evaluation); SRe2L's ``--cos`` 0.5 (1 + cos(pi e / E)); RDED's
    ``half_cosine`` 0.5 (1 + cos(pi e / 2E)); SRe2L's default ``linear`` 1 - e / E."""
    if schedule == "step":
        return decay_factor if decay_epoch is not None and epoch >= decay_epoch else 1.0
    if epoch > epochs:
        return 0.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if schedule == "half_cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs / 2))
    if schedule == "linear":
        return 1 - epoch / epochs
    raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


@dataclass(frozen=True)
class StackTraining:
    """How `train_stack` trains: `optimizer` (SGD with `momentum`, or AdamW with `betas`) at `lr` with
    `weight_decay` for `epochs` over minibatches of `batch_size`.  `schedule` ``step``: after `decay_epoch` epochs
    the lr is multiplied by `decay_factor` and the momentum restarts (as a new optimizer would); ``cosine``,
    ``half_cosine``, ``linear``: `schedule_factor` per epoch (the decoupled dataset-distillation evaluations).
    `decay_weights_only`: weight decay on conv/linear weights only (SRe2L's and RDED's parameter groups).
    `flip_batch` appends the horizontal flip of every batch, drawing half as many."""

    epochs: int
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    decay_epoch: Optional[int] = None
    decay_factor: float = 0.1
    flip_batch: bool = False
    vectorize: Optional[bool] = None  # a stack built for this training: one vmapped forward (default: on CUDA)
    optimizer: str = "sgd"
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: str = "step"
    decay_weights_only: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")


def stack_optimizer(stack: "StackedModels", settings: StackTraining) -> torch.optim.Optimizer:
    """The optimizer over the stacked leaves (element-wise, so K optimizers in one).  Stacked tensors carry the
    network dimension first, so a conv/linear weight has more than two dimensions here."""
    if settings.decay_weights_only:
        decay = [t for name, t in stack.params.items() if "weight" in name and t.dim() > 2]
        rest = [t for name, t in stack.params.items() if not ("weight" in name and t.dim() > 2)]
        groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": rest, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
    else:
        groups = [{"params": stack.parameters(), "weight_decay": settings.weight_decay}]
    if settings.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas)
    return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)


GradientFn = Callable[[Tensors, Tensors, torch.Tensor, torch.Tensor], Tensors]


@dataclass(frozen=True)
class StackHooks:
    """What `train_stack` does to every batch besides the step.  `augment(x, groups=K)` transforms the K networks'
    batches (one draw per network's batch); `mix(x, y, groups=K)` mixes inputs and their labels together within
    each network's batch (INFER's static labels); `relabel(x, groups=K)` replaces the labels by a teacher's soft
    labels of the augmented inputs (SRe2L/RDED's relabelling; `groups` tells a teacher with batch statistics where
    one network's batch ends); `batches(epoch)` yields the epoch's (x, y) itself, shared by every network (stored
    crops with their labels, SRe2L/FKD), in place of the per-network shuffle; `on_epoch(epoch, params)` sees the
    stacked parameters at epoch 0 and after every epoch."""

    augment: Optional[Callable[..., torch.Tensor]] = None
    mix: Optional[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = None
    relabel: Optional[Callable[..., torch.Tensor]] = None
    batches: Optional[Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]] = None
    on_epoch: Optional[Callable[[int, Tensors], None]] = None


def train_stack(stack: StackedModels, images: torch.Tensor, labels: torch.Tensor, settings: StackTraining,
                gradient: GradientFn, hooks: StackHooks = StackHooks(), progress: Optional[str] = None) -> None:
    """Train every network of `stack` on (images, labels): each draws its own batch order, `hooks` transform the
    batches (augmentation, mixing, relabelling), `gradient(params, buffers, x, y)` (a torch.func gradient of one
    network's loss) gives the per-network gradients, and one optimizer over the stacks updates them (element-wise,
    so the same update as one optimizer per network).  `progress`: a bar with this description."""
    optimizer = stack_optimizer(stack, settings)
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    count, n = len(stack), len(images)
    batch = max(1, settings.batch_size // 2 if settings.flip_batch else settings.batch_size)
    steps = math.ceil(n / batch)

    augment, mix, relabel, batches = hooks.augment, hooks.mix, hooks.relabel, hooks.batches

    def report(epoch: int) -> None:
        if hooks.on_epoch:
            hooks.on_epoch(epoch, {k: v.detach() for k, v in stack.params.items()})

    report(0)
    for epoch in tqdm(range(settings.epochs), desc=progress, disable=progress is None, leave=False, dynamic_ncols=True):
        if settings.schedule != "step":
            factor = schedule_factor(settings.schedule, epoch, settings.epochs)
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = base * factor
        for x, y in (_shared(batches(epoch), count) if batches is not None else
                     _shuffled(images, labels, count, batch, steps, settings.flip_batch)):
            with torch.no_grad():  # torch.func.grad still differentiates inside; nothing else is recorded
                if augment is not None:  # one draw per network's batch
                    x = augment(x.flatten(0, 1), groups=count).view_as(x)
                if mix is not None:
                    mixed_x, mixed_y = mix(x.flatten(0, 1), y.flatten(0, 1), groups=count)
                    x, y = mixed_x.view_as(x), mixed_y.view(*y.shape[:2], *mixed_y.shape[1:])
                if relabel is not None:
                    y = relabel(x.flatten(0, 1), groups=count).view(*x.shape[:2], -1)
                set_gradients(stack, stack.gradients(gradient, x, y))
            optimizer.step()
        if settings.schedule == "step" and settings.decay_epoch is not None and epoch + 1 == settings.decay_epoch:
            for group in optimizer.param_groups:
                group["lr"] *= settings.decay_factor
            optimizer.state.clear()
        report(epoch + 1)


def _shuffled(images: torch.Tensor, labels: torch.Tensor, count: int, batch: int, steps: int, flip_batch: bool
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (K, batch, ...) minibatches, each network its own shuffle (and flips appended)."""
    order = torch.rand(count, len(images), device=images.device).argsort(1)
    for s in range(steps):
        with torch.no_grad():
            index = order[:, s * batch:(s + 1) * batch]
            x, y = images[index], labels[index]
            if flip_batch:
                x, y = torch.cat([x, x.flip(-1)], 1), torch.cat([y, y], 1)
        yield x, y


def _shared(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], count: int
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Given batches, the same one for each of the K networks (expanded, not copied)."""
    for x, y in batches:
        yield x.unsqueeze(0).expand(count, *x.shape), y.unsqueeze(0).expand(count, *y.shape)


__all__ = ["StackedModels", "StackTraining", "StackHooks", "train_stack", "stack_optimizer", "schedule_factor", "SCHEDULES", "member", "loss_gradient", "set_gradients"]
