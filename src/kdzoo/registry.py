"""One generic registry: methods, models and datasets register by name with a decorator.

Each entry keeps the object, its default keyword arguments (read from the signature, so the
defaults live beside the code) and free-form metadata such as the paper it comes from.

Option values are checked against the signature's annotations when a config is loaded and when an entry
is built: ``float``, ``int``, ``bool``, ``str``, ``Optional[...]``, ``Union[...]``, ``Literal[...]``, lists
and mappings, and ranges declared beside the default with ``typing.Annotated``::

    def __init__(self, weight: NonNegative = 0.9, temperature: Positive = 4.0): ...

(`Positive`, `NonNegative`, `PositiveInt`, `NonNegativeInt`, `Fraction` or any ``Annotated[float, Range(...)]``).
We wrote this small checker rather than use pydantic: the messages must be one line naming the config key
(``methods[1].weight``) and the allowed values, and the core must stay light.  Every float option must be
finite (a NaN or infinite weight, rate or temperature is never meant).  Annotations that are not plain
config types (a tensor, a module) accept only instances of that type.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import math
import numbers
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Iterator, Literal, Optional, Union

from .errors import ConfigError


@dataclass(frozen=True)
class Range:
    """Bounds of a numeric option, declared beside its default: ``Annotated[float, Range(gt=0)]``."""

    gt: Optional[float] = None
    ge: Optional[float] = None
    lt: Optional[float] = None
    le: Optional[float] = None

    def allows(self, value: float) -> bool:
        return ((self.gt is None or value > self.gt) and (self.ge is None or value >= self.ge)
                and (self.lt is None or value < self.lt) and (self.le is None or value <= self.le))

    def describe(self) -> str:
        parts = [f"{op} {_number(bound)}" for op, bound in ((">", self.gt), (">=", self.ge), ("<", self.lt),
                                                             ("<=", self.le)) if bound is not None]
        return " and ".join(parts)


Positive = Annotated[float, Range(gt=0)]
NonNegative = Annotated[float, Range(ge=0)]
Fraction = Annotated[float, Range(gt=0, lt=1)]  # strictly between 0 and 1
PositiveInt = Annotated[int, Range(ge=1)]
NonNegativeInt = Annotated[int, Range(ge=0)]
UnitInterval = Annotated[float, Range(ge=0, le=1)]  # a momentum, a decay, a mixing weight


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Callable[..., Any]
    defaults: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    _hints: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # filled on first use

    @property
    def paper(self) -> str:
        return self.meta.get("paper", "")

    @property
    def description(self) -> str:
        """One line: what the entry does (``description=`` beside its registration)."""
        return self.meta.get("description", "")

    @property
    def options_class(self) -> Optional[type]:
        """The dataclass holding the entry's options (``options=`` beside its registration), if it has one."""
        return self.meta.get("options")

    def option_meanings(self) -> dict[str, str]:
        """Option name -> meaning, from the "Options:" section of the entry's docstring (or of its options class or
        the first of its bases that has one)."""
        if self.options_class is None:
            return docstring_options(self.obj.__doc__ or "")
        return next((found for cls in self.options_class.__mro__ if (found := docstring_options(cls.__doc__ or ""))),
                    {})

    def hints(self) -> dict[str, Any]:
        """Option name -> annotation (None where there is none or it cannot be resolved)."""
        if not self._hints and self.defaults:
            self._hints.update(option_hints(self.options_class or self.obj, list(self.defaults)))
        return self._hints

    def check(self, options: dict[str, Any], where: str, label: str = "") -> dict[str, Any]:
        """`options` with every value checked against its annotation (and converted: ``"1e-3"`` -> 0.001).
        `where` is the config path of the options (``methods[1]``), `label` what they belong to (``kd``)."""
        owner = f"{where} ({label})" if where and label else where or label
        check_options(owner, options, self.defaults)
        hints = self.hints()
        suffix = f" ({label})" if label else ""
        return {key: check_value(f"{where}.{key}" if where else str(key), value, hints.get(key), suffix)
                for key, value in options.items()}


def docstring_options(doc: str) -> dict[str, str]:
    """The ``Options:`` section of a docstring as {name: meaning}: one ``name: meaning`` line per option,
    continued on more deeply indented lines, up to the next blank line or the end."""
    lines = inspect.cleandoc(doc).splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Options:")
    except StopIteration:
        return {}
    meanings: dict[str, str] = {}
    indent, name = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            break
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth == indent and ":" in line:
            name, meaning = line.strip().split(":", 1)
            meanings[name] = meaning.strip()
        elif depth > indent and name is not None:
            meanings[name] += " " + line.strip()
        else:
            break
    return meanings


def signature_defaults(obj: Callable[..., Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Keyword arguments of `obj` (a class or function) with their default values (none when `skip` is ``("*",)``:
    an entry that takes no options from a config)."""
    if skip == ("*",):
        return {}
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = inspect.signature(target).parameters
    out = {}
    for name, p in params.items():
        if name in ("self",) + skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[name] = None if p.default is p.empty else p.default
    return out


def option_hints(obj: Callable[..., Any], names: list[str]) -> dict[str, Any]:
    """The resolved annotations of `obj`'s options `names` (a dataclass's fields, a class's __init__, a function)."""
    target = obj if dataclasses.is_dataclass(obj) or not inspect.isclass(obj) else obj.__init__
    try:
        hints = typing.get_type_hints(target, include_extras=True)
    except Exception:  # one unresolvable annotation (a TYPE_CHECKING import): resolve the options one by one
        hints = {}
        raw = getattr(target, "__annotations__", {})
        module = sys.modules.get(getattr(obj, "__module__", ""), None)
        namespace = dict(vars(typing), **(vars(module) if module else {}))
        for name in names:
            annotation = raw.get(name)
            try:
                hints[name] = eval(annotation, namespace) if isinstance(annotation, str) else annotation
            except Exception:
                hints[name] = None
    if inspect.isclass(obj):
        for name in names:
            hints[name] = _inherited_bounds(obj, name, hints.get(name))
    return {name: hints.get(name) for name in names}


def _inherited_bounds(cls: type, name: str, hint: Any) -> Any:
    """A subclass that only changes an option's default (``iterations: int = 20000``) keeps the bounds or
    choices a base class declared for it (``iterations: NonNegativeInt = 1000``)."""
    if not inspect.isclass(hint):
        return hint
    for base in cls.__mro__[1:]:
        if name not in getattr(base, "__annotations__", {}):
            continue
        try:
            declared = typing.get_type_hints(base, include_extras=True).get(name)
        except Exception:
            return hint
        origin, args = typing.get_origin(declared), typing.get_args(declared)
        if origin is Annotated and args[0] is hint:
            return declared
        if origin is Literal and all(isinstance(a, hint) for a in args):
            return declared
        return hint
    return hint


class Registry:
    """A named collection of constructors.  `kind` only appears in messages.

    An entry's options (what a config may set) are its keyword parameters with their defaults, or, for one with
    many, the fields of the dataclass given as ``options=`` at registration: the entry is then called with
    ``options=`` an instance of it."""

    def __init__(self, kind: str, skip_args: tuple[str, ...] = ()):
        self.kind = kind
        self._skip = skip_args
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, options: Optional[type] = None,
                 **meta: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            defaults = signature_defaults(options if options is not None else obj, self._skip)
            self._entries[name] = Entry(name, obj, defaults, {**meta, **({"options": options} if options else {})})
            obj.registry_name = name
            return obj

        return decorator

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(unknown_name_message(self.kind, name, self._entries)) from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the entry; keyword arguments must be options it declares (or ones the registry skips), with
        values its annotations allow."""
        entry = self.get(name)
        options = entry.check({k: v for k, v in kwargs.items() if k not in self._skip}, f"{self.kind} {name!r}")
        if entry.options_class is not None:
            fixed = {k: v for k, v in kwargs.items() if k in self._skip}
            return entry.obj(*args, **fixed, options=entry.options_class(**options))
        return entry.obj(*args, **{**kwargs, **options})

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)


def unknown_name_message(kind: str, name: str, known: Any) -> str:
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(known)}"
    return f"unknown {kind} {name!r}{hint}"


def check_options(owner: str, options: dict[str, Any], allowed: dict[str, Any]) -> None:
    """Refuse an option `allowed` does not name, with the closest spelling as a hint."""
    for key in options:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), list(allowed), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"options: {', '.join(allowed) or 'none'}"
            raise ConfigError(f"{owner}: unknown option {key!r} ({hint})")


# ---------------------------------------------------------------- values against annotations


class _Mismatch(Exception):
    """A value does not fit an annotation (turned into one ConfigError by `check_value`)."""


def check_value(where: str, value: Any, annotation: Any, suffix: str = "") -> Any:
    """`value` checked against `annotation` and converted (a YAML string ``1e-3`` to a float); a mismatch
    is one `ConfigError`: ``methods[0].temperature (kd): expected a number > 0, got int 0``."""
    try:
        return _fit(value, annotation)
    except _Mismatch:
        raise ConfigError(f"{where}{suffix}: expected {describe_type(annotation)}, got {describe_value(value)}") from None


def _fit(value: Any, tp: Any) -> Any:
    if tp is None or tp is Any or tp is inspect.Parameter.empty or isinstance(tp, (str, typing.TypeVar)):
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        value = _fit(value, args[0])
        for bound in args[1:]:
            if isinstance(bound, Range) and not bound.allows(value):
                raise _Mismatch
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _fit(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, str):  # PyYAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise _Mismatch from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise _Mismatch
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise _Mismatch
            return tuple(_fit(v, a) for v, a in zip(value, args))
        item = args[0] if args else Any
        items = [_fit(v, item) for v in value]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, collections.abc.Mapping) or tp in (dict,):
        if not isinstance(value, dict):
            raise _Mismatch
        return value
    if inspect.isclass(tp):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    return value  # an annotation this checker does not know (a Callable, a Protocol): not checked


def describe_type(tp: Any) -> str:
    """An annotation in words: ``a number > 0``, ``one of 'auto', 'repdistiller'``, ``a list of strings``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        bounds = " and ".join(b.describe() for b in args[1:] if isinstance(b, Range))
        return f"{describe_type(args[0])} {bounds}".rstrip()
    if origin in (Union, types.UnionType):
        words = [describe_type(a) for a in args if a is not type(None)]
        if type(None) in args:
            words.append("null")
        return " or ".join(words)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple):
        item = args[0] if args else Any
        return "a list" + ("" if item is Any else f" of {_plural(describe_type(item))}")
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        return "a mapping"
    simple = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    if tp in simple:
        return simple[tp]
    return getattr(tp, "__name__", str(tp))


def _plural(words: str) -> str:
    for single, many in (("an integer", "integers"), ("a finite number", "finite numbers"), ("a string", "strings"),
                         ("true or false", "booleans")):
        if words.startswith(single):
            return many + words[len(single):]
    return words


def describe_value(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)):
        return f"{type(value).__name__} {value!r}" if len(repr(value)) <= 60 else type(value).__name__
    return f"{type(value).__name__} {value!r}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


# Every registry of kdzoo, filled by its decorator in the files of its package (which its package imports, so
# importing the package registers everything it has).
METHODS = Registry("method")
MODELS = Registry("model", skip_args=("num_classes", "in_channels"))
DATASETS = Registry("dataset")
CONDENSERS = Registry("condenser", skip_args=("data", "ipc"))
LM_LOSSES = Registry("lm loss", skip_args=("student_config", "teacher_config", "student_tokenizer", "teacher_tokenizer"))
TASKS = Registry("task", skip_args=("*",))  # Task classes: built by their runs, no options of their own
DIFFUSION_METHODS = Registry("diffusion method", skip_args=("scheduler",))
CLIP_METHODS = Registry("clip method")

register_method = METHODS.register
register_model = MODELS.register
register_dataset = DATASETS.register
register_condenser = CONDENSERS.register
register_lm_loss = LM_LOSSES.register
register_task = TASKS.register
register_diffusion_method = DIFFUSION_METHODS.register
register_clip_method = CLIP_METHODS.register

__all__ = ["Registry", "Entry", "Range", "Positive", "NonNegative", "Fraction", "PositiveInt", "NonNegativeInt", "UnitInterval",
           "check_options", "check_value", "describe_type", "register_method", "register_model", "register_dataset",
           "register_condenser", "register_lm_loss", "register_task", "register_diffusion_method", "register_clip_method",
           "METHODS", "MODELS", "DATASETS", "CONDENSERS", "LM_LOSSES", "TASKS", "DIFFUSION_METHODS", "CLIP_METHODS"]
