"""Distiller: a frozen teacher teaches a student through any list of methods, on unmodified models."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .methods.base import Context, Method, Setup
from .taps import Layout, Taps, discover_layout, probe


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
    """

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module] = None, methods: Sequence[Method] = (),
                 example_input: Optional[torch.Tensor] = None, ce_weight: Optional[float] = None,
                 num_samples: Optional[int] = None, train_labels: Optional[torch.Tensor] = None,
                 train_data=None, cache_dir=None):
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.methods = nn.ModuleDict(_unique_names(methods))
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        elif any(m.needs_teacher for m in self.methods.values()):
            raise ConfigError("a method needs a teacher, but none was given")
        self.ce_weight = ce_weight if ce_weight is not None else _default_ce_weight(methods)

        self._student_paths: dict[str, str] = {}  # tap spec -> module tap
        self._teacher_paths: dict[str, str] = {}
        self._student_shapes: dict[str, torch.Size] = {}  # tap spec -> feature shape (probe batch included)
        self._teacher_shapes: dict[str, torch.Size] = {}
        needs_layout = any(m.student_taps or m.teacher_taps or type(m).choose_taps is not Method.choose_taps
                           for m in self.methods.values())
        if needs_layout or (len(self.methods) and example_input is not None):  # every method gets its build()
            if example_input is None:
                raise ConfigError("feature methods need example_input to find layers and shapes")
            self._wire_taps(example_input, num_samples, train_labels, train_data, cache_dir)
        self._student_taps: Optional[Taps] = None  # hooks, registered by the first forward, removed by close()
        self._teacher_taps: Optional[Taps] = None

    def _wire_taps(self, example: torch.Tensor, num_samples: Optional[int],
                   train_labels: Optional[torch.Tensor], train_data, cache_dir) -> None:
        example = example[:2] if example.dim() == 4 else example.unsqueeze(0)
        example = torch.cat([example, example]) if len(example) == 1 else example  # BN needs 2 in train
        s_layout = discover_layout(self.student, example)
        t_layout = discover_layout(self.teacher, example) if self.teacher is not None else Layout([], "")
        self.layouts = {"student": s_layout, "teacher": t_layout}
        for method in self.methods.values():
            method.choose_taps(s_layout, t_layout)
            for spec in method.student_taps:
                self._student_paths[spec] = s_layout.resolve(spec)
            for spec in method.teacher_taps:
                self._teacher_paths[spec] = t_layout.resolve(spec)
        s_feats, logits = probe(self.student, example, self._student_paths.values())
        t_feats = probe(self.teacher, example, self._teacher_paths.values())[0] if self._teacher_paths else {}
        setup = Setup({spec: s_feats[path].shape for spec, path in self._student_paths.items()},
                      {spec: t_feats[path].shape for spec, path in self._teacher_paths.items()},
                      num_classes=logits.shape[1], num_samples=num_samples, train_labels=train_labels,
                      student=self.student, teacher=self.teacher, student_paths=dict(self._student_paths),
                      teacher_paths=dict(self._teacher_paths), example_input=example,
                      train_data=train_data, cache_dir=cache_dir)
        self._student_shapes, self._teacher_shapes = dict(setup.student_shapes), dict(setup.teacher_shapes)
        for method in self.methods.values():
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
        """Tap spec -> shape of every teacher feature a method reads, from the probe batch (a copy)."""
        return dict(self._teacher_shapes)

    @property
    def teacher_batch_statistics(self) -> bool:
        """Whether the teacher runs with batch-statistics BatchNorm, as some methods' references do (OFD)."""
        return any(m.teacher_train_mode for m in self.methods.values())

    @property
    def needs_teacher(self) -> bool:
        """Whether a forward reads the teacher's outputs (a teacher is set and some method uses it)."""
        return self.teacher is not None and any(m.needs_teacher for m in self.methods.values())

    # ------------------------------------------------------------------ hooks

    def open(self) -> "Distiller":
        """Register the forward hooks the methods read (done by the first forward; `close` removes them)."""
        if self._student_taps is None:
            self._student_taps = Taps(self.student, self._student_paths.values())
        return self

    def close(self) -> None:
        """Remove every forward hook this distiller put on the student and the teacher.  The distiller stays
        usable: the next forward registers them again."""
        for taps in (self._student_taps, self._teacher_taps):
            if taps is not None:
                taps.remove()
        self._student_taps = self._teacher_taps = None

    def __enter__(self) -> "Distiller":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ forward

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # BN statistics and dropout of the teacher never change
        return self

    def trainable_parameters(self):
        """The student's and the methods' parameters (adapters, projectors); never the teacher's."""
        yield from self.student.parameters()
        yield from self.methods.parameters()

    def run_teacher(self, images: torch.Tensor) -> TeacherOutputs:
        """The teacher's logits and every tapped teacher feature for one batch (eval mode, no_grad)."""
        if self.teacher is None:
            raise ConfigError("this distiller has no teacher")
        if self._teacher_taps is None:
            self._teacher_taps = Taps(self.teacher, self._teacher_paths.values())
        # the references switch the teacher's BatchNorm to batch statistics in training alone; evaluation is eval
        return teacher_forward(self.teacher, images, self._teacher_taps, self.training and self.teacher_batch_statistics)

    def context(self, images: torch.Tensor, labels: torch.Tensor, index: Optional[torch.Tensor] = None,
                epoch: float | torch.Tensor = 0.0, teacher_outputs: Optional[TeacherOutputs] = None,
                student_logits: Optional[torch.Tensor] = None) -> Context:
        """Run the teacher (no_grad) and the student on one batch and collect every tap.

        `teacher_outputs` (logits and features by module tap, e.g. from a shared forward or a cache) stand in
        for the teacher's forward; `student_logits` (from a forward run elsewhere, e.g. several students
        stacked) for the student's, which only methods that read no student feature allow.  `epoch` is the
        fractional epoch; it reaches methods as a 0-d tensor so a compiled step never specialises on it."""
        epoch = torch.as_tensor(epoch, dtype=torch.float32, device=images.device)
        teacher_logits = None
        teacher_feats: dict[str, torch.Tensor] = {}
        if self.needs_teacher:
            if teacher_outputs is None:
                teacher_outputs = self.run_teacher(images)
            teacher_logits = teacher_outputs.logits
            teacher_feats = {spec: teacher_outputs.feature(path) for spec, path in self._teacher_paths.items()}
        if student_logits is None:
            self.open()
            student_logits = self.student(images)
            student_feats = self._student_taps.collect()
            student_feats = {spec: student_feats[path] for spec, path in self._student_paths.items()}
        elif self._student_paths:
            raise ConfigError("student_logits given, but a method reads student features "
                              f"({', '.join(self._student_paths)}): run the student through the distiller")
        else:
            student_feats = {}
        return Context(student_logits, teacher_logits, labels, student_feats, teacher_feats, index, epoch)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: Optional[torch.Tensor] = None,
                epoch: float | torch.Tensor = 0.0, teacher_outputs: Optional[TeacherOutputs] = None,
                student_logits: Optional[torch.Tensor] = None) -> DistillOutput:
        """The student's logits and the named, weighted losses of one batch (see `context`)."""
        ctx = self.context(images, labels, index, epoch, teacher_outputs, student_logits)
        losses = {}
        if self.ce_weight:
            losses["ce"] = self.ce_weight * F.cross_entropy(ctx.student_logits, labels)
        for name, method in self.methods.items():
            for key, value in method(ctx).items():
                losses[key if key not in losses else f"{name}.{key}"] = value
        return DistillOutput(ctx.student_logits, losses)


@dataclass
class TeacherOutputs:
    """A teacher's logits and tapped features (by module tap) for one batch."""

    logits: torch.Tensor
    features: dict[str, torch.Tensor] = field(default_factory=dict)

    def feature(self, path: str) -> torch.Tensor:
        try:
            return self.features[path]
        except KeyError:
            raise ConfigError(f"teacher outputs have no feature {path!r} (they hold: "
                              f"{', '.join(self.features) or 'none'})") from None


def teacher_forward(teacher: nn.Module, images: torch.Tensor, taps: Optional[Taps] = None,
                    batch_statistics: bool = False) -> TeacherOutputs:
    """Run a frozen teacher on one batch under no_grad; `taps` (hooks on it) give its features.

    In eval mode, or with `batch_statistics` in train mode with BatchNorm normalising by the batch (OFD's
    references), through cloned buffers so its running statistics never change."""
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
    return TeacherOutputs(logits, taps.collect() if taps is not None else {})


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


def _default_ce_weight(methods: Sequence[Method]) -> float:
    """The first method's published cross-entropy weight, else 1."""
    for method in methods:
        if method.ce_weight is not None:
            return method.ce_weight
    return 1.0
