"""From a run config to the objects a run trains: data, models (with their weights), methods and the Distiller."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import ZERO_SHOT_TEACHER, DataConfig, ModelConfig, RunConfig
from ..data import DataSplits, build_dataset, input_example, keep_labels_of, withhold_labels
from ..distiller import Distiller, TrainingData
from ..errors import CheckpointError, ConfigError
from ..methods import METHODS, Method, create_method
from ..models import create_model
from ..models.inherit import inherit_weights
from ..models.weights import LoadReport
from ..models.weights import load_weights as load_model_weights
from ..registry import DATASETS, TASKS, unknown_name_message
from ..tasks.clip.zero_shot import build_zero_shot_teacher


def build_data(cfg: DataConfig, task: Optional[str] = None) -> DataSplits:
    """The dataset a config names.  `task` (the config's ``task:``): a dataset with a ``task`` option (``scenes``)
    is built for it unless its options say otherwise; the labels must be that task's."""
    options = dict(cfg.options)
    if task is not None:
        tasks = [name for name in TASKS.names() if name != "lm"]
        if task not in tasks:
            raise ConfigError(unknown_name_message("task", task, tasks))
        if cfg.name in DATASETS and "task" in DATASETS.get(cfg.name).defaults:
            options.setdefault("task", task)
    data = build_dataset(cfg.name, **options)
    if task is not None and data.task != task:
        raise ConfigError(f"task: {task!r}, but data {cfg.name!r} holds {data.task} labels"
                          + (" (data.options.task)" if "task" in cfg.options else ""))
    if cfg.labelled_indices is not None:
        data = keep_labels_of(data, read_indices(cfg.labelled_indices))
    elif cfg.labelled_fraction < 1 or cfg.held_out_fraction > 0:
        data = withhold_labels(data, cfg.labelled_fraction, cfg.held_out_fraction, cfg.label_seed)
    return data


def read_indices(path: str | Path, where: str = "data.labelled_indices") -> torch.Tensor:
    """Sample positions from a text file, one integer per line (blank lines and # comments skipped)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise ConfigError(f"{where} {path}: cannot be read ({err.strerror or err})") from None
    values = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            values.append(int(text))
        except ValueError:
            raise ConfigError(f"{where} {path}: line {number} is not an integer ({text!r})") from None
    return torch.tensor(values, dtype=torch.long)


def build_model(cfg: ModelConfig, data: DataSplits, where: str = "model") -> nn.Module:
    if cfg.name == ZERO_SHOT_TEACHER:
        return build_zero_shot_teacher(cfg.options, data, where)
    try:
        model = create_model(cfg.name, num_classes=data.num_classes, in_channels=data.in_channels,
                             pretrained=cfg.pretrained, **cfg.options)
    except (ConfigError, CheckpointError) as err:  # CheckpointError: pretrained weights that did not download
        raise type(err)(f"{where}: {err}") from None
    except TypeError as err:  # a torchvision/timm builder refusing an option: options are not checked ahead
        raise ConfigError(f"{where}.options ({cfg.name}): {err}") from None
    if cfg.weights:
        report = load_weights(model, cfg.weights, f"{where}.weights", cfg.strict)
        if report.missing or report.unexpected:  # only without `strict`: the run's summary keeps it
            model.weights_warning = f"{where}.weights (strict: false): {report.summary()}"
    return model


def load_weights(model: nn.Module, path: str | Path, where: str = "", strict: bool = True) -> LoadReport:
    """Load any weights file or run directory into `model` (`kdzoo.models.weights.load_weights`: prefixes
    matched, a shape that differs refused, and with `strict` tensors on one side only); `where` names the config
    key in errors and in the one-line report printed when names had to be matched or some were left out."""
    prefix = f"{where}: " if where else ""
    try:
        report = load_model_weights(model, path, strict=strict)
    except (CheckpointError, ConfigError) as err:
        if strict and "strict: false" in str(err):
            err = type(err)(str(err).replace("strict: false", f"{where.rsplit('.', 1)[0]}.strict=false"))
        raise type(err)(f"{prefix}{err}") from None
    if not report.exact:
        print(f"{prefix}{'warning: ' if report.missing or report.unexpected else ''}{report.summary()}")
    return report


def model_meta(cfg: ModelConfig, data: DataSplits, data_cfg: DataConfig) -> dict:
    """What an exported model records so `kdzoo eval` can rebuild it: its name, options and dataset."""
    return {"model": cfg.name, "options": cfg.options, "num_classes": data.num_classes,
            "in_channels": data.in_channels, "data": {"name": data_cfg.name, "options": data_cfg.options},
            "task": data.task}


def build_methods(cfg: RunConfig) -> list[Method]:
    methods = []
    for i, method in enumerate(cfg.methods):
        try:
            methods.append(create_method(method.name, **method.options))
        except ConfigError as err:
            raise ConfigError(f"methods[{i}] ({method.name}): {err}") from None
        methods[-1].teacher_name = method.teacher  # which named teacher it reads (None: the first)
    return methods


def name_method_key(err: ConfigError, cfg: RunConfig) -> ConfigError:
    """A layer error from the Distiller ("no module 'layer9' in TinyCNN") prefixed with the method option that
    names the layer (``methods[1].student_layer (fitnet): ...``), when one does."""
    message = str(err)
    match = re.search(r"(?:no module|tap) '([^']+)'", message)
    if not match:
        return err
    layer = match.group(1)
    for i, method in enumerate(cfg.methods):
        options = {**METHODS.get(method.name).defaults, **method.options}
        for key, value in options.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, str) and layer in (v, v.rsplit(":", 1)[0]) for v in values):
                return ConfigError(f"methods[{i}].{key} ({method.name}): {message}")
    return err


def build_distiller(cfg: RunConfig, data: DataSplits, run_dir: Optional[Path] = None,
                    teacher: Optional[nn.Module] = None) -> Distiller:
    """`teacher`: an already built teacher to use instead of building cfg.teacher (students trained together
    by `fit_many` must share one teacher module)."""
    student = build_model(cfg.student, data, "student")
    if cfg.teacher is None:
        teacher = None
    elif teacher is None:
        teacher = build_model(cfg.teacher, data, "teacher")
    if cfg.teacher and not cfg.teacher.weights and not cfg.teacher.pretrained and cfg.teacher.name != ZERO_SHOT_TEACHER:
        print("warning: the teacher has no weights (teacher.weights); it is randomly initialised")
    if cfg.student.init_from == "teacher":
        if teacher is None:
            raise ConfigError("student.init_from: teacher needs a 'teacher:' section to inherit from")
        print(f"student initialised from the teacher: {inherit_weights(student, teacher).summary()}")
    teachers = {}
    for name, section in cfg.teachers.items():
        if not section.weights and section.name != ZERO_SHOT_TEACHER:
            print(f"warning: teachers.{name} has no weights; it is randomly initialised")
        teachers[name] = build_model(section, data, f"teachers.{name}")
    methods = build_methods(cfg)
    try:
        return Distiller(student, teacher, methods, example_input=input_example(data), ce_weight=cfg.ce_weight,
                         teachers=teachers, data=TrainingData.of(data, run_dir))
    except ConfigError as err:
        raise name_method_key(err, cfg) from None


__all__ = ["build_data", "read_indices", "build_model", "load_weights", "model_meta", "build_methods", "build_distiller"]
