"""The training step and what makes it fast, kept apart from the loop's bookkeeping (``trainer.py``).

One step is: forward under autocast (bf16 on CUDA), the summed losses, backward, optimizer update, and the
step's loss terms, accuracy and a non-finite flag added to accumulators on the device.  Nothing in it reads
a value back to the host: the loop reads the meters at progress refreshes and once per epoch.

What changes with the device and `train.compile` (the optimizer's form: see `build_optimizer`):

- CUDA, compile off: fused SGD/AdamW whose learning rate is a 0-d tensor on the device (`fill_` before each
  step, no host sync) and whose `found_inf` is the run's non-finite flag, so every update after a NaN/inf loss
  is skipped on the device until the loop sees the flag and stops.
- compile ``default`` / ``reduce-overhead``: the whole forward of a step (student, taps, every method's loss)
  is one compiled function, as are the teacher's forward, the meters and the optimizer step (foreach SGD/AdamW
  whose learning rate is a static 0-d tensor: a replayed graph reads its memory, so the schedule stays
  adjustable without recompiling); ``reduce-overhead`` replays them as CUDA graphs, one generation per batch.
  The fractional epoch reaches methods as a 0-d tensor, so warm-ups never specialise a graph.  Nothing is
  compiled in place: the models are untouched, and `compile_scope` restores the one compiler setting it raises.
  Without found_inf, a non-finite loss stops the run at the next check (at most `log_every` steps later); no
  checkpoint is written after it.
- CPU: the same code eagerly, with a Python-float learning rate and torch's default optimizer, so runs and
  resumes stay bit-identical.  ``reduce-overhead`` falls back to ``default`` (CUDA graphs need CUDA);
  ``default`` needs a C++ compiler and falls back to eager without one.
"""
from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn

from ..config import TrainConfig

# Compiled functions that share one code object (every run's step forward, every module call) share its
# recompile limit: allow a few graphs (full batch, last batch, evaluation) for each of them.
RECOMPILES_PER_FUNCTION = 8

LossTerms = dict[str, torch.Tensor]
# forward(images, labels, index, epoch tensor, teacher outputs or None) -> one (logits, losses) per run
StepForward = Callable[..., Sequence[tuple[Optional[torch.Tensor], LossTerms]]]


def autocast_for(device: torch.device, amp: str):
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_compile_mode(mode: str, device: torch.device) -> tuple[str, Optional[str]]:
    """The compile mode that will actually run on `device`, and a one-line note when it differs."""
    if mode == "off":
        return mode, None
    if mode == "reduce-overhead" and device.type != "cuda":
        mode, note = "default", "train.compile=reduce-overhead needs CUDA (CUDA graphs): compiling with 'default'"
    else:
        note = None
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("cc", "gcc", "clang", "g++", "c++")):
        return "off", "train.compile: no C++ compiler for torch.compile on the CPU: training eagerly"
    return mode, note


def build_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig, device: Optional[torch.device] = None,
                    compile_mode: str = "off") -> torch.optim.Optimizer:
    """SGD or AdamW as `cfg` says, in the form the step runs best:

    - CUDA eager: fused, lr a 0-d device tensor (the kernels read it; no sync), found_inf honoured;
    - compiled: foreach with a 0-d tensor lr, which torch.compile turns into a few generated kernels and a
      CUDA graph replays with the current rate (AdamW also capturable: its step counter on the device);
    - CPU eager, and AdamW compiled on the CPU (a foreach AdamW takes a tensor lr only when capturable, which
      the CPU is not): torch's default implementation with a float lr, the update left uncompiled.
    """
    params = [p for p in params if p.requires_grad]
    device = device or (params[0].device if params else torch.device("cpu"))
    on_cuda = device.type == "cuda"
    if compile_mode != "off" and (cfg.optimizer == "sgd" or on_cuda):
        kind = {"foreach": True, **({"capturable": True} if cfg.optimizer == "adamw" else {})}
    elif on_cuda:
        kind = {"fused": True}
    else:
        kind = {}
    tensor_lr = bool(kind)
    lr = torch.tensor(cfg.lr, dtype=torch.float32, device=device) if tensor_lr else cfg.lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, **kind)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, **kind)


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


class LearningRate:
    """Sets the scheduled learning rate before each step, in place when it is a tensor."""

    def __init__(self, optimizer: torch.optim.Optimizer, schedule: Callable[[int], float]):
        self.optimizer, self.schedule = optimizer, schedule
        self._filled: Optional[float] = None  # the value last written into the tensors

    def set(self, step: int) -> float:
        lr = self.schedule(step)
        for group in self.optimizer.param_groups:
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = lr
            elif lr != self._filled:  # a step schedule changes it rarely: no kernel launch otherwise
                group["lr"].fill_(lr)  # the value travels as a kernel argument, not a copy from the host
        self._filled = lr
        return lr


@dataclass
class MeterReading:
    """One read-back of `DeviceMeters`."""

    seen: int
    loss: float
    terms: dict[str, float]  # mean of each loss term
    top1: float  # % of training samples the student got right (nan when the step has no logits)
    diverged: bool
    first_bad_step: int  # global index of the first step with a non-finite loss, -1 if none

    def describe(self) -> str:
        return ", ".join(f"{k}={v:.4g}" for k, v in self.terms.items())


def _accumulate(sums: torch.Tensor, correct: torch.Tensor, bad: torch.Tensor, first_bad: torch.Tensor,
                step: torch.Tensor, values: list[torch.Tensor], logits: Optional[torch.Tensor],
                labels: torch.Tensor) -> None:
    """Add one step to the accumulators, in place and without leaving the device."""
    stacked = torch.stack([v.detach().float() for v in values])
    finite = torch.isfinite(stacked).all()
    sums.add_(stacked * labels.shape[0])
    if logits is not None:
        correct.add_((logits.detach().argmax(1) == labels).sum())
    first_bad.copy_(torch.where((bad > 0) | finite, first_bad, step))
    bad.copy_(torch.maximum(bad, (~finite).float()))
    step.add_(1)


_compiled_accumulate: Optional[Callable] = None


class DeviceMeters:
    """Per-epoch sums of the loss and each term (weighted by batch size), correct predictions, and a sticky
    non-finite flag (float 0/1, usable as an optimizer's `found_inf`), all on the device."""

    def __init__(self, device: torch.device, first_step: int = 0, compiled: bool = False):
        self.device, self.compiled = device, compiled
        self.keys: Optional[list[str]] = None
        self.sums = torch.zeros(0, device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.bad = torch.zeros((), device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.step = torch.full((), first_step, dtype=torch.long, device=device)
        self.seen = 0
        self.has_logits = False

    def add(self, loss: torch.Tensor, terms: LossTerms, logits: Optional[torch.Tensor], labels: torch.Tensor) -> None:
        keys = list(terms)
        if self.keys is None:
            self.keys = keys
            self.sums = torch.zeros(1 + len(keys), device=self.device)
        elif keys != self.keys:
            raise ValueError(f"the loss terms changed within an epoch: {self.keys} then {keys}")
        accumulate = _accumulate
        if self.compiled:
            global _compiled_accumulate
            if _compiled_accumulate is None:
                _compiled_accumulate = torch.compile(_accumulate, dynamic=False)
            accumulate = _compiled_accumulate
        accumulate(self.sums, self.correct, self.bad, self.first_bad, self.step, [loss, *terms.values()], logits,
                   labels)
        self.seen += labels.shape[0]
        self.has_logits = self.has_logits or logits is not None

    def read(self, group=None) -> MeterReading:
        """Everything in one transfer to the host (a synchronisation); with a `Distributed` group, summed over
        its processes first (the first bad step is the earliest of any process)."""
        flat = torch.cat([self.sums, self.correct.float().view(1), self.bad.view(1),
                          torch.full((1,), float(self.seen), device=self.device)])
        first_bad = self.first_bad.clone()
        if group is not None and group.active:
            group.all_reduce_sum(flat)
            first_bad = torch.where(first_bad < 0, torch.iinfo(torch.long).max, first_bad)
            group.all_reduce_min(first_bad)
            first_bad = torch.where(first_bad == torch.iinfo(torch.long).max, -1, first_bad)
        values = flat.tolist()
        sums, correct, bad, seen = values[:-3], values[-3], values[-2], int(values[-1])
        n = max(seen, 1)
        terms = dict(zip(self.keys or [], (s / n for s in sums[1:])))
        return MeterReading(seen, sums[0] / n if sums else float("nan"), terms,
                            100 * correct / n if self.has_logits else float("nan"), bad > 0, int(first_bad))


@contextlib.contextmanager
def compile_scope(mode: str, functions: int = 1) -> Iterator[None]:
    """Raise dynamo's recompile limit for the block when compiling (`functions` compiled callables, each with a
    few shapes), and restore it afterwards.  The setting is named `recompile_limit` from torch 2.6 on and
    `cache_size_limit` before."""
    if mode == "off":
        yield
        return
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch(**{name: max(getattr(config, name), RECOMPILES_PER_FUNCTION * max(functions, 1))}):
        yield


def compile_function(fn: Callable, mode: str) -> Callable:
    """`fn` compiled for `mode` (one specialised graph per input shape), or `fn` itself when mode is off."""
    if mode == "off":
        return fn
    return torch.compile(fn, mode=None if mode == "default" else mode, dynamic=False)


def mark_static(tensors: Iterable[torch.Tensor]) -> None:
    """Tell the compiler these tensors keep their address (updated in place), so CUDA graphs read them live."""
    import torch._dynamo

    mark = getattr(torch._dynamo, "mark_static_address", None)
    if mark is not None:
        for tensor in tensors:
            mark(tensor)


class TrainStep:
    """One optimizer step for one or more runs that share an optimizer (batches arrive on the device, already
    in the models' memory format).

    `forward(images, labels, index, epoch)` returns one ``(logits, losses)`` per run (the logits may be None,
    e.g. in an init stage); their losses are summed into one backward, and each run's terms go to its own
    meters.  `meters` is replaced at every epoch by the loop.
    """

    def __init__(self, forward: StepForward, optimizer: torch.optim.Optimizer, device: torch.device, amp: str,
                 compile_mode: str = "off"):
        self.optimizer, self.device, self.amp = optimizer, device, amp
        self.compile_mode = compile_mode
        self.forward = compile_function(forward, compile_mode)
        self.meters: list[DeviceMeters] = []
        self.fused = any(g.get("fused") for g in optimizer.param_groups)
        # the loop marks each batch as one CUDA-graph generation (teacher, student, backward, update), so a
        # graph replay never reuses memory still holding this batch's teacher outputs
        self.cuda_graphs = compile_mode == "reduce-overhead" and device.type == "cuda"
        self._update = optimizer.step
        if compile_mode != "off" and any(g.get("foreach") for g in optimizer.param_groups):
            mark_static(group["lr"] for group in optimizer.param_groups)  # replayed graphs read the current value
            self._update = compile_function(optimizer.step, compile_mode)

    def new_epoch(self, runs: int, first_step: int) -> list[DeviceMeters]:
        self.meters = [DeviceMeters(self.device, first_step, compiled=self.compile_mode != "off") for _ in range(runs)]
        return self.meters

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, epoch: torch.Tensor,
                 teacher_outputs=None) -> None:
        with autocast_for(self.device, self.amp):
            outputs = self.forward(images, labels, index, epoch, teacher_outputs)
        total = None
        for meters, (logits, terms) in zip(self.meters, outputs):
            loss = sum(terms.values())
            meters.add(loss, terms, logits, labels)  # before the update: it reads the non-finite flag
            total = loss if total is None else total + loss
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.fused:
            # skip the update on the device once any run's loss was non-finite (GradScaler's protocol)
            flags = [m.bad for m in self.meters]
            self.optimizer.found_inf = flags[0] if len(flags) == 1 else torch.stack(flags).amax()
        self._update()


def prepare_models(modules: Iterable[nn.Module], device: torch.device, channels_last: bool) -> None:
    for module in modules:
        module.to(device)
        if channels_last:
            module.to(memory_format=torch.channels_last)


__all__ = ["TrainStep", "DeviceMeters", "MeterReading", "LearningRate", "autocast_for", "build_optimizer",
           "compile_scope", "compile_function", "mark_static", "resolve_compile_mode", "optimizer_state", "load_optimizer_state", "prepare_models"]
