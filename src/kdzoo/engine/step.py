"""The training step and what makes it fast, kept apart from the loop's bookkeeping (``trainer.py``).

One step is: for each of its micro-batches (gradient accumulation), forward under autocast (bf16 on CUDA), the
summed losses, backward (gradients averaged over processes on the last micro-batch only); then gradient
clipping, the optimizer update, and the step's loss terms, accuracy and a non-finite flag added to accumulators
on the device.  Nothing in it reads
a value back to the host: the loop reads the meters at progress refreshes and once per epoch.  With SAM/ASAM
(`StepOptions.sam_rho`, ``sam.py``) the micro-batches run forward and backward a second time at the perturbed
weights before clipping and the update; the meters keep the first pass's losses.

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

from .sam import sharpness_aware

# Compiled functions that share one code object (every run's step forward, every module call) share its
# recompile limit: allow a few graphs (full batch, last batch, evaluation) for each of them.
RECOMPILES_PER_FUNCTION = 8

LossTerms = dict[str, torch.Tensor]
# forward(*StepBatch.inputs, fractional epoch tensor) -> one (logits or None, losses) per run
StepForward = Callable[..., Sequence[tuple[Optional[torch.Tensor], LossTerms]]]


@dataclass
class StepBatch:
    """One micro-batch as a step's forward takes it: `inputs` (positional, already on the device), `size` its
    number of samples (the weight of its losses in the epoch's means) and `labels` (for the training accuracy
    of runs that return logits; None: no accuracy)."""

    inputs: tuple
    size: int
    labels: Optional[torch.Tensor] = None
    units: int = 0  # what throughput counts (e.g. tokens); 0: `size`


@dataclass(frozen=True)
class StepOptions:
    """How a step runs: autocast (`amp`), torch.compile (`compile`), micro-batches per optimizer step
    (`accumulation`), gradient clipping (`max_grad_norm`, 0: none) and SAM/ASAM (`sam_rho`, `sam_adaptive`)."""

    amp: str = "auto"
    compile: str = "off"
    accumulation: int = 1
    max_grad_norm: float = 0.0
    # when the last step's gradients are freed: before the forward (their memory then serves the activations) or,
    # False, just before the first backward, which allocates the same sizes again.  Neither changes what is
    # computed; which is faster depends on the model and the allocator (on a CPU, measured in alternated pairs:
    # a small CNN 6% faster with False, a small language model with large logits 3% faster with True).
    free_gradients_first: bool = False
    # sharpness-aware minimisation (`sam.py`): a second forward/backward at w + e(w) before the update; 0: off
    sam_rho: float = 0.0
    sam_adaptive: bool = False  # ASAM: e(w) scaled elementwise by |w|


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


def _accumulate(state: tuple[torch.Tensor, ...], values: list[torch.Tensor], logits: Optional[torch.Tensor],
                labels: Optional[torch.Tensor], size: int) -> None:
    """Add one micro-batch to the accumulators (sums, correct, bad, first_bad, step), in place and without leaving
    the device."""
    sums, correct, bad, first_bad, step = state
    stacked = torch.stack([v.detach().float() for v in values])
    finite = torch.isfinite(stacked).all()
    sums.add_(stacked * size)
    if logits is not None and labels is not None:
        correct.add_((logits.detach().argmax(1) == labels).sum())
    first_bad.copy_(torch.where((bad > 0) | finite, first_bad, step))
    bad.copy_(torch.maximum(bad, (~finite).float()))


_compiled_accumulate: Optional[Callable] = None


class DeviceMeters:
    """Per-epoch sums of the loss and each term (weighted by batch size), correct predictions, and a sticky
    non-finite flag (float 0/1, usable as an optimizer's `found_inf`), all on the device.  `state()` and
    `load()` carry them through a checkpoint written in the middle of an epoch."""

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

    def add(self, loss: torch.Tensor, terms: LossTerms, logits: Optional[torch.Tensor],
            labels: Optional[torch.Tensor], size: int) -> None:
        """One micro-batch's loss and terms; a term it lacks (e.g. cross-entropy on generated rows) counts 0."""
        if self.keys is None:
            self.keys = list(terms)
            self.sums = torch.zeros(1 + len(self.keys), device=self.device)
        elif list(terms) != self.keys:
            new = [k for k in terms if k not in self.keys]
            if new:
                self.keys = self.keys + new
                self.sums = torch.cat([self.sums, self.sums.new_zeros(len(new))])
            terms = {k: terms[k] if k in terms else loss.new_zeros(()) for k in self.keys}
        accumulate = _accumulate
        if self.compiled:
            global _compiled_accumulate
            if _compiled_accumulate is None:
                _compiled_accumulate = torch.compile(_accumulate, dynamic=False)
            accumulate = _compiled_accumulate
        accumulate((self.sums, self.correct, self.bad, self.first_bad, self.step), [loss, *terms.values()], logits,
                   labels, size)
        self.seen += size
        self.has_logits = self.has_logits or (logits is not None and labels is not None)

    def end_step(self) -> None:
        self.step.add_(1)

    def flag(self, loss: torch.Tensor) -> None:
        """Count a loss that is not metered (SAM's second pass) in the non-finite flag alone."""
        finite = torch.isfinite(loss.detach()).all()
        self.first_bad.copy_(torch.where((self.bad > 0) | finite, self.first_bad, self.step))
        self.bad.copy_(torch.maximum(self.bad, (~finite).float()))

    def state(self, group=None) -> dict:
        """The sums so far (with a `Distributed` group: over every process, a collective), for a checkpoint."""
        flat, first_bad = self._totals(group)
        sums, (correct, bad, seen) = flat[:-3], flat[-3:].tolist()
        return {"keys": self.keys, "sums": sums.cpu(), "correct": torch.tensor(int(correct)),
                "bad": torch.tensor(bad), "first_bad": first_bad.cpu(), "step": self.step.cpu(), "seen": int(seen),
                "has_logits": self.has_logits}

    def load(self, state: dict) -> None:
        self.keys, self.seen, self.has_logits = state["keys"], state["seen"], state["has_logits"]
        for name in ("sums", "correct", "bad", "first_bad", "step"):
            setattr(self, name, state[name].to(self.device))

    def _totals(self, group=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sums, correct, bad, seen) as one flat tensor and the first bad step, over the group's processes."""
        flat = torch.cat([self.sums, self.correct.float().view(1), self.bad.view(1),
                          torch.full((1,), float(self.seen), device=self.device)])
        first_bad = self.first_bad.clone()
        if group is not None and group.active:
            group.all_reduce_sum(flat)
            first_bad = torch.where(first_bad < 0, torch.iinfo(torch.long).max, first_bad)
            group.all_reduce_min(first_bad)
            first_bad = torch.where(first_bad == torch.iinfo(torch.long).max, -1, first_bad)
        return flat, first_bad

    def read(self, group=None) -> MeterReading:
        """Everything in one transfer to the host (a synchronisation); with a `Distributed` group, summed over
        its processes first (the first bad step is the earliest of any process)."""
        flat, first_bad = self._totals(group)
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
    config = torch._dynamo.config  # torch loads its compiler on first access (2 s): only when compiling
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
    mark = getattr(torch._dynamo, "mark_static_address", None)
    if mark is not None:
        for tensor in tensors:
            mark(tensor)


class TrainStep:
    """One optimizer step for one or more runs that share an optimizer (batches arrive on the device, already
    in the models' memory format).

    `forward(*batch.inputs, epoch)` returns one ``(logits, losses)`` per run (the logits may be None, e.g. in an
    init stage or for a language model); their losses are summed into one backward per micro-batch (divided by
    the number of micro-batches when accumulating), and each run's terms go to its own meters.  `sync(last)`
    is the context a micro-batch's backward runs in (a data-parallel wrapper's: gradients are averaged over
    processes on the last one only).  Gradients of `clip_parameters` (default: the optimizer's) are clipped to
    `options.max_grad_norm` in total norm.  `meters` is replaced at every epoch by the loop.
    """

    def __init__(self, forward: StepForward, optimizer: torch.optim.Optimizer, device: torch.device,
                 options: StepOptions = StepOptions(), clip_parameters: Optional[Sequence[torch.Tensor]] = None,
                 sync: Optional[Callable[[bool], contextlib.AbstractContextManager]] = None):
        self.optimizer, self.device, self.options = optimizer, device, options
        self.compile_mode = options.compile
        self.forward = compile_function(forward, options.compile)
        self.meters: list[DeviceMeters] = []
        self.units = 0  # samples (or tokens) stepped on, a host count for throughput
        self.fused = any(g.get("fused") for g in optimizer.param_groups)
        self.clip_parameters = list(clip_parameters if clip_parameters is not None else
                                    (p for g in optimizer.param_groups for p in g["params"]))
        self.sync = sync or (lambda last: contextlib.nullcontext())
        self.sam_parameters = [p for g in optimizer.param_groups for p in g["params"]]  # what SAM perturbs
        # the loop marks each batch as one CUDA-graph generation (teacher, student, backward, update), so a
        # graph replay never reuses memory still holding this batch's teacher outputs
        self.cuda_graphs = options.compile == "reduce-overhead" and device.type == "cuda"
        self._update = optimizer.step
        if options.compile != "off" and any(g.get("foreach") for g in optimizer.param_groups):
            mark_static(group["lr"] for group in optimizer.param_groups)  # replayed graphs read the current value
            self._update = compile_function(optimizer.step, options.compile)

    def new_epoch(self, runs: int, first_step: int) -> list[DeviceMeters]:
        self.meters = [DeviceMeters(self.device, first_step, compiled=self.compile_mode != "off") for _ in range(runs)]
        return self.meters

    def __call__(self, micro_batches: Iterable[StepBatch], epoch: torch.Tensor) -> None:
        """One optimizer step over `options.accumulation` micro-batches (an iterable, so each is prepared just
        before its forward; kept for a second pass with SAM)."""
        options = self.options
        if options.sam_rho:
            micro_batches = list(micro_batches)
        if options.free_gradients_first:
            self.optimizer.zero_grad(set_to_none=True)
        self._backward(micro_batches, epoch, metered=True)
        if options.sam_rho:  # the update takes the gradient at w + e(w); the meters keep the losses at w
            with sharpness_aware(self.sam_parameters, options.sam_rho, options.sam_adaptive):
                self.optimizer.zero_grad(set_to_none=True)
                self._backward(micro_batches, epoch, metered=False)
        for meters in self.meters:
            meters.end_step()
        if self.options.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.clip_parameters, self.options.max_grad_norm)
        if self.fused:
            # skip the update on the device once any run's loss was non-finite (GradScaler's protocol)
            flags = [m.bad for m in self.meters]
            self.optimizer.found_inf = flags[0] if len(flags) == 1 else torch.stack(flags).amax()
        self._update()

    def _backward(self, micro_batches: Iterable[StepBatch], epoch: torch.Tensor, metered: bool) -> None:
        """Forward and backward of every micro-batch, gradients accumulated; `metered`: their losses go to the
        meters (else only a non-finite one is flagged)."""
        accumulation = self.options.accumulation
        for i, batch in enumerate(micro_batches):
            with self.sync(i == accumulation - 1):
                with autocast_for(self.device, self.options.amp):
                    outputs = self.forward(*batch.inputs, epoch)
                total = None
                for meters, (logits, terms) in zip(self.meters, outputs):
                    loss = sum(terms.values())
                    if metered:
                        meters.add(loss, terms, logits, batch.labels, batch.size)  # before the update reads the flag
                    else:
                        meters.flag(loss)
                    total = loss if total is None else total + loss
                if accumulation > 1:
                    total = total / accumulation
                if i == 0 and not self.options.free_gradients_first:
                    self.optimizer.zero_grad(set_to_none=True)
                total.backward()
            if metered:
                self.units += batch.units or batch.size


def prepare_models(modules: Iterable[nn.Module], device: torch.device, channels_last: bool) -> None:
    for module in modules:
        module.to(device)
        if channels_last:
            module.to(memory_format=torch.channels_last)


__all__ = ["TrainStep", "StepBatch", "StepOptions", "DeviceMeters", "MeterReading", "autocast_for", "compile_scope",
           "compile_function", "mark_static", "resolve_compile_mode", "prepare_models"]
