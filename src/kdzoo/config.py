"""Plain YAML mapped onto dataclasses.  No code is imported or called from a config.

Every unknown key, wrong type or bad value is a one-line `ConfigError` naming it; ``a.b=value``
overrides (the value parsed as YAML) are applied before validation.  Method, model, dataset (and condenser)
options are checked against the annotations and ranges of their constructors' signatures
(`kdzoo.registry.Entry.check`) when the config is loaded, not at the first step.  A YAML file with a key
given twice, a file that is not UTF-8 and a float that is NaN or infinite are refused too.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .data.datasets import DATASETS
from .data.semi import check_label_fractions
from .engine.runtime import atomic_write
from .errors import ConfigError, naming_path
from .methods import METHODS
from .models import EXTERNAL_PREFIXES, MODELS, check_pretrained


@dataclass
class MixupConfig:
    """``train.mixup``: timm's Mixup/CutMix on every training batch (kdzoo.tasks.classification.mixing); the
    defaults are DeiT's and DeiT-LT's (arguments.py: --mixup 0.8, --cutmix 1.0, --mixup-prob 1.0,
    --mixup-switch-prob 0.5, --mixup-mode batch, --smoothing 0.1)."""

    mixup_alpha: float = 0.8  # Beta(alpha, alpha) of mixup's lambda; 0: no mixup
    cutmix_alpha: float = 1.0  # Beta(alpha, alpha) of CutMix's area; 0: no CutMix
    prob: float = 1.0  # chance that a batch (or sample, pair) is mixed at all
    switch_prob: float = 0.5  # chance of CutMix rather than mixup when both are on
    mode: str = "batch"  # batch | pair | elem: one draw per batch, per pair, per sample
    label_smoothing: float = 0.1  # the mixed targets' smoothing
    until_epoch: Optional[int] = None  # no mixing from this (0-based) epoch on (DeiT-LT's --no-mixup-drw); None: all

    def validate(self) -> None:
        _choice("train.mixup.mode", self.mode, ("batch", "pair", "elem"))
        for key in ("mixup_alpha", "cutmix_alpha"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.mixup.{key}: must be >= 0, got {getattr(self, key)}")
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ConfigError("train.mixup: mixup_alpha and cutmix_alpha are both 0; remove train.mixup to train "
                              "without mixing")
        for key in ("prob", "switch_prob"):
            if not 0 <= getattr(self, key) <= 1:
                raise ConfigError(f"train.mixup.{key}: must be in [0, 1], got {getattr(self, key)}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"train.mixup.label_smoothing: must be >= 0 and < 1, got {self.label_smoothing}")
        if self.until_epoch is not None and self.until_epoch < 0:
            raise ConfigError(f"train.mixup.until_epoch: must be >= 0, got {self.until_epoch}")


@dataclass
class TrainConfig:
    epochs: int = 240
    batch_size: int = 64
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "multistep"  # multistep | cosine | constant
    milestones: list[int] = field(default_factory=lambda: [150, 180, 210])
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    eval_every: int = 1  # epochs
    save_every: int = 10  # epochs; the last epoch is always saved
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    deterministic: bool = False
    num_workers: int = 0
    progress: bool = True
    log_every: int = 20  # steps between progress-bar refreshes (each one reads values back from the device)
    # speed (see kdzoo.engine.step); none of these changes what is computed beyond bf16/compiler rounding
    compile: str = "off"  # off | default | reduce-overhead (torch.compile; reduce-overhead adds CUDA graphs, CUDA only)
    channels_last: bool = False  # NHWC memory format for models and batches (faster convolutions on CUDA)
    cache_teacher_outputs: bool = False  # keep teacher outputs per sample; only for data without augmentation
    # large-batch training (Goyal et al. 2017): lr *= k (linear) or sqrt(k), k = batch_size / reference_batch_size
    lr_scaling: str = "none"  # none | linear | sqrt
    reference_batch_size: int = 64  # the batch size train.lr was tuned for
    scaling_warmup_epochs: float = 5.0  # warm-up used when lr_scaling raises the lr; a larger warmup_epochs wins
    # mixed images and soft targets for the student's cross-entropy; the teacher sees the same mixed images
    mixup: Optional[MixupConfig] = None  # None: off; {}: DeiT's Mixup/CutMix (see MixupConfig)
    # sharpness-aware minimisation (kdzoo.engine.sam): two forward/backward passes per step, the second at
    # w + rho * g / ||g|| (sam_adaptive: ASAM, elementwise |w| scaling); 0: off
    sam_rho: float = 0.0
    sam_adaptive: bool = False

    def validate(self) -> None:
        _choice("train.optimizer", self.optimizer, ("sgd", "adamw"))
        _choice("train.schedule", self.schedule, ("multistep", "cosine", "constant"))
        _choice("train.amp", self.amp, ("auto", "bf16", "off"))
        _choice("train.compile", self.compile, ("off", "default", "reduce-overhead"))
        _choice("train.lr_scaling", self.lr_scaling, ("none", "linear", "sqrt"))
        for key in ("epochs", "batch_size", "eval_every", "save_every", "log_every", "reference_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("lr", "weight_decay", "warmup_epochs", "min_lr", "momentum", "num_workers",
                    "scaling_warmup_epochs", "gamma"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")
        if self.momentum >= 1:
            raise ConfigError(f"train.momentum: must be >= 0 and < 1, got {self.momentum}")
        for i, milestone in enumerate(self.milestones):
            if milestone < 0:
                raise ConfigError(f"train.milestones[{i}]: must be >= 0, got {milestone}")
        if not DEVICE_PATTERN.fullmatch(self.device):
            raise ConfigError(f"train.device: {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        if self.mixup is not None:
            self.mixup.validate()
            if self.cache_teacher_outputs:
                raise ConfigError("train.cache_teacher_outputs: the teacher sees newly mixed images every step "
                                  "(train.mixup); turn one of them off")
        if self.sam_rho < 0:
            raise ConfigError(f"train.sam_rho: must be >= 0, got {self.sam_rho}")
        if self.sam_adaptive and self.sam_rho == 0:
            raise ConfigError("train.sam_adaptive: ASAM needs a radius, train.sam_rho > 0 (e.g. 0.5)")
        if self.sam_rho > 0 and self.compile == "reduce-overhead":
            raise ConfigError("train.sam_rho: SAM runs the compiled forward twice per step, which CUDA graphs "
                              "(train.compile=reduce-overhead) cannot replay; use train.compile=default or off")


# a CLIP model's zero-shot classifier as a frozen teacher, built by kdzoo.runner from kdzoo.tasks.clip (DHO, SSLD)
ZERO_SHOT_TEACHER = "clip:zero_shot"
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class ModelConfig:
    name: str = "tiny:cnn"
    weights: Optional[str] = None  # .pth/.pt/.bin state dict, .safetensors, run directory or kdzoo checkpoint
    options: dict[str, Any] = field(default_factory=dict)
    # the weights must fill every tensor of the model and hold no others; false: load what fits, with a warning
    # printed and kept in the run's summary.json (``weights_warnings``)
    strict: bool = True
    # tv:/timm: models: true for the library's default pretrained weights (downloaded on first use), or a
    # weights name (torchvision: IMAGENET1K_V2; timm: a tag such as a1_in1k); a new head when classes differ
    pretrained: Any = False
    # "teacher": a student starts from slices of the teacher's weights (TinyCLIP's weight inheritance,
    # kdzoo.models.inherit); the student must be the teacher's architecture, narrower or shallower
    init_from: Optional[str] = None


@dataclass
class DataConfig:
    name: str = "digits"
    options: dict[str, Any] = field(default_factory=dict)
    # semi-supervised and label-free training (any dataset): a fraction of the training samples keeps its
    # label, the rest is marked unlabelled (label -1); `held_out_fraction` of the labelled ones leaves training
    # as held-out data for choosing evaluation-time weights.  Drawn with `label_seed`.
    labelled_fraction: float = 1.0
    held_out_fraction: float = 0.0
    label_seed: int = 0
    # instead of a fraction: a file of the training samples (positions, one per line) that keep their label, the
    # others unlabelled, none held out (active learning: `kdzoo select` adds the next round's queries to it)
    labelled_indices: Optional[str] = None


@dataclass
class MethodConfig:
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    teacher: Optional[str] = None  # which named teacher the method reads (RunConfig.teachers); None: the first


@dataclass
class StageConfig:
    """One stage of a staged run (``stages:``): what changes from the run's own keys.  Stages run in order, each
    student starting from the previous stage's weights (G2SD's generic then specific distillation, DMAE's
    masked pre-training then fine-tuning)."""

    name: str
    methods: Optional[list[MethodConfig]] = None  # None: the run's methods
    train: dict[str, Any] = field(default_factory=dict)  # keys of the run's train: section to change
    ce_weight: Optional[float] = None  # None: the run's ce_weight


STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass
class RunConfig:
    """``kdzoo train``: a student distilled from a teacher."""

    student: ModelConfig
    teacher: Optional[ModelConfig] = None
    # more teachers by name, each read by the methods whose `teacher:` key names it (`teacher:` above is named
    # "teacher"); the first of all is the default
    teachers: dict[str, ModelConfig] = field(default_factory=dict)
    methods: list[MethodConfig] = field(default_factory=list)
    ce_weight: Optional[float] = None  # None: the first method's published weight
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs"
    name: Optional[str] = None
    # students trained jointly with `student:` (mutual learning, kdzoo.tasks.classification.peers); each reads the others' outputs
    peers: list[ModelConfig] = field(default_factory=list)
    # train the student this many times, round r+1 taught by round r's student (kdzoo.runner.rounds)
    rounds: int = 1
    stages: list[StageConfig] = field(default_factory=list)  # empty: one stage, the run itself
    # what is learnt: classification, segmentation (kdzoo.tasks); None: what the dataset's labels are
    task: Optional[str] = None

    def stage_config(self, index: int, student_weights: Optional[str] = None) -> "RunConfig":
        """Stage `index` as a run of its own (no stages), its student starting from `student_weights`."""
        stage = self.stages[index]
        where = f"stages[{index}]"
        train = from_dict(TrainConfig, {**to_dict(self.train), **stage.train}, f"{where}.train")
        student = dataclasses.replace(self.student, options=dict(self.student.options))
        if student_weights is not None:
            student.weights, student.init_from = str(student_weights), None
        methods = self.methods if stage.methods is None else stage.methods
        return dataclasses.replace(self, student=student, train=train, stages=[],
                                   methods=[dataclasses.replace(m, options=dict(m.options)) for m in methods],
                                   ce_weight=stage.ce_weight if stage.ce_weight is not None else self.ce_weight)

    def validate(self) -> None:
        names = [stage.name for stage in self.stages]
        for i, stage in enumerate(self.stages):
            if not STAGE_NAME.fullmatch(stage.name) or names.index(stage.name) != i:
                raise ConfigError(f"stages[{i}].name: {stage.name!r} must be unique and a plain folder name "
                                  "(letters, digits, _ . -)")
            try:
                self.stage_config(i, "previous-stage" if i else None).validate()
            except ConfigError as err:
                message = str(err)
                raise ConfigError(message if message.startswith("stages[") else f"stages[{i}] ({stage.name}): "
                                  f"{message}") from None
        self.train.validate()
        _validate_peers_and_rounds(self)
        _validate_model(self.student, "student")
        if self.teacher is not None:
            _validate_model(self.teacher, "teacher")
        _validate_init_from(self.student, "student", self.teacher is not None)
        if self.teacher is not None and self.teacher.init_from is not None:
            raise ConfigError("teacher.init_from: only the student can inherit weights (student.init_from: teacher)")
        names = self.teacher_names()
        for name, teacher in self.teachers.items():
            if not isinstance(name, str) or not name or "." in name or name == "teacher":
                raise ConfigError(f"teachers.{name}: a teacher's name is a non-empty string without '.', other "
                                  "than 'teacher' (the name of the 'teacher:' section)")
            _validate_model(teacher, f"teachers.{name}")
            if teacher.init_from is not None:
                raise ConfigError(f"teachers.{name}.init_from: only the student can inherit weights")
        if self.ce_weight is not None and self.ce_weight < 0:
            raise ConfigError(f"ce_weight: must be >= 0, got {self.ce_weight}")
        for i, method in enumerate(self.methods):
            entry = _lookup(METHODS, method.name, f"methods[{i}].name")
            method.options = entry.check(method.options, f"methods[{i}]", method.name)
            if entry.obj.needs_teacher and not names and self.rounds < 2:
                raise ConfigError(f"methods[{i}] ({method.name}) needs a teacher: add a 'teacher:' section")
            if method.teacher is not None and method.teacher not in names:
                raise ConfigError(f"methods[{i}].teacher ({method.name}): {method.teacher!r} is not one of the "
                                  f"teachers ({', '.join(names) or 'none'})")
        validate_data(self.data)

    def teacher_names(self) -> list[str]:
        """Every teacher's name, the default first: 'teacher' for the 'teacher:' section, then `teachers`."""
        return (["teacher"] if self.teacher is not None else []) + list(self.teachers)



@dataclass
class TeacherConfig:
    """``kdzoo teacher``: plain supervised training of one model with the same trainer."""

    model: ModelConfig
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs"
    name: Optional[str] = None
    task: Optional[str] = None  # as RunConfig.task

    def validate(self) -> None:
        self.train.validate()
        _validate_model(self.model, "model")
        _validate_init_from(self.model, "model", False)
        validate_data(self.data)


def _validate_peers_and_rounds(cfg: RunConfig) -> None:
    """Peers train without a frozen teacher; methods that read peers need them; rounds, peers and stages do not
    mix."""
    if cfg.stages and (cfg.peers or cfg.rounds > 1):
        raise ConfigError("stages: a staged run trains one student once per stage; it cannot also have "
                          "'peers:' or 'rounds:'")
    for i, peer in enumerate(cfg.peers):
        _validate_model(peer, f"peers[{i}]")
        if peer.init_from is not None:
            raise ConfigError(f"peers[{i}].init_from: peers have no teacher to inherit from")
    if cfg.peers and cfg.teacher is not None:
        raise ConfigError("peers: students trained as peers teach each other; remove the 'teacher:' section")
    if cfg.peers and cfg.student.init_from is not None:
        raise ConfigError("student.init_from: peers have no teacher to inherit from")
    for i, method in enumerate(cfg.methods):
        entry = _lookup(METHODS, method.name, f"methods[{i}].name")
        if getattr(entry.obj, "needs_peers", False) and not cfg.peers:
            raise ConfigError(f"methods[{i}] ({method.name}) reads other students: add a 'peers:' section")
        for key, value in {**entry.defaults, **method.options}.items():
            if value != "estimate":  # a ground-truth weight set in each round (kdzoo.runner.rounds)
                continue
            if key != entry.obj.ground_truth_weight:
                which = entry.obj.ground_truth_weight or "none here"
                raise ConfigError(f"methods[{i}].{key} ({method.name}): only a ground-truth weight ({which}) can "
                                  "be 'estimate'")
            if cfg.rounds < 2:
                raise ConfigError(f"methods[{i}].{key} ({method.name}): 'estimate' is set in each round of "
                                  "'rounds: N' (N >= 2); give a number for a single run")
    if cfg.rounds < 1:
        raise ConfigError(f"rounds: must be >= 1, got {cfg.rounds}")
    if cfg.rounds > 1 and cfg.peers:
        raise ConfigError("rounds: not with 'peers:' (a round's teacher is the previous round's one student)")


def _validate_model(model: ModelConfig, where: str) -> None:
    """Registered models are checked here; torchvision and timm names, and a zero-shot CLIP teacher's options, when
    the model is built."""
    if model.name == ZERO_SHOT_TEACHER:
        if not where.startswith("teacher"):
            raise ConfigError(f"{where}.name: {ZERO_SHOT_TEACHER} is a frozen teacher (a CLIP model's zero-shot "
                              "classifier); it cannot be trained")
        if model.weights or model.pretrained or model.init_from:
            raise ConfigError(f"{where}: {ZERO_SHOT_TEACHER} reads its dual encoder from options.run or options.model; "
                              "remove weights / pretrained / init_from")
        return
    if not model.name.startswith(EXTERNAL_PREFIXES):
        entry = _lookup(MODELS, model.name, f"{where}.name")
        model.options = entry.check(model.options, f"{where}.options", model.name)
    try:
        check_pretrained(model.name, model.pretrained)
    except ConfigError as err:
        raise ConfigError(f"{where}.{err}") from None
    if model.pretrained and model.weights:
        raise ConfigError(f"{where}: give pretrained or weights, not both (weights replace every pretrained tensor)")


def _validate_init_from(model: ModelConfig, where: str, has_teacher: bool) -> None:
    if model.init_from is None:
        return
    if model.init_from != "teacher":
        raise ConfigError(f"{where}.init_from: {model.init_from!r} is not understood; the only value is 'teacher'")
    if not has_teacher:
        raise ConfigError(f"{where}.init_from: teacher needs a 'teacher:' section to inherit from")
    if model.weights or model.pretrained:
        raise ConfigError(f"{where}: give {'weights' if model.weights else 'pretrained'} or init_from, not both")


def validate_data(data: DataConfig) -> None:
    entry = _lookup(DATASETS, data.name, "data.name")
    data.options = entry.check(data.options, "data.options", data.name)
    check_label_fractions(data.labelled_fraction, data.held_out_fraction)
    if data.labelled_indices is not None and (data.labelled_fraction < 1 or data.held_out_fraction > 0):
        raise ConfigError("data.labelled_indices: names the labelled samples itself; leave labelled_fraction and "
                          "held_out_fraction unset")


def _lookup(registry, name: str, where: str):
    try:
        return registry.get(name)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _choice(where: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(allowed)}")


# ---------------------------------------------------------------- dict <-> dataclass


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from plain data, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (keys: {', '.join(fields)})"
            raise ConfigError(f"{_join(where, key)}: unknown key{hint}")
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _convert(hints[name], data[name], _join(where, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(where, name)}: missing required key")
    return cls(**values)


MAX_INT = 2**32 - 1  # an integer option beyond it (a seed's range) is a typo, not a request for 10^30 epochs


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        if tp is MethodConfig:
            return _method(value, where)
        return from_dict(tp, value if value is not None else {}, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_describe(value)}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_describe(value)}")
        if len(args) == 2 and dataclasses.is_dataclass(args[1]):  # e.g. teachers by name
            return {k: _convert(args[1], v, _join(where, k)) for k, v in value.items()}
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_describe(value)}")
        if abs(value) > MAX_INT:
            raise ConfigError(f"{where}: {value:.3g} is beyond any sensible value (at most {MAX_INT:,})")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_describe(value)}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def _method(value: Any, where: str) -> MethodConfig:
    """A method is written as a bare name or as a mapping of name and options."""
    if isinstance(value, str):
        return MethodConfig(value)
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ConfigError(f"{where}: expected a method name or a mapping with 'name', got {_describe(value)}")
    teacher = value.get("teacher")
    if teacher is not None and not isinstance(teacher, str):
        raise ConfigError(f"{where}.teacher: expected a teacher's name, got {_describe(teacher)}")
    options = {k: v for k, v in value.items() if k not in ("name", "teacher")}
    return MethodConfig(value["name"], options, teacher)


def to_dict(obj: Any) -> Any:
    if isinstance(obj, MethodConfig):
        return {"name": obj.name, **({"teacher": obj.teacher} if obj.teacher is not None else {}), **obj.options}
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, (dict, list)) else type(value).__name__


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


# ---------------------------------------------------------------- files and overrides


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last
    silently, so a second ``train:`` section would drop the first)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base``: keys given beside it override the base's
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: PyYAML reports it below
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


# Limits checked on the parsed document before any value is built, so an alias bomb (aliases of aliases, each
# doubling the value), a deep nesting or a number of thousands of digits is one line, never a hang or a traceback.
MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000  # values after every alias is expanded
MAX_YAML_DEPTH = 50
MAX_NUMBER_DIGITS = 40


def _check_yaml_nodes(root: yaml.Node) -> None:
    """Count the values `root` expands to (each alias as often as it is used) and its depth, without expanding
    anything (each node is measured once); refuse what is over the limits."""
    measured: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth)
    open_nodes: set[int] = set()  # entered, not yet measured: the ancestors of what is on top of the stack
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if id(node) in measured:
            continue
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else
                    list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if not children_done:
            if id(node) in open_nodes:
                raise ValueError(f"an alias at line {node.start_mark.line + 1} refers to a value that contains it")
            open_nodes.add(id(node))
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in measured)
            continue
        if isinstance(node, yaml.ScalarNode) and node.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
            digits = sum(c.isdigit() for c in node.value)
            if digits > MAX_NUMBER_DIGITS:
                raise ValueError(f"a number of {digits} digits at line {node.start_mark.line + 1} (at most "
                                 f"{MAX_NUMBER_DIGITS}; write large values with an exponent, e.g. 1e12)")
        values = 1 + sum(measured[id(c)][0] for c in children if id(c) in measured)
        depth = 1 + max((measured[id(c)][1] for c in children if id(c) in measured), default=0)
        if values > MAX_YAML_VALUES:
            raise ValueError(f"it expands to more than {MAX_YAML_VALUES:,} values (aliases repeated inside aliases?)")
        if depth > MAX_YAML_DEPTH:
            raise ValueError(f"it is nested more than {MAX_YAML_DEPTH} levels deep "
                             f"(at line {node.start_mark.line + 1})")
        measured[id(node)] = (values, depth)
        open_nodes.discard(id(node))


def load_yaml_text(text: str) -> Any:
    """YAML with PyYAML's safe loader (no code, no objects), refusing duplicate keys and, before anything is
    built, documents over the size, expansion, depth and number-length limits (`ConfigError`)."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"the YAML is {len(text):,} characters long (at most {MAX_YAML_BYTES:,})")
    loader = UniqueKeyLoader(text)
    try:
        root = loader.get_single_node()  # parsed, nothing built yet
        if root is None:
            return None
        _check_yaml_nodes(root)
        return loader.construct_document(root)
    except RecursionError:  # PyYAML parses nested values recursively
        raise ConfigError(f"the YAML is refused: it is nested more than {MAX_YAML_DEPTH} levels deep") from None
    except ValueError as err:  # a limit of _check_yaml_nodes
        raise ConfigError(f"the YAML is refused: {err}") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file")
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                          "save the config as UTF-8") from None
    try:
        data = load_yaml_text(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at} ({getattr(err, 'problem', err)})") from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if data is None:  # an empty file would start a run of defaults (a diffusion teacher: 2,000 steps)
        raise ConfigError(f"{path}: the config file is empty")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {_describe(data)}")
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` (value parsed as YAML; ``methods.0.temperature=2`` indexes lists)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.lr=0.1")
        try:
            value = load_yaml_text(raw)
        except yaml.YAMLError:
            raise ConfigError(f"override {item[:80]!r}: value is not valid YAML") from None
        except ConfigError as err:
            raise ConfigError(f"override {key[:80]!r}: {err}") from None
        node: Any = data
        parts = key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth]) or 'list'} has no item {part}")
                i = int(part)
                if isinstance(node[i], str) and not last:  # "kd" -> {"name": "kd"} to take options
                    node[i] = {"name": node[i]}
                if last:
                    node[i] = value
                else:
                    node = node[i]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
                    if node is None:
                        node = data_set(data, parts[: depth + 1], {})
            else:
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:depth])} is not a mapping")
    return data


def data_set(data: dict, parts: list[str], value: Any) -> Any:
    node = data
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value
    return value


def load_config(cls: type, path: Optional[str | Path], overrides: list[str] = ()) -> Any:
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides))
    config = from_dict(cls, data)
    config.validate()
    return config


def save_config(config: Any, path: str | Path) -> None:
    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    with naming_path(path):
        atomic_write(path, lambda tmp: tmp.write_text(text))
