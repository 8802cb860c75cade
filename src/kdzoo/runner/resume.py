"""Before a run continues (`--resume`): its config against the one the run directory holds, its input files
(teacher weights and folders, corpora, dataset folders: every path the config names) against the fingerprints
recorded at its start, and its checkpoint against the models just built.  All only read: nothing in the run
directory is written before they pass.

Any change that alters what is computed is refused with the changed keys in one line; only the keys in
`RESUMABLE` may change, each with a note of what that means (more epochs or steps: the learning-rate schedule
is recomputed).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..config import from_dict, read_yaml, save_config, to_dict
from ..data.datasets import DATASETS
from ..engine.checkpoint import check_state_fits, load_checkpoint
from ..engine.inputs import INPUTS, changed_inputs, record_inputs
from ..engine.rundir import CHECKPOINT, RUN_CONFIG
from ..errors import CheckpointError, ConfigError
from ..methods import METHODS
from ..models import EXTERNAL_PREFIXES, MODELS
from ..registry import LM_LOSSES

# Config keys a resumed run may change, and what the change means.  Anything else alters the result.
RESUMABLE = {
    "train.epochs": "the learning-rate schedule is recomputed for the new length",
    "train.steps": "the learning-rate schedule is recomputed for the new length",
    "train.save_every": "checkpoints are written at the new interval",
    "train.eval_every": "the test set is evaluated at the new interval",
    "train.log_every": "progress is shown at the new interval",
    "train.progress": "progress bars only",
    "train.device": "the run continues on another device; results may differ in the last bits",
    "output_dir": "where the run directory is",
    "name": "where the run directory is",
    "data.options.root": "where the data is read from",
    "data.options.cache_dir": "where decoded data is cached",
    "data.options.download": "whether missing data is downloaded",
}


def flat_config(config: Any) -> dict[str, Any]:
    """A config as ``{"train.lr": 0.05, "methods[0].temperature": 4.0, ...}`` with every registered option's
    default filled in, so writing a default out or leaving it implicit compares equal."""
    data = to_dict(config)
    for key in ("student", "teacher", "model"):
        section = data.get(key)
        name = section.get("name") if isinstance(section, dict) else None
        if isinstance(name, str) and not name.startswith(EXTERNAL_PREFIXES) and name in MODELS:
            section["options"] = {**MODELS.get(name).defaults, **section["options"]}
    section = data.get("data") or {}  # a diffusion distill config leaves `data` unset (None) for a kdzoo teacher
    if isinstance(section.get("name"), str) and section["name"] in DATASETS:
        section["options"] = {**DATASETS.get(section["name"]).defaults, **section["options"]}
    for key, registry in (("methods", METHODS), ("losses", LM_LOSSES)):
        for entry in data.get(key, []):
            if entry["name"] in registry:
                entry.update({**registry.get(entry["name"]).defaults, **entry})
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, v in enumerate(value):
                walk(f"{prefix}[{i}]", v)
        else:
            flat[prefix] = value

    walk("", data)
    return flat


def verify_resume_config(cfg: Any, run_dir: Path) -> list[str]:
    """Compare `cfg` with the run directory's config.yaml; refuse changes that alter the result (one line
    listing them), return notes on the allowed ones.  Reads only."""
    path = run_dir / RUN_CONFIG
    if not path.is_file():
        raise ConfigError(f"--resume: {path} is missing, so the run's config cannot be compared; start a new run")
    try:
        saved = from_dict(type(cfg), read_yaml(path))
    except ConfigError as err:
        raise ConfigError(f"--resume: the run's {path} cannot be read ({err})") from None
    try:
        saved.validate()  # converts option values ("1e-3" -> 0.001) as the new config's were
    except ConfigError:
        pass  # a value today's checks refuse: compared as it was written
    before, after = flat_config(saved), flat_config(cfg)
    changed = [k for k in dict.fromkeys([*before, *after]) if before.get(k, _ABSENT) != after.get(k, _ABSENT)]
    refused = [k for k in changed if k not in RESUMABLE]
    if refused:
        diff = ", ".join(f"{k} {_show(before.get(k, _ABSENT))} -> {_show(after.get(k, _ABSENT))}" for k in refused)
        raise ConfigError(f"--resume: the config differs from the run's {path} in what it computes ({diff}); "
                          "undo the change, or start a new run with name=... or --run-dir")
    replaced = changed_inputs(run_dir, input_paths(cfg))
    if replaced:
        raise ConfigError(f"--resume: {replaced[0]} since the run started (recorded in {run_dir / INPUTS}); "
                          "restore it, or start a new run with name=... or --run-dir")
    return [f"{k} {_show(before.get(k, _ABSENT))} -> {_show(after.get(k, _ABSENT))}: {RESUMABLE[k]}" for k in changed]


# Paths in a config that are where a run writes, not what it reads; and a continual step's `start`, the previous
# step's export, which the same run writes again when it is resumed.
NOT_INPUTS = ("output_dir", "name", "start")


def input_paths(cfg: Any) -> dict[str, Path]:
    """Every config value that names an existing file or folder (teacher weights, a teacher run, a corpus, a
    dataset root...), by its flat key."""
    paths = {}
    for key, value in flat_config(cfg).items():
        if key in NOT_INPUTS or key.endswith("cache_dir") or not isinstance(value, str) or not value:
            continue
        try:
            path = Path(value).expanduser()
            if path.exists():
                paths[key] = path
        except (OSError, ValueError):  # a name too long to be a path, or with a NUL byte
            continue
    return paths


def record_run_config(cfg: Any, run_dir: Path, resume: bool) -> None:
    """At a start: the resolved config in ``config.yaml`` and, for a new run (or one that recorded none), its
    inputs' fingerprints in ``inputs.json`` (what a resume compares)."""
    save_config(cfg, run_dir / RUN_CONFIG)
    if not resume or not (run_dir / INPUTS).is_file():
        record_inputs(run_dir, input_paths(cfg))


def verify_checkpoint(run_dir: Path, modules: dict[str, nn.Module], epochs: int) -> None:
    """The run's checkpoint can be read and every saved state fits the module built for it.  Reads only."""
    path = run_dir / CHECKPOINT
    state = load_checkpoint(path)
    for key in (*modules, "optimizer", "epoch", "step", "rng"):
        if key not in state:
            raise CheckpointError(f"{path}: not a training checkpoint (no {key!r} entry; written by another "
                                  "kdzoo command?)")
    for key, module in modules.items():
        check_state_fits(module, state[key], str(path), "student" if key == "student" else "methods' adapters")
    if not isinstance(state["epoch"], int) or state["epoch"] > epochs:
        raise ConfigError(f"--resume: train.epochs={epochs} but {path} is at epoch {state['epoch']}; "
                          f"give train.epochs >= {state['epoch']}")


def report_changes(notes: list[str], verbose: bool) -> None:
    if verbose:
        for note in notes:
            print(f"resume: {note}")


class _Absent:
    def __repr__(self) -> str:
        return "(unset)"


_ABSENT = _Absent()


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


__all__ = ["RESUMABLE", "flat_config", "verify_resume_config", "verify_checkpoint", "report_changes", "input_paths",
           "record_run_config"]
