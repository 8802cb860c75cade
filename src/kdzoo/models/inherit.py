"""Weight inheritance, from TinyCLIP (Wu et al., ICCV 2023): start a narrower or shallower student of the
teacher's family from the teacher's weights instead of from random ones.

``inherit_weights(student, teacher)`` walks the two module trees side by side:

- a module must have the same type in both (a student of another family is refused with the path where
  the two differ);
- depth: in a container (``nn.Sequential`` / ``nn.ModuleList``) with fewer units in the student, student
  unit i takes teacher unit ``i * (n_teacher // n_student)`` (TinyCLIP's manual "interval_front"
  choice).  A unit is one child when all children share a type (blocks of a stage), else the shortest
  repeating run of child types (conv-BN-ReLU in a VGG block), so layer types always line up;
- width: every tensor takes the teacher tensor's leading slice along each dimension (TinyCLIP's "select
  the front param"), so channel k of the student is channel k of the teacher throughout.  A fused
  attention projection (``qkv`` / ``in_proj``) is sliced per q, k and v, which keeps whole heads when
  student and teacher share the head width, as TinyCLIP assumes.

TinyCLIP also learns which channels and layers to keep (its "auto" inheritance with L0 masks); we
implement the manual rule, which needs no extra training.  A config uses it as ``student.init_from: teacher``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError

FUSED_QKV_SUFFIXES = ("qkv.weight", "qkv.bias", "in_proj_weight", "in_proj_bias")


@dataclass
class Inheritance:
    """What `inherit_weights` did: student state name -> teacher state name, and the layers it skipped."""

    sources: dict[str, str] = field(default_factory=dict)
    depth_maps: dict[str, list[int]] = field(default_factory=dict)  # container path -> teacher unit per student unit
    sliced: int = 0  # tensors that were narrowed

    def summary(self) -> str:
        depth = "; ".join(f"{path or 'model'}: units {idx}" for path, idx in self.depth_maps.items())
        return (f"{len(self.sources)} tensors inherited from the teacher, {self.sliced} narrowed"
                + (f"; depth: {depth}" if depth else ""))


def inherit_weights(student: nn.Module, teacher: nn.Module) -> Inheritance:
    """Overwrite `student`'s parameters and buffers with slices of `teacher`'s (see the module docstring).

    Raises `ConfigError` when the two are not of one family, or the student is wider or deeper anywhere."""
    if type(student) is not type(teacher):
        raise ConfigError(f"init_from teacher: the student ({type(student).__name__}) is not of the teacher's family "
                          f"({type(teacher).__name__}); weight inheritance needs the same architecture, narrower "
                          "or shallower")
    result = Inheritance()
    _match(student, teacher, "", "", result)
    teacher_state = teacher.state_dict()
    new_state = {}
    for name, value in student.state_dict().items():
        source = result.sources.get(name)
        if source is None:
            raise ConfigError(f"init_from teacher: no teacher tensor for the student's {name!r}")
        new_state[name] = _front_slice(name, teacher_state[source], value.shape)
        result.sliced += int(tuple(new_state[name].shape) != tuple(teacher_state[source].shape))
    student.load_state_dict(new_state)
    return result


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _match(student: nn.Module, teacher: nn.Module, s_path: str, t_path: str, result: Inheritance) -> None:
    if type(student) is not type(teacher):
        raise ConfigError(f"init_from teacher: the student's {s_path or 'model'} is a {type(student).__name__}, "
                          f"the teacher's {t_path or 'model'} a {type(teacher).__name__}")
    own = lambda m: dict(m.named_parameters(recurse=False)) | dict(m.named_buffers(recurse=False))  # noqa: E731
    s_own, t_own = own(student), own(teacher)
    for name in s_own:
        if name not in t_own:
            raise ConfigError(f"init_from teacher: the teacher's {t_path or 'model'} has no {name!r}")
        result.sources[_join(s_path, name)] = _join(t_path, name)
    s_children, t_children = dict(student.named_children()), dict(teacher.named_children())
    if isinstance(student, (nn.Sequential, nn.ModuleList)) and len(s_children) != len(t_children):
        pairs = _depth_pairs(list(s_children.items()), list(t_children.items()), s_path, result)
    else:
        missing = [name for name in s_children if name not in t_children]
        if missing:
            raise ConfigError(f"init_from teacher: the teacher's {t_path or 'model'} has no {missing[0]!r} "
                              f"(the student's {_join(s_path, missing[0])})")
        pairs = [(name, s_children[name], name, t_children[name]) for name in s_children]
    for s_name, s_child, t_name, t_child in pairs:
        _match(s_child, t_child, _join(s_path, s_name), _join(t_path, t_name), result)


def _unit_length(types: list[type]) -> int:
    """The shortest period of a list of child types (1 for a stage of identical blocks)."""
    for length in range(1, len(types) + 1):
        if len(types) % length == 0 and all(types[i] is types[i % length] for i in range(len(types))):
            return length
    return len(types)


def _depth_pairs(s_children, t_children, path: str, result: Inheritance):
    s_types, t_types = [type(m) for _, m in s_children], [type(m) for _, m in t_children]
    unit = _unit_length(s_types)
    if _unit_length(t_types) != unit or t_types[:unit] != s_types[:unit]:
        raise ConfigError(f"init_from teacher: {path or 'model'} repeats different layers in student and teacher "
                          f"({[t.__name__ for t in s_types[:unit]]} vs {[t.__name__ for t in t_types[:unit]]})")
    s_units, t_units = len(s_children) // unit, len(t_children) // unit
    if s_units > t_units:
        raise ConfigError(f"init_from teacher: the student's {path or 'model'} is deeper than the teacher's "
                          f"({s_units} vs {t_units} units)")
    step = t_units // s_units
    chosen = [i * step for i in range(s_units)]
    result.depth_maps[path] = chosen
    pairs = []
    for i, j in enumerate(chosen):
        for k in range(unit):
            s_name, s_child = s_children[i * unit + k]
            t_name, t_child = t_children[j * unit + k]
            pairs.append((s_name, s_child, t_name, t_child))
    return pairs


def _front_slice(name: str, source: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if tuple(source.shape) == tuple(shape):
        return source.clone()
    if source.dim() != len(shape) or any(s > t for s, t in zip(shape, source.shape)):
        raise ConfigError(f"init_from teacher: the student's {name} {tuple(shape)} does not fit inside the "
                          f"teacher's {tuple(source.shape)} (a student must be narrower or equal everywhere)")
    if name.endswith(FUSED_QKV_SUFFIXES) and source.shape[0] % 3 == 0 and shape[0] % 3 == 0:
        parts = source.reshape(3, source.shape[0] // 3, *source.shape[1:])
        index = (slice(None), slice(0, shape[0] // 3)) + tuple(slice(0, s) for s in shape[1:])
        return parts[index].reshape(shape).clone()
    return source[tuple(slice(0, s) for s in shape)].clone()


__all__ = ["inherit_weights", "Inheritance"]
