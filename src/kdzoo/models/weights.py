"""Weights from any usual file into a model: ``teacher.weights``, ``student.weights``, ``kdzoo eval``.

Accepted: a plain ``torch.save(model.state_dict())`` file (``.pth``, ``.pt``, ``.bin``, any name), read with
``torch.load(weights_only=True)`` so no code is unpickled, also when the state dict sits under ``state_dict``,
``model`` (torchvision's reference scripts), ``model_state_dict`` or ``student``; a ``.safetensors`` file; a
kdzoo checkpoint (its student); a kdzoo run directory (its exported weights, else its checkpoint).

Tensor names are matched to the model's before anything is loaded: the ``module.`` of DistributedDataParallel,
the ``_orig_mod.`` of torch.compile, the ``model.`` of Lightning-style wrappers, or any other prefix, is removed
(or the model's own prefix added, or one replaced by the other) when that makes more names match.  A tensor whose
shape differs is refused, naming it and both shapes; names present on one side only are loaded around and
reported in one line; a file that shares no parameter name with the model is refused (another architecture).
"""
from __future__ import annotations

import argparse
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..engine.checkpoint import MAGIC, load_checkpoint, read_weights
from ..engine.rundir import CHECKPOINT
from ..errors import CheckpointError

WEIGHT_FILES = ("model.safetensors", "student.safetensors")  # exported by kdzoo teacher / kdzoo train
RUN_WEIGHT_FILES = WEIGHT_FILES + (CHECKPOINT,)  # looked for in a run directory, in this order
# Where training scripts nest the state dict inside a saved dict, in the order they are looked for.
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "student", "module", "net")
# Prefixes wrappers add to every name: DistributedDataParallel, torch.compile, Lightning-style modules.
KNOWN_PREFIXES = ("module.", "_orig_mod.", "model.")
# Classes besides tensors and containers a weights file may hold (torch.load's weights_only refuses others).
SAFE_CLASSES = [argparse.Namespace]


@dataclass
class LoadReport:
    """What `fit_state_dict` loaded: the file, tensor counts, renames, and names found on one side only."""

    source: str
    loaded: int
    total: int  # tensors in the model's state dict
    renames: list[str] = field(default_factory=list)  # "removed prefix 'module.'"
    missing: list[str] = field(default_factory=list)  # in the model, not in the file: kept as initialised
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model: ignored (file names)

    @property
    def exact(self) -> bool:
        return not (self.renames or self.missing or self.unexpected)

    def summary(self) -> str:
        """One line: ``loaded 60/62 tensors from x.pth (removed prefix 'module.'); 2 missing ...``."""
        text = f"loaded {self.loaded}/{self.total} tensors from {self.source}"
        if self.renames:
            text += f" ({', '.join(self.renames)})"
        if self.missing:
            text += f"; {len(self.missing)} missing, kept as initialised: {_some(self.missing)}"
        if self.unexpected:
            text += f"; {len(self.unexpected)} unexpected, ignored: {_some(self.unexpected)}"
        return text


def resolve_weights_path(path: str | Path) -> Path:
    """A file as it is; a run directory as its exported weights (else its checkpoint)."""
    path = Path(path)
    if path.is_dir():
        for name in RUN_WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: no {', '.join(RUN_WEIGHT_FILES)} in this directory")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or run directory")
    return path


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors of a weights file or run directory, and its kdzoo metadata ({} where there is none)."""
    path = resolve_weights_path(path)
    if path.suffix == ".safetensors":
        return read_weights(path)
    with open(path, "rb") as f:
        head = f.read(len(MAGIC))
    if head == MAGIC:
        student = load_checkpoint(path).get("student")
        if not isinstance(student, dict) or not all(isinstance(v, torch.Tensor) for v in student.values()):
            raise CheckpointError(f"{path}: a checkpoint without a 'student' state (not written by kdzoo train or "
                                  "kdzoo teacher)")
        return student, {}
    return _torch_file_state(path), {}


def _torch_file_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        # torchvision's reference scripts save their argparse.Namespace beside the model: a bag of attributes
        # that runs no code, allowed for this load only
        with torch.serialization.safe_globals(SAFE_CLASSES):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:  # not a pickle of tensors at all (a text file, another format)
            detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(err))
            raise CheckpointError(f"{path}: not a weights file torch.load can read "
                                  f"({detail.group(1) if detail else _first_line(err)}); give a .pth/.pt/.bin state "
                                  "dict, .safetensors or a kdzoo run") from None
        # weights_only met a class: the file pickled code, not only tensors
        raise CheckpointError(f"{path}: holds Python objects besides tensors ({found.group(1)}), which kdzoo does "
                              "not unpickle; save the state dict alone: torch.save(model.state_dict(), 'weights.pth')"
                              ) from None
    except Exception as err:  # a truncated zip, a text file, another format
        raise CheckpointError(f"{path}: not a weights file torch.load can read ({type(err).__name__}: "
                              f"{_first_line(err)}); give a .pth/.pt/.bin state dict, .safetensors or a kdzoo run"
                              ) from None
    return extract_state_dict(obj, str(path))


def extract_state_dict(obj: Any, source: str = "weights") -> dict[str, torch.Tensor]:
    """The name -> tensor mapping inside what a training script saved: the mapping itself, or the one under
    one of `CONTAINER_KEYS` (nested too, as in ``{"model": {"state_dict": ...}}``)."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a state dict (a mapping of names "
                                  "to tensors)")
        tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        nested = next((key for key in CONTAINER_KEYS if isinstance(obj.get(key), Mapping)), None)
        if nested is None or len(tensors) > len(obj) // 2:
            break
        obj = obj[nested]
    if not tensors:
        keys = ", ".join(map(str, list(obj)[:6])) or "none"
        raise CheckpointError(f"{source}: holds no tensors (keys: {keys}; the state dict is looked for under "
                              f"{', '.join(CONTAINER_KEYS)})")
    return tensors


def match_names(state: Mapping[str, torch.Tensor], expected: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Map the file's tensor names onto `expected` (the model's names): as they are, or with one prefix removed,
    added or replaced (``module.model.x`` -> ``x``, ``x`` -> ``backbone.x``), whichever makes the most names
    match.  Returns {model name: file name} for the names that map, and the renaming done, e.g.
    ``["removed prefix 'module.'"]`` (empty when the names are used as they are)."""
    expected = list(expected)
    direct = {name: name for name in expected if name in state}
    if len(direct) == len(expected):
        return direct, []
    # Each file name votes for the (file prefix, model prefix) pairs that turn it into a model name with the
    # longest common rest; the pair with the most votes is the renaming that matches the most names.  (Shorter
    # rests such as "attn.qkv.weight" are shared by every block: counting them all would be quadratic.)
    owners: dict[str, list[str]] = {}  # rest of a model name after a dot-boundary prefix -> those prefixes
    for name in expected:
        for cut in _cuts(name):
            owners.setdefault(name[cut:], []).append(name[:cut])
    votes: dict[tuple[str, str], int] = {}
    for name in state:
        cut = next((cut for cut in _cuts(name) if name[cut:] in owners), None)
        for model_prefix in owners.get(name[cut:], ()) if cut is not None else ():
            key = (name[:cut], model_prefix)
            votes[key] = votes.get(key, 0) + 1
    best = max(votes, key=lambda k: (votes[k], KNOWN_PREFIXES.count(k[0]), -len(k[0]) - len(k[1])), default=None)
    # A renaming must explain at least half of the model's names: one name matched by chance is no evidence.
    if best is None or votes[best] <= len(direct) or 2 * votes[best] < len(expected):
        return direct, []
    removed, added = best
    wanted = set(expected)
    mapping = {added + name[len(removed):]: name for name in state if name.startswith(removed)}
    mapping = {name: source for name, source in mapping.items() if name in wanted}
    step = (f"replaced prefix {removed!r} by {added!r}" if removed and added else
            f"removed prefix {removed!r}" if removed else f"added prefix {added!r}")
    return mapping, [step]


def _cuts(name: str) -> list[int]:
    """Where a dot-boundary prefix of `name` ends: 0 ("" prefix), then after each dot."""
    return [0] + [i + 1 for i, char in enumerate(name) if char == "."]


def fit_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "weights",
                   what: str = "model", strict: bool = True) -> LoadReport:
    """Load `state` into `model` after matching names (`match_names`).  Refused (CheckpointError): a file that
    shares no parameter with the model, the first tensor whose shape differs (named, with both shapes) and, when
    `strict`, a file that leaves any tensor of the model unfilled or holds tensors the model has no place for (a
    ResNet-18 state dict fills 122 of a ResNet-34's 218: evaluating that half-loaded model gives noise).  BatchNorm's
    step counters (``num_batches_tracked``, absent from older files) do not count.  Without `strict`, names found on
    one side only are left alone and listed in the returned report."""
    expected = model.state_dict()
    mapping, renames = match_names(state, expected)
    kind = f"the {what} {type(model).__name__}"
    parameters = {name for name, _ in model.named_parameters()}
    if parameters and not parameters & set(mapping):
        raise CheckpointError(f"{source}: does not fit {kind} (another architecture?): no parameter names in "
                              f"common; the file has e.g. {_some(list(state), 2)}, the model "
                              f"{_some(list(expected), 2)}")
    for name, tensor in expected.items():
        if name in mapping and tuple(state[mapping[name]].shape) != tuple(tensor.shape):
            where = name if mapping[name] == name else f"{name} ({mapping[name]} in the file)"
            raise CheckpointError(f"{source}: does not fit {kind} (another architecture, width or class count?): "
                                  f"{where} is {tuple(state[mapping[name]].shape)} in the file, "
                                  f"{tuple(tensor.shape)} in the model")
    bad = non_finite_tensor({name: state[source_name] for name, source_name in mapping.items()}, expected)
    if bad is not None:
        name, what = bad
        where = name if mapping[name] == name else f"{name} ({mapping[name]} in the file)"
        raise CheckpointError(f"{source}: tensor {where} holds {what} (weights of a diverged or damaged run); give "
                              "weights saved before the loss became non-finite")
    used = set(mapping.values())
    report = LoadReport(source, len(mapping), len(expected), renames,
                        missing=[name for name in expected if name not in mapping],
                        unexpected=[name for name in state if name not in used])
    missing = [name for name in report.missing if not name.endswith("num_batches_tracked")]
    if strict and (missing or report.unexpected):
        parts = ([f"{len(missing)} of the model's tensors missing from the file ({_some(missing)})"] if missing
                 else []) + ([f"{len(report.unexpected)} in the file the model has no place for "
                              f"({_some(report.unexpected)})"] if report.unexpected else [])
        raise CheckpointError(f"{source}: fills {len(mapping)} of the {len(expected)} tensors of {kind}: "
                              f"{'; '.join(parts)}; another architecture or depth? (strict: false loads only what "
                              "fits)")
    model.load_state_dict({name: state[source_name] for name, source_name in mapping.items()}, strict=False)
    return report


def non_finite_tensor(state: Mapping[str, torch.Tensor],
                      reference: Mapping[str, torch.Tensor] | None = None) -> tuple[str, str] | None:
    """(name, "NaN" or "inf") of the first floating-point tensor of `state` holding a non-finite value, or None.
    A name whose tensor in `reference` (the model's own state) is non-finite too is skipped: a mask buffer of
    -inf belongs to the architecture, it is no sign of a diverged run."""
    for name, tensor in state.items():
        if not (tensor.is_floating_point() or tensor.is_complex()) or bool(torch.isfinite(tensor).all()):
            continue
        own = (reference or {}).get(name)
        if own is not None and (own.is_floating_point() or own.is_complex()) and not bool(torch.isfinite(own).all()):
            continue
        return name, "NaN" if bool(torch.isnan(tensor).any()) else "inf"
    return None


def load_weights(model: nn.Module, path: str | Path, what: str = "model", strict: bool = True) -> LoadReport:
    """Read a weights file or run directory (`read_state_dict`) and load it into `model` (`fit_state_dict`)."""
    state, _ = read_state_dict(path)
    return fit_state_dict(model, state, str(resolve_weights_path(path)), what, strict)


def _some(names: list[str], count: int = 3) -> str:
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:160] if lines else ""


__all__ = ["LoadReport", "load_weights", "read_state_dict", "fit_state_dict", "match_names", "extract_state_dict",
           "non_finite_tensor", "resolve_weights_path", "WEIGHT_FILES", "RUN_WEIGHT_FILES"]
