"""fit(): the training loop.  It knows no method by name: ``loss = sum(output.losses.values())``.

A `Trainer` holds the loop's state (device, schedule, step groups, the teacher feed, epoch and step) and one
`RunState` per student (its distiller, optimizer slot, history, best accuracy); what happens at the end of an
epoch or of training (metrics, console, checkpoints, exported weights) is done by `Callback`s.  The step
itself (autocast, channels_last, torch.compile / CUDA graphs, fused optimizer, meters on the device) lives in
``fast_step.py``; where each batch's teacher outputs come from (one shared forward, or a cache) in
``teacher_cache.py`` (they reach each distiller as ``teacher_outputs``); several students in one process in
``multi.py``; several processes in ``distributed.py``.  Losses and accuracy are read back from the device only
at progress refreshes (every `log_every` steps) and once per epoch; a non-finite loss raises
`TrainingDiverged` at the first of those reads, always before an evaluation or checkpoint, so the last
checkpoint on disk is the last good one.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import TrainConfig, save_config
from ..data import DataSplits, make_loader
from ..distiller import DistillOutput, Distiller, TeacherOutputs
from ..errors import ConfigError, TrainingDiverged
from ..runtime import atomic_write, resolve_device, seed_everything
from .checkpoint import export_weights, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import Distributed
from .fast_step import (DeviceMeters, LearningRate, MeterReading, TrainStep, autocast_for, build_optimizer,
                        compile_scope, load_optimizer_state, optimizer_state, prepare_models, resolve_compile_mode)
from .schedule import learning_rate
from .teacher_cache import TeacherCache, TeacherFeed

CHECKPOINT = "checkpoint.pt"
EVALUATION_MODEL = "student_with_heads.safetensors"  # exported when a method changes how predictions are made
METRICS = "metrics.csv"
RUN_CONFIG = "config.yaml"  # what `kdzoo train`/`kdzoo teacher` write: the whole run's config
TRAIN_CONFIG = "train.yaml"  # what `fit` writes for a run started from Python: the TrainConfig alone


@dataclass
class FitResult:
    last_top1: float
    best_top1: float
    best_epoch: int
    last_top5: float
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    run_dir: Optional[Path] = None


def scaled_lr(cfg: TrainConfig) -> tuple[float, float]:
    """(base learning rate, warm-up epochs) after large-batch scaling (Goyal et al. 2017): `lr` was tuned for
    `reference_batch_size`; a batch k times larger gets k (linear) or sqrt(k) times the rate, reached by a
    linear warm-up over `scaling_warmup_epochs` when the rate went up."""
    k = cfg.batch_size / cfg.reference_batch_size
    if cfg.lr_scaling == "none" or k == 1:
        return cfg.lr, cfg.warmup_epochs
    scale = k if cfg.lr_scaling == "linear" else math.sqrt(k)
    warmup = max(cfg.warmup_epochs, cfg.scaling_warmup_epochs) if scale > 1 else cfg.warmup_epochs
    return cfg.lr * scale, warmup


def lr_schedule(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The learning rate of each (0-based) optimizer step."""
    base_lr, warmup = scaled_lr(cfg)
    return functools.partial(learning_rate, base_lr=base_lr, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs,
                             schedule=cfg.schedule, milestones=cfg.milestones, gamma=cfg.gamma,
                             warmup_epochs=warmup, min_lr=cfg.min_lr)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int = 256, device: Optional[torch.device] = None,
             amp: str = "auto", num_workers: int = 0, channels_last: bool = False) -> dict[str, float]:
    """Top-1, top-5 (%) and mean cross-entropy of `model` on `dataset` (one read-back at the end)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    correct1 = torch.zeros((), device=device)
    correct5 = torch.zeros((), device=device)
    loss_sum = torch.zeros((), device=device)
    count = 0
    for images, labels, _ in make_loader(dataset, batch_size, shuffle=False, num_workers=num_workers, device=device):
        if device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # each batch its own generation if `model` is graph-compiled
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_for(device, amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum")
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        correct1 += hits[:, 0].sum()
        correct5 += hits.any(1).sum()
        count += len(labels)
    model.train(was_training)
    correct1, correct5, loss_sum = torch.stack([correct1, correct5, loss_sum]).tolist()
    return {"top1": 100 * correct1 / count, "top5": 100 * correct5 / count, "loss": loss_sum / count}


def evaluation_model(distiller) -> nn.Module:
    """What evaluation scores for a run: the distiller's `evaluation_model()` (a method's extra heads combined
    with the student), else the student."""
    chooser = getattr(distiller, "evaluation_model", None)
    if chooser is None:
        return distiller.student
    with torch.no_grad():
        return chooser()


class Distillable(Protocol):
    """What the trainer needs of a distiller (`kdzoo.Distiller` is one): a student, an optional teacher, named
    methods (state saved in checkpoints), the parameters to train, a forward that returns logits and named
    losses and takes precomputed teacher outputs, and its hooks closed when training ends."""

    student: nn.Module
    teacher: Optional[nn.Module]
    methods: nn.ModuleDict

    @property
    def needs_teacher(self) -> bool: ...

    @property
    def teacher_paths(self) -> dict[str, str]: ...

    def trainable_parameters(self): ...

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, index: Optional[torch.Tensor] = None,
                 epoch: float | torch.Tensor = 0.0, teacher_outputs: Optional[TeacherOutputs] = None,
                 student_logits: Optional[torch.Tensor] = None) -> DistillOutput: ...

    def close(self) -> None: ...


class OptimizerSlot:
    """How a run's optimizer state is read for its checkpoint and restored from it."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def state(self) -> dict:
        return optimizer_state(self.optimizer)

    def load(self, state: dict) -> None:
        load_optimizer_state(self.optimizer, state)


@dataclass
class StepGroup:
    """A TrainStep and its learning rate, stepping the runs at `run_indices` (their meters, in that order)."""

    step: TrainStep
    lr: LearningRate
    run_indices: list[int]
    slots: list[OptimizerSlot]  # one per run
    finish_loading: Callable[[], None] = lambda: None  # after every run restored its checkpoint
    close: Callable[[], None] = lambda: None  # after training, even when it fails


def distiller_forward(model: Callable[..., DistillOutput]):
    """The step forward of one distiller (or its DDP wrapper): one (logits, losses) pair."""

    def forward(images, labels, index, epoch, teacher_outputs):
        out = model(images, labels, index=index, epoch=epoch, teacher_outputs=teacher_outputs)
        return [(out.logits, out.losses)]

    return forward


def separate_steps(distillers: Sequence[Distillable], cfg: TrainConfig, device: torch.device, compile_mode: str,
                   schedule: Callable[[int], float], wrap: Callable[[nn.Module], nn.Module] = lambda m: m) -> list[StepGroup]:
    """One optimizer and step per distiller (fit, and fit_many when students cannot be stacked); `wrap` puts a
    distiller in its DDP wrapper on several processes."""
    groups = []
    for k, distiller in enumerate(distillers):
        optimizer = build_optimizer(distiller.trainable_parameters(), cfg, device, compile_mode)
        step = TrainStep(distiller_forward(wrap(distiller)), optimizer, device, cfg.amp, compile_mode)
        groups.append(StepGroup(step, LearningRate(optimizer, schedule), [k], [OptimizerSlot(optimizer)]))
    return groups


StepBuilder = Callable[..., list[StepGroup]]


class RunState:
    """One student's state in the loop: its distiller, run directory, optimizer slot, history and best."""

    def __init__(self, distiller: Distillable, run_dir: Optional[str | Path], export_meta: Optional[dict],
                 label: str = ""):
        self.distiller, self.student = distiller, distiller.student
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.export_meta, self.label = export_meta, label
        self.slot: Optional[OptimizerSlot] = None
        self.best, self.best_epoch, self.history = -1.0, 0, []
        self.last = {"top1": float("nan"), "top5": float("nan")}

    @property
    def checkpoint_path(self) -> Optional[Path]:
        return self.run_dir / CHECKPOINT if self.run_dir is not None else None

    def checkpoint(self, epoch: int, step: int) -> dict:
        # clones: a stacked student's tensors are views of a larger stack, which torch.save would write whole
        return {"student": {k: v.clone() for k, v in self.student.state_dict().items()},
                "methods": self.distiller.methods.state_dict(), "optimizer": self.slot.state(), "epoch": epoch,
                "step": step, "best_top1": self.best, "best_epoch": self.best_epoch, "history": self.history,
                "rng": rng_state()}

    def restore(self) -> tuple[int, int]:
        """Load the run directory's checkpoint; (epoch, step) to continue from."""
        if self.checkpoint_path is None or not self.checkpoint_path.exists():
            raise ConfigError(f"--resume: no {CHECKPOINT} in {self.run_dir}")
        state = load_checkpoint(self.checkpoint_path)
        self.student.load_state_dict(state["student"])
        self.distiller.methods.load_state_dict(state["methods"])
        self.slot.load(state["optimizer"])
        self.best, self.best_epoch, self.history = state["best_top1"], state["best_epoch"], state["history"]
        set_rng_state(state["rng"])
        return state["epoch"], state["step"]

    def diverged_message(self, reading: MeterReading, steps_per_epoch: int) -> str:
        bad = max(reading.first_bad_step, 0)
        where = (f"; the last good checkpoint {self.checkpoint_path} is intact"
                 if self.checkpoint_path and self.checkpoint_path.exists() else "")
        return (f"{self.label}loss is not finite at epoch {bad // steps_per_epoch + 1}, step {bad + 1} "
                f"(epoch means: {reading.describe()}){where}; try a lower train.lr or smaller method weights")

    def result(self, started: float) -> FitResult:
        final = self.history[-1] if self.history else {}
        return FitResult(final.get("test_top1", self.last["top1"]), self.best, self.best_epoch,
                         final.get("test_top5", self.last["top5"]), self.history, time.perf_counter() - started,
                         self.run_dir)


class Callback:
    """What happens around the loop for each run; every hook is optional.  Only the main process calls them."""

    def on_train_start(self, trainer: "Trainer", run: RunState) -> None:
        pass

    def on_checkpoint_due(self, trainer: "Trainer", run: RunState, epoch: int) -> None:
        """After the init stages (epoch 0) and at every epoch the schedule saves."""

    def on_epoch_end(self, trainer: "Trainer", run: RunState, row: dict, improved: bool) -> None:
        pass

    def on_train_end(self, trainer: "Trainer", run: RunState) -> None:
        pass


class MetricsLog(Callback):
    """metrics.csv (rewritten atomically each epoch) and TensorBoard events in the run directory."""

    def __init__(self):
        self.writers: dict[int, object] = {}

    def on_train_start(self, trainer, run):
        run.run_dir.mkdir(parents=True, exist_ok=True)
        write_metrics_csv(run.run_dir / METRICS, run.history)  # a resumed run drops rows after its checkpoint
        from torch.utils.tensorboard import SummaryWriter

        self.writers[id(run)] = SummaryWriter(str(run.run_dir / "tensorboard"),
                                              purge_step=trainer.start_epoch + 1 if trainer.resumed else None)

    def on_epoch_end(self, trainer, run, row, improved):
        write_metrics_csv(run.run_dir / METRICS, run.history)
        writer = self.writers[id(run)]
        for key, value in row.items():
            if key != "epoch":
                writer.add_scalar(key, value, row["epoch"])
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
        test = f"test {row['test_top1']:.2f}% (best {run.best:.2f}%)  " if "test_top1" in row else ""
        eta = trainer.eta_seconds()
        left = f"  run ETA {format_duration(eta)}" if eta is not None and row["epoch"] < trainer.cfg.epochs else ""
        message = (f"{run.label}epoch {row['epoch']}/{trainer.cfg.epochs}  loss {row['train_loss']:.4f}  "
                   f"train {row['train_top1']:.2f}%  {test}{row['images_per_s']:.0f} img/s{left}")
        tqdm.write(message) if trainer.show_bar else print(message, flush=True)


class Checkpoints(Callback):
    """An atomic checkpoint every `train.save_every` epochs, at the last one, and after the init stages."""

    def on_checkpoint_due(self, trainer, run, epoch):
        save_checkpoint(run.checkpoint_path, run.checkpoint(epoch, trainer.step))


class ExportWeights(Callback):
    """student_best.safetensors at each new best; student.safetensors, summary.json and curves.png at the end."""

    def on_epoch_end(self, trainer, run, row, improved):
        if improved:
            export_weights(run.run_dir / "student_best.safetensors", run.student, run.export_meta)

    def on_train_end(self, trainer, run):
        if run.history:
            export_weights(run.run_dir / "student.safetensors", run.student, run.export_meta)
            model = evaluation_model(run.distiller)
            if model is not run.student:  # the student with the heads a method trained, as evaluation scored it
                export_weights(run.run_dir / EVALUATION_MODEL, model,
                               {**(run.export_meta or {}), "evaluation_model": type(model).__name__})
            _write_summary(run.run_dir, run.history, run.best, run.best_epoch)


class RunRecord(Callback):
    """A run started from Python (no config.yaml in its directory) records what `kdzoo train` would: the
    TrainConfig as train.yaml and, for a distillation, the plan (plan.md, printed when `verbose`)."""

    def __init__(self, verbose: bool):
        self.verbose = verbose

    def on_train_start(self, trainer, run):
        if (run.run_dir / RUN_CONFIG).exists():  # written by kdzoo's runner, with the plan beside it
            return
        run.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(trainer.cfg, run.run_dir / TRAIN_CONFIG)
        distiller = run.distiller
        if isinstance(distiller, Distiller) and (distiller.teacher is not None or len(distiller.methods)):
            from ..plan import write_plan

            write_plan(distiller, trainer.data.test, run.run_dir, verbose=self.verbose,
                       student_name=(run.export_meta or {}).get("model"))


class EvalModeCheck(Callback):
    """One warning per run when evaluation tells a different story from training: test top-1 near chance while
    the training batches score well above it, or a test loss far beyond a uniform guess's.  Both are what
    stale BatchNorm running statistics give (a short run, or torchvision's momentum 0.01), which eval mode uses
    and training mode does not."""

    def __init__(self, min_train_gain: float = 15.0, max_test_share: float = 0.25, max_loss_factor: float = 10.0):
        self.min_train_gain = min_train_gain  # training top-1 points above chance before a gap means anything
        self.max_test_share = max_test_share  # test gain over chance below this share of the training gain
        self.max_loss_factor = max_loss_factor  # test loss above this many times ln(classes)
        self.warned: set[int] = set()

    def on_epoch_end(self, trainer, run, row, improved):
        if "test_top1" not in row or id(run) in self.warned:
            return
        classes = trainer.data.num_classes
        chance = 100.0 / classes
        train_gain, test_gain = row["train_top1"] - chance, row["test_top1"] - chance
        near_chance = train_gain >= self.min_train_gain and test_gain <= self.max_test_share * train_gain
        exploding = row["test_loss"] > self.max_loss_factor * math.log(max(classes, 2))
        if not (near_chance or exploding):
            return
        self.warned.add(id(run))
        what = (f"test top-1 {row['test_top1']:.2f}% is near chance ({chance:.2f}%) while training batches score "
                f"{row['train_top1']:.2f}%" if near_chance else
                f"the test loss {row['test_loss']:.4g} is over {self.max_loss_factor:g}x a uniform guess's")
        momenta = sorted({m.momentum for m in run.student.modules()
                          if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm))
                          and m.track_running_stats and m.momentum is not None})
        if momenta and momenta[0] < 0.1:
            kept = (1 - momenta[0]) ** trainer.step  # the share of the initial statistics still in them
            why = (f"its BatchNorm momentum is {momenta[0]:g}, so after {trainer.step} steps the running statistics "
                   f"used in eval mode still hold {kept:.0%} of their initial values" if kept >= 0.05 else
                   f"its BatchNorm momentum is {momenta[0]:g}, so the running statistics used in eval mode trail "
                   "the changing weights")
        else:
            why = ("the BatchNorm running statistics used in eval mode do not match the weights yet, or eval-mode "
                   "layers (dropout, BatchNorm) behave differently from training")
        message = (f"{run.label}warning: at epoch {row['epoch']} {what}: {why}.  Train for more steps (more epochs or "
                   "data), or give BatchNorm a larger momentum (tv: and timm: models take the option bn_momentum, e.g. "
                   "student.options.bn_momentum=0.1)")
        tqdm.write(message) if trainer.cfg.progress else print(message)


def default_callbacks(run_dir: Optional[Path], export_meta: Optional[dict], verbose: bool) -> list[Callback]:
    """What `fit` does for a run: console lines, and with a run directory metrics, checkpoints and exports."""
    callbacks: list[Callback] = [ConsoleLog(), EvalModeCheck()] if verbose else []
    if run_dir is not None:
        callbacks += [MetricsLog(), RunRecord(verbose), Checkpoints()]
        if export_meta is not None:
            callbacks.append(ExportWeights())
    return callbacks


class Trainer:
    """The loop over epochs and batches for one or more runs that see the same batches.

    Its state is in its fields (`epoch`, `step`, `runs`, `groups`, `feed`...); `run()` trains and returns one
    `FitResult` per run.  Launched by torchrun, every process builds the same Trainer."""

    def __init__(self, distillers: Sequence[Distillable], data: DataSplits, cfg: TrainConfig, *,
                 run_dirs: Sequence[Optional[str | Path]], export_metas: Sequence[Optional[dict]],
                 labels: Sequence[str], callbacks: Sequence[Sequence[Callback]], resume: bool = False,
                 on_step: Optional[Callable[[int], None]] = None, verbose: bool = True,
                 teacher_cache: Optional[TeacherCache] = None, build_steps: StepBuilder = separate_steps,
                 group: Optional[Distributed] = None):
        cfg.validate()
        self.cfg, self.data, self.on_step, self.resumed = cfg, data, on_step, resume
        self.distillers = list(distillers)
        self.group = group or Distributed.from_env(cfg.device)
        self.device = self.group.device(resolve_device(cfg.device))
        self.verbose = verbose and self.group.is_main
        self.runs = [RunState(d, r, m, label) for d, r, m, label in zip(distillers, run_dirs, export_metas, labels)]
        self.callbacks = [list(c) if self.group.is_main else [] for c in callbacks]
        self.teacher_cache, self.build_steps = teacher_cache, build_steps
        self.start_epoch = self.epoch = self.step = 0
        self.started = time.perf_counter()
        # a progress bar redraws itself with carriage returns: only on a terminal; into a file (or a pipe) the
        # progress goes as plain lines, a few per epoch
        self.show_bar = cfg.progress and _is_terminal(sys.stderr)
        self._loop_start: Optional[tuple[float, int]] = None  # (time, step) where this start's main loop began

    # ------------------------------------------------------------------ setup

    def _setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed, cfg.deterministic)
        self.compile_mode, note = resolve_compile_mode(cfg.compile, self.device)
        if note and self.verbose:
            print(note)
        prepare_models(self.distillers, self.device, cfg.channels_last)
        self.batch_size = self.group.local_batch_size(cfg.batch_size)
        self.steps_per_epoch = len(make_loader(self.data.train, self.batch_size, shuffle=False, **self.group.shard()))
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.batch_size: the training set has only {len(self.data.train)} samples")
        self.schedule = lr_schedule(cfg, self.steps_per_epoch)
        self.groups = self.build_steps(self.distillers, cfg, self.device, self.compile_mode, self.schedule,
                                       wrap=lambda d: self.group.wrap(d, self.device))
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
                self._train()
            finally:
                for g in self.groups:
                    g.close()
            for k in range(len(self.runs)):
                self._notify("on_train_end", k)
            return [run.result(self.started) for run in self.runs]
        finally:
            for distiller in self.distillers:
                distiller.close()  # no hook stays on a student or a teacher after training
            self.group.close()

    def _train(self) -> None:
        cfg = self.cfg
        if self.resumed:
            positions = {run.restore() for run in self.runs}
            if len(positions) > 1:
                raise ConfigError(f"--resume: the runs stopped at different points {sorted(positions)}; "
                                  "resume them apart")
            self.start_epoch, self.step = positions.pop()
            for g in self.groups:
                g.finish_loading()
        for k in range(len(self.runs)):
            self._notify("on_train_start", k)
        cache = self.teacher_cache
        if cache is None and cfg.cache_teacher_outputs:
            cache = TeacherCache.for_dataset(self.data.train, self.device)
        with compile_scope(self.compile_mode, functions=len(self.distillers) + 1):
            if self.start_epoch == 0 and self.step == 0:
                for k, run in enumerate(self.runs):
                    if self._init_stages(run):
                        self._notify("on_checkpoint_due", k, 0)  # so a resume never repeats the init stages
            with TeacherFeed(self.distillers, cache, self.compile_mode) as feed:
                self._loop_start = (time.perf_counter(), self.step)
                for self.epoch in range(self.start_epoch, cfg.epochs):
                    self._epoch(feed)

    def _epoch(self, feed: TeacherFeed) -> None:
        cfg, epoch = self.cfg, self.epoch
        for run in self.runs:
            run.distiller.train()
        meters: list[Optional[DeviceMeters]] = [None] * len(self.runs)
        for g in self.groups:
            for k, m in zip(g.run_indices, g.step.new_epoch(len(g.run_indices), self.step)):
                meters[k] = m
        loader = make_loader(self.data.train, self.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                             num_workers=cfg.num_workers, drop_last=False, pin_memory=self.device.type == "cuda",
                             device=self.device, **self.group.shard())
        feed.start_epoch()

        def check() -> list[MeterReading]:
            readings = [m.read(self.group) for m in meters]
            for run, reading in zip(self.runs, readings):
                if reading.diverged:
                    raise TrainingDiverged(run.diverged_message(reading, self.steps_per_epoch))
            return readings

        epoch_start = time.perf_counter()
        self._batches(loader, self.groups, feed, self.steps_per_epoch, f"epoch {epoch + 1}/{cfg.epochs}", check,
                      self.on_step)
        feed.end_epoch(self.group.all_reduce_sum if self.group.active else None)
        readings = check()
        train_seconds = time.perf_counter() - epoch_start
        for k, (run, reading) in enumerate(zip(self.runs, readings)):
            self.group.broadcast_buffers(run.student)  # every process evaluates and saves rank 0's statistics
            self._end_epoch(k, run, reading, train_seconds)

    def _end_epoch(self, k: int, run: RunState, reading: MeterReading, train_seconds: float) -> None:
        cfg, epoch = self.cfg, self.epoch
        row = {"epoch": epoch + 1, "step": self.step, "lr": self.schedule(self.step - 1), "train_loss": reading.loss,
               "train_top1": reading.top1, "images_per_s": reading.seen / train_seconds}
        row.update({f"loss_{key}": value for key, value in reading.terms.items()})
        improved = False
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            run.last = evaluate(evaluation_model(run.distiller), self.data.test, batch_size=max(cfg.batch_size, 256),
                                device=self.device, amp=cfg.amp, num_workers=cfg.num_workers,
                                channels_last=cfg.channels_last)
            if run.last["top1"] > run.best:
                run.best, run.best_epoch, improved = run.last["top1"], epoch + 1, True
            row.update({"test_top1": run.last["top1"], "test_top5": run.last["top5"], "test_loss": run.last["loss"]})
        row.update({"best_top1": run.best, "seconds": time.perf_counter() - self.started})
        run.history.append(row)
        self._notify("on_epoch_end", k, row, improved)
        if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
            self._notify("on_checkpoint_due", k, epoch + 1)

    def eta_seconds(self) -> Optional[float]:
        """Seconds left in the whole run (every remaining epoch, evaluations included) at the rate of this
        start's main loop so far; None before its first step."""
        if self._loop_start is None or self.step <= self._loop_start[1]:
            return None
        started, first_step = self._loop_start
        rate = (time.perf_counter() - started) / (self.step - first_step)
        return max(self.cfg.epochs * self.steps_per_epoch - self.step, 0) * rate

    def _batches(self, loader, groups: list[StepGroup], feed: Optional[TeacherFeed], steps_per_epoch: int,
                 desc: str, check: Callable[[], list[MeterReading]], on_step: Optional[Callable[[int], None]],
                 epoch_offset: Optional[float] = None) -> None:
        """One pass over `loader`: every group steps on every batch; meters are read every `log_every` steps.
        `epoch_offset` fixes the progress the methods see (init stages); else it is the running epoch.

        Progress: loss and accuracy appear from the first steps (steps 1, 2, 4, ... of the first epoch of a start,
        then every `log_every`), with the time left for the whole run; on a terminal in a tqdm bar, elsewhere
        as plain lines at most every 10% of an epoch."""
        cfg, device = self.cfg, self.device
        show = cfg.progress and self.group.is_main
        bar = tqdm(loader, desc=desc, leave=False, disable=not (show and self.show_bar), dynamic_ncols=True)
        early = self.epoch == self.start_epoch and epoch_offset is None  # the first epoch of this start
        last_line = 0
        start, seen, lr = time.perf_counter(), 0, float("nan")
        cuda_graphs = any(g.step.cuda_graphs for g in groups)
        progress = torch.zeros((), device=device)  # the fractional epoch, filled in place (no host sync)
        for i, (images, labels, index) in enumerate(bar):
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            index = index.to(device, non_blocking=True)
            if cfg.channels_last and images.dim() == 4:
                images = images.contiguous(memory_format=torch.channels_last)
            teacher_outputs = None
            if feed is not None and feed.active:
                with autocast_for(device, cfg.amp):
                    teacher_outputs = feed(images, index)
            progress.fill_(epoch_offset if epoch_offset is not None else self.epoch + i / steps_per_epoch)
            for g in groups:
                lr = g.lr.set(self.step)
                g.step(images, labels, index, progress, teacher_outputs)
            self.step += 1
            seen += len(labels)
            first_steps = early and (i + 1) < cfg.log_every and (i + 1) & i == 0  # steps 1, 2, 4, 8, ...
            if (i + 1) % cfg.log_every == 0 or first_steps:
                reading = check()[0]  # stops a diverged run here, before anything is saved
                if show:
                    eta = self.eta_seconds() if epoch_offset is None else None
                    numbers = dict(loss=f"{reading.loss:.3f}", acc=f"{reading.top1:.1f}",
                                   img_s=f"{seen / (time.perf_counter() - start):.0f}", lr=f"{lr:.3g}",
                                   **({"run_eta": format_duration(eta)} if eta is not None else {}))
                    if self.show_bar:
                        bar.set_postfix(**numbers)
                    elif i + 1 < steps_per_epoch and (i == 0 or (i + 1 - last_line) * 10 >= steps_per_epoch):
                        last_line = i + 1
                        words = {"acc": "train", "img_s": "img/s", "run_eta": "run ETA"}
                        print(f"{desc}  step {i + 1}/{steps_per_epoch}  " + "  ".join(
                            f"{words.get(k, k)} {v}{'%' if k == 'acc' else ''}" for k, v in numbers.items()), flush=True)
            if on_step is not None:
                on_step(self.step)
        bar.close()

    # ------------------------------------------------------------------ init stages

    def _init_stages(self, run: RunState) -> bool:
        """Run each method's stage before distillation (FitNet hints, FT paraphraser, ...), if it has one.

        On several processes each trains on its own shard; DDP then starts every process from rank 0's result.
        The main loop's step counter is left alone (a stage has its own)."""
        cfg, distiller = self.cfg, run.distiller
        ran = False
        for name, method in distiller.methods.items():
            stage = method.init_stage(distiller.student)
            if stage is None or stage.epochs <= 0:
                continue
            ran = True
            stage_lr = stage.lr if stage.lr is not None else cfg.lr
            stage_cfg = TrainConfig(**{**vars(cfg), "lr": stage_lr})
            optimizer = build_optimizer(stage.parameters, stage_cfg, self.device, self.compile_mode)

            def forward(images, labels, index, epoch, teacher_outputs, name=name, method=method):
                ctx = distiller.context(images, labels, index, epoch, method=method)
                return [(None, {f"{name}_init": method.init_loss(ctx)})]

            step = TrainStep(forward, optimizer, self.device, cfg.amp, self.compile_mode)
            stage_group = StepGroup(step, LearningRate(optimizer, lambda _: stage_lr), [0], [OptimizerSlot(optimizer)])
            distiller.train()
            student_ids = {id(p) for p in distiller.student.parameters()}
            if not any(id(p) in student_ids for p in stage.parameters):
                distiller.student.eval()  # a stage that trains no student weight must not move its BN statistics
            main_step, self.step = self.step, 0
            try:
                for epoch in range(stage.epochs):
                    loader = make_loader(self.data.train, self.batch_size, shuffle=True, seed=cfg.seed,
                                         epoch=-1 - epoch, num_workers=cfg.num_workers, device=self.device,
                                         **self.group.shard())
                    (meters,) = step.new_epoch(1, self.step)

                    def check() -> list[MeterReading]:
                        reading = meters.read(self.group)
                        if reading.diverged:
                            raise TrainingDiverged(
                                f"loss is not finite at epoch {epoch + 1}, step {reading.first_bad_step + 1} of "
                                f"{name}'s init stage ({reading.describe()}); try a lower train.lr or smaller "
                                "method weights")
                        return [reading]

                    self._batches(loader, [stage_group], None, len(loader), f"{name} init {epoch + 1}/{stage.epochs}",
                                  check, None, epoch_offset=0.0)
                    reading = check()[0]
                    if self.verbose:
                        print(f"{name} init stage {epoch + 1}/{stage.epochs}  loss {reading.loss:.4f}")
            finally:
                self.step = main_step
        if ran:
            distiller.close()  # its own teacher hooks served the stages; the feed taps the teacher from here on
        return ran


def fit(distiller: Distillable, data: DataSplits, cfg: TrainConfig, run_dir: Optional[str | Path] = None,
        resume: bool = False, export_meta: Optional[dict] = None,
        on_step: Optional[Callable[[int], None]] = None, verbose: bool = True,
        teacher_cache: Optional[TeacherCache] = None,
        callbacks: Optional[Sequence[Callback]] = None) -> FitResult:
    """Train `distiller` (a `Distiller`, or anything following the `Distillable` protocol) and evaluate its
    student.

    With `run_dir`: checkpoints (atomic) every `cfg.save_every` epochs and at the end, metrics.csv,
    TensorBoard events, and, with `export_meta`, the student exported as safetensors with a summary and
    curves.  `resume=True` continues exactly from the run directory's checkpoint.  `on_step(step)` is called
    after every optimizer step.  `teacher_cache` reuses teacher outputs across calls (else one is made when
    `cfg.cache_teacher_outputs`).  `callbacks` replace the default ones (`default_callbacks`).  The
    distiller's hooks are removed when training ends.  Launched by torchrun, every process calls fit the same
    way."""
    return train_runs([distiller], data, cfg, [run_dir], resume=resume, export_metas=[export_meta],
                      on_step=on_step, verbose=verbose, teacher_cache=teacher_cache,
                      callbacks=[callbacks] if callbacks is not None else None)[0]


def train_runs(distillers: Sequence[Distillable], data: DataSplits, cfg: TrainConfig,
               run_dirs: Sequence[Optional[str | Path]], *, resume: bool = False,
               export_metas: Optional[Sequence[Optional[dict]]] = None,
               on_step: Optional[Callable[[int], None]] = None, verbose: bool = True,
               teacher_cache: Optional[TeacherCache] = None, build_steps: StepBuilder = separate_steps,
               labels: Optional[Sequence[str]] = None,
               callbacks: Optional[Sequence[Sequence[Callback]]] = None) -> list[FitResult]:
    """Train several distillers on the same batches, each with its own optimizer, run directory and metrics
    (fit() is the case of one).  Those that share a teacher get its outputs from one forward per batch."""
    export_metas = [meta if meta is not None else _class_meta(d.student)
                    for d, meta in zip(distillers, export_metas or [None] * len(distillers))]
    if callbacks is None:
        callbacks = [default_callbacks(Path(r) if r is not None else None, m, verbose)
                     for r, m in zip(run_dirs, export_metas)]
    trainer = Trainer(distillers, data, cfg, run_dirs=run_dirs, export_metas=export_metas,
                      labels=labels or [""] * len(distillers), callbacks=callbacks, resume=resume, on_step=on_step,
                      verbose=verbose, teacher_cache=teacher_cache, build_steps=build_steps)
    return trainer.run()


def _class_meta(student: nn.Module) -> dict:
    """Export metadata of a student built outside a config: its class, so a reader knows what to rebuild."""
    return {"class": f"{type(student).__module__}.{type(student).__qualname__}"}


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


def _write_summary(run_dir: Path, history: list[dict], best: float, best_epoch: int) -> None:
    """summary.json and a learning-curve plot.  Facts a runner recorded in summary.json before training (the
    teacher's test accuracy, ``teacher_top1``) are kept, and the teacher's is drawn as a reference line."""
    final = history[-1]
    summary = {**read_summary(run_dir),
               "last_top1": final.get("test_top1"), "last_top5": final.get("test_top5"), "best_top1": best,
               "best_epoch": best_epoch, "epochs": final["epoch"], "seconds": final["seconds"]}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    from ..plots import plot_run

    plot_run(history, run_dir / "curves.png", teacher_top1=summary.get("teacher_top1"), title=run_dir.name)


def read_summary(run_dir: Path) -> dict:
    """A run directory's summary.json ({} when there is none or it cannot be read)."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


__all__ = ["fit", "train_runs", "evaluate", "FitResult", "Trainer", "RunState", "Callback", "MetricsLog", "ConsoleLog",
           "Checkpoints", "ExportWeights", "RunRecord", "EvalModeCheck",
           "default_callbacks", "Distillable", "build_optimizer", "autocast_for",
           "scaled_lr", "lr_schedule", "CHECKPOINT", "METRICS", "RUN_CONFIG", "TRAIN_CONFIG"]
