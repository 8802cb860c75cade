"""Continual learning of a dual encoder (``kdzoo clip continual``): a sequence of classification tasks trained one
after another, each step starting from the previous step's exported model, scored after every step by zero-shot
top-1 on every task of the sequence and on held-out tasks never trained on, as a forgetting table.

ZSCL's multi-domain task-incremental protocol (Zheng et al. 2023, github.com/Thunderbeee/ZSCL, mtil/): the initial
model is a pre-trained CLIP, each task is a labelled dataset classified over its own class names, every step is
one fine-tuning run from the previous step's saved model (mtil/scripts/*.sh: ``--load`` the previous
``<dataset>.pth``), and after each step the model is evaluated zero-shot on every dataset (their results matrix,
rows after each step, columns the datasets).  Here a task is a labelled kdzoo dataset, optionally restricted to
some of its classes (digits 0-4, then 5-9), and ``zero_shot_tasks`` are columns that no step trains on.

A step is a `ClipTask` (the engine's Trainer, exact resume) on the task's pairs with the run's method: the student
is the previous step's model, the teacher the frozen initial model (ZSCL's reference model; `methods.feature`'s
``clip_fd`` or ``contrastive`` work too).  For the prompt methods (``finetune``, ``zscl``) the step hands the method
the task's class prompts (the first template of each class) and the reference set, calls it after every optimizer
update (ZSCL's weight ensemble), and evaluates and exports the method's `evaluated_model` (ZSCL: the ensemble).
The optimizer is the task's AdamW with ``adam_betas`` (ZSCL's code: (0.9, 0.999), mtil/src/args.py line 17).

Run folder: ``config.yaml``, ``steps/<k>-<task>/`` (each a kdzoo clip run folder: checkpoint, metrics.csv, the
exported dual encoder), ``forgetting.csv`` and ``forgetting.json`` (rewritten after every step).
"""
from __future__ import annotations

import copy
import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ...config import STAGE_NAME, MethodConfig, from_dict, to_dict
from ...data.arrays import UInt8Images
from ...engine.rundir import CHECKPOINT
from ...engine.runtime import atomic_write, resolve_device, seed_everything
from ...engine.trainer import Task, Trainer
from ...errors import ConfigError
from ...registry import CLIP_METHODS
from .config import ClipDataConfig, ClipModelConfig, ClipTrainConfig
from .data import ClipData, PairSplit, build_clip_data, caption_table
from .evaluation import evaluate_encoder
from .methods.zscl import ZSCL, PromptFineTuning, ReferenceSet
from .models import DualEncoder, build_encoder, load_encoder
from .task import ClipTask, Encoder, encoder_for

STEPS_DIR = "steps"
FORGETTING_CSV = "forgetting.csv"
FORGETTING_JSON = "forgetting.json"
ZSCL_BETAS = [0.9, 0.999]  # mtil/src/args.py line 17 (--beta2 0.999)
REFERENCE_TEMPLATE = "a photo of a {}."  # their ImageNet and Conceptual Captions `template`


# ---------------------------------------------------------------- config


@dataclass
class ContinualTaskConfig:
    """One task: a labelled kdzoo dataset captioned through its templates (`data`), restricted to `classes`
    (indices of the dataset's classes, renumbered in the order given; empty: all of them)."""

    name: str
    data: ClipDataConfig
    classes: list[int] = field(default_factory=list)
    train: dict[str, Any] = field(default_factory=dict)  # keys of the run's train: section this task changes (lr)

    def validate(self, where: str) -> None:
        if not STAGE_NAME.fullmatch(self.name):
            raise ConfigError(f"{where}.name: {self.name!r} must be letters, digits, '_', '.' or '-' (a folder name)")
        self.data.validate()
        if self.data.dataset is None:
            raise ConfigError(f"{where}.data: a task is a labelled dataset (data.dataset), not captioned images")
        if len(set(self.classes)) != len(self.classes) or any(c < 0 for c in self.classes):
            raise ConfigError(f"{where}.classes: distinct class indices >= 0, got {self.classes}")


@dataclass
class ReferenceConfig:
    """ZSCL's reference set: the images of `data`'s training split (of `classes` only, when given), and the texts
    `texts` plus `vocabulary` put into `template`; neither given: `data`'s own class names in `template` (its
    captions, for captioned images)."""

    data: ClipDataConfig
    classes: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # whole sentences (theirs: Conceptual Captions' captions)
    vocabulary: list[str] = field(default_factory=list)  # names put into `template`
    template: str = REFERENCE_TEMPLATE

    def validate(self) -> None:
        self.data.validate()
        if self.template.count("{}") != 1:
            raise ConfigError(f"reference.template: takes the name once as {{}}, not {self.template!r}")
        if self.classes and self.data.dataset is None:
            raise ConfigError("reference.classes: captioned images have no classes; leave it empty")


@dataclass
class ClipContinualConfig:
    """A continual run (``kdzoo clip continual``): `method` trained on `tasks` in order from the initial model (a
    kdzoo clip run folder `initial`, or a pretrained `initial_model`), scored on every task and `zero_shot_tasks`
    after each step."""

    method: MethodConfig  # finetune | zscl | any registered CLIP method (kdzoo methods --clip)
    tasks: list[ContinualTaskConfig] = field(default_factory=list)
    initial: Optional[str] = None  # a kdzoo clip run directory
    initial_model: Optional[ClipModelConfig] = None  # or a pretrained dual encoder (source transformers/open_clip)
    zero_shot_tasks: list[ContinualTaskConfig] = field(default_factory=list)  # evaluated, never trained on
    reference: Optional[ReferenceConfig] = None  # zscl's reference images and texts
    train: ClipTrainConfig = field(default_factory=ClipTrainConfig)  # every step's (a task may change keys)
    adam_betas: list[float] = field(default_factory=lambda: list(ZSCL_BETAS))
    output_dir: str = "runs/clip"
    name: Optional[str] = None

    def validate(self) -> None:
        if (self.initial is None) == (self.initial_model is None):
            raise ConfigError("initial: name a kdzoo clip run directory (initial) or a pretrained model "
                              "(initial_model), one of them")
        if self.initial_model is not None:
            self.initial_model.validate("initial_model")
            if self.initial_model.source == "config":
                raise ConfigError("initial_model.source: config would start from random weights; train a model "
                                  "with kdzoo clip teacher and name its folder in initial")
        if not self.tasks:
            raise ConfigError("tasks: at least one task to train on")
        names = [t.name for t in self.tasks + self.zero_shot_tasks]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"tasks / zero_shot_tasks: each name once, {repeated[0]!r} is repeated")
        for i, task in enumerate(self.tasks):
            task.validate(f"tasks[{i}]")
            step_train(self.train, task.train, f"tasks[{i}].train")
        for i, task in enumerate(self.zero_shot_tasks):
            task.validate(f"zero_shot_tasks[{i}]")
            if task.train:
                raise ConfigError(f"zero_shot_tasks[{i}].train: a zero-shot task is never trained on")
        if self.reference is not None:
            self.reference.validate()
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"adam_betas: two values in [0, 1), got {self.adam_betas}")
        self.train.validate()
        _check_method(self.method, self.reference)


@dataclass
class ContinualStepConfig:
    """One step of a continual run (its folder's config.yaml): `task` trained with `method`, starting from the
    model exported to `start` (None: the initial model), the initial model frozen as the teacher."""

    method: MethodConfig
    task: ContinualTaskConfig
    train: ClipTrainConfig
    start: Optional[str] = None
    initial: Optional[str] = None
    initial_model: Optional[ClipModelConfig] = None
    reference: Optional[ReferenceConfig] = None
    adam_betas: list[float] = field(default_factory=lambda: list(ZSCL_BETAS))

    def validate(self) -> None:
        self.task.validate("task")
        self.train.validate()
        if self.reference is not None:
            self.reference.validate()
        _check_method(self.method, self.reference)


def _check_method(method: MethodConfig, reference: Optional[ReferenceConfig]) -> None:
    """The method's options; ZSCL's distillation needs a reference set."""
    try:
        entry = CLIP_METHODS.get(method.name)
    except ConfigError as err:
        raise ConfigError(f"method.name: {err}") from None
    options = {**entry.defaults, **entry.check(method.options, "method", method.name)}
    if reference is None and issubclass(entry.obj, ZSCL) and options["distillation_weight"]:
        raise ConfigError("reference: zscl distils on a reference set of images and texts; set reference.data "
                          "(or method.distillation_weight=0)")


def step_train(train: ClipTrainConfig, changes: dict[str, Any], where: str) -> ClipTrainConfig:
    """The run's train section with a task's `changes`."""
    cfg = from_dict(ClipTrainConfig, {**to_dict(train), **changes}, where)
    cfg.validate()
    return cfg


def step_config(cfg: ClipContinualConfig, index: int, start: Optional[str]) -> ContinualStepConfig:
    """Step `index` (0-based) of `cfg`, starting from the model in the run folder `start` (None: the initial)."""
    task = cfg.tasks[index]
    return ContinualStepConfig(copy.deepcopy(cfg.method), copy.deepcopy(task),
                               step_train(cfg.train, task.train, f"tasks[{index}].train"), start, cfg.initial,
                               copy.deepcopy(cfg.initial_model), copy.deepcopy(cfg.reference), list(cfg.adam_betas))


def step_dir(run_dir: Path, index: int, name: str) -> Path:
    """Where step `index` (1-based) keeps its checkpoint, config, metrics and exported model."""
    return Path(run_dir) / STEPS_DIR / f"{index}-{name}"


# ---------------------------------------------------------------- data


def _subset_images(images: Any, keep: torch.Tensor, labels: torch.Tensor) -> Any:
    if isinstance(images, UInt8Images):
        return UInt8Images(images.images[keep], labels, images.mean, images.std, resident="false")
    return images[keep]


def class_subset(data: ClipData, classes: Sequence[int], where: str) -> ClipData:
    """`data` (a labelled dataset) restricted to `classes`, renumbered 0.. in the order given; the caption pool is
    every template with the kept class names (class c of template t at ``t * C + c``, as every labelled
    ClipData)."""
    count = len(data.class_names)
    if any(not 0 <= c < count for c in classes):
        raise ConfigError(f"{where}: class indices must be below {count} ({data.name} has {count} classes), "
                          f"got {list(classes)}")
    relabel = torch.full((count,), -1, dtype=torch.long)
    relabel[torch.tensor(list(classes), dtype=torch.long)] = torch.arange(len(classes))
    templates = len(data.templates)

    def split(part: PairSplit, which: str) -> PairSplit:
        keep = (relabel[part.labels] >= 0).nonzero().flatten()
        if len(keep) == 0:
            raise ConfigError(f"{where}: the {which} split of {data.name} has no image of classes {list(classes)}")
        labels = relabel[part.labels[keep]]
        candidates = torch.arange(templates).view(1, -1) * len(classes) + labels.view(-1, 1)
        return PairSplit(_subset_images(part.images, keep, labels), candidates,
                         torch.full((len(labels),), templates), labels)

    names = [data.class_names[c] for c in classes]
    captions = [template.format(name) for template in data.templates for name in names]
    return ClipData(data.name, split(data.train, "training"), split(data.test, "held-out"), captions, data.geometry,
                    names, list(data.templates))


def task_data(task: ContinualTaskConfig, where: str = "tasks") -> ClipData:
    """The pairs of one task (its classes only, when it names some)."""
    data = build_clip_data(task.data)
    return class_subset(data, task.classes, f"{where}.classes") if task.classes else data


def reference_texts(cfg: ReferenceConfig, data: ClipData) -> list[str]:
    """The reference texts: `cfg.texts` and the vocabulary in the template; by default the data's class names
    in the template (its captions, for captioned images)."""
    texts = list(cfg.texts) + [cfg.template.format(word) for word in cfg.vocabulary]
    if texts:
        return texts
    if data.class_names is None:
        return list(data.captions)
    return [cfg.template.format(name) for name in data.class_names]


def reference_set(cfg: ReferenceConfig, tokenizer: Any, channels: int) -> ReferenceSet:
    """ZSCL's reference set of `cfg`, its texts in `tokenizer`'s ids; `channels`: what the model's input takes."""
    data = build_clip_data(cfg.data)
    texts = reference_texts(cfg, data)
    if cfg.classes:
        data = class_subset(data, cfg.classes, "reference.classes")
    _check_channels(channels, data, "reference.data")
    return ReferenceSet(data.train, *tokenizer(texts))


def _check_channels(channels: int, data: ClipData, where: str) -> None:
    if channels != data.geometry.channels:
        raise ConfigError(f"{where}: the initial model takes {channels}-channel data, {data.name} has "
                          f"{data.geometry.channels} channels")


# ---------------------------------------------------------------- one step


def initial_encoder(initial: Optional[str], initial_model: Optional[ClipModelConfig],
                    data: ClipData) -> tuple[DualEncoder, Any]:
    """The initial model, frozen, and its tokenizer (a run folder's, or a pretrained model's)."""
    if initial is not None:
        model, tokenizer = load_encoder(initial)
    else:
        model, tokenizer = build_encoder(initial_model, data.geometry, data.captions)
    return model.eval().requires_grad_(False), tokenizer


class ContinualStepTask(ClipTask):
    """One step: `ClipTask` on the task's pairs; a prompt method (`PromptFineTuning`) gets the task's class prompts
    and the reference set, is told of every optimizer update, and its `evaluated_model` is evaluated and
    exported."""

    def __init__(self, step: ContinualStepConfig, data: ClipData, student: Encoder, method: Any, teacher: Encoder,
                 reference: Optional[ReferenceSet]):
        super().__init__(step.train, data, student, method, teacher)
        self.reference, self.betas = reference, tuple(step.adam_betas)
        self.prompt_method = isinstance(method, PromptFineTuning)

    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        if self.prompt_method:
            ids, mask = self.student_tokens
            prompts = self.data.prompt_indices().to(ids.device)
            if not self.method.all_templates:
                prompts = prompts[:, 0]  # ZSCL's `dataset.template`
            self.method.bind((ids[prompts], mask[prompts]), self.reference, self.train_cfg.seed, self.device,
                             self.steps_per_epoch)

    def build_steps(self, trainer: Trainer):
        groups = super().build_steps(trainer)
        optimizer = groups[0].slots[0].optimizer
        for group in optimizer.param_groups:
            group["betas"] = self.betas
        if self.prompt_method:  # after the task's own hook (the logit-scale clamp)
            optimizer.register_step_post_hook(lambda *_: self.method.after_update())
        return groups

    def exported_model(self) -> DualEncoder:
        return self.method.evaluated_model() if self.prompt_method else self.student.model

    def evaluate(self, trainer: Trainer, index: int) -> dict[str, float]:
        tc = self.train_cfg
        return evaluate_encoder(self.exported_model(), self.student_tokens, self.data, tc.eval_batch_size,
                                tc.retrieval_pairs, self.device)

    def finish(self, trainer: Trainer) -> None:
        self.student = self.student._replace(model=self.exported_model())  # ZSCL: the ensemble is the export
        super().finish(trainer)


def build_step_task(step: ContinualStepConfig, device: torch.device) -> ContinualStepTask:
    """The task's pairs, the frozen initial model, the student (the model in `step.start`, or a copy of the initial
    one), the method and the reference set."""
    data = task_data(step.task, "task")
    model, tokenizer = initial_encoder(step.initial, step.initial_model, data)
    _check_channels(model.adapter.data_channels, data, "task.data")
    teacher = encoder_for(model, tokenizer, data)
    seed_everything(step.train.seed)
    if step.start is None:
        student = Encoder(copy.deepcopy(teacher.model).requires_grad_(True), teacher.tokenizer, teacher.tokens)
    else:
        start, start_tokenizer = load_encoder(step.start)
        student = encoder_for(start.requires_grad_(True), start_tokenizer, data)
    method = CLIP_METHODS.build(step.method.name, **step.method.options)
    reference = None
    if step.reference is not None:
        reference = reference_set(step.reference, tokenizer, model.adapter.data_channels)
    return ContinualStepTask(step, data, student, method, teacher, reference)


# ---------------------------------------------------------------- the forgetting table


@dataclass
class ForgettingTable:
    """Zero-shot top-1 (%) of the initial model (row 0) and of the model after each step (row k), on each trained
    task (the first `trained` columns, in training order) and each zero-shot task."""

    columns: list[str]
    trained: int
    rows: list[tuple[str, list[float]]] = field(default_factory=list)

    def forgetting(self) -> list[Optional[float]]:
        """Per trained task learned at step j: the best score from step j on minus the last row's (None for the
        zero-shot columns, and for a task not trained yet)."""
        last = len(self.rows) - 1
        out = []
        for j in range(len(self.columns)):
            if j >= self.trained or j + 1 > last:
                out.append(None)
            else:
                out.append(max(self.rows[k][1][j] for k in range(j + 1, last + 1)) - self.rows[last][1][j])
        return out

    def change(self) -> list[float]:
        """The last row minus the initial model's, per column."""
        return [b - a for a, b in zip(self.rows[0][1], self.rows[-1][1])]

    def format(self) -> str:
        label = max([len("zero-shot top-1 (%)"), len("forgetting (best - last)")] + [len(r) for r, _ in self.rows])
        width = max([8] + [len(c) for c in self.columns])

        def line(name: str, values: Sequence[Optional[float]]) -> str:
            cells = [f"{v:>{width}.2f}" if v is not None else f"{'-':>{width}}" for v in values]
            return f"{name:<{label}}  " + " ".join(cells[:self.trained]) + \
                (" | " + " ".join(cells[self.trained:]) if len(cells) > self.trained else "")

        head = [f"{c:>{width}}" for c in self.columns]
        lines = [f"{'zero-shot top-1 (%)':<{label}}  " + " ".join(head[:self.trained])
                 + (" | " + " ".join(head[self.trained:]) if len(head) > self.trained else "")]
        lines += [line(name, values) for name, values in self.rows]
        lines.append(line("forgetting (best - last)", self.forgetting()))
        lines.append(line("last - initial", self.change()))
        return "\n".join(lines)

    def write(self, run_dir: Path) -> None:
        """``forgetting.csv`` (one row per model) and ``forgetting.json`` (with the forgetting per task)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["after", *self.columns])
        writer.writerows([name, *(f"{v:.4f}" for v in values)] for name, values in self.rows)
        text = buffer.getvalue()
        atomic_write(Path(run_dir) / FORGETTING_CSV, lambda tmp: tmp.write_text(text))
        record = {"metric": "test_zeroshot_top1", "columns": self.columns, "trained": self.columns[:self.trained],
                  "zero_shot": self.columns[self.trained:],
                  "rows": [{"after": name, **dict(zip(self.columns, values))} for name, values in self.rows],
                  "forgetting": dict(zip(self.columns, self.forgetting())),
                  "last_minus_initial": dict(zip(self.columns, self.change()))}
        blob = json.dumps(record, indent=1)
        atomic_write(Path(run_dir) / FORGETTING_JSON, lambda tmp: tmp.write_text(blob))


def zero_shot_scores(model: DualEncoder, tokenizer: Any, tasks: dict[str, ClipData], train: ClipTrainConfig,
                     device: torch.device) -> list[float]:
    """Zero-shot top-1 (%) of `model` on the held-out images of each of `tasks`, over that task's classes."""
    model.to(device)
    scores = []
    for data in tasks.values():
        tokens = caption_table(data.captions, tokenizer)
        metrics = evaluate_encoder(model, tokens, data, train.eval_batch_size, train.retrieval_pairs, device)
        scores.append(metrics["test_zeroshot_top1"])
    return scores


StepRunner = Callable[[ContinualStepConfig, Path, bool, Callable[[torch.device], Task]], Any]


def run_sequence(cfg: ClipContinualConfig, run_dir: Path, resume: bool, verbose: bool,
                 run_step: StepRunner) -> ForgettingTable:
    """Train the steps in order, each through `run_step(step config, its folder, resume, build)` (a kdzoo run in a
    folder); after the initial model and each step, the zero-shot row of every task into the forgetting table
    (written to `run_dir` each time).  With `resume` a step that has a checkpoint continues from it (a finished one
    only re-exports); the others start afresh."""
    run_dir = Path(run_dir)
    tasks = {t.name: task_data(t, f"tasks[{i}]") for i, t in enumerate(cfg.tasks)}
    tasks.update({t.name: task_data(t, f"zero_shot_tasks[{i}]") for i, t in enumerate(cfg.zero_shot_tasks)})
    device = resolve_device(cfg.train.device)
    table = ForgettingTable(list(tasks), len(cfg.tasks))
    initial, tokenizer = initial_encoder(cfg.initial, cfg.initial_model, tasks[cfg.tasks[0].name])
    table.rows.append(("initial", zero_shot_scores(initial, tokenizer, tasks, cfg.train, device)))
    table.write(run_dir)
    start = None
    for index, task in enumerate(cfg.tasks):
        folder = step_dir(run_dir, index + 1, task.name)
        folder.mkdir(parents=True, exist_ok=True)
        if verbose:
            print(f"step {index + 1}/{len(cfg.tasks)}: {task.name} with {cfg.method.name} ({folder})")
        step = step_config(cfg, index, start)
        run_step(step, folder, resume and (folder / CHECKPOINT).is_file(),
                 lambda device, step=step: build_step_task(step, device))
        model, tokenizer = load_encoder(folder)
        table.rows.append((f"after {index + 1} ({task.name})", zero_shot_scores(model, tokenizer, tasks, cfg.train,
                                                                                 device)))
        table.write(run_dir)
        start = str(folder)
    return table


__all__ = ["ClipContinualConfig", "ContinualTaskConfig", "ContinualStepConfig", "ReferenceConfig",
           "ContinualStepTask", "ForgettingTable", "build_step_task", "class_subset", "task_data", "reference_set",
           "reference_texts", "run_sequence", "step_config", "step_dir", "zero_shot_scores", "FORGETTING_CSV",
           "FORGETTING_JSON", "STEPS_DIR"]
