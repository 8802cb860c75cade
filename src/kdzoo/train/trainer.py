"""fit(): the training loop.  It knows no method by name: ``loss = sum(output.losses.values())``.

It owns the optimizer, the schedule, evaluation, checkpoints, logging and nothing else.  The step itself
(autocast, channels_last, torch.compile / CUDA graphs, fused optimizer, meters on the device) lives in
``fast_step.py``; where each batch's teacher outputs come from (one shared forward, or a cache) in
``teacher_cache.py``; several students in one process in ``multi.py``; several processes in
``distributed.py``.  Losses and accuracy are read back from the device only at progress refreshes (every
`log_every` steps) and once per epoch; a non-finite loss raises `TrainingDiverged` at the first of those
reads, always before an evaluation or checkpoint, so the last checkpoint on disk is the last good one.
"""
from __future__ import annotations

import csv
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..data import DataSplits, make_loader
from ..errors import ConfigError, TrainingDiverged
from ..runtime import atomic_write, resolve_device, seed_everything
from .checkpoint import export_weights, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import Distributed
from .fast_step import (DeviceMeters, LearningRate, MeterReading, TrainStep, autocast_for, build_optimizer,
                        compiled_modules, load_optimizer_state, optimizer_state, prepare_models, resolve_compile_mode)
from .schedule import learning_rate
from .teacher_cache import TeacherCache, TeacherFeed

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"


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


class _DistillerForward:
    """The main-stage forward of one distiller; `model` becomes the DDP wrapper on several processes."""

    def __init__(self, distiller: nn.Module):
        self.model = distiller

    def __call__(self, images, labels, index, epoch):
        out = self.model(images, labels, index=index, epoch=epoch)
        return [(out.logits, out.losses)]


def separate_steps(distillers: Sequence[nn.Module], cfg: TrainConfig, device: torch.device,
                   compile_mode: str, schedule: Callable[[int], float]) -> list[StepGroup]:
    """One optimizer and step per distiller (fit, and fit_many when students cannot be stacked)."""
    groups = []
    for k, distiller in enumerate(distillers):
        optimizer = build_optimizer(distiller.trainable_parameters(), cfg, device, compile_mode)
        step = TrainStep(_DistillerForward(distiller), optimizer, device, cfg.amp, compile_mode)
        groups.append(StepGroup(step, LearningRate(optimizer, schedule), [k], [OptimizerSlot(optimizer)]))
    return groups


class Run:
    """One student's bookkeeping: run directory, history, best accuracy, checkpoints, metrics and logs.
    Only the main process (rank 0) writes anything."""

    def __init__(self, distiller: nn.Module, run_dir: Optional[str | Path], export_meta: Optional[dict],
                 writes: bool, verbose: bool, label: str = ""):
        self.distiller, self.student = distiller, distiller.student  # the student itself, even if later replaced
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.export_meta, self.writes, self.verbose, self.label = export_meta, writes, verbose, label
        self.checkpoint_path = self.run_dir / CHECKPOINT if self.run_dir else None
        self.slot: Optional[OptimizerSlot] = None
        self.best, self.best_epoch, self.history = -1.0, 0, []
        self.last = {"top1": float("nan"), "top5": float("nan")}
        self.writer = None

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
        if self.verbose:
            print(f"resumed {self.run_dir} at epoch {state['epoch']} (step {state['step']})")
        return state["epoch"], state["step"]

    def open_logs(self, start_epoch: int, resumed: bool) -> None:
        if self.run_dir is None or not self.writes:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        _write_metrics(self.run_dir / METRICS, self.history)  # a resumed run drops rows after its checkpoint
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_epoch + 1 if resumed else None)

    def save(self, epoch: int, step: int) -> None:
        if self.checkpoint_path is None or not self.writes:
            return
        save_checkpoint(self.checkpoint_path, {
            # clones: a stacked student's tensors are views of a larger stack, which torch.save would write whole
            "student": {k: v.clone() for k, v in self.student.state_dict().items()},
            "methods": self.distiller.methods.state_dict(), "optimizer": self.slot.state(), "epoch": epoch,
            "step": step, "best_top1": self.best, "best_epoch": self.best_epoch, "history": self.history,
            "rng": rng_state(),
        })

    def diverged_message(self, reading: MeterReading, steps_per_epoch: int) -> str:
        bad = max(reading.first_bad_step, 0)
        where = (f"; the last good checkpoint {self.checkpoint_path} is intact"
                 if self.checkpoint_path and self.checkpoint_path.exists() else "")
        return (f"{self.label}loss is not finite at epoch {bad // steps_per_epoch + 1}, step {bad + 1} "
                f"(epoch means: {reading.describe()}){where}; try a lower train.lr or smaller method weights")

    def end_epoch(self, epoch: int, cfg: TrainConfig, step: int, lr: float, reading: MeterReading,
                  train_seconds: float, started: float, evaluate_student: Callable[[nn.Module], dict]) -> None:
        """Evaluate, keep the best export, log the epoch's row and checkpoint when due."""
        row = {"epoch": epoch + 1, "step": step, "lr": lr, "train_loss": reading.loss, "train_top1": reading.top1,
               "images_per_s": reading.seen / train_seconds}
        row.update({f"loss_{k}": v for k, v in reading.terms.items()})
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            self.last = evaluate_student(self.student)
            if self.last["top1"] > self.best:
                self.best, self.best_epoch = self.last["top1"], epoch + 1
                if self.run_dir is not None and self.export_meta is not None and self.writes:
                    export_weights(self.run_dir / "student_best.safetensors", self.student, self.export_meta)
            row.update({"test_top1": self.last["top1"], "test_top5": self.last["top5"], "test_loss": self.last["loss"]})
        row.update({"best_top1": self.best, "seconds": time.perf_counter() - started})
        self.history.append(row)
        if self.writer is not None:
            _write_metrics(self.run_dir / METRICS, self.history)
            for key, value in row.items():
                if key != "epoch":
                    self.writer.add_scalar(key, value, epoch + 1)
            self.writer.flush()
        if self.verbose and self.writes:
            test = f"test {row['test_top1']:.2f}% (best {self.best:.2f}%)  " if "test_top1" in row else ""
            message = (f"{self.label}epoch {epoch + 1}/{cfg.epochs}  loss {row['train_loss']:.4f}  "
                       f"train {row['train_top1']:.2f}%  {test}{row['images_per_s']:.0f} img/s")
            tqdm.write(message) if cfg.progress else print(message)
        if (epoch + 1) % cfg.save_every == 0 or epoch + 1 == cfg.epochs:
            self.save(epoch + 1, step)

    def finish(self, started: float) -> FitResult:
        if self.writer is not None:
            self.writer.close()
        if self.run_dir is not None and self.export_meta is not None and self.writes:
            export_weights(self.run_dir / "student.safetensors", self.student, self.export_meta)
            _write_summary(self.run_dir, self.history, self.best, self.best_epoch)
        final = self.history[-1] if self.history else {}
        return FitResult(final.get("test_top1", self.last["top1"]), self.best, self.best_epoch,
                         final.get("test_top5", self.last["top5"]), self.history, time.perf_counter() - started,
                         self.run_dir)


def fit(distiller: nn.Module, data: DataSplits, cfg: TrainConfig, run_dir: Optional[str | Path] = None,
        resume: bool = False, export_meta: Optional[dict] = None,
        on_step: Optional[Callable[[int], None]] = None, verbose: bool = True,
        teacher_cache: Optional[TeacherCache] = None) -> FitResult:
    """Train `distiller` (a `Distiller`, or any module with the same forward) and evaluate its student.

    With `run_dir`: checkpoints (atomic) every `cfg.save_every` epochs and at the end, metrics.csv,
    TensorBoard events, and the student exported as safetensors.  `resume=True` continues exactly
    from the run directory's checkpoint.  `on_step(step)` is called after every optimizer step.
    `teacher_cache` reuses teacher outputs across calls (else one is made when
    `cfg.cache_teacher_outputs`).  Launched by torchrun, every process calls fit the same way.
    """
    return train_runs([distiller], data, cfg, [run_dir], resume=resume, export_metas=[export_meta],
                      on_step=on_step, verbose=verbose, teacher_cache=teacher_cache)[0]


StepBuilder = Callable[[Sequence[nn.Module], TrainConfig, torch.device, str, Callable[[int], float]], list[StepGroup]]


def train_runs(distillers: Sequence[nn.Module], data: DataSplits, cfg: TrainConfig,
               run_dirs: Sequence[Optional[str | Path]], *, resume: bool = False,
               export_metas: Optional[Sequence[Optional[dict]]] = None,
               on_step: Optional[Callable[[int], None]] = None, verbose: bool = True,
               teacher_cache: Optional[TeacherCache] = None, build_steps: StepBuilder = separate_steps,
               labels: Optional[Sequence[str]] = None) -> list[FitResult]:
    """Train several distillers on the same batches, each with its own optimizer, run directory and metrics
    (fit() is the case of one).  Those that share a teacher get its outputs from one forward per batch."""
    cfg.validate()
    group = Distributed.from_env(cfg.device)
    try:
        return _train(distillers, data, cfg, run_dirs, group, resume, export_metas or [None] * len(distillers),
                      on_step, verbose, teacher_cache, build_steps, labels or [""] * len(distillers))
    finally:
        group.close()


def _train(distillers, data, cfg, run_dirs, group: Distributed, resume, export_metas, on_step, verbose,
           teacher_cache, build_steps, labels) -> list[FitResult]:
    device = group.device(resolve_device(cfg.device))
    seed_everything(cfg.seed, cfg.deterministic)
    compile_mode, note = resolve_compile_mode(cfg.compile, device)
    if note and verbose and group.is_main:
        print(note)
    verbose = verbose and group.is_main
    prepare_models(distillers, device, cfg.channels_last)
    batch_size = group.local_batch_size(cfg.batch_size)
    steps_per_epoch = len(make_loader(data.train, batch_size, shuffle=False, **group.shard()))
    if steps_per_epoch == 0:
        raise ConfigError(f"train.batch_size: the training set has only {len(data.train)} samples")
    schedule = lr_schedule(cfg, steps_per_epoch)

    runs = [Run(d, r, m, group.is_main, verbose, label) for d, r, m, label in zip(distillers, run_dirs, export_metas, labels)]
    groups = build_steps(distillers, cfg, device, compile_mode, schedule)
    started = time.perf_counter()
    try:
        _run_stages(runs, groups, distillers, data, cfg, device, group, compile_mode, resume, batch_size,
                    steps_per_epoch, schedule, teacher_cache, on_step, started)
    finally:
        for g in groups:
            g.close()
    return [run.finish(started) for run in runs]


def _run_stages(runs, groups, distillers, data, cfg, device, group, compile_mode, resume, batch_size, steps_per_epoch,
                schedule, teacher_cache, on_step, started) -> None:
    """Restore or initialise, then the epochs."""
    for g in groups:
        for k, slot in zip(g.run_indices, g.slots):
            runs[k].slot = slot
    start_epoch, step = 0, 0
    if resume:
        positions = {run.restore() for run in runs}
        if len(positions) > 1:
            raise ConfigError(f"--resume: the runs stopped at different points {sorted(positions)}; resume them apart")
        start_epoch, step = positions.pop()
        for g in groups:
            g.finish_loading()
    for run in runs:
        run.open_logs(start_epoch, resume)
    teachers = [d.teacher for d in distillers if d.teacher is not None]
    models = list({id(m): m for m in [run.student for run in runs] + teachers}.values())
    cache = teacher_cache
    if cache is None and cfg.cache_teacher_outputs:
        cache = TeacherCache.for_dataset(data.train, device)
    with compiled_modules(models, compile_mode):
        if start_epoch == 0 and step == 0:
            for run in runs:
                if _run_init_stages(run.distiller, data, cfg, device, compile_mode, batch_size, group, run.verbose):
                    run.save(0, 0)  # a checkpoint only ever exists after the init stages, so resume never repeats them
        with TeacherFeed(distillers, cache) as feed:
            for g in groups:
                forward = g.step.forward
                if isinstance(forward, _DistillerForward):
                    forward.model = group.wrap(forward.model, device)
            for epoch in range(start_epoch, cfg.epochs):
                step = _train_epoch(runs, groups, feed, data, cfg, device, group, epoch, step, batch_size,
                                    steps_per_epoch, schedule, started, on_step)


def _train_epoch(runs: list[Run], groups: list[StepGroup], feed: TeacherFeed, data: DataSplits, cfg: TrainConfig,
                 device: torch.device, group: Distributed, epoch: int, step: int, batch_size: int,
                 steps_per_epoch: int, schedule: Callable[[int], float], started: float,
                 on_step: Optional[Callable[[int], None]]) -> int:
    for run in runs:
        run.distiller.train()
    meters: list[Optional[DeviceMeters]] = [None] * len(runs)
    for g in groups:
        for k, m in zip(g.run_indices, g.step.new_epoch(len(g.run_indices), step)):
            meters[k] = m
    loader = make_loader(data.train, batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                         num_workers=cfg.num_workers, drop_last=False, pin_memory=device.type == "cuda",
                         device=device, **group.shard())
    feed.start_epoch()

    def check() -> list[MeterReading]:
        readings = [m.read(group) for m in meters]
        for run, reading in zip(runs, readings):
            if reading.diverged:
                raise TrainingDiverged(run.diverged_message(reading, steps_per_epoch))
        return readings

    epoch_start = time.perf_counter()
    step = _run_batches(loader, groups, feed, cfg, device, epoch, step, steps_per_epoch,
                        f"epoch {epoch + 1}/{cfg.epochs}", check, on_step, group.is_main)
    feed.end_epoch(group.all_reduce_sum if group.active else None)
    readings = check()
    train_seconds = time.perf_counter() - epoch_start
    evaluate_student = functools.partial(evaluate, dataset=data.test, batch_size=max(cfg.batch_size, 256),
                                         device=device, amp=cfg.amp, num_workers=cfg.num_workers,
                                         channels_last=cfg.channels_last)
    for run, reading in zip(runs, readings):
        group.broadcast_buffers(run.student)  # every process evaluates and saves rank 0's statistics
        run.end_epoch(epoch, cfg, step, schedule(step - 1), reading, train_seconds, started, evaluate_student)
    return step


def _run_batches(loader, groups: list[StepGroup], feed: Optional[TeacherFeed], cfg: TrainConfig,
                 device: torch.device, epoch: int, step: int, steps_per_epoch: int, desc: str,
                 check: Callable[[], list[MeterReading]], on_step: Optional[Callable[[int], None]],
                 show: bool) -> int:
    """One pass over `loader`: every group steps on every batch; meters are read every `log_every` steps."""
    bar = tqdm(loader, desc=desc, leave=False, disable=not (cfg.progress and show), dynamic_ncols=True)
    start, seen, lr = time.perf_counter(), 0, float("nan")
    cuda_graphs = any(g.step.cuda_graphs for g in groups)
    for i, (images, labels, index) in enumerate(bar):
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        index = index.to(device, non_blocking=True)
        if cfg.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        if feed is not None and feed.active:
            with autocast_for(device, cfg.amp):
                feed(images, index)
        fraction = epoch + i / steps_per_epoch
        for g in groups:
            lr = g.lr.set(step)
            g.step(images, labels, index, fraction)
        step += 1
        seen += len(labels)
        if (i + 1) % cfg.log_every == 0:
            reading = check()[0]  # stops a diverged run here, before anything is saved
            if cfg.progress and show:
                bar.set_postfix(loss=f"{reading.loss:.3f}", acc=f"{reading.top1:.1f}",
                                img_s=f"{seen / (time.perf_counter() - start):.0f}", lr=f"{lr:.3g}")
        if on_step is not None:
            on_step(step)
    bar.close()
    return step


class _InitForward:
    """An init stage's forward: the method's own loss on the distiller's context (fractional epoch 0)."""

    def __init__(self, distiller: nn.Module, name: str, method: nn.Module):
        self.distiller, self.name, self.method = distiller, name, method

    def __call__(self, images, labels, index, epoch):
        ctx = self.distiller.context(images, labels, index, 0.0)
        return [(None, {f"{self.name}_init": self.method.init_loss(ctx)})]


def _run_init_stages(distiller: nn.Module, data: DataSplits, cfg: TrainConfig, device: torch.device,
                     compile_mode: str, batch_size: int, group: Distributed, verbose: bool) -> bool:
    """Run each method's stage before distillation (FitNet hints, FT paraphraser, ...), if it has one.

    On several processes each trains on its own shard; DDP then starts every process from rank 0's result."""
    ran = False
    for name, method in distiller.methods.items():
        stage = method.init_stage(distiller.student)
        if stage is None or stage.epochs <= 0:
            continue
        ran = True
        stage_lr = stage.lr if stage.lr is not None else cfg.lr
        stage_cfg = TrainConfig(**{**vars(cfg), "lr": stage_lr})
        optimizer = build_optimizer(stage.parameters, stage_cfg, device, compile_mode)
        step = TrainStep(_InitForward(distiller, name, method), optimizer, device, cfg.amp, compile_mode)
        stage_group = StepGroup(step, LearningRate(optimizer, lambda _: stage_lr), [0], [OptimizerSlot(optimizer)])
        distiller.train()
        student_ids = {id(p) for p in distiller.student.parameters()}
        if not any(id(p) in student_ids for p in stage.parameters):
            distiller.student.eval()  # a stage that trains no student weight must not move its BN statistics
        steps = 0
        for epoch in range(stage.epochs):
            loader = make_loader(data.train, batch_size, shuffle=True, seed=cfg.seed, epoch=-1 - epoch,
                                 num_workers=cfg.num_workers, device=device, **group.shard())
            (meters,) = step.new_epoch(1, steps)

            def check() -> list[MeterReading]:
                reading = meters.read(group)
                if reading.diverged:
                    raise TrainingDiverged(f"loss is not finite at epoch {epoch + 1}, step {reading.first_bad_step + 1} "
                                           f"of {name}'s init stage ({reading.describe()}); try a lower train.lr or "
                                           "smaller method weights")
                return [reading]

            steps = _run_batches(loader, [stage_group], None, cfg, device, epoch, steps, len(loader),
                                 f"{name} init {epoch + 1}/{stage.epochs}", check, None, group.is_main)
            reading = check()[0]
            if verbose:
                print(f"{name} init stage {epoch + 1}/{stage.epochs}  loss {reading.loss:.4f}")
    return ran


def _write_metrics(path: Path, history: list[dict]) -> None:
    keys = list(dict.fromkeys(k for row in history for k in row))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=keys)
            out.writeheader()
            out.writerows(history)

    atomic_write(path, write)


def _write_summary(run_dir: Path, history: list[dict], best: float, best_epoch: int) -> None:
    """summary.json and a learning-curve plot."""
    final = history[-1]
    summary = {"last_top1": final.get("test_top1"), "last_top5": final.get("test_top5"), "best_top1": best,
               "best_epoch": best_epoch, "epochs": final["epoch"], "seconds": final["seconds"]}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    from ..plots import plot_curves

    plot_curves({"run": history}, run_dir / "curves.png")


__all__ = ["fit", "train_runs", "evaluate", "FitResult", "resolve_device", "seed_everything", "build_optimizer",
           "autocast_for", "scaled_lr", "lr_schedule", "CHECKPOINT", "METRICS"]
