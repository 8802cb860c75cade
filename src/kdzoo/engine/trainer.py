"""The one training loop of kdzoo.  It knows no task, method or model by name.

A `Task` (image classification, language models, ...) supplies what differs: its models on the device, the
optimizer steps (`StepGroup`: a `TrainStep` and its learning rate), the batches of each epoch, evaluation, and
what a row of metrics says.  The `Trainer` owns everything else, the same for every task: seeding, the loop over
epochs and steps, the learning-rate schedule, gradient accumulation and clipping (in the step), progress bars with
the time left, the non-finite check, evaluation cadence and the best metric, checkpoints (atomic, hashed, exact
resume, also from the middle of an epoch), metrics.csv and TensorBoard (through `Callback`s), and the
distributed group.  An *epoch* is a pass over the data, or, for a task that counts steps (a language model),
one evaluation period.

Several runs (students) may train in one loop on the same batches (`Run`: what its checkpoint holds, its run
directory, optimizer slot, history and best metric); a task's step groups say which runs each step trains.

Losses and accuracy are read back from the device only at progress refreshes (every `log_every` steps) and once
per epoch; a non-finite loss raises `TrainingDiverged` at the first of those reads, always before an evaluation
or checkpoint, and the weights are checked before every checkpoint write, so the last checkpoint on disk is the
last good one.  SIGTERM or SIGINT ends the run after the current step with a checkpoint (`Interrupted`).
"""
from __future__ import annotations

import abc
import contextlib
import csv
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from ..errors import ConfigError, TrainingDiverged
from .checkpoint import check_state_fits, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import Distributed
from .optim import LearningRate, OptimizerSlot
from .rundir import CHECKPOINT, METRICS
from .runtime import atomic_write, resolve_device, seed_everything
from .step import DeviceMeters, MeterReading, StepBatch, TrainStep, compile_scope, resolve_compile_mode
from .stopping import StopRequest, stop_requests


@dataclass
class LoopConfig:
    """How the loop runs; each task maps its config's train section onto it."""

    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: str = "off"  # off | default | reduce-overhead (the task's steps compile their forwards)
    eval_every: int = 1  # epochs
    save_every: int = 1  # epochs; 0: by `save_every_steps` alone.  The last step is always saved
    save_every_steps: int = 0  # optimizer steps (checkpoints inside an epoch resume exactly too)
    log_every: int = 20  # steps between progress refreshes (each reads values back from the device)
    progress: bool = True


@dataclass
class StepGroup:
    """A TrainStep and its learning rate, stepping the runs at `run_indices` (their meters, in that order)."""

    step: TrainStep
    lr: LearningRate
    run_indices: list[int]
    slots: list[OptimizerSlot]  # one per run
    finish_loading: Callable[[], None] = lambda: None  # after every run restored its checkpoint
    close: Callable[[], None] = lambda: None  # after training, even when it fails


class ShardedState:
    """How a run whose modules are sharded (FSDP2) is checkpointed: the whole state gathered from every process
    (a collective), and loaded back into the shards."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer):
        self.module, self.optimizer = module, optimizer

    def save(self) -> tuple[dict, dict]:
        return Distributed.full_state(self.module, self.optimizer)

    def load(self, model_state: dict, optimizer_state: dict) -> None:
        Distributed.load_full_state(self.module, self.optimizer, model_state, optimizer_state)


METRIC_NAMES = {"test_top1": "top-1", "test_miou": "mIoU", "test_map": "mAP"}  # as `FitResult.describe` says them


@dataclass
class FitResult:
    """What a run ended with: its last evaluation (`metrics`), the best value of the task's metric and the epoch
    it came at, every row of metrics, and the wall time."""

    metrics: dict[str, float]
    best: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    run_dir: Optional[Path] = None
    metric: str = "test_top1"  # the key `best` follows (the task's metric)

    def describe(self) -> str:
        """``last top-1 71.20%, best 72.00% (epoch 9)``: the task's metric, last and best."""
        name = METRIC_NAMES.get(self.metric, self.metric.removeprefix("test_"))
        last = self.metrics.get(self.metric, float("nan"))
        return f"last {name} {last:.2f}%, best {self.best:.2f}% (epoch {self.best_epoch})"

    @property
    def last_top1(self) -> float:
        """Classification: the last test top-1 (%)."""
        return self.metrics.get("test_top1", float("nan"))

    @property
    def last_top5(self) -> float:
        return self.metrics.get("test_top5", float("nan"))

    @property
    def best_top1(self) -> float:
        """Classification: the best test top-1 (%)."""
        return self.best


class Run:
    """One model trained in the loop: the modules its checkpoint holds (by name; restored strictly), its run
    directory and label, its optimizer slot (set by the Trainer from the task's step groups), its history and
    the best value of the task's metric.  `sharded`: its modules are FSDP2 shards, gathered for checkpoints."""

    def __init__(self, modules: Optional[dict[str, nn.Module]] = None, run_dir: Optional[str | Path] = None,
                 label: str = "", sharded: Optional[ShardedState] = None):
        self.modules = modules if modules is not None else {}  # a task may add the modules it builds in setup
        self.label, self.sharded = label, sharded
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.slot: Optional[OptimizerSlot] = None
        self.best, self.best_epoch, self.history = float("nan"), 0, []
        self.last: dict[str, float] = {}

    @property
    def checkpoint_path(self) -> Optional[Path]:
        return self.run_dir / CHECKPOINT if self.run_dir is not None else None

    def checkpoint(self, epoch: int, step: int) -> dict:
        """The run's whole state (a collective on every process when sharded)."""
        if self.sharded is not None:
            (name,) = self.modules
            model_state, optimizer_state = self.sharded.save()
            states = {name: model_state}
        else:
            # clones: a stacked student's tensors are views of a larger stack, which torch.save would write whole
            states = {name: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in module.state_dict().items()}
                      for name, module in self.modules.items()}
            optimizer_state = self.slot.state()
        return {**states, "optimizer": optimizer_state, "epoch": epoch, "step": step, "best": self.best,
                "best_epoch": self.best_epoch, "history": self.history, "rng": rng_state()}

    def restore(self) -> tuple[int, int, Optional[dict]]:
        """Load the run directory's checkpoint; (epoch, step, meters of a checkpoint inside an epoch) to continue
        from."""
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            raise ConfigError(f"--resume: no {CHECKPOINT} in {self.run_dir}")
        state = load_checkpoint(self.checkpoint_path)
        if self.sharded is not None:
            (name,) = self.modules
            self.sharded.load(state[name], state["optimizer"])
        else:
            for name, module in self.modules.items():
                check_state_fits(module, state.get(name), str(self.checkpoint_path), name)
                module.load_state_dict(state[name])
            self.slot.load(state["optimizer"])
        self.best = state["best"] if "best" in state else state["best_top1"]  # best_top1: before kdzoo 0.2
        self.best_epoch, self.history = state["best_epoch"], state["history"]
        set_rng_state(state["rng"])
        return state["epoch"], state["step"], state.get("meters")

    def diverged_message(self, reading: MeterReading, steps_per_epoch: int) -> str:
        bad = max(reading.first_bad_step, 0)
        where = (f"; the last good checkpoint {self.checkpoint_path} is intact"
                 if self.checkpoint_path and self.checkpoint_path.exists() else "")
        return (f"{self.label}loss is not finite at epoch {bad // steps_per_epoch + 1}, step {bad + 1} "
                f"(epoch means: {reading.describe()}){where}; try a lower train.lr or smaller method weights")

    def result(self, started: float, metric: str) -> FitResult:
        return FitResult(dict(self.last), self.best, self.best_epoch, self.history, time.perf_counter() - started,
                         self.run_dir, metric)


class Task(abc.ABC):
    """What a kind of run supplies to the `Trainer`; the Trainer drives it and owns the loop.

    Required: `setup` (models to `trainer.device`, data; set `steps_per_epoch` and `total_steps`), `schedule`,
    `build_steps`, `batches` and `evaluate`.  The other hooks have defaults that do nothing.  `metric` is the
    evaluation key `best` follows (``higher_is_better``), `log_axis` the x-axis of TensorBoard (``epoch`` or
    ``step``)."""

    metric: str = "loss"
    higher_is_better: bool = False
    log_axis: str = "epoch"
    unit: str = "img"  # what throughput counts (img/s, tok/s)
    steps_per_epoch: int = 0
    total_steps: int = 0

    @abc.abstractmethod
    def setup(self, trainer: "Trainer") -> None:
        """Models on `trainer.device` (wrapped on several processes), data; `steps_per_epoch`, `total_steps`."""

    @abc.abstractmethod
    def schedule(self, trainer: "Trainer") -> Callable[[int], float]:
        """The learning rate of each (0-based) optimizer step."""

    @abc.abstractmethod
    def build_steps(self, trainer: "Trainer") -> list[StepGroup]:
        """The optimizer steps: a `TrainStep` and its learning rate per group of runs."""

    @abc.abstractmethod
    def batches(self, trainer: "Trainer", epoch: int, first_step: int) -> Iterable[Iterable[StepBatch]]:
        """The optimizer steps of `epoch` from global step `first_step` on, each an iterable of its micro-batches
        (prepared lazily, just before each forward)."""

    @abc.abstractmethod
    def evaluate(self, trainer: "Trainer", index: int) -> dict[str, float]:
        """Run `index`'s evaluation metrics (keys prefixed, e.g. ``test_top1``), on every process."""

    def before_loop(self, trainer: "Trainer") -> list[int]:
        """Work before the first epoch of a new run (e.g. methods' init stages); the runs whose checkpoint is then
        due, so a resume never repeats it."""
        return []

    def session(self, trainer: "Trainer") -> contextlib.AbstractContextManager:
        """A context around the epochs (e.g. hooks on a shared teacher)."""
        return contextlib.nullcontext()

    def train_mode(self) -> None:
        """Put the trained modules in training mode (at every epoch's start)."""

    def start_epoch(self, trainer: "Trainer", epoch: int) -> None:
        pass

    def end_epoch(self, trainer: "Trainer", epoch: int) -> None:
        """After the epoch's last step, before its meters are read (e.g. merge caches over processes)."""

    def before_evaluation(self, trainer: "Trainer", index: int) -> None:
        """Before run `index` is evaluated and checkpointed (e.g. every process takes rank 0's buffers)."""

    def train_metrics(self, reading: MeterReading, seconds: float, units: int) -> dict[str, float]:
        """A row's training columns beside ``train_loss``: `units` counted this epoch over `seconds`."""
        return {}

    def describe(self, row: dict, run: Run) -> str:
        """The console line's words about a row, after its loss."""
        return ""

    def finish(self, trainer: "Trainer") -> None:
        """After the last step, on every process (a sharded model is gathered for its export here)."""

    def close(self) -> None:
        """After training, even when it fails (remove hooks)."""


class Callback:
    """What happens around the loop for each run; every hook is optional.  Only the main process calls them."""

    def on_train_start(self, trainer: "Trainer", run: Run) -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer", run: Run, row: dict, improved: bool) -> None:
        pass

    def on_checkpoint(self, trainer: "Trainer", run: Run, epoch: int) -> None:
        """After the run's checkpoint was written."""

    def on_train_end(self, trainer: "Trainer", run: Run) -> None:
        pass


class MetricsLog(Callback):
    """metrics.csv (rewritten atomically each epoch) and TensorBoard events in the run directory."""

    def __init__(self):
        self.writers: dict[int, SummaryWriter] = {}

    def on_train_start(self, trainer, run):
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_metrics_csv(run.run_dir / METRICS, run.history)  # a resumed run drops rows after its checkpoint
        axis = trainer.task.log_axis
        purge = (trainer.start_epoch if axis == "epoch" else trainer.step) + 1 if trainer.resumed else None
        self.writers[id(run)] = SummaryWriter(str(run.run_dir / "tensorboard"), purge_step=purge)

    def on_epoch_end(self, trainer, run, row, improved):
        write_metrics_csv(run.run_dir / METRICS, run.history)
        writer = self.writers[id(run)]
        axis = trainer.task.log_axis
        for key, value in row.items():
            if key not in ("epoch", "step"):
                writer.add_scalar(key, value, row[axis])
        writer.flush()

    def on_train_end(self, trainer, run):
        writer = self.writers.pop(id(run), None)
        if writer is not None:
            writer.close()


class ConsoleLog(Callback):
    """One line per epoch with the time left for the whole run (through tqdm when a progress bar is shown)."""

    def on_train_start(self, trainer, run):
        if trainer.resumed and run.run_dir is not None:
            print(f"resumed {run.run_dir} at epoch {trainer.start_epoch} (step {trainer.step})")

    def on_epoch_end(self, trainer, run, row, improved):
        eta = trainer.eta_seconds()
        left = f"  run ETA {format_duration(eta)}" if eta is not None and row["step"] < trainer.total_steps else ""
        words = trainer.task.describe(row, run)
        message = (f"{run.label}{trainer.position(row)}  loss {row['train_loss']:.4f}"
                   f"{'  ' + words if words else ''}{left}")
        tqdm.write(message) if trainer.show_bar else print(message, flush=True)


def default_callbacks(run_dir: Optional[Path], verbose: bool) -> list[Callback]:
    """Console lines, and with a run directory metrics.csv and TensorBoard."""
    return ([ConsoleLog()] if verbose else []) + ([MetricsLog()] if run_dir is not None else [])


class Trainer:
    """The loop over epochs and steps of a `Task`, for one or more runs that see the same batches.

    Its state is in its fields (`epoch`, `step`, `runs`, `groups`...); `run()` trains and returns one `FitResult`
    per run.  Launched by torchrun, every process builds the same Trainer.  `callbacks[k]`: run k's;
    `on_step(step)`: called after every optimizer step."""

    def __init__(self, task: Task, cfg: LoopConfig, runs: Sequence[Run], *, resume: bool = False,
                 callbacks: Optional[Sequence[Sequence[Callback]]] = None,
                 on_step: Optional[Callable[[int], None]] = None, verbose: bool = True,
                 group: Optional[Distributed] = None):
        self.task, self.cfg, self.runs = task, cfg, list(runs)
        self.resumed, self.on_step = resume, on_step
        self.group = group or Distributed.from_env(cfg.device)
        self.device = self.group.device(resolve_device(cfg.device))
        self.verbose = verbose and self.group.is_main
        if callbacks is None:
            callbacks = [default_callbacks(run.run_dir, verbose) for run in self.runs]
        self.callbacks = [list(c) if self.group.is_main else [] for c in callbacks]
        self.start_epoch = self.epoch = self.step = 0
        self.started = time.perf_counter()
        # a progress bar redraws itself with carriage returns: only on a terminal; into a file (or a pipe) the
        # progress goes as plain lines, a few per epoch
        self.show_bar = cfg.progress and _is_terminal(sys.stderr)
        self._loop_start: Optional[tuple[float, int]] = None  # (time, step) where this start's main loop began
        self._resume_meters: Optional[list] = None
        self.stop = StopRequest()  # replaced by the live one while `run` trains

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed, cfg.deterministic)
        self.compile_mode, note = resolve_compile_mode(cfg.compile, self.device)
        if note and self.verbose:
            print(note)
        self.task.setup(self)
        self.steps_per_epoch, self.total_steps = self.task.steps_per_epoch, self.task.total_steps
        self.epochs = -(-self.total_steps // self.steps_per_epoch)
        self.schedule = self.task.schedule(self)
        self.groups = self.task.build_steps(self)
        for g in self.groups:
            for k, slot in zip(g.run_indices, g.slots):
                self.runs[k].slot = slot

    def _notify(self, event: str, run_index: int, *args) -> None:
        for callback in self.callbacks[run_index]:
            getattr(callback, event)(self, self.runs[run_index], *args)

    # ------------------------------------------------------------------ the loop

    def run(self) -> list[FitResult]:
        try:
            self._setup()
            try:
                with stop_requests() as self.stop:
                    self._train()
            finally:
                for g in self.groups:
                    g.close()
            self.task.finish(self)
            for k in range(len(self.runs)):
                self._notify("on_train_end", k)
            return [run.result(self.started, self.task.metric) for run in self.runs]
        finally:
            self.task.close()
            self.group.close()

    def _train(self) -> None:
        if self.resumed:
            positions = [run.restore() for run in self.runs]
            if len({(epoch, step) for epoch, step, _ in positions}) > 1:
                raise ConfigError(f"--resume: the runs stopped at different points "
                                  f"{sorted({(e, s) for e, s, _ in positions})}; resume them apart")
            _, self.step, _ = positions[0]
            self.start_epoch = self.step // self.steps_per_epoch
            if any(meters is not None for _, _, meters in positions):
                self._resume_meters = [meters for _, _, meters in positions]
            for g in self.groups:
                g.finish_loading()
        for k in range(len(self.runs)):
            self._notify("on_train_start", k)
        with compile_scope(self.compile_mode, functions=len(self.runs) + 1):
            if not self.resumed:
                for k in self.task.before_loop(self):
                    self.save_checkpoint(k, 0)  # so a resume never repeats what came before the loop
            with self.task.session(self):
                self._loop_start = (time.perf_counter(), self.step)
                for self.epoch in range(self.start_epoch, self.epochs):
                    self._epoch()

    def epoch_steps(self, epoch: int) -> int:
        """Optimizer steps in `epoch` (the last epoch of a step-counted run may be shorter)."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def _epoch(self) -> None:
        epoch = self.epoch
        self.task.train_mode()
        meters: list[Optional[DeviceMeters]] = [None] * len(self.runs)
        for g in self.groups:
            for k, m in zip(g.run_indices, g.step.new_epoch(len(g.run_indices), self.step)):
                meters[k] = m
        if self._resume_meters is not None:  # a checkpoint inside this epoch: its sums so far, over every process
            if self.group.is_main:
                for m, state in zip(meters, self._resume_meters):
                    m.load(state)
            self._resume_meters = None
        offset = self.step - epoch * self.steps_per_epoch
        batches = self.task.batches(self, epoch, self.step)
        self.task.start_epoch(self, epoch)

        def check() -> list[MeterReading]:
            readings = [m.read(self.group) for m in meters]
            for run, reading in zip(self.runs, readings):
                if reading.diverged:
                    raise TrainingDiverged(run.diverged_message(reading, self.steps_per_epoch))
            return readings

        def after_step(step: int) -> None:
            inside = step < min((epoch + 1) * self.steps_per_epoch, self.total_steps)
            stopping = inside and self.stop_agreed(step)  # at an epoch's end the epoch finishes first
            if inside and (stopping or (self.cfg.save_every_steps and step % self.cfg.save_every_steps == 0)):
                check()  # never a checkpoint after a non-finite loss
                for k in range(len(self.runs)):
                    self.save_checkpoint(k, epoch, meters[k])
            if stopping:
                raise self.stop.interrupted(self.stopped_where())
            if self.on_step is not None:
                self.on_step(step)

        epoch_start = time.perf_counter()
        units = self.run_pass(batches, self.groups, PassSpec(self.epoch_steps(epoch), self.epoch_label(epoch),
                                                             offset), check, after_step)
        self.task.end_epoch(self, epoch)
        readings = check()
        train_seconds = time.perf_counter() - epoch_start
        saved = []
        for k, (run, reading) in enumerate(zip(self.runs, readings)):
            self.task.before_evaluation(self, k)
            saved.append(self._end_epoch(k, run, reading, train_seconds, units))
        if epoch + 1 < self.epochs and self.stop_agreed(self.step, every_step=True):
            for k in range(len(self.runs)):
                if not saved[k]:
                    self.save_checkpoint(k, epoch + 1)
            raise self.stop.interrupted(self.stopped_where())

    def stop_agreed(self, step: int, every_step: bool = False) -> bool:
        """Whether to stop now on a signal.  One process decides alone; the processes of a distributed job
        agree every `log_every` steps (and at epoch ends), as a signal may reach them at different steps."""
        if not self.group.active:
            return self.stop.requested
        if not (every_step or step % self.cfg.log_every == 0):
            return False
        flag = torch.tensor(float(self.stop.requested), device=self.device)
        self.group.all_reduce_sum(flag)
        if flag.item() > 0 and not self.stop.requested:
            self.stop.signal_number = signal.SIGTERM  # another process was signalled (torchrun passes SIGTERM on)
        return flag.item() > 0

    def stopped_where(self) -> str:
        paths = [str(run.checkpoint_path) for run in self.runs if run.checkpoint_path is not None]
        saved = f"; the checkpoint is in {', '.join(paths)}" if paths else ""
        return f"after step {self.step}/{self.total_steps}{saved}"

    def epoch_label(self, epoch: int) -> str:
        if self.task.log_axis == "step":
            first = epoch * self.steps_per_epoch
            return f"steps {first + 1}-{first + self.epoch_steps(epoch)}/{self.total_steps}"
        return f"epoch {epoch + 1}/{self.epochs}"

    def position(self, row: dict) -> str:
        """Where a row of metrics stands: ``epoch 3/20`` or ``step 600/1000``."""
        if self.task.log_axis == "step":
            return f"step {row['step']}/{self.total_steps}"
        return f"epoch {row['epoch']}/{self.epochs}"

    def _end_epoch(self, k: int, run: Run, reading: MeterReading, train_seconds: float, units: int) -> bool:
        """Evaluate and log run k's epoch; whether its checkpoint was written."""
        cfg, epoch, task = self.cfg, self.epoch, self.task
        row = {"epoch": epoch + 1, "step": self.step, "lr": self.schedule(self.step - 1), "train_loss": reading.loss}
        row.update(task.train_metrics(reading, train_seconds, units))
        row.update({f"loss_{key}": value for key, value in reading.terms.items()})
        improved = False
        last = epoch + 1 == self.epochs
        if (epoch + 1) % cfg.eval_every == 0 or last:
            self.check_weights(run)  # weights gone non-finite a step before the loss shows it: no NaN metrics
            run.last = task.evaluate(self, k)
            value = run.last[task.metric]
            if math.isnan(run.best) or (value > run.best if task.higher_is_better else value < run.best):
                run.best, run.best_epoch, improved = value, epoch + 1, True
            row.update(run.last)
        row.update({f"best_{task.metric.split('_', 1)[-1]}": run.best, "seconds": time.perf_counter() - self.started})
        run.history.append(row)
        self._notify("on_epoch_end", k, row, improved)
        if (cfg.save_every and (epoch + 1) % cfg.save_every == 0) or last or \
                (cfg.save_every_steps and self.step % cfg.save_every_steps == 0):
            self.save_checkpoint(k, epoch + 1)
            return True
        return False

    def save_checkpoint(self, k: int, epoch: int, meters: Optional[DeviceMeters] = None) -> None:
        """Run k's checkpoint, atomically, by the main process (every process takes part in gathering a sharded
        state); `meters`: the sums of an epoch in progress."""
        run = self.runs[k]
        if run.checkpoint_path is None:
            return
        self.check_weights(run)
        totals = meters.state(self.group) if meters is not None else None  # summed over processes: a collective
        if self.group.is_main or run.sharded is not None:  # gathering shards takes every process too
            state = run.checkpoint(epoch, self.step)
            if totals is not None:
                state["meters"] = totals
            if self.group.is_main:
                save_checkpoint(run.checkpoint_path, state)
        self.group.barrier()
        self._notify("on_checkpoint", k, epoch)

    def check_weights(self, run: Run) -> None:
        """Raise `TrainingDiverged` when a weight of `run` is NaN or infinite (a loss can stay finite a step
        longer), so such weights never reach a checkpoint; every process checks its own (shard of the) weights
        and they agree."""
        tensors = [(f"{name}.{key}", t) for name, module in run.modules.items()
                   for key, t in module.state_dict().items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not tensors:
            return
        finite = torch.stack([(t.to_local() if hasattr(t, "to_local") else t).detach().isfinite().all()
                              for _, t in tensors])  # a sharded tensor: this process's part
        bad = (~finite).sum().float()
        self.group.all_reduce_sum(bad)
        if bad.item() == 0:
            return
        first = next((key for (key, _), ok in zip(tensors, finite.tolist()) if not ok), "on another process")
        where = (f"; the last good checkpoint {run.checkpoint_path} is intact"
                 if run.checkpoint_path is not None and run.checkpoint_path.exists() else "")
        raise TrainingDiverged(f"{run.label}weights are not finite at step {self.step} (first: {first}); they were "
                               f"not saved{where}; try a lower train.lr or smaller method weights")

    def eta_seconds(self) -> Optional[float]:
        """Seconds left in the whole run (every remaining step, evaluations included) at the rate of this start's
        main loop so far; None before its first step."""
        if self._loop_start is None or self.step <= self._loop_start[1]:
            return None
        started, first_step = self._loop_start
        rate = (time.perf_counter() - started) / (self.step - first_step)
        return max(self.total_steps - self.step, 0) * rate

    def run_pass(self, batches: Iterable[Iterable[StepBatch]], groups: list[StepGroup], spec: "PassSpec",
                 check: Callable[[], list[MeterReading]], after_step: Optional[Callable[[int], None]] = None) -> int:
        """Up to `spec.steps` optimizer steps, every group stepping on every batch; meters are read every
        `log_every` steps.  Returns the units (samples, or tokens) the first group counted.

        Progress: loss and accuracy appear from the first steps (steps 1, 2, 4, ... of the first epoch of a start,
        then every `log_every`), with the time left for the whole run; on a terminal in a tqdm bar, elsewhere
        as plain lines at most every 10% of an epoch."""
        cfg, device = self.cfg, self.device
        show = cfg.progress and self.group.is_main
        bar = tqdm(total=spec.steps - spec.offset, desc=spec.description, leave=False,
                   disable=not (show and self.show_bar), dynamic_ncols=True)
        early = self.epoch == self.start_epoch and spec.epoch_offset is None  # the first epoch of this start
        last_line = 0
        start, lr = time.perf_counter(), float("nan")
        units_before = groups[0].step.units
        cuda_graphs = any(g.step.cuda_graphs for g in groups)
        progress = torch.zeros((), device=device)  # the fractional epoch, filled in place (no host sync)
        iterator: Iterator = iter(batches)
        for n in range(spec.steps - spec.offset):
            i = spec.offset + n  # the step's index in its epoch
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # one graph generation per batch, teacher included
            micro_batches = next(iterator, None)
            if micro_batches is None:
                break
            progress.fill_(spec.epoch_offset if spec.epoch_offset is not None else
                           self.epoch + i / self.steps_per_epoch)
            for g in groups:
                lr = g.lr.set(self.step)
                g.step(micro_batches, progress)
            self.step += 1
            bar.update()
            first_steps = early and (n + 1) < cfg.log_every and (n + 1) & n == 0  # steps 1, 2, 4, 8, ...
            if (i + 1) % cfg.log_every == 0 or first_steps:
                reading = check()[0]  # stops a diverged run here, before anything is saved
                if show:
                    rate = (groups[0].step.units - units_before) / (time.perf_counter() - start)
                    last_line = self._show_progress(bar, spec, (reading, i, n, lr, rate), last_line)
            if after_step is not None:
                after_step(self.step)
        bar.close()
        return groups[0].step.units - units_before

    def _show_progress(self, bar, spec: "PassSpec", state: tuple, last_line: int) -> int:
        """Show one progress reading (in the bar, or as a plain line); returns the step of the last plain line."""
        reading, i, n, lr, rate = state
        eta = self.eta_seconds() if spec.epoch_offset is None else None
        unit = f"{self.task.unit}_s"
        numbers = {"loss": f"{reading.loss:.3f}", **({"acc": f"{reading.top1:.1f}"} if not math.isnan(reading.top1)
                                                     else {}),
                   unit: f"{rate:.0f}", "lr": f"{lr:.3g}", **({"run_eta": format_duration(eta)} if eta is not None
                                                             else {})}
        if self.show_bar:
            bar.set_postfix(**numbers)
        elif i + 1 < spec.steps and (n == 0 or (i + 1 - last_line) * 10 >= spec.steps):
            words = {"acc": "train", unit: f"{self.task.unit}/s", "run_eta": "run ETA"}
            print(f"{spec.description}  step {i + 1}/{spec.steps}  " + "  ".join(
                f"{words.get(k, k)} {v}{'%' if k == 'acc' else ''}" for k, v in numbers.items()), flush=True)
            return i + 1
        return last_line


@dataclass
class PassSpec:
    """One pass of `Trainer.run_pass`: its length in steps (of the whole epoch), a description for the progress,
    the steps of it already done (a resumed epoch), and a fixed fractional epoch for the methods (None: the
    running one)."""

    steps: int
    description: str
    offset: int = 0
    epoch_offset: Optional[float] = None


def format_duration(seconds: float) -> str:
    """``45s``, ``3m05s``, ``2h07m``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream
        return False


def write_metrics_csv(path: Path, history: list[dict]) -> None:
    """One row per epoch (or evaluation), columns in first-seen order, written atomically."""
    keys = list(dict.fromkeys(k for row in history for k in row))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=keys)
            out.writeheader()
            out.writerows(history)

    atomic_write(path, write)


__all__ = ["Trainer", "Task", "Run", "LoopConfig", "StepGroup", "PassSpec", "ShardedState", "FitResult", "Callback",
           "MetricsLog", "ConsoleLog", "default_callbacks", "format_duration", "write_metrics_csv"]
