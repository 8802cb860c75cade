"""Distiller: a frozen teacher teaches a student through any list of methods, on unmodified models."""
from __future__ import annotations

from dataclasses import dataclass
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
        needs_layout = any(m.student_taps or m.teacher_taps or type(m).choose_taps is not Method.choose_taps
                           for m in self.methods.values())
        if needs_layout or (len(self.methods) and example_input is not None):  # every method gets its build()
            if example_input is None:
                raise ConfigError("feature methods need example_input to find layers and shapes")
            self._wire_taps(example_input, num_samples, train_labels, train_data, cache_dir)
        self._student_hooks = Taps(student, set(self._student_paths.values()))
        self._teacher_hooks = Taps(teacher, set(self._teacher_paths.values())) if teacher is not None else None

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
        for method in self.methods.values():
            method.build(setup)

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:  # eval (running BN statistics) unless a method's reference runs it in train mode
            self.teacher.train(mode and any(m.teacher_train_mode for m in self.methods.values()))
        return self

    def trainable_parameters(self):
        """The student's and the methods' parameters (adapters, projectors); never the teacher's."""
        yield from self.student.parameters()
        yield from self.methods.parameters()

    def context(self, images: torch.Tensor, labels: torch.Tensor, index: Optional[torch.Tensor] = None,
                epoch: float = 0.0) -> Context:
        """Run the teacher (no_grad) and the student on one batch and collect every tap."""
        teacher_logits = None
        teacher_feats: dict[str, torch.Tensor] = {}
        if self.teacher is not None and any(m.needs_teacher for m in self.methods.values()):
            with torch.no_grad():
                if self.teacher.training:  # batch-statistics BN (teacher_train_mode); its running statistics stay
                    buffers = {name: b.clone() for name, b in self.teacher.named_buffers()}
                    teacher_logits = torch.func.functional_call(self.teacher, buffers, (images,), strict=False)
                else:
                    teacher_logits = self.teacher(images)
            teacher_feats = {spec: self._teacher_hooks.get(path) for spec, path in self._teacher_paths.items()}
        student_logits = self.student(images)
        student_feats = {spec: self._student_hooks.get(path) for spec, path in self._student_paths.items()}
        self._student_hooks.features.clear()  # let activations go once the losses are built
        if self._teacher_hooks is not None:
            self._teacher_hooks.features.clear()
        return Context(student_logits, teacher_logits, labels, student_feats, teacher_feats, index, epoch)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: Optional[torch.Tensor] = None,
                epoch: float = 0.0) -> DistillOutput:
        ctx = self.context(images, labels, index, epoch)
        losses = {}
        if self.ce_weight:
            losses["ce"] = self.ce_weight * F.cross_entropy(ctx.student_logits, labels)
        for name, method in self.methods.items():
            for key, value in method(ctx).items():
                losses[key if key not in losses else f"{name}.{key}"] = value
        return DistillOutput(ctx.student_logits, losses)

    def remove_hooks(self) -> None:
        self._student_hooks.remove()
        if self._teacher_hooks is not None:
            self._teacher_hooks.remove()


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
