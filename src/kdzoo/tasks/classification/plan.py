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
from ...taps import Layout
from ...engine.runtime import atomic_write, resolve_device
from ...methods import METHODS
from .evaluation import evaluate

__all__ = ["distillation_plan", "peer_plan", "write_plan", "write_peer_plan", "epoch_option_warnings", "warnings_section", "top1_score",
           "ModelScore", "describe_adapter", "loss_weights", "other_options"]
PLAN_FILE = "plan.md"

WEIGHT_NAMES = ("weight", "alpha", "beta", "gamma")  # DKD's alpha/beta, DIST's beta/gamma weigh their terms
# Method options that count epochs of an init stage run before train.epochs (FT, AB, FSP), not epochs of the run.
OWN_STAGE_OPTIONS = ("init_epochs",)


def distillation_plan(distiller: Distiller, teacher_score: Optional[tuple[str, float]] = None,
                      student_name: Optional[str] = None, teacher_name: Optional[str] = None) -> str:
    """A Markdown plan of `distiller`: per method, the student and teacher layers (module paths, a symbolic tap
    with its place among the model's, `tap_place`) with their shapes (batch dimension left out), the adapter
    between them, and the loss weights; with `teacher_score` the teacher's test score, e.g.
    ``("test top-1", 87.5)`` (%)."""
    student = student_name or type(distiller.student).__name__
    lines = ["# Distillation plan", ""]
    if distiller.teacher is not None:
        teacher = teacher_name or type(distiller.teacher).__name__
        score = f", {teacher_score[0]} {teacher_score[1]:.2f}%" if teacher_score is not None else ""
        lines.append(f"- teacher: {teacher}{score}")
        for other, module in list(distiller.teachers.items())[1:]:  # several named teachers
            lines.append(f"- teacher {other!r}: {type(module).__name__}")
    lines += [f"- student: {student}", f"- cross-entropy weight: {_number(distiller.ce_weight)}"]
    return "\n".join(lines + _method_lines(distiller)) + "\n"


def peer_plan(distillers: Sequence[Distiller], student_names: Sequence[Optional[str]] = ()) -> str:
    """The plan of students trained as peers (`PeerDistiller`'s distillers): per student, its methods as
    `distillation_plan` shows them; `student_names`: the students' factory names, in order."""
    names = [student_names[k] if k < len(student_names) and student_names[k] else type(d.student).__name__
             for k, d in enumerate(distillers)]
    lines = [f"# Distillation plan: {len(distillers)} students as peers", "",
             "- students: " + ", ".join(f"{k} {name}" for k, name in enumerate(names)),
             "- each student has its own methods; a method that reads peers gets the other students' outputs, "
             "detached"]
    for k, (distiller, name) in enumerate(zip(distillers, names)):
        lines += ["", f"## student {k}: {name}", "", f"- cross-entropy weight: {_number(distiller.ce_weight)}"]
        lines += _method_lines(distiller, heading="###")
    return "\n".join(lines) + "\n"


def _method_lines(distiller: Distiller, heading: str = "##") -> list[str]:
    """Per method of `distiller`: a heading with its loss weights, its options, the layers it pairs (with their
    place among the model's taps and shapes) and its adapters."""
    lines: list[str] = []
    s_paths, s_shapes = distiller.student_paths, distiller.student_shapes
    layouts = getattr(distiller, "layouts", {})
    several = len(distiller.teachers) > 1
    for name, method in distiller.methods.items():
        t_paths, t_shapes = distiller.method_teacher_taps(method)
        teacher_name = distiller.method_teacher(method)
        t_layout = layouts.get(f"teacher:{teacher_name}", layouts.get("teacher"))
        weights = loss_weights(method)
        shown = ", ".join(f"{k} {_number(v)}" for k, v in weights.items()) or "no weight option"
        lines += ["", f"{heading} {name} ({shown})", ""]
        others = other_options(method)
        if others:
            lines.append("- options: " + ", ".join(f"{k} {_option(v)}" for k, v in others.items()))
        if several and method.needs_teacher:
            reads = "every teacher" if method.reads_all_teachers else f"teacher {distiller.method_teacher(method)!r}"
            lines.append(f"- reads {reads}")
        pairs = method.layer_pairs()
        if not pairs:
            lines.append("- logits: student <- teacher" if method.needs_teacher else
                         "- logits: student <- the other students' (peers, detached)" if method.needs_peers else
                         "- student logits alone")
        adapters = method.adapters()
        for i, (s_spec, t_spec) in enumerate(pairs):
            student_side = _side(s_spec, s_paths, s_shapes, layouts.get("student"))
            teacher_side = _side(t_spec, t_paths, t_shapes, t_layout)
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
    return lines


def top1_score(model: nn.Module, test_data) -> tuple[str, float]:
    """A classifier's score for the plan: its test top-1."""
    return "test top-1", evaluate(model, test_data)["top1"]


ModelScore = Callable[[nn.Module, object], tuple[str, float]]  # (model, test split) -> (what, value in %)


def write_plan(distiller: Distiller, test_data, run_dir: Optional[Path] = None, device: Optional[str] = None,
               names: tuple[Optional[str], Optional[str]] = (None, None), verbose: bool = True,
               score: ModelScore = top1_score, warnings: Sequence[str] = ()) -> str:
    """Score the teacher on `test_data` (on `device`, else where it is; `score`: the task's, test top-1 by
    default), then print the plan and write it to ``run_dir/plan.md``.  `names`: the student's and the teacher's
    factory names; `warnings`: lines the plan ends with (`epoch_option_warnings`)."""
    teacher_score = None
    if distiller.teacher is not None and test_data is not None:
        if device is not None:
            distiller.teacher.to(resolve_device(device))  # where training puts it anyway
        teacher_score = score(distiller.teacher, test_data)
    return _record(distillation_plan(distiller, teacher_score, *names) + warnings_section(warnings), run_dir,
                   verbose)


def write_peer_plan(distillers: Sequence[Distiller], run_dir: Optional[Path] = None,
                    student_names: Sequence[Optional[str]] = (), verbose: bool = True,
                    warnings: Sequence[str] = ()) -> str:
    """`peer_plan` printed and written to ``run_dir/plan.md``, as `write_plan` does for one student."""
    return _record(peer_plan(distillers, student_names) + warnings_section(warnings), run_dir, verbose)


def _record(plan: str, run_dir: Optional[Path], verbose: bool) -> str:
    if verbose:
        print(plan, end="")
    if run_dir is not None:
        atomic_write(Path(run_dir) / PLAN_FILE, lambda tmp: tmp.write_text(plan))
    return plan


def warnings_section(warnings: Sequence[str]) -> str:
    return "".join(["\n## Warnings\n\n", *(f"- warning: {line}\n" for line in warnings)]) if warnings else ""


def epoch_option_warnings(methods: Sequence[tuple[str, dict]], epochs: int) -> list[str]:
    """One line per method option that counts epochs of the run (a warm-up, a ramp, a curriculum, an epoch
    from which something starts: a registered numeric option whose name holds "epoch") set to `epochs` or more,
    naming the method, the option, its value, train.epochs and what follows.  `methods`: (registered name,
    options given) pairs, in config order; options not given take the registered default."""
    found = []
    for index, (name, given) in enumerate(methods):
        if name not in METHODS.names():
            continue
        for key, value in {**METHODS.get(name).defaults, **given}.items():
            if "epoch" not in key or key in OWN_STAGE_OPTIONS or not isinstance(value, numbers.Real) \
                    or isinstance(value, bool) or value <= 0 or value < epochs:
                continue
            found.append(f"{name}.{key} = {_number(value)} >= train.epochs = {epochs}: "
                         f"{_epoch_option_effect(key, value, epochs)}; set methods.{index}.{key} below {epochs} or "
                         "raise train.epochs")
    return found


def _epoch_option_effect(key: str, value: float, epochs: int) -> str:
    """What an epoch-counting option at `value` does in a run of `epochs` epochs, by the kind its name says."""
    if key.endswith(("from_epoch", "start_epoch")) or key.startswith("start"):
        return f"it never takes effect (it starts at epoch {_number(value)}, after the run's last)"
    if "warmup" in key:  # `warmup_factor`: linear, (epoch + 1) / warmup_epochs
        return ("the term reaches full weight only in the last epoch" if value == epochs else
                f"the term never reaches full weight ({epochs / value:.0%} of it in the last epoch)")
    return (f"its {_number(value)}-epoch schedule reaches its end only in the last epoch" if value == epochs else
            f"its {_number(value)}-epoch schedule never reaches its end")


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


def _side(spec: Optional[str], paths: dict[str, str], shapes: dict[str, torch.Size],
          layout: Optional[Layout] = None) -> str:
    if spec is None:
        return "(none)"
    path = paths.get(spec, spec)
    place = tap_place(spec, layout)
    where = f"`{path}`" if path == spec else f"{spec}{f' ({place})' if place else ''} = `{path}`"
    return f"{where} {_shape(shapes[spec])}" if spec in shapes else where


def tap_place(spec: str, layout: Optional[Layout]) -> str:
    """Where a symbolic tap ``kind:i`` sits in the model's list of that kind, counted from 1 as people count:
    ``stage:2`` -> ``3rd of 3 stage outputs``.  The index counts from 0 (RepDistiller's ``feat[i]``), and the
    layout decides what stage 0 is (the stem's output on a CIFAR ResNet, the first block whose shape differs from
    the input's on a model whose stem keeps the first stage's shape), so a module called ``stage3`` can be
    ``stage:2``; saying its place removes the guesswork.  Empty for module taps."""
    kind, sep, index = spec.partition(":")
    if layout is None or not sep or not index.lstrip("-").isdigit():
        return ""
    taps = layout.stages if kind == "stage" else layout.extra.get(kind, [])
    if not taps or not -len(taps) <= int(index) < len(taps):
        return ""
    noun = "stage outputs" if kind == "stage" else f"{kind} taps"
    return f"{_ordinal(int(index) % len(taps) + 1)} of {len(taps)} {noun}"


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


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
