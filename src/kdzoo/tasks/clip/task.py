"""Dual encoders (CLIP) on the engine's Trainer: ``kdzoo clip teacher`` trains one contrastively on image-caption
pairs, ``kdzoo clip distill`` trains a student with a registered method against a frozen teacher.

The task supplies the step (the student's forward on a batch of pairs, the teacher's without gradient when the
method needs it, the method's loss terms), each epoch's batches (a permutation of the training images and one
caption per image, both functions of (seed, epoch), so a resumed run, also from inside an epoch, draws what the
uninterrupted one did), the held-out evaluation (zero-shot top-1 and retrieval recall, `evaluation`) and the
export: ``model.safetensors``, ``encoder.json`` and the tokenizer (`models.save_encoder`), ``summary.json``.

Optimisation follows CLIP / open_clip: AdamW with betas (0.9, 0.98), weight decay on matrices only (gains, biases
and the logit scale get none), a linear warm-up then a cosine (or constant) rate, and the log logit scale clamped
to [0, ln 100] after every update (an optimizer post-step hook, so a checkpoint holds the clamped value).  One
process: the contrastive loss would need the features of every process gathered (open_clip's ``gather_features``),
which is not written yet.
"""
from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Optional

import torch
from torch import nn

from ...config import from_dict, read_yaml, to_dict
from ...engine.optim import LearningRate, OptimizerSlot, OptimizerSpec, build_optimizer
from ...engine.rundir import RUN_CONFIG, SUMMARY
from ...engine.runtime import atomic_write, seed_everything
from ...engine.schedule import Schedule
from ...engine.step import MeterReading, StepBatch, StepOptions, TrainStep
from ...engine.trainer import LoopConfig, Run, StepGroup, Task, Trainer
from ...errors import ConfigError
from ...registry import CLIP_METHODS, register_task
from .config import LN_100, ClipDataConfig, ClipDistillConfig, ClipRunConfig, ClipTrainConfig
from .data import ClipData, build_clip_data, caption_table, epoch_captions, epoch_order
from .evaluation import RECALL_KS, evaluate_encoder
from .method_base import ClipBatch, ClipMethod
from .methods.tinyclip import MaskStage, inherited_student
from .models import DualEncoder, build_encoder, load_encoder, save_encoder

ADAMW_BETAS = (0.9, 0.98)  # CLIP's (and open_clip's for ViTs)


class Encoder(NamedTuple):
    """A dual encoder with its tokenizer and the caption pool's tokens for it ((ids, mask), one row per caption)."""

    model: DualEncoder
    tokenizer: Any
    tokens: tuple[torch.Tensor, torch.Tensor]


def encoder_for(model: DualEncoder, tokenizer: Any, data: ClipData) -> Encoder:
    return Encoder(model, tokenizer, caption_table(data.captions, tokenizer))


class ClipStep(nn.Module):
    """One micro-batch: the student's outputs (a submodule; under the gates of a TinyCLIP mask stage), the frozen
    teacher's without gradient when the method needs them, and the method's loss terms (and the stage's)."""

    def __init__(self, student: DualEncoder, method: ClipMethod, teacher: Optional[DualEncoder],
                 mask_stage: Optional[MaskStage] = None):
        super().__init__()
        self.student = student
        # checkpointed by the task / no run state
        self.__dict__.update(method=method, teacher=teacher, mask_stage=mask_stage)

    def forward(self, batch: ClipBatch, step: int) -> dict[str, torch.Tensor]:
        method, stage = self.method, self.mask_stage
        with stage.gated(self.student) if stage is not None else contextlib.nullcontext(), \
                method.student_context(batch, step):
            student_out = self.student(batch.images, batch.input_ids, batch.attention_mask, method.student_features)
        teacher_out = None
        if method.needs_teacher:
            with torch.no_grad():
                teacher_out = self.teacher(batch.images, batch.teacher_input_ids, batch.teacher_attention_mask,
                                           method.teacher_features)
        terms = method.loss(batch, student_out, teacher_out, step)
        return terms if stage is None else {**terms, **stage.loss_terms(step)}


class _ScheduledGroups:
    """The optimizer's groups the schedule sets: a group marked ``"constant_lr": True`` keeps the rate it was added
    with (TinyCLIP's gates)."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self) -> list[dict]:
        return [group for group in self.optimizer.param_groups if not group.get("constant_lr")]


@register_task("clip", family="vision-language",
               description="dual encoders (CLIP): a teacher trained contrastively on image-caption pairs (kdzoo clip "
                           "teacher), students distilled from it with registered methods (kdzoo clip distill)")
class ClipTask(Task):
    higher_is_better = True
    log_axis = "epoch"
    unit = "img"

    def __init__(self, train: ClipTrainConfig, data: ClipData, student: Encoder, method: ClipMethod,
                 teacher: Optional[Encoder] = None, mask_stage: Optional[MaskStage] = None):
        if method.needs_teacher and teacher is None:
            raise ConfigError(f"method {getattr(method, 'registry_name', type(method).__name__)}: needs a teacher")
        self.train_cfg, self.data, self.student, self.method, self.teacher = train, data, student, method, teacher
        self.mask_stage = mask_stage  # TinyCLIP's automatic inheritance: gates learnt, the compact model exported
        self.metric = "test_zeroshot_top1" if data.class_names is not None else "test_mean_recall"
        self.steps_per_epoch = len(data.train) // train.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train.batch_size {train.batch_size} exceeds the {len(data.train)} training pairs")
        self.total_steps = train.epochs * self.steps_per_epoch if mask_stage is None else mask_stage.steps
        # before any checkpoint is restored: modules the method builds here are part of the run's state
        method.attach(student.model, teacher.model if teacher is not None else None)

    def setup(self, trainer: Trainer) -> None:
        if trainer.group.world_size > 1:
            raise ConfigError("kdzoo clip runs on one process: the contrastive loss over several would need every "
                              "process's features gathered, which kdzoo does not do yet")
        self.device = trainer.device
        self.student.model.to(self.device).train()
        self.method.to(self.device)
        self.student_tokens = tuple(t.to(self.device) for t in self.student.tokens)
        teacher = None
        if self.teacher is not None and self.method.needs_teacher:
            teacher = self.teacher.model.to(self.device).eval().requires_grad_(False)
            self.teacher_tokens = tuple(t.to(self.device) for t in self.teacher.tokens)
        self.step_module = ClipStep(self.student.model, self.method, teacher, self.mask_stage)
        trainer.runs[0].modules["student"] = self.student.model
        trainer.runs[0].modules["method"] = self.method
        if self.mask_stage is not None:
            trainer.runs[0].modules["gates"] = self.mask_stage.to(self.device).train()

    def schedule(self, trainer: Trainer) -> Schedule:
        tc = self.train_cfg
        return Schedule(tc.lr, self.total_steps, 1, tc.schedule, warmup=tc.warmup_steps)

    def build_steps(self, trainer: Trainer) -> list[StepGroup]:
        tc, student = self.train_cfg, self.student.model
        spec = OptimizerSpec("adamw", tc.lr, weight_decay=tc.weight_decay, betas=ADAMW_BETAS, decay_1d=False)
        optimizer = build_optimizer(student.parameters(), spec, trainer.device)
        extra = []
        stage = self.mask_stage
        for group in self.method.parameter_groups() + (stage.parameter_groups() if stage is not None else []):
            lr = group["lr"] if group.get("constant_lr") else tc.lr * group.get("lr_scale", 1.0)
            if isinstance(optimizer.param_groups[0]["lr"], torch.Tensor):
                lr = group["params"][0].new_tensor(lr)
            optimizer.add_param_group({**group, "lr": lr})
            extra += group["params"]

        def clamp_logit_scale(*_):
            with torch.no_grad():
                student.logit_scale.clamp_(0, LN_100)
            if stage is not None:
                stage.constrain_()  # the gates' log-alphas, as the authors after every step

        optimizer.register_step_post_hook(clamp_logit_scale)

        def forward(*inputs):  # the micro-batch's inputs, then the fractional epoch (unused)
            return [(None, self.step_module(*inputs[:-1]))]

        step = TrainStep(forward, optimizer, trainer.device,
                         StepOptions(amp=tc.amp, max_grad_norm=tc.max_grad_norm, free_gradients_first=True),
                         clip_parameters=list(student.parameters()) + extra)
        return [StepGroup(step, LearningRate(_ScheduledGroups(optimizer), trainer.schedule), [0],
                          [OptimizerSlot(optimizer)])]

    def train_mode(self) -> None:
        self.student.model.train()
        self.method.train()
        if self.mask_stage is not None:
            self.mask_stage.train()

    def batches(self, trainer: Trainer, epoch: int, first_step: int) -> Iterator[Iterator[StepBatch]]:
        tc, train = self.train_cfg, self.data.train
        order = epoch_order(len(train), tc.seed, epoch)
        captions = epoch_captions(train, tc.seed, epoch)
        first = epoch * self.steps_per_epoch
        for index in range(first_step - first, self.steps_per_epoch):
            rows = order[index * tc.batch_size:(index + 1) * tc.batch_size]
            yield iter([self.micro_batch(rows, captions[rows], first + index)])

    def micro_batch(self, rows: torch.Tensor, captions: torch.Tensor, step: int) -> StepBatch:
        """The images of `rows` with their `captions` (pool indices) as each model's tokens."""
        device, split = self.device, self.data.train
        index = captions.to(device)
        ids, mask = self.student_tokens
        labels = split.labels[rows].to(device) if split.labels is not None else None
        teacher_ids = teacher_mask = None
        if self.teacher is not None and self.method.needs_teacher:
            teacher_ids, teacher_mask = (t[index] for t in self.teacher_tokens)
        batch = ClipBatch(split.images_at(rows).to(device), ids[index], mask[index], index, labels, teacher_ids,
                          teacher_mask)
        return StepBatch((batch, step), len(rows), units=len(rows))

    def evaluate(self, trainer: Trainer, index: int) -> dict[str, float]:
        tc, stage = self.train_cfg, self.mask_stage
        if stage is None:
            return evaluate_encoder(self.student.model, self.student_tokens, self.data, tc.eval_batch_size,
                                    tc.retrieval_pairs, self.device)
        stage.eval()  # the deterministic gates, which the exported compact model computes
        try:
            with stage.gated(self.student.model):
                return evaluate_encoder(self.student.model, self.student_tokens, self.data, tc.eval_batch_size,
                                        tc.retrieval_pairs, self.device)
        finally:
            stage.train()

    def train_metrics(self, reading: MeterReading, seconds: float, units: int) -> dict[str, float]:
        return {"images_per_s": units / max(seconds, 1e-9)}

    def describe(self, row: dict, run: Run) -> str:
        words = []
        if "test_zeroshot_top1" in row:
            words.append(f"zero-shot top-1 {row['test_zeroshot_top1']:.2f}%")
        if "test_i2t_r1" in row:
            words.append(f"R@1 image->text {row['test_i2t_r1']:.1f}% text->image {row['test_t2i_r1']:.1f}%")
        return "  ".join(words + [f"{row['images_per_s']:.0f} img/s"])

    def finish(self, trainer: Trainer) -> None:
        """The dual encoder, its tokenizer and summary.json into the run directory."""
        run = trainer.runs[0]
        if not trainer.group.is_main:
            return
        model, stage = self.student.model, self.mask_stage
        exported = model if stage is None else stage.compact(model)
        save_encoder(run.run_dir, exported, self.student.tokenizer)
        if run.history:
            summary = {"epochs": -(-self.total_steps // self.steps_per_epoch), "steps": self.total_steps,
                       "seconds": run.history[-1]["seconds"], "final": run.history[-1],
                       "method": getattr(self.method, "registry_name", type(self.method).__name__),
                       "parameters": sum(p.numel() for p in exported.parameters())}
            if stage is not None:
                summary["mask_stage"] = stage.summary(model, exported)
            text = json.dumps(summary, indent=2)
            atomic_write(run.run_dir / SUMMARY, lambda tmp: tmp.write_text(text))


# ---------------------------------------------------------------- building runs


def loop_config(cfg: ClipRunConfig | ClipDistillConfig) -> LoopConfig:
    tc = cfg.train
    return LoopConfig(seed=tc.seed, device=tc.device, eval_every=tc.eval_every, save_every=1,
                      save_every_steps=tc.save_every_steps, log_every=tc.log_every, progress=tc.progress)


def run_config(run_dir: str | Path) -> ClipRunConfig | ClipDistillConfig:
    """The config a kdzoo clip run was trained with (a teacher's or a distilled student's)."""
    path = Path(run_dir) / RUN_CONFIG
    if not Path(run_dir).exists():
        raise ConfigError(f"{run_dir}: not a kdzoo clip run directory (the folder does not exist)")
    if not Path(run_dir).is_dir():
        raise ConfigError(f"{run_dir}: a file, not a kdzoo clip run directory")
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a kdzoo clip run directory (no {RUN_CONFIG})")
    data = read_yaml(path)
    distilled = "method" in data and ("teacher" in data or "teacher_model" in data)
    try:
        return from_dict(ClipDistillConfig if distilled else ClipRunConfig, data, str(path))
    except ConfigError as err:
        raise ConfigError(f"{run_dir}: not a kdzoo clip run directory (its {RUN_CONFIG} is not a kdzoo clip config: "
                          f"{err})") from None


def run_data_config(run_dir: str | Path, depth: int = 0) -> ClipDataConfig:
    """The image-caption pairs a kdzoo clip run was trained on (a student's own, or its teacher's)."""
    cfg = run_config(run_dir)
    if cfg.data is not None:
        return cfg.data
    if depth > 8:
        raise ConfigError(f"{run_dir}: its chain of teachers runs too deep to find its data")
    return run_data_config(cfg.teacher, depth + 1)


def build_teacher_task(cfg: ClipRunConfig, device: torch.device) -> ClipTask:
    """The pairs and a dual encoder (its initial weights a function of the seed alone) with the contrastive loss."""
    data = build_clip_data(cfg.data)
    seed_everything(cfg.train.seed)
    model, tokenizer = build_encoder(cfg.model, data.geometry, data.captions)
    method = CLIP_METHODS.build("contrastive")
    return ClipTask(cfg.train, data, encoder_for(model, tokenizer, data), method)


def _teacher(cfg: ClipDistillConfig, data: ClipData) -> Encoder:
    if cfg.teacher is not None:
        model, tokenizer = load_encoder(cfg.teacher)
        if model.adapter.data_channels != data.geometry.channels:
            raise ConfigError(f"data: the teacher {cfg.teacher} takes {model.adapter.data_channels}-channel data, this "
                              f"data has {data.geometry.channels} channels")
    else:
        model, tokenizer = build_encoder(cfg.teacher_model, data.geometry, data.captions)
    return encoder_for(model.eval().requires_grad_(False), tokenizer, data)


def build_distill_task(cfg: ClipDistillConfig, device: torch.device) -> ClipTask:
    """The frozen teacher, the student (built from `cfg.model`, or a copy of the teacher) and the method."""
    data = build_clip_data(cfg.data if cfg.data is not None else run_data_config(cfg.teacher))
    teacher = _teacher(cfg, data)
    seed_everything(cfg.train.seed)
    init, mask_stage = cfg.student_init, None
    if init.inherit != "none" or init.run is not None:  # TinyCLIP's weight inheritance, or a previous stage's student
        model, tokenizer, mask_stage = inherited_student(init, cfg.model, teacher.model, teacher.tokenizer)
        student = encoder_for(model, tokenizer, data)
    elif cfg.model is None:
        student = Encoder(copy.deepcopy(teacher.model).requires_grad_(True), teacher.tokenizer, teacher.tokens)
    else:
        student = encoder_for(*build_encoder(cfg.model, data.geometry, data.captions), data)
    method = CLIP_METHODS.build(cfg.method.name, **cfg.method.options)
    return ClipTask(cfg.train, data, student, method, teacher, mask_stage)


# ---------------------------------------------------------------- kdzoo clip eval


def evaluate_runs(runs: list[str], device: torch.device, batch_size: int = 256,
                  retrieval_pairs: int = 1000) -> list[dict]:
    """One row per run folder: its held-out metrics on the pairs it was trained on, and its parameter count."""
    if not runs:
        raise ConfigError("no runs to evaluate")
    rows, cached = [], {}
    for run in runs:
        data_cfg = run_data_config(run)
        key = json.dumps(to_dict(data_cfg), sort_keys=True)
        if key not in cached:
            cached[key] = build_clip_data(data_cfg)
        data = cached[key]
        model, tokenizer = load_encoder(run)
        model.to(device)
        tokens = tuple(t.to(device) for t in caption_table(data.captions, tokenizer))
        metrics = evaluate_encoder(model, tokens, data, batch_size, retrieval_pairs, device)
        rows.append({"run": str(run), "parameters": sum(p.numel() for p in model.parameters()), **metrics})
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows of `evaluate_runs` as a text table (a metric a run lacks shows as -)."""
    columns = [("zero-shot", "test_zeroshot_top1")] + [
        (f"{way} R@{k}", f"test_{way}_r{k}") for way in ("i2t", "t2i") for k in RECALL_KS]
    width = max([len("run")] + [len(r["run"]) for r in rows])
    lines = [f"{'run':<{width}} " + " ".join(f"{name:>9}" for name, _ in columns) + f" {'params':>10}"]
    for row in rows:
        cells = [f"{row[key]:>9.2f}" if key in row else f"{'-':>9}" for _, key in columns]
        lines.append(f"{row['run']:<{width}} " + " ".join(cells) + f" {row['parameters']:>10,}")
    return "\n".join(lines)


__all__ = ["ClipTask", "ClipStep", "Encoder", "build_teacher_task", "build_distill_task", "loop_config",
           "run_config", "run_data_config", "encoder_for", "evaluate_runs", "format_table"]
