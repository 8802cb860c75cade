"""Every method's loss as a pure function, in one namespace: ``kdzoo.functional.kd_loss(...)``.

Each method file keeps its math in functions named ``<something>_loss`` beside the `Method` that holds its
weights and hyper-parameters; this module re-exports all of them, collected from the method registry so a
newly registered method's losses appear here without a second list to keep.
"""
from __future__ import annotations

import inspect
import sys

from .methods import METHODS


def _collect() -> dict[str, object]:
    losses: dict[str, object] = {}
    for entry in METHODS:
        module = sys.modules[entry.obj.__module__]
        for name, value in vars(module).items():
            if name.endswith("_loss") and inspect.isfunction(value) and value.__module__ == module.__name__:
                if losses.get(name, value) is not value:  # one name, one function: never shadow another's
                    raise RuntimeError(f"two methods define a loss named {name}: {losses[name].__module__}, "
                                       f"{module.__name__}")
                losses[name] = value
    return dict(sorted(losses.items()))


_LOSSES = _collect()
globals().update(_LOSSES)
__all__ = list(_LOSSES)
