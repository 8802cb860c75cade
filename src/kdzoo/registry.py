"""One generic registry: methods, models and datasets register by name with a decorator.

Each entry keeps the object, its default keyword arguments (read from the signature, so the
defaults live beside the code) and free-form metadata such as the paper it comes from.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .errors import ConfigError


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Callable[..., Any]
    defaults: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def paper(self) -> str:
        return self.meta.get("paper", "")


def signature_defaults(obj: Callable[..., Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """Keyword arguments of `obj` (a class or function) with their default values."""
    target = obj.__init__ if inspect.isclass(obj) else obj
    params = inspect.signature(target).parameters
    out = {}
    for name, p in params.items():
        if name in ("self",) + skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        out[name] = None if p.default is p.empty else p.default
    return out


class Registry:
    """A named collection of constructors.  `kind` only appears in messages."""

    def __init__(self, kind: str, skip_args: tuple[str, ...] = ()):
        self.kind = kind
        self._skip = skip_args
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **meta: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, obj, signature_defaults(obj, self._skip), meta)
            obj.registry_name = name
            return obj

        return decorator

    def get(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(unknown_name_message(self.kind, name, self._entries)) from None

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the entry; keyword arguments must be options it declares (or ones the registry skips)."""
        entry = self.get(name)
        check_options(f"{self.kind} {name!r}", {k: v for k, v in kwargs.items() if k not in self._skip}, entry.defaults)
        return entry.obj(*args, **kwargs)

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
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"options: {', '.join(allowed) or 'none'}"
            raise ConfigError(f"{owner}: unknown option {key!r} ({hint})")


METHODS = Registry("method")
MODELS = Registry("model", skip_args=("num_classes", "in_channels"))
DATASETS = Registry("dataset")

register_method = METHODS.register
register_model = MODELS.register
register_dataset = DATASETS.register
