"""Image classification on the engine's Trainer: `fit()` trains a `Distiller` (or anything following the
`Distillable` protocol); several students that share a teacher train on the same batches (`fit_many`).

The task supplies what is particular to it: models on the device (channels_last where asked), one optimizer
step per distiller (or one stacked step, `multi.py`), each epoch's batches from `make_loader` with the teacher's
outputs of the batch (one shared forward, or a cache: `teacher_feed.py`), the methods' init stages (FitNet
hints, FT paraphraser), top-1/top-5 on the test split, and its exports (safetensors, summary.json, curves.png,
plan.md) as callbacks.  It knows no method by name: ``loss = sum(output.losses.values())``.  With
``train.mixup`` each batch is mixed before the teacher's forward and the cross-entropy takes the soft targets
(`mixing.py`); ``train.sam_rho`` makes every main step sharpness-aware (kdzoo.engine.sam; init stages step plainly).
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ...config import TrainConfig, save_config
from ...data import DataSplits, Placement, make_loader
from ...distiller import Distiller, DistillOutput, TeacherOutputs
from ...engine.checkpoint import export_weights
from ...engine.optim import LearningRate, OptimizerSlot, OptimizerSpec, build_optimizer
from ...engine.rundir import RUN_CONFIG, SUMMARY
from ...engine.runtime import atomic_write
from ...engine.schedule import Schedule
from ...engine.step import MeterReading, StepBatch, StepOptions, TrainStep, autocast_for, prepare_models
from ...engine.trainer import (Callback, ConsoleLog, FitResult, LoopConfig, MetricsLog, PassSpec, Run, StepGroup, Task,
                               Trainer)
from ...errors import ConfigError, TrainingDiverged
from ...plots import plot_run
from ...registry import TASKS, register_task
from .evaluation import evaluate, evaluation_model
from .mixing import BatchMixer, check_mixup, split_targets, with_soft_targets
from .plan import top1_score, write_plan
from .teacher_feed import TeacherCache, TeacherFeed

EVALUATION_MODEL = "student_with_heads.safetensors"  # exported when a method changes how predictions are made
TRAIN_CONFIG = "train.yaml"  # what `fit` writes for a run started from Python: the TrainConfig alone


class Distillable(Protocol):
    """What the task needs of a distiller (`kdzoo.Distiller` is one): a student, an optional teacher, named
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


# ---------------------------------------------------------------- schedule and optimizer


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


def lr_schedule(cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
    """The learning rate of each (0-based) optimizer step, counted in epochs of `steps_per_epoch`."""
    base_lr, warmup = scaled_lr(cfg)
    return Schedule(base_lr, cfg.epochs, steps_per_epoch, cfg.schedule, tuple(cfg.milestones), cfg.gamma, warmup,
                    cfg.min_lr)


def optimizer_spec(cfg: TrainConfig, lr: Optional[float] = None) -> OptimizerSpec:
    return OptimizerSpec(cfg.optimizer, cfg.lr if lr is None else lr, cfg.momentum, cfg.nesterov, cfg.weight_decay)


def loop_config(cfg: TrainConfig) -> LoopConfig:
    return LoopConfig(seed=cfg.seed, deterministic=cfg.deterministic, device=cfg.device, compile=cfg.compile,
                      eval_every=cfg.eval_every, save_every=cfg.save_every, log_every=cfg.log_every,
                      progress=cfg.progress)


# ---------------------------------------------------------------- steps


def distiller_forward(model: Callable[..., DistillOutput]):
    """The step forward of one distiller (or its DDP wrapper): one (logits, losses) pair.  Mixed soft targets
    (train.mixup) in place of the labels feed the cross-entropy; the distiller reads their argmax."""
    ce_weight = getattr(getattr(model, "module", model), "ce_weight", 1.0)

    def forward(images, labels, index, teacher_outputs, epoch):
        labels, targets = split_targets(labels)
        out = model(images, labels, index=index, epoch=epoch, teacher_outputs=teacher_outputs)
        return [(out.logits, with_soft_targets(out.losses, out.logits, targets, ce_weight))]

    return forward


def has_init_stage(distiller) -> bool:
    return any((stage := m.init_stage(distiller.student)) is not None and stage.epochs > 0
               for m in distiller.methods.values())


def separate_steps(task: "ClassificationTask", trainer: Trainer) -> list[StepGroup]:
    """One optimizer and step per distiller (fit, and fit_many when students cannot be stacked), each in its
    DDP wrapper on several processes."""
    groups = []
    for k, distiller in enumerate(task.distillers):
        optimizer = build_optimizer(distiller.trainable_parameters(), optimizer_spec(task.cfg), trainer.device,
                                    trainer.compile_mode)
        # parameters a method trains only in its init stage may get no gradient later: DDP must look for them
        wrapped = trainer.group.wrap(distiller, trainer.device, find_unused=has_init_stage(distiller))
        step = TrainStep(distiller_forward(wrapped), optimizer, trainer.device, task.step_options(trainer))
        groups.append(StepGroup(step, LearningRate(optimizer, trainer.schedule), [k], [OptimizerSlot(optimizer)]))
    return groups


StepBuilder = Callable[["ClassificationTask", Trainer], list[StepGroup]]


# ---------------------------------------------------------------- the task


@register_task("classification", family="vision", description="image classifiers: a student distilled from one or "
               "more teachers, plain training, peers, rounds, stages (kdzoo train, kdzoo teacher)")
class ClassificationTask(Task):
    """Distillers (or plain students) trained on the same labelled batches; see the module's docstring."""

    metric = "test_top1"
    score = ("top1", "top-1")  # the metric's column suffix and name (summary.json's last_/best_/teacher_ keys)
    higher_is_better = True
    log_axis = "epoch"
    unit = "img"
    score_model = staticmethod(top1_score)  # (model, test split) -> (what, %): the teacher's line in plan.md

    @staticmethod
    def test_scores(model: nn.Module, data: DataSplits) -> dict[str, float]:
        """`model`'s scores on the whole test split (``kdzoo eval``): top-1, top-5 (%) and the loss."""
        return evaluate(model, data.test)

    @staticmethod
    def scores_line(scores: dict[str, float]) -> str:
        return f"top-1 {scores['top1']:.2f}%  top-5 {scores['top5']:.2f}%  loss {scores['loss']:.4f}"

    def __init__(self, distillers: Sequence[Distillable], data: DataSplits, cfg: TrainConfig,
                 teacher_cache: Optional[TeacherCache] = None, build_steps: StepBuilder = separate_steps):
        cfg.validate()
        self.distillers, self.data, self.cfg = list(distillers), data, cfg
        self.teacher_cache, self.step_builder = teacher_cache, build_steps
        self.feed: Optional[TeacherFeed] = None
        self.mixer: Optional[BatchMixer] = None
        if cfg.mixup is not None:
            check_mixup(self.distillers, data, teacher_cache)
            self.mixer = BatchMixer(cfg.mixup, data.num_classes, cfg.seed)
        if cfg.sam_rho > 0 and not all(isinstance(d, Distiller) for d in self.distillers):
            raise ConfigError("train.sam_rho: SAM perturbs each student by its own gradient's norm; students "
                              "trained as peers share one optimizer, so train them without SAM")

    def step_options(self, trainer: Trainer) -> StepOptions:
        return StepOptions(amp=self.cfg.amp, compile=trainer.compile_mode, sam_rho=self.cfg.sam_rho,
                           sam_adaptive=self.cfg.sam_adaptive)

    def setup(self, trainer: Trainer) -> None:
        prepare_models(self.distillers, trainer.device, self.cfg.channels_last)
        self.batch_size = trainer.group.local_batch_size(self.cfg.batch_size)
        self.steps_per_epoch = len(make_loader(self.data.train, self.batch_size, shuffle=False,
                                               placement=Placement(**trainer.group.shard())))
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.batch_size: the training set has only {len(self.data.train)} samples")
        self.total_steps = self.cfg.epochs * self.steps_per_epoch

    def schedule(self, trainer: Trainer) -> Schedule:
        return lr_schedule(self.cfg, self.steps_per_epoch)

    def build_steps(self, trainer: Trainer) -> list[StepGroup]:
        return self.step_builder(self, trainer)

    def train_mode(self) -> None:
        for distiller in self.distillers:
            distiller.train()

    def placement(self, trainer: Trainer) -> Placement:
        """The training batches: made on the training device, this process's share on several."""
        return Placement(trainer.device, self.cfg.num_workers, **trainer.group.shard())

    def to_device(self, trainer: Trainer, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels, index = (t.to(trainer.device, non_blocking=True) for t in batch)
        if self.cfg.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels, index

    def batches(self, trainer: Trainer, epoch: int, first_step: int):
        cfg = self.cfg
        loader = make_loader(self.data.train, self.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                             placement=self.placement(trainer))
        # a run resumed inside the epoch draws the epoch's batches again and skips those it trained on: the
        # shuffle and augmentation are functions of (seed, epoch), so the rest are the uninterrupted run's
        done = first_step - epoch * trainer.steps_per_epoch
        for b, batch in itertools.islice(enumerate(loader), done, None):
            images, labels, index = self.to_device(trainer, batch)
            if self.mixer is not None and self.mixer.active(epoch):  # before the teacher: it sees them mixed
                images, labels = self.mixer(images, labels, epoch, b)
            teacher_outputs = None
            if self.feed is not None and self.feed.active:
                with autocast_for(trainer.device, cfg.amp):
                    teacher_outputs = self.feed(images, index)
            yield [self.micro_batch((images, labels, index, teacher_outputs))]

    def micro_batch(self, inputs: tuple) -> StepBatch:
        """(images, labels, index, teacher outputs) as the step takes them: a sample per label (mixed soft
        targets: the training accuracy counts their dominant class)."""
        labels = split_targets(inputs[1])[0]
        return StepBatch(inputs, len(labels), labels)

    @contextlib.contextmanager
    def session(self, trainer: Trainer):
        cache = self.teacher_cache
        if cache is None and self.cfg.cache_teacher_outputs:
            cache = TeacherCache.for_dataset(self.data.train, trainer.device)
        with TeacherFeed(self.distillers, cache, trainer.compile_mode) as feed:
            self.feed = feed
            try:
                yield
            finally:
                self.feed = None

    def start_epoch(self, trainer: Trainer, epoch: int) -> None:
        self.feed.start_epoch()

    def end_epoch(self, trainer: Trainer, epoch: int) -> None:
        self.feed.end_epoch(trainer.group.all_reduce_sum if trainer.group.active else None)

    def before_evaluation(self, trainer: Trainer, index: int) -> None:
        # every process evaluates and saves rank 0's statistics
        trainer.group.broadcast_buffers(self.distillers[index].student)

    def evaluate(self, trainer: Trainer, index: int) -> dict[str, float]:
        cfg = self.cfg
        metrics = evaluate(evaluation_model(self.distillers[index]), self.data.test,
                           batch_size=max(cfg.batch_size, 256), device=trainer.device, amp=cfg.amp,
                           num_workers=cfg.num_workers, channels_last=cfg.channels_last)
        return {"test_top1": metrics["top1"], "test_top5": metrics["top5"], "test_loss": metrics["loss"]}

    def train_metrics(self, reading: MeterReading, seconds: float, units: int) -> dict[str, float]:
        return {"train_top1": reading.top1, "images_per_s": reading.seen / seconds}

    def describe(self, row: dict, run: Run) -> str:
        test = f"test {row['test_top1']:.2f}% (best {run.best:.2f}%)  " if "test_top1" in row else ""
        return f"train {row['train_top1']:.2f}%  {test}{row['images_per_s']:.0f} img/s"

    def close(self) -> None:
        for distiller in self.distillers:
            distiller.close()  # no hook stays on a student or a teacher after training

    def default_callbacks(self, distiller, run_dir: Optional[Path], meta: dict, verbose: bool) -> list[Callback]:
        """A run's callbacks when the caller gives none (`default_callbacks`); a task adds its own pictures."""
        return default_callbacks(distiller, run_dir, meta, verbose)

    # ------------------------------------------------------------------ init stages

    def before_loop(self, trainer: Trainer) -> list[int]:
        return [k for k, distiller in enumerate(self.distillers) if self._init_stages(trainer, distiller)]

    def _init_stages(self, trainer: Trainer, distiller) -> bool:
        """Run each method's stage before distillation (FitNet hints, FT paraphraser, ...), if it has one.

        On several processes each trains on its own shard; DDP then starts every process from rank 0's result.
        The main loop's step counter is left alone (a stage has its own)."""
        cfg = self.cfg
        ran = False
        for name, method in distiller.methods.items():
            stage = method.init_stage(distiller.student)
            if stage is None or stage.epochs <= 0:
                continue
            ran = True
            stage_lr = stage.lr if stage.lr is not None else cfg.lr
            optimizer = build_optimizer(stage.parameters, optimizer_spec(cfg, stage_lr), trainer.device,
                                        trainer.compile_mode)

            def forward(images, labels, index, teacher_outputs, epoch, name=name, method=method):
                ctx = distiller.context(images, labels, index, epoch, method=method)
                return [(None, {f"{name}_init": method.init_loss(ctx)})]

            # a stage trains its own parameters plainly: no SAM
            step = TrainStep(forward, optimizer, trainer.device, replace(self.step_options(trainer), sam_rho=0.0,
                                                                         sam_adaptive=False))
            stage_group = StepGroup(step, LearningRate(optimizer, lambda _: stage_lr), [0], [OptimizerSlot(optimizer)])
            distiller.train()
            student_ids = {id(p) for p in distiller.student.parameters()}
            if not any(id(p) in student_ids for p in stage.parameters):
                distiller.student.eval()  # a stage that trains no student weight must not move its BN statistics
            main_step, trainer.step = trainer.step, 0
            try:
                for epoch in range(stage.epochs):
                    self._stage_epoch(trainer, stage_group, (name, epoch, stage.epochs))
            finally:
                trainer.step = main_step
        if ran:
            distiller.close()  # its own teacher hooks served the stages; the feed taps the teacher from here on
        return ran

    def _stage_epoch(self, trainer: Trainer, group: StepGroup, where: tuple[str, int, int]) -> None:
        name, epoch, epochs = where
        loader = make_loader(self.data.train, self.batch_size, shuffle=True, seed=self.cfg.seed, epoch=-1 - epoch,
                             placement=self.placement(trainer))
        (meters,) = group.step.new_epoch(1, trainer.step)

        def check() -> list[MeterReading]:
            reading = meters.read(trainer.group)
            if reading.diverged:
                raise TrainingDiverged(
                    f"loss is not finite at epoch {epoch + 1}, step {reading.first_bad_step + 1} of {name}'s init "
                    f"stage ({reading.describe()}); try a lower train.lr or smaller method weights")
            return [reading]

        def batches():
            for batch in loader:
                images, labels, index = self.to_device(trainer, batch)
                yield [self.micro_batch((images, labels, index, None))]

        trainer.run_pass(batches(), [group], PassSpec(len(loader), f"{name} init {epoch + 1}/{epochs}",
                                                      epoch_offset=0.0), check)
        reading = check()[0]
        if trainer.verbose:
            print(f"{name} init stage {epoch + 1}/{epochs}  loss {reading.loss:.4f}")


# ---------------------------------------------------------------- callbacks


class ExportWeights(Callback):
    """student_best.safetensors at each new best; student.safetensors, summary.json and curves.png at the end."""

    def __init__(self, distiller, meta: dict):
        self.distiller, self.meta = distiller, meta

    def on_epoch_end(self, trainer, run, row, improved):
        if improved:
            export_weights(run.run_dir / "student_best.safetensors", self.distiller.student, self.meta)

    def on_train_end(self, trainer, run):
        if run.history:
            export_weights(run.run_dir / "student.safetensors", self.distiller.student, self.meta)
            model = evaluation_model(self.distiller)
            if model is not self.distiller.student:  # the student with the heads a method trained, as scored
                export_weights(run.run_dir / EVALUATION_MODEL, model,
                               {**self.meta, "evaluation_model": type(model).__name__})
            write_summary(run.run_dir, run.history, (run.best, run.best_epoch), trainer.task.score)


class RunRecord(Callback):
    """A run started from Python (no config.yaml in its directory) records what `kdzoo train` would: the
    TrainConfig as train.yaml and, for a distillation, the plan (plan.md, printed when `verbose`)."""

    def __init__(self, distiller, meta: dict, verbose: bool):
        self.distiller, self.meta, self.verbose = distiller, meta, verbose

    def on_train_start(self, trainer, run):
        self.record_weights_warnings(run.run_dir)
        if (run.run_dir / RUN_CONFIG).exists():  # written by kdzoo's runs, with the plan beside it
            return
        run.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(trainer.task.cfg, run.run_dir / TRAIN_CONFIG)
        distiller = self.distiller
        if isinstance(distiller, Distiller) and (distiller.teacher is not None or len(distiller.methods)):
            write_plan(distiller, trainer.task.data.test, run.run_dir, names=(self.meta.get("model"), None),
                       verbose=self.verbose, score=trainer.task.score_model)


    def record_weights_warnings(self, run_dir: Path) -> None:
        """Weights loaded with ``strict: false`` that left tensors out stay in summary.json (``weights_warnings``)."""
        distiller = self.distiller
        models = [distiller.student, *(getattr(distiller, "teachers", None) or {}).values()]
        found = [m.weights_warning for m in models if isinstance(getattr(m, "weights_warning", None), str)]
        if found:
            run_dir.mkdir(parents=True, exist_ok=True)
            text = json.dumps({**read_summary(run_dir), "weights_warnings": found}, indent=2)
            atomic_write(run_dir / SUMMARY, lambda tmp: tmp.write_text(text))


class EvalModeCheck(Callback):
    """One warning per run when evaluation tells a different story from training: test top-1 near chance while
    the training batches score well above it, or a test loss far beyond a uniform guess's.  Both are what
    stale BatchNorm running statistics give (a short run, or torchvision's momentum 0.01), which eval mode uses
    and training mode does not."""

    def __init__(self, student: nn.Module, min_train_gain: float = 15.0, max_test_share: float = 0.25,
                 max_loss_factor: float = 10.0, model_name: Optional[str] = None):
        self.student, self.model_name = student, model_name or ""
        self.min_train_gain = min_train_gain  # training top-1 points above chance before a gap means anything
        self.max_test_share = max_test_share  # test gain over chance below this share of the training gain
        self.max_loss_factor = max_loss_factor  # test loss above this many times ln(classes)
        self.warned = False

    def on_epoch_end(self, trainer, run, row, improved):
        if "test_top1" not in row or self.warned:
            return
        classes = trainer.task.data.num_classes
        chance = 100.0 / classes
        train_gain, test_gain = row["train_top1"] - chance, row["test_top1"] - chance
        near_chance = train_gain >= self.min_train_gain and test_gain <= self.max_test_share * train_gain
        exploding = row["test_loss"] > self.max_loss_factor * math.log(max(classes, 2))
        if not (near_chance or exploding):
            return
        self.warned = True
        what = (f"test top-1 {row['test_top1']:.2f}% is near chance ({chance:.2f}%) while training batches score "
                f"{row['train_top1']:.2f}%" if near_chance else
                f"the test loss {row['test_loss']:.4g} is over {self.max_loss_factor:g}x a uniform guess's")
        norms = [m for m in self.student.modules()
                 if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm))
                 and m.track_running_stats]
        momenta = sorted({m.momentum for m in norms if m.momentum is not None})
        if not norms:  # a ViT, an MLP: no running statistics to blame
            message = (f"{run.label}warning: at epoch {row['epoch']} {what}: the model has no BatchNorm, so the "
                       "gap is not running statistics; it may be overfitting the training batches (more data or "
                       "augmentation, a lower train.lr) or still too early to tell (train for more epochs)")
            tqdm.write(message) if trainer.cfg.progress else print(message)
            return
        if momenta and momenta[0] < 0.1:
            kept = (1 - momenta[0]) ** trainer.step  # the share of the initial statistics still in them
            why = (f"its BatchNorm momentum is {momenta[0]:g}, so after {trainer.step} steps the running statistics "
                   f"used in eval mode still hold {kept:.0%} of their initial values" if kept >= 0.05 else
                   f"its BatchNorm momentum is {momenta[0]:g}, so the running statistics used in eval mode trail "
                   "the changing weights")
        else:
            why = ("the BatchNorm running statistics used in eval mode do not match the weights yet, or eval-mode "
                   "layers (dropout, BatchNorm) behave differently from training")
        # only torchvision and timm models take the option; a model built in Python has the function
        option = (" (student.options.bn_momentum=0.1)" if self.model_name.startswith(("tv:", "timm:", "timm32:"))
                  else " (kdzoo.models.set_bn_momentum(model, 0.1))" if not self.model_name else "")
        message = (f"{run.label}warning: at epoch {row['epoch']} {what}: {why}.  Train for more steps (more epochs or "
                   f"data){', or give BatchNorm a larger momentum' + option if momenta and momenta[0] < 0.1 else ''}")
        tqdm.write(message) if trainer.cfg.progress else print(message)


class LossBalanceCheck(Callback):
    """After the first epoch, a distillation term more than `max_factor` times the (unweighted) cross-entropy is
    reported:
    the term, its method's weight and the weight that would make it equal to the cross-entropy.  A recipe weight
    is tuned to the maps of its paper's models (AT's 1000 to CIFAR ResNets' 8x8 maps), so on other models a term
    can swamp the labels without anything diverging.  The reports go to the console and to summary.json
    (``loss_balance``), where `kdzoo bench` marks the cell."""

    def __init__(self, distiller, verbose: bool, max_factor: float = 10.0):
        self.distiller, self.verbose, self.max_factor = distiller, verbose, max_factor
        self.done = False

    def reports(self, row: dict) -> list[str]:
        # against the cross-entropy itself, not its weighted term: KD's recipe weighs the labels 0.1 on purpose
        ce_weight = getattr(self.distiller, "ce_weight", 1.0)
        if not ce_weight or row.get("loss_ce") is None:
            return []
        cross_entropy = row["loss_ce"] / ce_weight
        if not math.isfinite(cross_entropy) or cross_entropy <= 0:
            return []
        methods = dict(self.distiller.methods.items())
        found = []
        for key, value in row.items():
            if not key.startswith("loss_") or key == "loss_ce" or not value > self.max_factor * cross_entropy:
                continue
            term = key[len("loss_"):]
            name = term if term in methods else term.split(".")[0]
            weight = getattr(methods.get(name), "weight", None)
            index = list(methods).index(name) if name in methods else None
            suggestion = (f"; methods.{index}.weight={weight * cross_entropy / value:.3g} would make it equal to the "
                          f"cross-entropy" if isinstance(weight, (int, float)) and weight > 0 and index is not None
                          else "")
            found.append(f"the {term} term ({value:.4g}, weight {weight if weight is not None else '?'}) is "
                         f"{value / cross_entropy:.0f}x the cross-entropy ({cross_entropy:.4g}) after epoch "
                         f"{row['epoch']}: it may swamp the labels{suggestion}")
        return found

    def on_epoch_end(self, trainer, run, row, improved):
        if self.done:
            return
        self.done = True
        found = self.reports(row)
        if not found:
            return
        if self.verbose:
            for line in found:
                message = f"{run.label}warning: {line}"
                tqdm.write(message) if trainer.cfg.progress else print(message)
        if run.run_dir is not None:
            text = json.dumps({**read_summary(run.run_dir), "loss_balance": found}, indent=2)
            atomic_write(run.run_dir / SUMMARY, lambda tmp: tmp.write_text(text))


def default_callbacks(distiller, run_dir: Optional[Path], meta: dict, verbose: bool,
                      export: bool = True) -> list[Callback]:
    """What `fit` does for a run: console lines, and with a run directory metrics, the run's record and (with
    `export`) its exports."""
    callbacks: list[Callback] = ([ConsoleLog(), EvalModeCheck(distiller.student, model_name=meta.get("model"))]
                                 if verbose else [])
    if distiller.methods:
        callbacks.append(LossBalanceCheck(distiller, verbose))
    if run_dir is not None:
        callbacks += [MetricsLog(), RunRecord(distiller, meta, verbose)]
        if export:
            callbacks.append(ExportWeights(distiller, meta))
    return callbacks


def write_summary(run_dir: Path, history: list[dict], best: tuple[float, int],
                  score: tuple[str, str] = ("top1", "top-1")) -> None:
    """summary.json and a learning-curve plot.  `best`: the best value of the task's metric and its epoch;
    `score`: the metric's column suffix and name (``test_<key>`` in the rows; ``last_<key>`` and ``best_<key>`` in
    the summary, e.g. last_top1 and last_top5 for a classifier).  Facts a run recorded in summary.json before
    training (the teacher's test score, ``teacher_<key>``) are kept, and the teacher's is drawn as a reference
    line."""
    final = history[-1]
    key = score[0]
    last = {f"last_{k[len('test_'):]}": v for k, v in final.items() if k.startswith("test_") and k != "test_loss"}
    summary = {**read_summary(run_dir), **last, f"last_{key}": final.get(f"test_{key}"), f"best_{key}": best[0],
               "best_epoch": best[1], "epochs": final["epoch"], "seconds": final["seconds"]}
    if key == "top1":
        summary.setdefault("last_top5", None)
    text = json.dumps(summary, indent=2)
    atomic_write(run_dir / SUMMARY, lambda tmp: tmp.write_text(text))
    plot_run(history, run_dir / "curves.png", teacher_score=summary.get(f"teacher_{key}"), title=run_dir.name,
             score=score)


def read_summary(run_dir: Path) -> dict:
    """A run directory's summary.json ({} when there is none or it cannot be read)."""
    try:
        summary = json.loads((Path(run_dir) / SUMMARY).read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


# ---------------------------------------------------------------- entry points


@dataclass
class FitOptions:
    """What else `fit` and `fit_many` can be told.  `export_meta`: the exported student's metadata (`fit_many`:
    a list, one per student; default: the student's class); `callbacks` replace the default ones (`fit_many`: a
    list per student); `teacher_cache` reuses teacher outputs across calls (else one is made when
    `cfg.cache_teacher_outputs`); `on_step(step)` is called after every optimizer step."""

    export_meta: Optional[dict | Sequence[Optional[dict]]] = None
    callbacks: Optional[Sequence[Callback] | Sequence[Sequence[Callback]]] = None
    teacher_cache: Optional[TeacherCache] = None
    on_step: Optional[Callable[[int], None]] = None


def fit(distiller: Distillable, data: DataSplits, cfg: TrainConfig, run_dir: Optional[str | Path] = None, *,
        resume: bool = False, verbose: bool = True, options: Optional[FitOptions] = None) -> FitResult:
    """Train `distiller` (a `Distiller`, or anything following the `Distillable` protocol) and evaluate its
    student.

    With `run_dir`: checkpoints (atomic) every `cfg.save_every` epochs and at the end, metrics.csv,
    TensorBoard events, the student exported as safetensors with a summary and curves, and the plan.
    `resume=True` continues exactly from the run directory's checkpoint.  The distiller's hooks are removed
    when training ends.  Launched by torchrun, every process calls fit the same way."""
    options = options or FitOptions()
    many = replace(options, export_meta=[options.export_meta],
                   callbacks=[options.callbacks] if options.callbacks is not None else None)
    task = task_class(data)([distiller], data, cfg, options.teacher_cache)
    return train_runs(task, [run_dir], resume=resume, verbose=verbose, options=many)[0]


def train_runs(task: ClassificationTask, run_dirs: Sequence[Optional[str | Path]], *, resume: bool = False,
               verbose: bool = True, options: Optional[FitOptions] = None,
               labels: Optional[Sequence[str]] = None) -> list[FitResult]:
    """Train the task's distillers on the same batches, each with its own optimizer, run directory and metrics
    (fit() is the case of one); those that share a teacher get its outputs from one forward per batch.
    `options.export_meta` and `options.callbacks` hold one entry per distiller."""
    options = options or FitOptions()
    distillers = task.distillers
    metas = [meta if meta is not None else _class_meta(d.student)
             for d, meta in zip(distillers, options.export_meta or [None] * len(distillers))]
    labels = labels or [""] * len(distillers)
    runs = [Run({"student": d.student, "methods": d.methods}, run_dir, label)
            for d, run_dir, label in zip(distillers, run_dirs, labels)]
    callbacks = options.callbacks
    if callbacks is None:
        callbacks = [task.default_callbacks(d, run.run_dir, meta, verbose)
                     for d, run, meta in zip(distillers, runs, metas)]
    trainer = Trainer(task, loop_config(task.cfg), runs, resume=resume, callbacks=callbacks,
                      on_step=options.on_step, verbose=verbose)
    return trainer.run()


def task_class(data: DataSplits) -> type[ClassificationTask]:
    """The task that trains on `data`: the registered task its `task` names (classification, segmentation), which
    `fit` and `fit_many` then run."""
    if data.task == "classification":
        return ClassificationTask
    found = TASKS.get(data.task).obj if data.task in TASKS else None
    if not (isinstance(found, type) and issubclass(found, ClassificationTask)):
        tasks = [t.name for t in TASKS if isinstance(t.obj, type) and issubclass(t.obj, ClassificationTask)]
        raise ConfigError(f"data {data.name!r} holds {data.task} labels, which fit cannot train (tasks it can: "
                          f"{', '.join(tasks)})")
    return found


def _class_meta(student: nn.Module) -> dict:
    """Export metadata of a student built outside a config: its class, so a reader knows what to rebuild."""
    return {"class": f"{type(student).__module__}.{type(student).__qualname__}"}


__all__ = ["fit", "train_runs", "evaluate", "evaluation_model", "FitOptions", "ClassificationTask", "Distillable",
           "separate_steps", "scaled_lr", "lr_schedule", "default_callbacks", "ExportWeights", "RunRecord",
           "EvalModeCheck", "write_summary", "read_summary", "task_class", "EVALUATION_MODEL", "TRAIN_CONFIG"]
