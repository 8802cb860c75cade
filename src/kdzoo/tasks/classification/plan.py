"""The distillation plan: what each method will compare, printed before training and kept as ``plan.md``.

Automatic layer pairing ("stage:-2" of each model) is convenient and silent; the plan says, for every method,
which student and teacher module it reads, their feature shapes, the adapter that bridges them, the loss
weight, and how good the teacher is, so a pairing that makes no sense is seen before the first epoch.
Everything comes from the Distiller's and the methods' public API (`student_paths`, `student_shapes`,
`Method.layer_pairs`, `Method.adapters`).
"""
from __future__ import annotations

import numbers
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from ...distiller import Distiller
from ...engine.runtime import atomic_write, resolve_device
from ...methods import METHODS
from .evaluation import evaluate

__all__ = ["distillation_plan", "write_plan", "top1_score", "ModelScore", "describe_adapter", "loss_weights", "other_options"]
PLAN_FILE = "plan.md"

WEIGHT_NAMES = ("weight", "alpha", "beta", "gamma")  # DKD's alpha/beta, DIST's beta/gamma weigh their terms


def distillation_plan(distiller: Distiller, teacher_score: Optional[tuple[str, float]] = None,
                      student_name: Optional[str] = None, teacher_name: Optional[str] = None) -> str:
    """A Markdown plan of `distiller`: per method, the student and teacher layers (module paths) with their
    shapes (batch dimension left out), the adapter between them, and the loss weights; with `teacher_score`
    the teacher's test score, e.g. ``("test top-1", 87.5)`` (%)."""
    student = student_name or type(distiller.student).__name__
    lines = ["# Distillation plan", ""]
    if distiller.teacher is not None:
        teacher = teacher_name or type(distiller.teacher).__name__
        score = f", {teacher_score[0]} {teacher_score[1]:.2f}%" if teacher_score is not None else ""
        lines.append(f"- teacher: {teacher}{score}")
        for other, module in list(distiller.teachers.items())[1:]:  # several named teachers
            lines.append(f"- teacher {other!r}: {type(module).__name__}")
    lines += [f"- student: {student}", f"- cross-entropy weight: {_number(distiller.ce_weight)}"]
    s_paths, s_shapes = distiller.student_paths, distiller.student_shapes
    several = len(distiller.teachers) > 1
    for name, method in distiller.methods.items():
        t_paths, t_shapes = distiller.method_teacher_taps(method)
        weights = loss_weights(method)
        shown = ", ".join(f"{k} {_number(v)}" for k, v in weights.items()) or "no weight option"
        lines += ["", f"## {name} ({shown})", ""]
        others = other_options(method)
        if others:
            lines.append("- options: " + ", ".join(f"{k} {_option(v)}" for k, v in others.items()))
        if several and method.needs_teacher:
            reads = "every teacher" if method.reads_all_teachers else f"teacher {distiller.method_teacher(method)!r}"
            lines.append(f"- reads {reads}")
        pairs = method.layer_pairs()
        if not pairs:
            lines.append("- logits: student <- teacher" if method.needs_teacher else "- student logits alone")
        adapters = method.adapters()
        for i, (s_spec, t_spec) in enumerate(pairs):
            student_side = _side(s_spec, s_paths, s_shapes)
            teacher_side = _side(t_spec, t_paths, t_shapes)
            lines.append(f"- student {student_side}  ->  teacher {teacher_side}")
            for adapter_name, adapter in _adapters_of_pair(adapters, i, len(pairs)):
                shape = s_shapes.get(s_spec) if s_spec is not None else None
                lines.append(f"  - adapter `{adapter_name}`: {describe_adapter(adapter, shape)}")
        shown_adapters = {n for i in range(len(pairs)) for n, _ in _adapters_of_pair(adapters, i, len(pairs))}
        for adapter_name, adapter in adapters.items():
            if not any(n == adapter_name or n.startswith(f"{adapter_name}[") for n in shown_adapters):
                lines.append(f"- learnable `{adapter_name}`: {describe_adapter(adapter)}")
        if pairs and not adapters:
            lines.append("- adapter: none (features compared as they are)")
    return "\n".join(lines) + "\n"


def top1_score(model: nn.Module, test_data) -> tuple[str, float]:
    """A classifier's score for the plan: its test top-1."""
    return "test top-1", evaluate(model, test_data)["top1"]


ModelScore = Callable[[nn.Module, object], tuple[str, float]]  # (model, test split) -> (what, value in %)


def write_plan(distiller: Distiller, test_data, run_dir: Optional[Path] = None, device: Optional[str] = None,
               names: tuple[Optional[str], Optional[str]] = (None, None), verbose: bool = True,
               score: ModelScore = top1_score) -> str:
    """Score the teacher on `test_data` (on `device`, else where it is; `score`: the task's, test top-1 by
    default), then print the plan and write it to ``run_dir/plan.md``.  `names`: the student's and the teacher's
    factory names."""
    teacher_score = None
    if distiller.teacher is not None and test_data is not None:
        if device is not None:
            distiller.teacher.to(resolve_device(device))  # where training puts it anyway
        teacher_score = score(distiller.teacher, test_data)
    plan = distillation_plan(distiller, teacher_score, *names)
    if verbose:
        print(plan, end="")
    if run_dir is not None:
        atomic_write(Path(run_dir) / PLAN_FILE, lambda tmp: tmp.write_text(plan))
    return plan


def loss_weights(method: nn.Module) -> dict[str, float]:
    """The method's numeric hyper-parameters that weigh its loss terms (``weight``, ``*_weight``, alpha/beta)."""
    return {k: v for k, v in vars(method).items() if not k.startswith("_") and isinstance(v, numbers.Real)
            and not isinstance(v, bool) and (k in WEIGHT_NAMES or k.endswith("_weight"))}


def other_options(method: nn.Module) -> dict:
    """The method's registered options that are not loss weights and hold one plain value (temperature,
    normalisation, choices), as the instance has them."""
    name = getattr(type(method), "registry_name", None)
    if name is None or name not in METHODS.names():
        return {}
    weights = loss_weights(method)
    values = vars(method)
    return {k: values[k] for k in METHODS.get(name).defaults
            if k in values and k not in weights and isinstance(values[k], (numbers.Real, str))}


def describe_adapter(module: nn.Module, input_shape: Optional[Sequence[int]] = None) -> str:
    """``ConvReg [Conv2d 64->128 3x3/2, BatchNorm2d 128], (64, 16, 16) -> (128, 8, 8), 74,112 parameters``:
    the class, its parametrised layers, the shapes it maps (when `input_shape` is given and a forward on zeros
    of that shape runs) and its size."""
    layers = [_layer(m) for m in module.modules() if not list(m.children()) and any(True for _ in m.parameters(False))]
    inner = ", ".join(layers[:4]) + (f", +{len(layers) - 4} more" if len(layers) > 4 else "")
    name = type(module).__name__
    text = layers[0] if len(layers) == 1 and layers[0].startswith(name) else name + (f" [{inner}]" if inner else "")
    if input_shape is not None:
        output = _output_shape(module, input_shape)
        if output is not None:
            text += f", {_shape(input_shape)} -> {_shape(output)}"
    return f"{text}, {sum(p.numel() for p in module.parameters()):,} parameters"


def _side(spec: Optional[str], paths: dict[str, str], shapes: dict[str, torch.Size]) -> str:
    if spec is None:
        return "(none)"
    path = paths.get(spec, spec)
    where = f"`{path}`" if path == spec else f"{spec} = `{path}`"
    return f"{where} {_shape(shapes[spec])}" if spec in shapes else where


def _adapters_of_pair(adapters: dict[str, nn.Module], index: int, count: int) -> list[tuple[str, nn.Module]]:
    """The adapters that serve pair `index`: one per pair in a list/dict as long as the pairs, or a single
    adapter when the method compares one pair."""
    found = []
    for name, module in adapters.items():
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)) and len(module) == count:
            items = list(module.items()) if isinstance(module, nn.ModuleDict) else list(enumerate(module))
            key, part = items[index]
            found.append((f"{name}[{key}]", part))
        elif count == 1 and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            found.append((name, module))
    return found


@torch.no_grad()
def _output_shape(module: nn.Module, input_shape: Sequence[int]) -> Optional[tuple[int, ...]]:
    """The output shape of `module` on zeros of `input_shape`, or None where it takes other inputs."""
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = module.training
    module.eval()
    try:
        output = module(torch.zeros(tuple(input_shape), device=device))
    except Exception:  # noqa: BLE001  an adapter that takes other inputs (several, or none) shows no shapes
        return None
    finally:
        module.train(was_training)
    return tuple(output.shape) if isinstance(output, torch.Tensor) else None


def _layer(module: nn.Module) -> str:
    name = type(module).__name__
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)):
        kernel = "x".join(map(str, module.kernel_size))
        stride = f"/{module.stride[0]}" if module.stride[0] > 1 else ""
        return f"{name} {module.in_channels}->{module.out_channels} {kernel}{stride}"
    if isinstance(module, nn.Linear):
        return f"{name} {module.in_features}->{module.out_features}"
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
        size = getattr(module, "num_features", None) or getattr(module, "num_channels", None) \
            or tuple(getattr(module, "normalized_shape", ()))
        return f"{name} {size}"
    return name


def _shape(shape: Sequence[int]) -> str:
    """A feature shape without its batch dimension: ``(64, 16, 16)``."""
    return "(" + ", ".join(str(int(d)) for d in tuple(shape)[1:]) + ")"


def _number(value: float) -> str:
    return f"{value:g}"


def _option(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return _number(value) if isinstance(value, numbers.Real) else str(value)
