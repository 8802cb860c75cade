"""Capture intermediate features of unmodified models through forward hooks.

A tap names a module by its path in `model.named_modules()` and optionally which side of it:
``"layer3"`` is the module's output, ``"layer3.4.relu:input"`` its (first) input.  A module called
more than once in one forward (torchvision's shared ``relu`` in a BasicBlock) keeps its last call.

Symbolic taps are resolved per model against its layout: ``"stage:2"`` (third stage output, counted
from the stem), ``"stage:-1"``, ``"penultimate"`` (the feature that enters the classifier) and any
extra list a model family publishes, e.g. ``"preact:-1"``.  Layouts are discovered automatically
(see `discover_layout`) unless the model class publishes ``kdzoo_taps``.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .errors import ConfigError

INPUT_SUFFIX = ":input"


def split_tap(tap: str) -> tuple[str, bool]:
    """``"a.b:input"`` -> ``("a.b", True)``; ``"a.b"`` -> ``("a.b", False)``."""
    if tap.endswith(INPUT_SUFFIX):
        return tap[: -len(INPUT_SUFFIX)], True
    if ":" in tap:
        raise ConfigError(f"tap {tap!r}: only the suffix ':input' is understood after a module path")
    return tap, False


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at `path`; a wrong path names the closest real module paths."""
    modules = dict(model.named_modules())
    if path in modules:
        return modules[path]
    names = [n for n in modules if n]
    if not names:
        raise ConfigError(f"no module {path!r} in {type(model).__name__} (the model has no submodules)")
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.4)
    if not close:  # fall back to the children of the deepest existing prefix ("" is the model itself)
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        while parent not in modules:
            parent = parent.rsplit(".", 1)[0] if "." in parent else ""
        close = [n for n in names if (n.rsplit(".", 1)[0] if "." in n else "") == parent][:5] or names[:5]
    raise ConfigError(f"no module {path!r} in {type(model).__name__}; closest: {', '.join(close)}")


class Taps:
    """Forward hooks that store chosen features of one model in `self.features` (tap -> tensor).

    Use as a context manager or call `remove()`; features are overwritten at every forward.
    The input of an in-place module (``relu:input`` with ``inplace=True``) is copied before the
    module overwrites it; any other capture that a later in-place op modifies is refused by `get`.
    """

    def __init__(self, model: nn.Module, taps: Iterable[str]):
        self.features: dict[str, torch.Tensor] = {}
        self._versions: dict[str, int] = {}
        self._handles = []
        for tap in dict.fromkeys(taps):  # ordered, unique
            path, want_input = split_tap(tap)
            module = get_module(model, path)
            if want_input:
                copy = bool(getattr(module, "inplace", False))
                self._handles.append(module.register_forward_pre_hook(self._input_hook(tap, copy)))
            else:
                self._handles.append(module.register_forward_hook(self._output_hook(tap)))

    def _store(self, tap: str, value) -> None:
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"tap {tap!r} is not a tensor but {type(value).__name__}")
        self.features[tap] = value
        self._versions[tap] = value._version

    def _input_hook(self, tap: str, copy: bool):
        def hook(module, inputs):
            value = inputs[0] if inputs else None
            self._store(tap, value.clone() if copy and isinstance(value, torch.Tensor) else value)

        return hook

    def _output_hook(self, tap: str):
        def hook(module, inputs, output):
            self._store(tap, output)

        return hook

    def get(self, tap: str) -> torch.Tensor:
        """The captured feature, refusing one that an in-place op changed after it was captured."""
        value = self.features[tap]
        if value._version != self._versions[tap]:
            raise ConfigError(f"tap {tap!r} was modified in place after it was captured (an in-place op "
                              "follows that module); tap the next module's ':input' instead")
        return value

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.features = {}

    def __enter__(self) -> "Taps":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass
class Layout:
    """Where a model's stage outputs and penultimate feature are.  `extra` holds published lists."""

    stages: list[str]
    penultimate: str
    extra: dict[str, list[str]] = field(default_factory=dict)

    def resolve(self, spec: str) -> str:
        """Turn a symbolic tap into a module tap; module taps pass through unchanged."""
        if spec == "penultimate":
            return self.penultimate
        kind, sep, index = spec.partition(":")
        if sep and index.lstrip("-").isdigit() and (kind == "stage" or kind in self.extra):
            taps = self.stages if kind == "stage" else self.extra[kind]
            i = int(index)
            if not -len(taps) <= i < len(taps):
                raise ConfigError(f"tap {spec!r}: the model has {len(taps)} {kind} taps ({', '.join(taps)})")
            return taps[i]
        return spec


def stage_taps(owner: str, student_layout: Layout, teacher_layout: Layout,
               student_layers: Optional[Sequence[str]] = None, teacher_layers: Optional[Sequence[str]] = None,
               student_kind: str = "stage", teacher_kind: str = "stage",
               skip_stem: bool = True) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Student and teacher tap specs for a method that reads several stages, paired in order.

    Explicit `student_layers` / `teacher_layers` (any tap specs) win.  Otherwise: the stages both models
    have, paired from the deepest back, ``kind:-n`` .. ``kind:-1``, where n is the smaller stage count less
    the stem (stage 0) when `skip_stem` (RepDistiller's ``feat[1:-1]``, mdistiller's ``feats[1:]``).
    A kind other than "stage" names a list the model family publishes, e.g. "preact" (pre-ReLU stage outputs).
    """
    if student_layers is not None or teacher_layers is not None:
        if not student_layers or not teacher_layers or len(student_layers) != len(teacher_layers):
            raise ConfigError(f"{owner}: give student_layers and teacher_layers together, as lists of equal length")
        return tuple(student_layers), tuple(teacher_layers)
    for role, layout, kind in (("student", student_layout, student_kind), ("teacher", teacher_layout, teacher_kind)):
        if kind != "stage" and kind not in layout.extra:
            raise ConfigError(f"{owner}: the {role} model publishes no {kind!r} taps; name them with "
                              "student_layers=[...] and teacher_layers=[...], e.g. the input of each stage's last "
                              "ReLU 'layer3.2.relu:input'")
    n = max(min(len(student_layout.stages), len(teacher_layout.stages)) - int(skip_stem), 1)
    return (tuple(f"{student_kind}:{i}" for i in range(-n, 0)), tuple(f"{teacher_kind}:{i}" for i in range(-n, 0)))


@torch.no_grad()
def probe(model: nn.Module, example: torch.Tensor, taps: Iterable[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run one eval-mode forward; return the requested features and the output (training mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with Taps(model, taps) as t:
            output = model(example)
            return {tap: t.get(tap) for tap in t.features}, output
    finally:
        model.train(was_training)


def _record_calls(model: nn.Module, example: torch.Tensor):
    """Completion-ordered (path, output shape) of every module call, and the last Linear's path."""
    records: dict[str, tuple[int, ...]] = {}
    last_linear: list[str] = []
    handles = []
    for path, module in model.named_modules():
        if not path:
            continue

        def hook(mod, inputs, output, path=path):
            if isinstance(mod, nn.Linear):
                last_linear.append(path)
            if isinstance(output, torch.Tensor) and path not in records:
                records[path] = tuple(output.shape[1:])

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return records, (last_linear[-1] if last_linear else None)


def discover_layout(model: nn.Module, example: torch.Tensor) -> Layout:
    """Find stage outputs (where spatial size or width changes) and the penultimate feature.

    Walks the chain of a module's direct children in call order; a `Sequential` child whose
    children change shape is walked into (timm's ``stages``, torchvision's ``features``), other
    blocks are kept whole so a bottleneck's inner convs never count as stages.  Parameter-free
    global pools (1x1 outputs) and 2-D outputs are not stages.
    """
    published = getattr(model, "kdzoo_taps", None)
    if published:
        extra = {k: list(v) for k, v in published.items() if k not in ("stages", "penultimate")}
        return Layout(list(published["stages"]), published["penultimate"], extra)

    records, last_linear = _record_calls(model, example)
    modules = dict(model.named_modules())

    def is_pool(path: str, shape: tuple[int, ...]) -> bool:
        return len(shape) == 3 and shape[1] * shape[2] == 1 and not _has_params(modules[path])

    def nearest_recorded_ancestor(path: str) -> str:
        while "." in path:
            path = path.rsplit(".", 1)[0]
            if path in records:
                return path
        return ""

    order = list(records)  # completion order

    def chain(parent: str) -> list[str]:
        return [p for p in order if nearest_recorded_ancestor(p) == parent
                and len(records[p]) >= 2 and not is_pool(p, records[p])]

    def walk(parent: str) -> list[str]:
        out = []
        for path in chain(parent):
            inner = chain(path)
            if isinstance(modules[path], nn.Sequential) and len({records[p] for p in inner}) > 1:
                out.extend(walk(path))
            else:
                out.append(path)
        return out

    flat = walk("")
    ends = [i for i, p in enumerate(flat) if i + 1 == len(flat) or records[flat[i + 1]] != records[p]]
    # A run of parameter-free modules alone (a max-pool between VGG blocks) opens the next stage
    # rather than being one.
    stages, start = [], 0
    for end in ends:
        if any(_has_params(modules[p]) for p in flat[start:end + 1]):
            stages.append(flat[end])
        start = end + 1
    if not stages:
        raise ConfigError(f"{type(model).__name__}: found no feature maps to use as stages; name taps explicitly")
    penultimate = f"{last_linear}{INPUT_SUFFIX}" if last_linear else stages[-1]
    return Layout(stages, penultimate)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())
