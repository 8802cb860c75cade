"""A benchmark grid as plain YAML, expanded into cells (one training run each) and the teachers they need.

A spec (``kdzoo bench --config FILE`` or a preset, see `presets.py`)::

    name: quick
    kind: distillation            # or condensation
    dataset: digits               # which published table to print beside ours (default: data.name)
    seeds: [0, 1, 2]
    methods:                      # label -> a `kdzoo train` methods list ([] = the student alone)
      student: []
      kd: [kd]
      fitnet: [{name: fitnet, weight: 100}]
    pairs:
      - teacher: {name: "tiny:cnn", options: {width: 32}}
        student: {name: "tiny:cnn", options: {width: 8}}
      # or a directory of recipes, one `<method>.yaml` per label (configs/cifar100/<pair>/), and the
      # teacher's own recipe; `methods` is then a list of file stems
      - {recipes: configs/cifar100/resnet56-resnet20, teacher_recipe: configs/cifar100/teachers/resnet56.yaml}
    data: {name: digits}          # merged over each recipe's data section
    train: {epochs: 30}           # merged over each recipe's train section (milestones scale with epochs)
    teacher_train: {epochs: 12}   # merged over the teachers' train section
    student_subset: 0.1           # students learn from this share of the training split (fixed draw)
    output_dir: runs/bench/quick

``kind: condensation`` grids dataset-distillation methods over ``ipc: [1, 10, 50]`` instead of pairs;
``methods`` then maps a label to the condenser's options, ``evaluation`` holds the evaluation's.

Every cell is a complete `RunConfig`, saved as ``config.yaml`` in its run directory, so any cell can be
re-run alone with ``kdzoo train OUT/<pair>/<method>/seed<k>/config.yaml``.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..config import RunConfig, TeacherConfig, apply_overrides, from_dict, read_yaml, to_dict
from ..engine.rundir import RUN_CONFIG
from ..errors import CheckpointError, ConfigError
from ..models.weights import resolve_weights_path
from ..runner.resume import RESUMABLE, flat_config

KINDS = ("distillation", "condensation")
FINGERPRINT = "fingerprint.json"  # in a bench teacher's run directory: the settings it was trained with
# Keys that say where and how visibly a teacher ran, not what it learned (a resumed run may change them too);
# the epochs and steps do change a finished teacher.
NOT_SETTINGS = frozenset(k for k in RESUMABLE if k not in ("train.epochs", "train.steps")) | {"train.num_workers"}


@dataclass
class BenchSpec:
    name: str = "bench"
    kind: str = "distillation"
    dataset: Optional[str] = None
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: Any = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    ipc: list[int] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    teacher_train: dict[str, Any] = field(default_factory=dict)
    student_subset: float = 1.0
    evaluation: dict[str, Any] = field(default_factory=dict)
    checkpoint_every: int = 100  # condensation iterations between checkpoints
    output_dir: Optional[str] = None

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"bench kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        if not self.seeds:
            raise ConfigError("bench seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"bench seeds: {self.seeds} repeats a seed")
        if not self.methods:
            raise ConfigError("bench methods: give at least one method")
        if not isinstance(self.methods, (list, dict)):
            raise ConfigError("bench methods: expected a list of names or a mapping label -> methods")
        if not 0 < self.student_subset <= 1:
            raise ConfigError(f"bench student_subset: must be in (0, 1], got {self.student_subset}")
        if self.kind == "distillation" and not self.pairs:
            raise ConfigError("bench pairs: a distillation grid needs at least one teacher/student pair")
        if self.kind == "condensation" and not self.ipc:
            raise ConfigError("bench ipc: a condensation grid needs a list of images per class, e.g. [1, 10]")

    @property
    def table_dataset(self) -> str:
        return self.dataset or self.data.get("name", "")


def load_spec(raw: dict, overrides: list[str] = (), source: str = "bench config") -> BenchSpec:
    """A validated spec from plain data; ``key=value`` overrides apply to the spec (``train.epochs=5``)."""
    raw = apply_overrides(copy.deepcopy(raw), list(overrides))
    try:
        spec = from_dict(BenchSpec, raw)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    spec.validate()
    return spec


@dataclass
class TeacherJob:
    """A teacher to train first (or to load: `trained` when its weights already exist elsewhere)."""

    label: str
    config: Optional[TeacherConfig]
    run_dir: Path
    trained: bool = False
    note: Optional[str] = None  # why given weights were not used (printed when the teacher is trained)

    @property
    def settings(self) -> dict[str, Any]:
        return teacher_settings(self.config) if self.config is not None else {}


@dataclass
class Cell:
    pair: str  # "resnet56-resnet20" (distillation) or "ipc10" (condensation)
    method: str
    seed: int
    run_dir: Path
    config: Optional[RunConfig] = None  # distillation
    teacher: Optional[str] = None  # TeacherJob label
    teacher_name: Optional[str] = None  # model labels: "resnet56", "cnn_width8" (see `model_label`)
    student_name: Optional[str] = None
    condense: Optional[dict] = None  # condensation: method, ipc, options, evaluation

    @property
    def key(self) -> str:
        return f"{self.pair}/{self.method}/seed{self.seed}"


def _merge(base: dict, update: dict) -> dict:
    """Recursive dict merge (update wins); lists and scalars are replaced."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _train_section(recipe: dict, update: dict) -> dict:
    """Merge `update` over a recipe's train section; when it changes the epochs but not the milestones, the
    milestones keep their place in the schedule (150/180/210 of 240 -> 19/22/26 of 30)."""
    merged = _merge(recipe, update)
    old_epochs, new_epochs = recipe.get("epochs"), update.get("epochs")
    if new_epochs and old_epochs and "milestones" not in update and recipe.get("milestones"):
        merged["milestones"] = [max(1, round(m * new_epochs / old_epochs)) for m in recipe["milestones"]]
    return merged


def model_label(model: dict) -> str:
    """``{name: "cifar:resnet20"}`` -> ``resnet20``; options become part of it (``cnn_width8``)."""
    label = str(model.get("name", "")).split(":")[-1]
    for key, value in sorted((model.get("options") or {}).items()):
        label += f"_{key}{value}"
    return label


def pair_name(pair: dict) -> str:
    """A pair's label: its `name`, its recipe folder's name, or teacher-student model labels."""
    if pair.get("name"):
        return str(pair["name"])
    if "recipes" in pair:
        return Path(pair["recipes"]).name
    if isinstance(pair.get("teacher"), dict) and isinstance(pair.get("student"), dict):
        return f"{model_label(pair['teacher'])}-{model_label(pair['student'])}"
    return ""


def select(spec: BenchSpec, pairs: Optional[list[str]] = None, methods: Optional[list[str]] = None) -> BenchSpec:
    """The spec restricted to some pairs (labels) and methods (labels); unknown ones are a `ConfigError`."""
    if pairs:
        known = [pair_name(p) for p in spec.pairs] if spec.kind == "distillation" else [f"ipc{i}" for i in spec.ipc]
        unknown = [p for p in pairs if p not in known]
        if unknown:
            raise ConfigError(f"--pairs: no pair {unknown[0]!r} in {spec.name} (pairs: {', '.join(known)})")
        if spec.kind == "distillation":
            spec.pairs = [p for p in spec.pairs if pair_name(p) in pairs]
        else:
            spec.ipc = [i for i in spec.ipc if f"ipc{i}" in pairs]
    if methods:
        known = list(spec.methods)
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise ConfigError(f"--methods: no method {unknown[0]!r} in {spec.name} (methods: {', '.join(known)})")
        spec.methods = ([m for m in spec.methods if m in methods] if isinstance(spec.methods, list)
                        else {k: v for k, v in spec.methods.items() if k in methods})
    spec.validate()
    return spec


def _method_entries(spec: BenchSpec) -> dict[str, Any]:
    if isinstance(spec.methods, dict):
        return dict(spec.methods)
    return {name: ([] if name == "student" else [name]) for name in spec.methods}


def expand(spec: BenchSpec, out_dir: Path) -> tuple[list[TeacherJob], list[Cell]]:
    """The teachers and the cells of a spec, every config resolved and validated."""
    if spec.kind == "condensation":
        return [], _condensation_cells(spec, out_dir)
    teachers: dict[str, TeacherJob] = {}
    cells = []
    for index, pair in enumerate(spec.pairs):
        where = f"bench pairs[{index}]"
        recipes = _pair_recipes(spec, pair, where)
        teacher_model = next((r["teacher"] for r, _ in recipes.values() if r.get("teacher")),
                             next((t["model"] for _, t in recipes.values() if t), {}))
        student_model = next(iter(recipes.values()))[0]["student"]
        pair_label = pair_name(pair) or f"{model_label(teacher_model)}-{model_label(student_model)}"
        for label, (raw, teacher_raw) in recipes.items():
            cfg_where = f"{where} ({label})"
            raw = copy.deepcopy(raw)
            raw.pop("output_dir", None), raw.pop("name", None)
            job = None
            if raw.get("teacher"):
                job = _teacher_job(raw["teacher"], teacher_raw, out_dir, teachers, cfg_where,
                                   check_given="teacher_recipe" in pair)
                raw["teacher"] = dict(raw["teacher"], weights=str(job.run_dir) if not job.trained
                                      else raw["teacher"]["weights"])
            for seed in spec.seeds:
                cell_raw = copy.deepcopy(raw)
                cell_raw.setdefault("train", {})["seed"] = seed
                try:
                    config = from_dict(RunConfig, cell_raw)
                    config.validate()
                except ConfigError as err:
                    raise ConfigError(f"{cfg_where}: {err}") from None
                cells.append(Cell(pair_label, label, seed, out_dir / pair_label / label / f"seed{seed}", config,
                                  job.label if job else None, model_label(teacher_model), model_label(raw["student"])))
    keys = [c.key for c in cells]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ConfigError(f"bench: two cells share a run directory ({duplicates[0]}); give the pairs a 'name'")
    return list(teachers.values()), cells


def _pair_recipes(spec: BenchSpec, pair: dict, where: str) -> dict[str, tuple[dict, Optional[dict]]]:
    """label -> (run config as plain data, the teacher's config as plain data or None)."""
    known = {"name", "recipes", "teacher_recipe", "teacher", "student", "methods", "train", "data"}
    unknown = sorted(set(pair) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(sorted(known))})")
    train_update = _merge(spec.train, pair.get("train") or {})
    data_update = _merge(spec.data, pair.get("data") or {})
    out = {}
    if "recipes" in pair:
        if not isinstance(spec.methods, list):
            raise ConfigError(f"{where}: with recipes, 'methods' is a list of recipe names (file stems)")
        folder = Path(pair["recipes"])
        if not folder.is_dir():
            raise ConfigError(f"{where}: no recipe directory {folder} (run from the kdzoo repository root, "
                              "where configs/ lives, or pass --configs DIR)")
        teacher_recipe = read_yaml(pair["teacher_recipe"]) if pair.get("teacher_recipe") else None
        for label in spec.methods:
            raw = read_yaml(folder / f"{label}.yaml")
            out[label] = _with_sections(raw, data_update, train_update, teacher_recipe, spec)
        return out
    for role in ("teacher", "student"):
        if not isinstance(pair.get(role), dict):
            raise ConfigError(f"{where}: give 'recipes' or both 'teacher' and 'student' as model mappings")
    entries = _merge(_method_entries(spec), pair.get("methods") or {})
    for label, methods in entries.items():
        raw = {"student": pair["student"], "methods": methods, "data": spec.data, "train": {}}
        if methods:
            raw["teacher"] = {k: v for k, v in pair["teacher"].items()}
        teacher_raw = {"model": {k: v for k, v in pair["teacher"].items() if k != "weights"}, "data": spec.data,
                       "train": {}}
        out[label] = _with_sections(raw, data_update, train_update, teacher_raw, spec)
    return out


def _with_sections(raw: dict, data_update: dict, train_update: dict, teacher_raw: Optional[dict],
                   spec: BenchSpec) -> tuple[dict, Optional[dict]]:
    raw = dict(raw, data=_merge(raw.get("data") or {}, data_update),
               train=_train_section(raw.get("train") or {}, train_update))
    if raw.get("teacher") and teacher_raw is None:  # no teacher recipe: the student's data and recipe
        teacher_raw = {"model": {k: v for k, v in raw["teacher"].items() if k != "weights"}, "data": raw["data"],
                       "train": raw["train"]}
    elif teacher_raw is not None:
        teacher_raw = copy.deepcopy(teacher_raw)
        teacher_raw.pop("output_dir", None), teacher_raw.pop("name", None)
        teacher_raw["data"] = _merge(teacher_raw.get("data") or {}, data_update)
        teacher_raw["train"] = _train_section(_train_section(teacher_raw.get("train") or {}, train_update),
                                              spec.teacher_train)
    return raw, teacher_raw


def _teacher_job(teacher: dict, teacher_raw: Optional[dict], out_dir: Path, jobs: dict[str, TeacherJob],
                 where: str, check_given: bool) -> TeacherJob:
    """The teacher's weights if they exist (a trained recipe teacher; with `check_given`, only when their run
    recorded this teacher's settings), else a run under OUT/teachers/."""
    weights = teacher.get("weights")
    config = None
    if teacher_raw is not None:
        try:
            config = from_dict(TeacherConfig, teacher_raw)
            config.validate()
        except ConfigError as err:
            raise ConfigError(f"{where} teacher: {err}") from None
    note = None
    if weights:
        try:
            found = resolve_weights_path(weights)
        except CheckpointError:  # no weights there yet: the bench trains the teacher
            found = None
        # Weights a recipe points at (runs/cifar100/teachers/...) may have been trained with other settings
        # than this grid's teacher: they are used only when their recorded settings are the same.
        why_not = (settings_difference(recorded_settings(found.parent if found.is_file() else found),
                                       teacher_settings(config))
                   if found is not None and check_given and config is not None else None)
        if found is not None and why_not is None:
            label = f"{model_label(teacher)}@{weights}"
            return jobs.setdefault(label, TeacherJob(label, None, Path(weights), trained=True))
        if why_not is not None:
            note = f"not using the teacher in {weights}: {why_not}"
    if config is None:
        raise ConfigError(f"{where}: the teacher has no weights and no recipe to train it")
    label = model_label(teacher)
    text = yaml.safe_dump(to_dict(config), sort_keys=True)
    existing = jobs.get(label)
    if existing is not None and yaml.safe_dump(to_dict(existing.config), sort_keys=True) != text:
        label = f"{label}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"  # same model, another recipe
    job = jobs.setdefault(label, TeacherJob(label, config, out_dir / "teachers" / label))
    job.note = job.note or note
    return job


def teacher_settings(config: TeacherConfig) -> dict[str, Any]:
    """What a teacher learned from, flat (``{"train.lr": 0.05, ...}``, defaults filled in): its config without
    where it was written, where the data was read from or how visibly it ran."""
    return {k: v for k, v in flat_config(config).items() if k not in NOT_SETTINGS}


def fingerprint(settings: dict[str, Any]) -> str:
    """A short hash of a teacher's settings (`teacher_settings`)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recorded_settings(run_dir: Path) -> Optional[dict[str, Any]]:
    """The settings a teacher's run directory says it was trained with: the bench's ``fingerprint.json``, else
    the ``config.yaml`` every `kdzoo teacher` run writes; None when neither can be read."""
    try:
        return json.loads((Path(run_dir) / FINGERPRINT).read_text())["settings"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        return teacher_settings(from_dict(TeacherConfig, read_yaml(Path(run_dir) / RUN_CONFIG)))
    except (OSError, ConfigError):
        return None


def settings_difference(recorded: Optional[dict[str, Any]], wanted: dict[str, Any]) -> Optional[str]:
    """None when a teacher trained with `recorded` settings is the one `wanted` describes, else why not
    (the first keys that differ, old -> new)."""
    if recorded is None:
        return "there is no record of the settings it was trained with (no fingerprint.json or config.yaml)"
    if fingerprint(recorded) == fingerprint(wanted):
        return None
    missing = object()
    changed = [k for k in dict.fromkeys([*recorded, *wanted]) if recorded.get(k, missing) != wanted.get(k, missing)]
    shown = ", ".join(f"{k} {_show(recorded.get(k))} -> {_show(wanted.get(k))}" for k in changed[:3])
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    return f"it was trained with other settings ({shown}{more})"


def _show(value: Any) -> str:
    text = "(unset)" if value is None else str(value)
    return text if len(text) <= 30 else text[:27] + "..."


def _condensation_cells(spec: BenchSpec, out_dir: Path) -> list[Cell]:
    if not isinstance(spec.methods, (dict, list)):
        raise ConfigError("bench methods: a mapping label -> condenser options")
    methods = spec.methods if isinstance(spec.methods, dict) else {m: {} for m in spec.methods}
    dataset = spec.data.get("name")
    if not dataset:
        raise ConfigError("bench data.name: a condensation grid needs a dataset")
    cells = []
    for ipc in spec.ipc:
        for label, options in methods.items():
            options = dict(options or {})
            method = options.pop("method", label)
            for seed in spec.seeds:
                cells.append(Cell(f"ipc{ipc}", label, seed, out_dir / f"ipc{ipc}" / label / f"seed{seed}",
                                  condense={"method": method, "ipc": ipc, "options": options,
                                            "data": spec.data, "evaluation": dict(spec.evaluation),
                                            "checkpoint_every": spec.checkpoint_every}))
    return cells


__all__ = ["BenchSpec", "Cell", "TeacherJob", "load_spec", "expand", "select", "model_label", "pair_name",
           "teacher_settings", "fingerprint", "recorded_settings", "settings_difference", "FINGERPRINT"]
