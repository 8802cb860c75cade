"""Distiller: a frozen teacher teaches a student through any list of methods, on unmodified models."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .data import DataSplits, labels_of
from .data.semi import UNLABELLED
from .errors import ConfigError
from .methods import METHODS
from .methods.base import Context, Method, Setup
from .taps import Layout, Taps, discover_layout, get_module, predictions_tap, probe, split_tap, trains_on_targets


@dataclass
class TrainingData:
    """What methods may know of the training data when they build their parts: its size and labels by sample
    index (CRD's memory bank and negative sampling), the dataset itself (statistics over it), held-out samples,
    and a folder for what they compute from it (`cache_dir`)."""

    num_samples: Optional[int] = None
    labels: Optional[torch.Tensor] = None
    dataset: Any = None
    held_out: Any = None
    cache_dir: Optional[Path] = None
    task: Optional[str] = None  # what the labels are (`DataSplits.task`; None: unsaid, unchecked)

    @classmethod
    def of(cls, splits: DataSplits, cache_dir: Optional[Path] = None) -> "TrainingData":
        """All of it from a `DataSplits`."""
        labels = labels_of(splits.train) if splits.task != "detection" else None  # detection: boxes, not labels
        return cls(len(splits.train), labels, splits.train, splits.held_out, cache_dir, splits.task)


@dataclass
class DistillOutput:
    logits: torch.Tensor
    losses: dict[str, torch.Tensor]  # already weighted; the trainer sums them

    @property
    def loss(self) -> torch.Tensor:
        return sum(self.losses.values())


class Distiller(nn.Module):
    """Runs the student (train mode) and the teacher (eval mode, no_grad), collects the taps every
    method asked for, and returns the student's logits with a dict of named, weighted losses.

    It knows no method by name.  `example_input` (one batch or a single sample) is used once to
    discover layouts and feature shapes so methods can build their adapters before training.

    Several teachers: `teachers={"vit": m1, "cnn": m2}` (or `teacher` as such a mapping).  Each method reads the
    teacher its `teacher_name` names (default: the first, which is `self.teacher`); methods with
    `reads_all_teachers` get every teacher's logits in `Context.teacher_logits_by_name`.  Each teacher that some
    method reads runs once per batch, however many methods read it.

    Labels of -1 mark unlabelled samples: the cross-entropy term ignores them (zero for a batch with none).
    `data` tells the methods about the training data (`TrainingData.of(splits)`).

    A detector (torchvision's) trains on its targets and returns its own losses: the labels of a batch are then
    its targets (one dict of boxes and labels per image), the student's losses replace the cross-entropy (weighed
    by `ce_weight`), and the logits methods read are its dense head's class logits (B, anchors, classes), tapped
    where its layout says (`Layout.predictions`).
    """

    def __init__(self, student: nn.Module, teacher: Union[nn.Module, Mapping[str, nn.Module], None] = None,
                 methods: Sequence[Method] = (), example_input: Optional[torch.Tensor] = None,
                 ce_weight: Optional[float] = None, teachers: Optional[Mapping[str, nn.Module]] = None,
                 data: Optional[TrainingData] = None):
        super().__init__()
        data = data or TrainingData()
        named = _named_teachers(teacher, teachers)
        names = list(named)
        self.student = student
        self.teacher = named[names[0]] if names else None  # the first teacher: read by default, fed by TeacherFeed
        self.trains_on_targets = trains_on_targets(student)
        self.teacher_name = names[0] if names else None
        self.other_teachers = nn.ModuleDict({n: named[n] for n in names[1:]})
        self.methods = nn.ModuleDict(_unique_names(methods))
        for module in named.values():
            module.requires_grad_(False)
            module.eval()
        if not named and any(m.needs_teacher for m in self.methods.values()):
            raise ConfigError("a method needs a teacher, but none was given")
        for key, method in self.methods.items():
            if method.teacher_name is not None and method.teacher_name not in named:
                raise ConfigError(f"method {key}: teacher {method.teacher_name!r} is not one of the teachers "
                                  f"({', '.join(names) or 'none'})")
            if method.reads_all_teachers and method.teacher_taps:
                raise ConfigError(f"method {key} reads every teacher's logits, so it cannot tap teacher features")
            if data.task is not None and data.task not in method.tasks:
                able = [n for n in METHODS.names() if data.task in METHODS.get(n).obj.tasks]
                raise ConfigError(f"method {key} distils {' and '.join(sorted(method.tasks))}, not {data.task} "
                                  f"(methods for {data.task}: {', '.join(able)})")
            if (method.reads_labels and data.task in (None, "classification") and data.labels is not None
                    and bool((data.labels == UNLABELLED).any())):
                raise ConfigError(f"method {key} reads every sample's label, but some training samples are unlabelled "
                                  "(data.labelled_fraction < 1): use methods that read none there (e.g. kd, ssld, dho)")
        self.ce_weight = ce_weight if ce_weight is not None else _default_ce_weight(methods)

        self._student_paths: dict[str, str] = {}  # tap spec -> module tap
        self._teacher_paths_by_name: dict[str, dict[str, str]] = {n: {} for n in names}
        if predictions_tap(student) is not None:  # a detector's class logits, read from its head
            self._student_paths[PREDICTIONS] = predictions_tap(student)
        for name, model in named.items():
            if predictions_tap(model) is not None and self._reads_logits(name):
                self._teacher_paths_by_name[name][PREDICTIONS] = predictions_tap(model)
        self._teacher_paths: dict[str, str] = self._teacher_paths_by_name.get(self.teacher_name, {})
        self._student_shapes: dict[str, torch.Size] = {}  # tap spec -> feature shape (probe batch included)
        self._teacher_shapes_by_name: dict[str, dict[str, torch.Size]] = {n: {} for n in names}
        needs_layout = any(m.student_taps or m.teacher_taps or type(m).choose_taps is not Method.choose_taps
                           for m in self.methods.values())
        if needs_layout or (len(self.methods) and example_input is not None):  # every method gets its build()
            if example_input is None:
                raise ConfigError("feature methods need example_input to find layers and shapes")
            self._wire_taps(example_input, data)
        self._student_taps: Optional[Taps] = None  # hooks, registered by the first forward, removed by close()
        self._teacher_taps: Optional[Taps] = None
        self._other_teacher_taps: dict[str, Taps] = {}

    @property
    def teachers(self) -> dict[str, nn.Module]:
        """Every teacher by name, the first (`self.teacher`) first."""
        first = {self.teacher_name: self.teacher} if self.teacher is not None else {}
        return {**first, **dict(self.other_teachers.items())}

    def method_teacher(self, method: Method) -> Optional[str]:
        """The name of the teacher `method` reads (None without teachers)."""
        return method.teacher_name if method.teacher_name is not None else self.teacher_name

    def _reads(self, name: str) -> bool:
        return any(m.needs_teacher and (m.reads_all_teachers or self.method_teacher(m) == name)
                   for m in self.methods.values())

    def _wire_taps(self, example: torch.Tensor, data: TrainingData) -> None:
        example = example[:2] if example.dim() == 4 else example.unsqueeze(0)
        example = torch.cat([example, example]) if len(example) == 1 else example  # BN needs 2 in train
        s_layout = discover_layout(self.student, example)
        teachers = self.teachers
        t_layouts = {n: discover_layout(t, example) for n, t in teachers.items() if self._reads(n)}
        t_layout = t_layouts.get(self.teacher_name, Layout([], ""))
        self.layouts = {"student": s_layout, "teacher": t_layout,
                        **{f"teacher:{n}": layout for n, layout in t_layouts.items()}}
        for method in self.methods.values():
            name = self.method_teacher(method)
            layout = t_layouts.get(name, Layout([], "")) if name is not None else Layout([], "")
            method.choose_taps(s_layout, layout)
            for spec in method.student_taps:
                self._student_paths[spec] = s_layout.resolve(spec)
            for spec in method.teacher_taps:
                self._teacher_paths_by_name.setdefault(name, {})[spec] = layout.resolve(spec)
        s_feats, logits = probe(self.student, example, self._student_paths.values())
        logits = logits_of(logits, example)
        if PREDICTIONS in self._student_paths:
            logits = s_feats[self._student_paths[PREDICTIONS]].movedim(-1, 1)  # (B, classes, anchors)
        t_feats = {n: probe(teachers[n], example, paths.values())[0] if paths else {}
                   for n, paths in self._teacher_paths_by_name.items()}
        self._student_shapes = {spec: s_feats[path].shape for spec, path in self._student_paths.items()}
        self._teacher_shapes_by_name = {n: {spec: t_feats[n][path].shape for spec, path in paths.items()}
                                        for n, paths in self._teacher_paths_by_name.items()}
        for method in self.methods.values():
            name = self.method_teacher(method)
            paths = self._teacher_paths_by_name.get(name, {})
            setup = Setup(dict(self._student_shapes), dict(self._teacher_shapes_by_name.get(name, {})),
                          num_classes=logits.shape[1] if logits is not None else 0,  # 0: a two-stage detector's
                          num_samples=data.num_samples, train_labels=data.labels,        # classes are per proposal
                          student=self.student, teacher=teachers.get(name), student_paths=dict(self._student_paths),
                          teacher_paths=dict(paths), example_input=example,
                          train_data=data.dataset, cache_dir=data.cache_dir, held_out_data=data.held_out,
                          teachers=dict(teachers))
            method.build(setup)

    @property
    def student_paths(self) -> dict[str, str]:
        """Tap spec -> module tap of every student feature a method reads (a copy)."""
        return dict(self._student_paths)

    @property
    def teacher_paths(self) -> dict[str, str]:
        """Tap spec -> module tap of every teacher feature a method reads (a copy)."""
        return dict(self._teacher_paths)

    @property
    def student_shapes(self) -> dict[str, torch.Size]:
        """Tap spec -> shape of every student feature a method reads, from the probe batch (a copy)."""
        return dict(self._student_shapes)

    @property
    def teacher_shapes(self) -> dict[str, torch.Size]:
        """Tap spec -> shape of every (first) teacher feature a method reads, from the probe batch (a copy)."""
        return dict(self._teacher_shapes_by_name.get(self.teacher_name, {}))

    def method_teacher_taps(self, method: Method) -> tuple[dict[str, str], dict[str, torch.Size]]:
        """Tap spec -> module tap, and tap spec -> shape, of the teacher `method` reads."""
        name = self.method_teacher(method)
        return (dict(self._teacher_paths_by_name.get(name, {})), dict(self._teacher_shapes_by_name.get(name, {})))

    @property
    def teacher_batch_statistics(self) -> bool:
        """Whether the teacher runs with batch-statistics BatchNorm, as some methods' references do (OFD)."""
        return self._batch_statistics(self.teacher_name)

    def _batch_statistics(self, name: Optional[str]) -> bool:
        return any(m.teacher_train_mode for m in self.methods.values()
                   if m.reads_all_teachers or self.method_teacher(m) == name)

    @property
    def needs_teacher(self) -> bool:
        """Whether a forward reads the (first) teacher's outputs (a teacher is set and some method uses it)."""
        return self.teacher is not None and self._reads(self.teacher_name)

    def evaluation_model(self) -> nn.Module:
        """The model evaluation scores: a method's `evaluation_model` (the student with a head it trained),
        else the student itself."""
        for method in self.methods.values():
            model = method.evaluation_model(self.student)
            if model is not None:
                return model
        return self.student

    # ------------------------------------------------------------------ hooks

    def open(self) -> "Distiller":
        """Register the forward hooks the methods read (done by the first forward; `close` removes them)."""
        if self._student_taps is None:
            self._student_taps = Taps(self.student, self._student_paths.values())
        return self

    def close(self) -> None:
        """Remove every forward hook this distiller put on the student and the teacher.  The distiller stays
        usable: the next forward registers them again."""
        for taps in (self._student_taps, self._teacher_taps, *self._other_teacher_taps.values()):
            if taps is not None:
                taps.remove()
        self._student_taps = self._teacher_taps = None
        self._other_teacher_taps = {}

    def __enter__(self) -> "Distiller":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ forward

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        for teacher in self.teachers.values():
            teacher.eval()  # BN statistics and dropout of the teachers never change
        return self

    def trainable_parameters(self):
        """The student's and the methods' parameters (adapters, projectors); never the teacher's."""
        yield from self.student.parameters()
        yield from self.methods.parameters()

    def run_teacher(self, images: torch.Tensor, name: Optional[str] = None) -> TeacherOutputs:
        """A teacher's (default: the first's) logits and every tapped feature of it for one batch (eval mode,
        no_grad)."""
        if self.teacher is None:
            raise ConfigError("this distiller has no teacher")
        name = self.teacher_name if name is None else name
        if name == self.teacher_name:
            if self._teacher_taps is None:
                self._teacher_taps = Taps(self.teacher, self._teacher_paths.values())
            taps, teacher = self._teacher_taps, self.teacher
        else:
            teacher = self.other_teachers[name]
            if name not in self._other_teacher_taps:
                self._other_teacher_taps[name] = Taps(teacher, self._teacher_paths_by_name[name].values())
            taps = self._other_teacher_taps[name]
        # the references switch the teacher's BatchNorm to batch statistics in training alone; evaluation is eval
        return teacher_forward(teacher, images, taps, self.training and self._batch_statistics(name),
                               stop_after_taps=not self._needs_output(name)
                               and bool(self._teacher_paths_by_name[name]))

    @property
    def reads_teacher_logits(self) -> bool:
        """Whether the (first) teacher's forward must reach its output: some method reads its logits and they are
        not tapped (a detector's are, in its head); if not, its forward ends at its last tap."""
        return self._needs_output(self.teacher_name)

    def _needs_output(self, name: Optional[str]) -> bool:
        return self._reads_logits(name) and PREDICTIONS not in self._teacher_paths_by_name.get(name, {})

    def _reads_logits(self, name: Optional[str]) -> bool:
        return any(m.needs_teacher and (m.reads_all_teachers
                                        or (m.reads_teacher_logits and self.method_teacher(m) == name))
                   for m in self.methods.values())

    def context(self, images: torch.Tensor, labels: torch.Tensor, index: Optional[torch.Tensor] = None,
                epoch: float | torch.Tensor = 0.0,
                teacher_outputs: Union[TeacherOutputs, Mapping[str, TeacherOutputs], None] = None,
                student_logits: Optional[torch.Tensor] = None, method: Optional[Method] = None) -> Context:
        """Run the teachers (no_grad) and the student on one batch and collect every tap.

        `teacher_outputs` (logits and features by module tap, e.g. from a shared forward or a cache) stand in
        for the first teacher's forward (a mapping by name: for those teachers'); `student_logits` (from a
        forward run elsewhere, e.g. several students stacked) for the student's, which only methods that read no
        student feature allow.  `epoch` is the fractional epoch; it reaches methods as a 0-d tensor so a
        compiled step never specialises on it.  `method`: the view that method reads (its own teacher's
        logits and features); default the first teacher's."""
        epoch = torch.as_tensor(epoch, dtype=torch.float32, device=images.device)
        student_losses: dict[str, torch.Tensor] = {}
        given = dict(teacher_outputs) if isinstance(teacher_outputs, Mapping) else (
            {self.teacher_name: teacher_outputs} if teacher_outputs is not None else {})
        outputs: dict[str, TeacherOutputs] = {}
        for name in self.teachers:
            if self._reads(name):  # each teacher read by any method runs once for the batch
                outputs[name] = given[name] if given.get(name) is not None else self.run_teacher(images, name)
        logits_by_name = {name: out.logits for name, out in outputs.items()}
        feats_by_name = {name: {spec: out.feature(path) for spec, path in self._teacher_paths_by_name[name].items()}
                         for name, out in outputs.items()}
        for name, feats in feats_by_name.items():  # a detector's class logits were tapped in its head
            if PREDICTIONS in feats:
                logits_by_name[name] = feats.pop(PREDICTIONS)
        teacher_logits = logits_by_name.get(self.teacher_name)
        teacher_feats = feats_by_name.get(self.teacher_name, {})
        if student_logits is None:
            self.open()
            student_images = images
            for each in self.methods.values():  # e.g. masked patches; the teacher saw the clean batch
                student_images = each.student_input(student_images)
            with contextlib.ExitStack() as contexts:  # e.g. patch tokens dropped inside a ViT student
                for each in self.methods.values():
                    contexts.enter_context(each.student_context(student_images))
                if self.trains_on_targets and self.student.training:  # a detector: its own losses on the targets
                    student_losses = dict(self.student(student_images, labels))
                    output = None
                else:
                    output = self.student(student_images)
            student_feats = self._student_taps.collect()
            student_feats = {spec: student_feats[path] for spec, path in self._student_paths.items()}
            tapped = student_feats.pop(PREDICTIONS, None)
            student_logits = tapped if tapped is not None else logits_of(output, images)
        elif self._student_paths:
            raise ConfigError("student_logits given, but a method reads student features "
                              f"({', '.join(self._student_paths)}): run the student through the distiller")
        else:
            student_feats = {}
        ctx = Context(student_logits, teacher_logits, labels, student_feats, teacher_feats, index, epoch,
                      logits_by_name, feats_by_name, student_losses=student_losses)
        return self._view(ctx, method) if method is not None else ctx

    def _view(self, ctx: Context, method: Method) -> Context:
        """`ctx` as `method` reads it: its own teacher's logits and features; dense predictions (logits maps) as
        a batch of positions, unless the method reads maps."""
        name = self.method_teacher(method)
        if name != self.teacher_name and name in ctx.teacher_logits_by_name:
            ctx = dataclasses.replace(ctx, teacher_logits=ctx.teacher_logits_by_name[name],
                                      teacher=ctx.teacher_features_by_name.get(name, {}))
        if ctx.student_logits is not None and ctx.student_logits.dim() == 4 and not method.reads_maps:
            ctx = position_view(ctx)
        return ctx

    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: Optional[torch.Tensor] = None,
                epoch: float | torch.Tensor = 0.0,
                teacher_outputs: Union[TeacherOutputs, Mapping[str, TeacherOutputs], None] = None,
                student_logits: Optional[torch.Tensor] = None) -> DistillOutput:
        """The student's logits and the named, weighted losses of one batch (see `context`)."""
        ctx = self.context(images, labels, index, epoch, teacher_outputs, student_logits)
        return DistillOutput(ctx.student_logits, self.losses(ctx))

    def losses(self, ctx: Context) -> dict[str, torch.Tensor]:
        """The named, weighted losses on one context: the cross-entropy and every method's terms (a term named
        twice is prefixed with its method's name)."""
        losses = {}
        if ctx.student_losses:  # a detector's own losses (classification, box regression, ...)
            losses.update({key: self.ce_weight * value for key, value in ctx.student_losses.items()})
        elif self.ce_weight and not self.trains_on_targets:  # a detector in eval mode has no losses of its own
            losses["ce"] = self.ce_weight * labelled_cross_entropy(ctx.student_logits, ctx.labels)
        for name, method in self.methods.items():
            for key, value in method(self._view(ctx, method)).items():
                losses[key if key not in losses else f"{name}.{key}"] = value
        return losses


def logits_of(output, images: torch.Tensor) -> Optional[torch.Tensor]:
    """A model's prediction as one tensor: torchvision's segmentation dict (``out``), a transformers output
    (``.logits``), or the tensor itself; dense logits smaller than the images (SegFormer's, at 1/4) are resized to
    them bilinearly, as the mask they are compared with.  None for a detector's list of detections (its logits are
    tapped in its head instead)."""
    if output is None or isinstance(output, (list, tuple)):
        return None
    if isinstance(output, Mapping):
        output = output["out"]
    elif not isinstance(output, torch.Tensor) and hasattr(output, "logits"):
        output = output.logits
    if output.dim() == 4 and images.dim() == 4 and output.shape[-2:] != images.shape[-2:]:
        output = F.interpolate(output, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return output


def positions(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B * H * W, C): each position a sample."""
    return maps.movedim(1, -1).reshape(-1, maps.shape[1])


def position_view(ctx: Context) -> Context:
    """A dense context as a batch of positions: logits (B * H * W, C), labels (B * H * W,), so a method made for
    classification (KD, DIST, ...) distils every pixel; features are left as maps."""
    return dataclasses.replace(
        ctx, student_logits=positions(ctx.student_logits),
        teacher_logits=positions(ctx.teacher_logits) if ctx.teacher_logits is not None else None,
        labels=ctx.labels.reshape(-1), index=None,
        teacher_logits_by_name={k: positions(v) for k, v in ctx.teacher_logits_by_name.items() if v is not None},
        peer_logits=tuple(positions(p) for p in ctx.peer_logits))


PREDICTIONS = "predictions"  # the tap spec of a detector's class logits (in its head), set apart from method taps


def labelled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the labelled samples alone (labels of -1 are skipped); 0 for a batch
    without any.  Equals `F.cross_entropy` when every sample is labelled."""
    labelled = (labels != UNLABELLED).sum()
    total = F.cross_entropy(logits, labels, ignore_index=UNLABELLED, reduction="sum")
    return total / labelled.clamp(min=1)


@dataclass
class TeacherOutputs:
    """A teacher's logits and tapped features (by module tap) for one batch."""

    logits: Optional[torch.Tensor]  # None when the forward stopped at the last tapped layer
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def feature(self, path: str) -> torch.Tensor:
        try:
            return self.features[path]
        except KeyError:
            raise ConfigError(f"teacher outputs have no feature {path!r} (they hold: "
                              f"{', '.join(self.features) or 'none'})") from None


class _StopForward(Exception):
    """Raised by a hook once every tapped teacher feature is captured, to skip the layers after them."""


def _stop_when_captured(teacher: nn.Module, taps: Taps) -> list:
    """Hooks (after the taps' own) that end the forward once every tap has its feature."""
    def check(*_):
        if all(tap in taps.features for tap in taps.taps):
            raise _StopForward

    handles = []
    for tap in taps.taps:
        path, want_input = split_tap(tap)
        module = get_module(teacher, path)
        handles.append(module.register_forward_pre_hook(check) if want_input else module.register_forward_hook(check))
    return handles


def teacher_forward(teacher: nn.Module, images: torch.Tensor, taps: Optional[Taps] = None,
                    batch_statistics: bool = False, stop_after_taps: bool = False) -> TeacherOutputs:
    """Run a frozen teacher on one batch under no_grad; `taps` (hooks on it) give its features.

    In eval mode, or with `batch_statistics` in train mode with BatchNorm normalising by the batch (OFD's
    references), through cloned buffers so its running statistics never change.  `stop_after_taps` ends the
    forward as soon as every tap is captured (nobody reads the logits, which are then None): a method reading
    an intermediate layer pays only for the layers up to it."""
    if taps is not None:  # only this forward's captures count (a method may have run the same module since)
        taps.features = {}
    if stop_after_taps and taps is not None and taps.taps:
        handles = _stop_when_captured(teacher, taps)
        try:
            teacher_forward(teacher, images, None, batch_statistics)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return TeacherOutputs(None, taps.collect())
    with torch.no_grad():
        if batch_statistics:
            teacher.train()
            try:
                buffers = {name: b.clone() for name, b in teacher.named_buffers()}
                logits = torch.func.functional_call(teacher, buffers, (images,), strict=False)
            finally:
                teacher.eval()
        else:
            teacher.eval()
            logits = teacher(images)
    return TeacherOutputs(logits_of(logits, images), taps.collect() if taps is not None else {})


def _unique_names(methods: Sequence[Method]) -> dict[str, Method]:
    named: dict[str, Method] = {}
    for method in methods:
        base = getattr(type(method), "registry_name", type(method).__name__.lower())
        name, k = base, 1
        while name in named:
            k += 1
            name = f"{base}{k}"
        named[name] = method
    return named


def _named_teachers(teacher, teachers: Optional[Mapping[str, nn.Module]]) -> dict[str, nn.Module]:
    """One name -> module mapping from `teacher` (a module or a mapping) and `teachers`."""
    if isinstance(teacher, Mapping):
        if teachers:
            raise ConfigError("give the teachers either as `teacher` (a mapping) or as `teachers`, not both")
        teacher, teachers = None, teacher
    named = {"teacher": teacher} if teacher is not None else {}
    for name, module in (teachers or {}).items():
        if not isinstance(name, str) or not name or "." in name:
            raise ConfigError(f"teachers: {name!r} is not a usable teacher name (a non-empty string without '.')")
        if name in named:
            raise ConfigError(f"teachers: the name {name!r} is given twice")
        if not isinstance(module, nn.Module):
            raise ConfigError(f"teachers.{name}: expected a model (nn.Module), got {type(module).__name__}")
        named[name] = module
    return named


def _default_ce_weight(methods: Sequence[Method]) -> float:
    """The first method's published cross-entropy weight, else 1."""
    for method in methods:
        if method.ce_weight is not None:
            return method.ce_weight
    return 1.0
