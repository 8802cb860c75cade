"""MTT: matching training trajectories (Cazenavette et al. 2022), with its expert buffer.

Experts are networks trained on the real data whose flat parameters are recorded after every
epoch.  One iteration starts a student at an expert's epoch t, trains it `syn_steps` SGD steps on
(DSA-augmented) synthetic images with a learnable step size, and minimises
||student - expert(t + M)||^2 / ||expert(t) - expert(t + M)||^2 w.r.t. the images and the step size.

Memory: the student is a flat parameter vector run through `torch.func.functional_call`.  With
``checkpoint_steps`` (default) each unrolled step keeps only its inputs (parameters, augmented
batch, step size) and rebuilds its double-backward graph during the backward pass, so memory grows
by one parameter vector per step instead of one step's activations and second-order graph.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Optional

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.func import functional_call

from ..engine.runtime import atomic_write
from ..engine.stacked import StackTraining
from ..errors import CheckpointError, ConfigError
from ..registry import register_condenser
from .base import Condenser, EvalProtocol, fyi_expand, jsonable, nearest_ipc
from .evaluate import Sharpness, train_networks

MTT_PAPER = "Cazenavette et al. 2022, Dataset Distillation by Matching Training Trajectories (CVPR)"



@dataclass(frozen=True)
class TrajectorySettings:
    """One row of a trajectory-matching hyper-parameter table (None batch_syn: every image per step)."""

    syn_steps: int
    expert_epochs: int
    max_start_epoch: int
    batch_syn: Optional[int]
    lr_img: float
    lr_lr: float
    syn_lr_init: float
    ema_decay: Optional[float] = None  # FTD only


# MTT's published hyper-parameters (Cazenavette et al., supplementary table; also mtt-distillation
# issue #7), by dataset and IPC.  CIFAR-10 IPC 10's "Learning Rate (Pixels)" of 100000 is a typo the
# author confirmed (issue #31; 100 and 1000 are stable): 1000, MTT's default lr_img, is used.
MTT_SETTINGS = {
    "cifar10": {1: TrajectorySettings(50, 2, 2, None, 1000.0, 1e-7, 0.01),
                10: TrajectorySettings(30, 2, 20, None, 1000.0, 1e-5, 0.01),
                50: TrajectorySettings(30, 2, 40, None, 1000.0, 1e-5, 0.01)},
    "cifar100": {1: TrajectorySettings(20, 3, 20, None, 1000.0, 1e-5, 0.01),
                 10: TrajectorySettings(20, 2, 20, None, 1000.0, 1e-5, 0.01),
                 50: TrajectorySettings(80, 2, 40, 125, 1000.0, 1e-5, 0.01)},
}
# Other datasets take the CIFAR-10 rows (the nearest listed IPC, see `nearest_ipc`).
DEFAULT_TABLE = "cifar10"

ParamLayout = list[tuple[str, torch.Size]]


def param_layout(network: nn.Module) -> ParamLayout:
    return [(name, p.shape) for name, p in network.named_parameters()]


def flatten_params(params: dict[str, torch.Tensor], layout: ParamLayout, batch_dims: int = 0) -> torch.Tensor:
    """Concatenate parameters (in `layout` order) into one vector (per leading batch index)."""
    return torch.cat([params[name].flatten(batch_dims) for name, _ in layout], -1)


def unflatten_params(flat: torch.Tensor, layout: ParamLayout) -> dict[str, torch.Tensor]:
    sizes = [math.prod(shape) for _, shape in layout]
    return {name: chunk.view(shape) for (name, shape), chunk in zip(layout, flat.split(sizes))}


def student_update(network: nn.Module, layout: ParamLayout, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                   lr: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """One SGD step of the student (flat parameters `w`, which must require grad) on batch (x, y)."""
    loss = F.cross_entropy(functional_call(network, unflatten_params(w, layout), (x,)), y)
    (g,) = torch.autograd.grad(loss, w, create_graph=create_graph)
    return w - lr * g


def trajectory_loss(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MTT's normalised parameter distance ||student - target||^2 / ||start - target||^2 (the reference
    divides both sums by the parameter count, which cancels)."""
    return ((student - target) ** 2).sum() / ((start - target) ** 2).sum()


class RecomputedStudentStep(torch.autograd.Function):
    """`student_update` whose graph is rebuilt in backward: saves (w, x, lr, y) only."""

    @staticmethod
    def forward(ctx, w, x, lr, y, network, layout):
        ctx.network, ctx.layout = network, layout
        ctx.save_for_backward(w, x, lr, y)
        with torch.enable_grad():
            w_leaf = w.detach().requires_grad_(True)
            return student_update(network, layout, w_leaf, x.detach(), y, lr.detach(), create_graph=False).detach()

    @staticmethod
    def backward(ctx, grad_next):
        w, x, lr, y = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_(True) for t in (w, x, lr)]
            w_next = student_update(ctx.network, ctx.layout, leaves[0], leaves[1], y, leaves[2], create_graph=True)
            grads = torch.autograd.grad(w_next, leaves, grad_next)
        return (*grads, None, None, None)


def unroll_student(network: nn.Module, layout: ParamLayout, w0: torch.Tensor,
                   batches: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int, lr: torch.Tensor,
                   checkpoint_steps: bool = True) -> torch.Tensor:
    """The student's parameters after `steps` SGD steps from `w0`, differentiable w.r.t. the batches and lr."""
    w = w0.detach().clone().requires_grad_(True)
    for _ in range(steps):
        x, y = next(batches)
        if checkpoint_steps:
            w = RecomputedStudentStep.apply(w, x, lr, y, network, layout)
        else:
            w = student_update(network, layout, w, x, y, lr, create_graph=True)
    return w


class ExpertBuffer:
    """Expert trajectories: per expert, its flat parameters at epoch 0, 1, ..., E.

    Held in memory, or in a directory with one safetensors file per expert (read lazily, two rows
    at a time) and ``buffer.json`` describing how the experts were trained; the JSON is written
    last, so a directory without it is an unfinished buffer."""

    INDEX = "buffer.json"

    def __init__(self, meta: dict, trajectories: Optional[list[torch.Tensor]] = None,
                 files: Optional[list[Path]] = None):
        self.meta = meta
        self.trajectories = trajectories
        self.files = files

    def __len__(self) -> int:
        return len(self.trajectories if self.trajectories is not None else self.files)

    @property
    def epochs(self) -> int:
        return self.meta["epochs"]

    def segment(self, expert: int, start: int, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat parameters of `expert` after epochs `start` and `end`."""
        if self.trajectories is not None:
            rows = self.trajectories[expert][[start, end]]
        else:
            with safe_open(str(self.files[expert]), framework="pt") as f:
                trajectory = f.get_slice("trajectory")
                rows = torch.cat([trajectory[start:start + 1], trajectory[end:end + 1]])
        rows = rows.to(device)
        return rows[0], rows[1]

    def save(self, directory: str | Path) -> "ExpertBuffer":
        directory = Path(directory)
        files = []
        for i, trajectory in enumerate(self.trajectories):
            path = directory / f"expert_{i:04d}.safetensors"
            tensors = {"trajectory": trajectory.contiguous()}
            atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
            files.append(path)
        text = json.dumps(self.meta, indent=1)
        atomic_write(directory / self.INDEX, lambda tmp: tmp.write_text(text))
        return ExpertBuffer(self.meta, files=files)

    @classmethod
    def load(cls, directory: str | Path) -> Optional["ExpertBuffer"]:
        """The buffer saved in `directory`, or None when there is none (yet)."""
        directory = Path(directory)
        index = directory / cls.INDEX
        if not index.is_file():
            return None
        try:
            meta = json.loads(index.read_text())
        except ValueError as err:
            raise CheckpointError(f"{index}: unreadable expert buffer index ({err})") from None
        files = [directory / f"expert_{i:04d}.safetensors" for i in range(meta["num_experts"])]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{directory}: expert buffer lacks {', '.join(missing[:3])}")
        return cls(meta, files=files)

    @classmethod
    def load_or_train(cls, directory: Optional[str | Path], meta: dict,
                      train: Callable[[], list[torch.Tensor]]) -> "ExpertBuffer":
        """Reuse the buffer in `directory` if it was trained as `meta` says, else train (and save) it."""
        if directory is not None:
            saved = cls.load(directory)
            if saved is not None:
                if saved.meta != meta:
                    differ = sorted(k for k in set(meta) | set(saved.meta) if meta.get(k) != saved.meta.get(k))
                    raise ConfigError(f"expert buffer {directory} was trained differently ({', '.join(differ)}); "
                                      "point buffer_dir elsewhere or delete it")
                return saved
        buffer = cls(meta, trajectories=train())
        return buffer.save(directory) if directory is not None else buffer


@register_condenser("mtt", paper=MTT_PAPER)
@dataclass(eq=False)
class MTT(Condenser):
    """Trajectory matching.  Options left None take the authors' value for the dataset and IPC
    (`SETTINGS`); ZCA whitening is on by default for CIFAR-10/100 as in the authors' scripts."""

    iterations: int = 5000
    lr_img: Optional[float] = None  # None: by dataset and IPC
    lr_lr: Optional[float] = None
    syn_lr_init: Optional[float] = None  # initial student step size (the reference's --lr_teacher)
    syn_steps: Optional[int] = None
    max_start_epoch: Optional[int] = None
    expert_epochs: Optional[int] = None  # M: the student matches the expert this many epochs later
    batch_syn: Optional[int] = None  # None: the table's value (mostly every synthetic image per step)
    batch_real: Optional[int] = None  # unused: trajectory matching draws no real batches (refused)
    checkpoint_steps: bool = True  # bounded memory: rebuild each unrolled step in backward
    buffer_dir: Optional[str] = None  # where expert trajectories are saved and reused
    num_experts: int = 100
    expert_train_epochs: int = 50
    expert_lr: float = 0.01  # the experts' SGD lr (buffer.py --lr_teacher)
    expert_batch: int = 256
    experts_together: int = 10  # experts trained in one vectorised group

    EVAL: ClassVar[EvalProtocol] = EvalProtocol(epochs=1000, augment=True, learned_lr=True)
    SETTINGS: ClassVar[dict] = MTT_SETTINGS

    def table_settings(self) -> TrajectorySettings:
        table = self.SETTINGS.get(self.data.name, self.SETTINGS[DEFAULT_TABLE])
        return nearest_ipc(table, self.ipc)

    def resolve_options(self) -> None:
        if self.batch_real is not None:
            raise ConfigError(f"{self.registry_name}: batch_real is not used by trajectory matching "
                              "(no real batches are drawn); remove it")
        table = self.table_settings()
        for name in ("lr_img", "lr_lr", "syn_lr_init", "syn_steps", "max_start_epoch", "expert_epochs", "batch_syn"):
            if getattr(self, name) is None:
                setattr(self, name, getattr(table, name))

    def default_zca(self) -> bool:
        return self.data.name in ("cifar10", "cifar100")

    def setup(self) -> None:
        self.steps, self.max_start, self.step_size_lr = self.syn_steps, self.max_start_epoch, self.lr_lr
        if self.max_start < 1 or self.max_start - 1 + self.expert_epochs > self.expert_train_epochs:
            raise ConfigError(f"{self.registry_name}: start epochs 0..{self.max_start - 1} plus expert_epochs="
                              f"{self.expert_epochs} must stay within expert_train_epochs={self.expert_train_epochs}")
        self.student = self.new_network()
        self.param_layout = param_layout(self.student)
        self.syn_lr = torch.tensor(self.syn_lr_init, device=self.torch_device).requires_grad_(True)
        self.lr_optimizer = torch.optim.SGD([self.syn_lr], lr=self.step_size_lr, momentum=0.5)

    @cached_property
    def buffer(self) -> ExpertBuffer:
        """Built on first use, so a run's progress settings apply; depends on `seed` only."""
        return ExpertBuffer.load_or_train(self.buffer_dir, self.expert_meta(), self.train_experts)

    def expert_training(self) -> Sharpness:
        """How the experts' SGD deviates from plain SGD (FTD: sharpness-aware)."""
        return Sharpness()

    def expert_meta(self) -> dict:
        return jsonable({"dataset": self.data.name, "num_classes": self.num_classes, "image_size": self.image_size,
                         "model": self.model, "model_options": self.model_options, "num_experts": self.num_experts,
                         "epochs": self.expert_train_epochs, "lr": self.expert_lr, "batch": self.expert_batch,
                         "dsa_strategy": self.dsa_strategy, "seed": self.seed, "input_space": self.space.meta(),
                         "num_params": sum(math.prod(s) for _, s in self.param_layout),
                         **(self.expert_training().meta() if self.expert_training().rho > 0 else {})})

    def train_experts(self) -> list[torch.Tensor]:
        """Experts on the real data as in the reference buffer: SGD expert_lr, no momentum, no
        weight decay, no lr decay, DSA augmentation (one operation per batch), flat parameters
        recorded after every epoch (CPU)."""
        devices = [self.torch_device] if self.torch_device.type == "cuda" else []
        trajectories: list[torch.Tensor] = []
        with torch.random.fork_rng(devices=devices):  # the buffer depends on `seed` only
            torch.manual_seed(self.seed)
            for first in range(0, self.num_experts, self.experts_together):
                count = min(self.experts_together, self.num_experts - first)
                snapshots: list[torch.Tensor] = []
                settings = StackTraining(self.expert_train_epochs, self.expert_lr, momentum=0.0, weight_decay=0.0,
                                         batch_size=self.expert_batch)
                train_networks([self.new_network() for _ in range(count)], self.real.images, self.real.labels,
                               settings, augment=self.dsa, sharpness=self.expert_training(),
                               on_epoch=lambda _, p: snapshots.append(flatten_params(p, self.param_layout, 1).cpu()),
                               progress=f"experts {first + 1}-{first + count}/{self.num_experts}" if self.progress
                               else None)
                trajectories.extend(torch.stack(snapshots, 1).unbind(0))
        return trajectories

    def student_batch_size(self) -> int:
        """`batch_syn` (all images when unset); FYI's distill.py halves it before adding the flips."""
        size = self.batch_syn or len(self.images)
        return max(1, size // 2) if self.fyi else size

    def student_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless augmented minibatches of the synthetic set (each epoch a new order), one DSA
        operation per batch as the reference's non-siamese DiffAugment."""
        size = self.student_batch_size()
        while True:
            for index in torch.randperm(len(self.images), device=self.torch_device).split(size):
                x, y = self.images[index], self.labels[index]
                if self.fyi:
                    x, y = fyi_expand(x, y, 1)
                yield self.dsa.augment(x), y

    def expert_segment(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A random expert's parameters at a start epoch in [0, max_start_epoch) and expert_epochs later."""
        expert = int(torch.randint(len(self.buffer), ()))
        start = int(torch.randint(self.max_start, ()))
        return self.buffer.segment(expert, start, start + self.expert_epochs, self.torch_device)

    def matching_loss(self) -> torch.Tensor:
        w0, target = self.expert_segment()
        w = unroll_student(self.student, self.param_layout, w0, self.student_batches(), self.steps, self.syn_lr,
                           self.checkpoint_steps)
        return trajectory_loss(w, w0, target)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.image_optimizer, self.lr_optimizer]

    def learned_lr(self) -> float:
        return self.syn_lr.detach().item()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "syn_lr": self.syn_lr.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.syn_lr.copy_(state["syn_lr"])
