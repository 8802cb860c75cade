"""Configs to runs: build data, models and the Distiller, train, export, evaluate.

Resuming (`train_run(..., resume=True)`) first compares the config with the one the run directory holds
(``config.yaml``, written when the run started): any change that alters what is computed is refused with
the changed keys in one line; only the keys in `RESUMABLE` may change, each with a note of what that means
(more epochs: the learning-rate schedule is recomputed).  Then the checkpoint is read and checked against
the models and methods just built (every tensor's name and shape).  Nothing in the run directory is
written before both checks pass.  Every start deletes the temporary files a killed write left behind.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from .config import (DataConfig, ModelConfig, RunConfig, TeacherConfig, from_dict, read_yaml, save_config, to_dict,
                     validate_data)
from .data import DataSplits, build_dataset, input_example, labels_of, withhold_labels
from .distiller import Distiller
from .errors import CheckpointError, ConfigError
from .methods import create_method
from .models import create_model
from .models.inherit import inherit_weights
from .models.weights import LoadReport, fit_state_dict, read_state_dict, resolve_weights_path
from .models.weights import WEIGHT_FILES  # noqa: F401  (kdzoo.analysis imports it from here)
from .models.weights import load_weights as load_model_weights
from .train import FitResult, evaluate, fit, load_checkpoint
from .train.checkpoint import remove_stale_files
from .registry import METHODS, check_value
from .runtime import atomic_write, resolve_device, seed_everything
from .train.trainer import CHECKPOINT, RUN_CONFIG, Callback, Distillable

# Config keys a resumed run may change, and what the change means.  Anything else alters the result.
RESUMABLE = {
    "train.epochs": "the learning-rate schedule is recomputed for the new length",
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


def build_data(cfg: DataConfig) -> DataSplits:
    data = build_dataset(cfg.name, **cfg.options)
    if cfg.labelled_fraction < 1 or cfg.held_out_fraction > 0:
        data = withhold_labels(data, cfg.labelled_fraction, cfg.held_out_fraction, cfg.label_seed)
    return data


def build_model(cfg: ModelConfig, data: DataSplits, where: str = "model") -> nn.Module:
    try:
        model = create_model(cfg.name, num_classes=data.num_classes, in_channels=data.in_channels,
                             pretrained=cfg.pretrained, **cfg.options)
    except (ConfigError, CheckpointError) as err:  # CheckpointError: pretrained weights that did not download
        raise type(err)(f"{where}: {err}") from None
    except TypeError as err:  # a torchvision/timm builder refusing an option: options are not checked ahead
        raise ConfigError(f"{where}.options ({cfg.name}): {err}") from None
    if cfg.weights:
        load_weights(model, cfg.weights, f"{where}.weights")
    return model


def weights_file(path: str | Path) -> Path:
    """A run directory resolves to its exported weights (or its checkpoint)."""
    return resolve_weights_path(path)


def read_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A model state dict (and its kdzoo metadata) from any weights file or run directory
    (`kdzoo.models.weights.read_state_dict`)."""
    return read_state_dict(path)


def check_state_fits(module: nn.Module, state: dict[str, Any], source: str, what: str) -> None:
    """Refuse a state dict whose tensor names or shapes differ from `module`'s, naming the first difference."""
    expected = module.state_dict()
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: holds no {what} state")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: does not fit the {what} {type(module).__name__} (another architecture?): {len(missing)} "
            f"tensors missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}")
    for key, tensor in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{source}: does not fit the {what} {type(module).__name__} (another architecture "
                                  f"or width?): {key} is {shape} in the file, {tuple(tensor.shape)} in the model")


def load_weights(model: nn.Module, path: str | Path, where: str = "") -> LoadReport:
    """Load any weights file or run directory into `model` (`kdzoo.models.weights.load_weights`: prefixes
    matched, a shape that differs refused); `where` names the config key in errors and in the one-line report
    printed when names had to be matched or some were found on one side only."""
    prefix = f"{where}: " if where else ""
    try:
        report = load_model_weights(model, path)
    except (CheckpointError, ConfigError) as err:
        raise type(err)(f"{prefix}{err}") from None
    if not report.exact:
        print(f"{prefix}{report.summary()}")
    return report


def run_dir_path(output_dir: str, name: str, run_dir: Optional[str] = None) -> Path:
    """The run directory a start uses: `run_dir` when given, else OUTPUT_DIR/NAME."""
    return Path(run_dir) if run_dir else Path(output_dir) / name


@contextmanager
def removed_if_failed(path: Path) -> Iterator[None]:
    """Around a start that uses the run directory `path`: when it fails and the directory holds nothing worth
    keeping (no checkpoint or weights, its own or an earlier run's being resumed), remove what the start wrote
    there (its config.yaml, an empty metrics.csv, ...) and the folders it created, so a typo leaves no empty run
    folder behind.  Entries that were there before the start are never touched, nor is anything on other
    processes of a torchrun job than rank 0."""
    created = [p for p in (path, *path.parents) if not p.exists()]
    before = set(path.iterdir()) if path.is_dir() else set()
    try:
        yield
    except BaseException:
        if is_main_process() and path.is_dir():
            if not holds_run(path) and not any(path.rglob("*.safetensors")):
                for entry in (p for p in path.iterdir() if p not in before):
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                for folder in created:  # deepest first; stops at the first that holds anything
                    try:
                        folder.rmdir()
                    except OSError:
                        break
        raise


def prepare_run_dir(output_dir: str, name: str, resume: bool, run_dir: Optional[str] = None) -> Path:
    path = run_dir_path(output_dir, name, run_dir)
    if not resume and holds_run(path):
        raise ConfigError(f"{path} already holds a run: pass --resume to continue it, or set name=... for a new one")
    if resume and not holds_run(path):
        raise ConfigError(f"--resume: no {CHECKPOINT} in {path} (nothing to continue)")
    path.mkdir(parents=True, exist_ok=True)
    if is_main_process():  # under torchrun rank 0 alone writes, and alone cleans
        remove_stale_files(path)
    return path




def model_meta(cfg: ModelConfig, data: DataSplits, data_cfg: DataConfig) -> dict:
    return {"model": cfg.name, "options": cfg.options, "num_classes": data.num_classes,
            "in_channels": data.in_channels, "data": {"name": data_cfg.name, "options": data_cfg.options}}


def build_methods(cfg: RunConfig) -> list:
    methods = []
    for i, method in enumerate(cfg.methods):
        try:
            methods.append(create_method(method.name, **method.options))
        except ConfigError as err:
            raise ConfigError(f"methods[{i}] ({method.name}): {err}") from None
        methods[-1].teacher_name = method.teacher  # which named teacher it reads (None: the first)
    return methods


def name_method_key(err: ConfigError, cfg: RunConfig) -> ConfigError:
    """A layer error from the Distiller ("no module 'layer9' in TinyCNN") prefixed with the method option that
    names the layer (``methods[1].student_layer (fitnet): ...``), when one does."""
    message = str(err)
    match = re.search(r"(?:no module|tap) '([^']+)'", message)
    if not match:
        return err
    layer = match.group(1)
    for i, method in enumerate(cfg.methods):
        options = {**METHODS.get(method.name).defaults, **method.options}
        for key, value in options.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, str) and layer in (v, v.rsplit(":", 1)[0]) for v in values):
                return ConfigError(f"methods[{i}].{key} ({method.name}): {message}")
    return err


def build_distiller(cfg: RunConfig, data: DataSplits, run_dir: Optional[Path] = None,
                    teacher: Optional[nn.Module] = None) -> Distiller:
    """`teacher`: an already built teacher to use instead of building cfg.teacher (students trained together
    by `fit_many` must share one teacher module)."""
    student = build_model(cfg.student, data, "student")
    if cfg.teacher is None:
        teacher = None
    elif teacher is None:
        teacher = build_model(cfg.teacher, data, "teacher")
    if cfg.teacher and not cfg.teacher.weights and not cfg.teacher.pretrained:
        print("warning: the teacher has no weights (teacher.weights); it is randomly initialised")
    if cfg.student.init_from == "teacher":
        if teacher is None:
            raise ConfigError("student.init_from: teacher needs a 'teacher:' section to inherit from")
        print(f"student initialised from the teacher: {inherit_weights(student, teacher).summary()}")
    teachers = {}
    for name, section in cfg.teachers.items():
        if not section.weights:
            print(f"warning: teachers.{name} has no weights; it is randomly initialised")
        teachers[name] = build_model(section, data, f"teachers.{name}")
    methods = build_methods(cfg)
    try:
        return Distiller(student, teacher, methods, example_input=input_example(data), ce_weight=cfg.ce_weight,
                         num_samples=len(data.train), train_labels=labels_of(data.train), train_data=data.train,
                         cache_dir=run_dir, teachers=teachers, held_out_data=data.held_out)
    except ConfigError as err:
        raise name_method_key(err, cfg) from None


def train_run(cfg: RunConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> FitResult:
    if cfg.stages:
        return train_stages(cfg, run_dir, resume, verbose)
    if cfg.peers or cfg.rounds > 1:  # students teaching each other, or a student retrained in rounds
        from .peer_runs import train_peers
        from .rounds import train_rounds

        return (train_peers if cfg.peers else train_rounds)(cfg, run_dir, resume=resume, verbose=verbose)
    return run_distiller(cfg, run_dir, build_distiller, resume=resume, verbose=verbose)


def run_distiller(cfg: RunConfig, run_dir: Path, build: Callable[[RunConfig, DataSplits, Path], Distillable],
                  resume: bool = False, verbose: bool = True, data: Optional[DataSplits] = None,
                  callbacks: Optional[Sequence[Callback]] = None) -> FitResult:
    """One run of what `build(cfg, data, run_dir)` returns: the checks before resuming, initial weights from the
    seed alone, the config saved, `fit`.  `data`: splits the caller built (a round holding samples out);
    `callbacks`: in place of `fit`'s default ones."""
    notes = verify_resume_config(cfg, run_dir) if resume else []
    data = data if data is not None else build_data(cfg.data)
    seed_everything(cfg.train.seed)  # initial weights depend on the seed alone
    distiller = build(cfg, data, run_dir)
    if resume:
        verify_checkpoint(run_dir, {"student": distiller.student, "methods": distiller.methods}, cfg.train.epochs)
    _report_changes(notes, verbose)
    if is_main_process():  # under torchrun rank 0 alone writes
        save_config(cfg, run_dir / RUN_CONFIG)
        if isinstance(distiller, Distiller):  # students trained as peers have no teacher's layers to show
            from .plan import write_plan  # what each method compares, before the first step
            write_plan(distiller, data.test, run_dir, cfg.train.device, cfg.student.name,
                       cfg.teacher.name if cfg.teacher else None, verbose)
        teacher_top1 = teacher_run_accuracy(cfg)
        if teacher_top1 is not None and not resume:  # curves.png draws it as the reference line
            record_summary(run_dir, teacher_top1=teacher_top1)
    return fit(distiller, data, cfg.train, run_dir, resume=resume,
               export_meta=model_meta(cfg.student, data, cfg.data), verbose=verbose, callbacks=callbacks)


# ---------------------------------------------------------------- staged runs (RunConfig.stages)

STAGES_DIR = "stages"


def stage_dir(run_dir: Path, index: int, name: str) -> Path:
    """Where stage `index` of a staged run keeps its checkpoint, config, metrics and weights."""
    return Path(run_dir) / STAGES_DIR / f"{index}-{name}"


def holds_run(path: Path) -> bool:
    """Whether a run directory holds a checkpoint: its own, or one of its parts' (stages, rounds)."""
    path = Path(path)
    return (path / CHECKPOINT).is_file() or any(path.glob(f"*/{CHECKPOINT}")) or any(path.glob(f"*/*/{CHECKPOINT}"))


def train_stages(cfg: RunConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> FitResult:
    """Run the stages in order, each a plain run in its own folder whose student starts from the previous
    stage's exported weights; the last stage's weights are copied to the run directory.  With `resume` a stage
    that has a checkpoint continues from it (a finished one only re-exports), the others start afresh."""
    notes = verify_resume_config(cfg, run_dir) if resume else []
    _report_changes(notes, verbose)
    if is_main_process():
        save_config(cfg, run_dir / RUN_CONFIG)
    weights, result = cfg.student.weights, None
    for i, stage in enumerate(cfg.stages):
        folder = stage_dir(run_dir, i, stage.name)
        folder.mkdir(parents=True, exist_ok=True)
        if verbose:
            print(f"stage {i + 1}/{len(cfg.stages)}: {stage.name} ({folder})")
        stage_cfg = cfg.stage_config(i, weights if i else None)
        result = train_run(stage_cfg, folder, resume=resume and (folder / CHECKPOINT).is_file(), verbose=verbose)
        weights = str(folder / "student.safetensors")
    if is_main_process():  # the run directory's weights are the last stage's student
        import shutil

        atomic_write(run_dir / "student.safetensors", lambda tmp: shutil.copyfile(weights, tmp))
    result.run_dir = run_dir
    return result


def teacher_run_accuracy(cfg: RunConfig) -> Optional[float]:
    """The teacher's test top-1 when ``teacher.weights`` is (a file of) a kdzoo run directory whose
    summary.json reports it, on the same dataset as this run; else None."""
    if cfg.teacher is None or not cfg.teacher.weights:
        return None
    path = Path(cfg.teacher.weights)
    folder = path if path.is_dir() else path.parent
    try:
        summary = json.loads((folder / "summary.json").read_text())
        data = read_yaml(folder / RUN_CONFIG).get("data", {})
    except (OSError, ValueError, ConfigError):
        return None
    top1 = summary.get("last_top1") if isinstance(summary, dict) else None
    where_only = ("root", "cache_dir", "download")  # where the data is read from, not what it is

    def same_data(section: Any) -> tuple:
        if not isinstance(section, dict) or not isinstance(section.get("options", {}), dict):
            return (None,)
        return section.get("name"), {k: v for k, v in section.get("options", {}).items() if k not in where_only}

    if not isinstance(top1, (int, float)) or same_data(data) != same_data(to_dict(cfg.data)):
        return None
    return float(top1)


def record_summary(run_dir: Path, **facts: Any) -> None:
    """Add facts known before training (the teacher's accuracy) to the run's summary.json; the trainer keeps
    them when it writes the final summary."""
    from .train.trainer import read_summary

    text = json.dumps({**read_summary(run_dir), **facts}, indent=2)
    atomic_write(run_dir / "summary.json", lambda tmp: tmp.write_text(text))


def teacher_run(cfg: TeacherConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> FitResult:
    notes = verify_resume_config(cfg, run_dir) if resume else []
    data = build_data(cfg.data)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, data)
    distiller = Distiller(model)
    if resume:
        verify_checkpoint(run_dir, {"student": model, "methods": distiller.methods}, cfg.train.epochs)
    _report_changes(notes, verbose)
    if is_main_process():  # under torchrun rank 0 alone writes
        save_config(cfg, run_dir / RUN_CONFIG)
    result = fit(distiller, data, cfg.train, run_dir, resume=resume,
                 export_meta=model_meta(cfg.model, data, cfg.data), verbose=verbose)
    # A teacher run's weights are the model itself: name them so `teacher.weights: RUN_DIR` reads clearly.
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 wrote them
        (run_dir / "student.safetensors").replace(run_dir / "model.safetensors")
    return result


def evaluate_target(target: str | Path, overrides: list[str] = (), device: str = "auto") -> dict:
    """Evaluate a run directory, an exported .safetensors, a checkpoint or any state-dict file on its dataset's
    test split.  ``model.*`` overrides name or change the model (a plain .pth records none), the others the
    data section."""
    from .config import apply_overrides

    target = Path(target)
    model_overrides = [item for item in overrides if item.startswith("model.")]
    data_overrides = [item for item in overrides if not item.startswith("model.")]
    run_config = target / RUN_CONFIG if target.is_dir() else target.parent / RUN_CONFIG
    state, meta = read_state(target)
    if meta and "class" not in meta:  # exported from a config; fit() alone records only the model's class
        if not isinstance(meta.get("model"), str) or not isinstance(meta.get("data"), dict):
            raise CheckpointError(f"{target}: its kdzoo metadata names no model and dataset (not an exported model; "
                                  "a synthetic set is evaluated by kdzoo condense)")
        model_dict, data_dict = {"name": meta["model"], "options": meta.get("options", {})}, meta["data"]
    elif run_config.is_file():
        raw = read_yaml(run_config)
        model_dict, data_dict = raw.get("student") or raw.get("model"), raw.get("data", {})
        if not isinstance(model_dict, dict):
            raise ConfigError(f"{run_config}: names no student or model")
    elif model_overrides and any(item.startswith("data.name=") for item in data_overrides):
        model_dict, data_dict = {}, {}
    else:
        raise ConfigError(f"{target}: cannot tell which model this is (no kdzoo metadata, no config.yaml beside it); "
                          f"name it: kdzoo eval {target} model.name=tv:resnet18 data.name=imagefolder ...")
    model_dict = apply_overrides({"model": dict(model_dict)}, model_overrides)["model"]
    model_cfg = from_dict(ModelConfig, model_dict, "model")
    data_cfg = from_dict(DataConfig, apply_overrides({"data": dict(data_dict)}, data_overrides)["data"], "data")
    validate_data(data_cfg)
    data = build_data(data_cfg)
    model = build_model(ModelConfig(model_cfg.name, None, model_cfg.options), data)
    report = fit_state_dict(model, state, str(weights_file(target)))
    if not report.exact:
        print(report.summary())
    model.to(resolve_device(device))
    metrics = evaluate(model, data.test)
    return {"target": str(target), "model": model_cfg.name, "dataset": data_cfg.name, **metrics}


# ---------------------------------------------------------------- resume: verify before writing anything


def flat_config(config: Any) -> dict[str, Any]:
    """A config as ``{"train.lr": 0.05, "methods[0].temperature": 4.0, ...}`` with every registered option's
    default filled in, so writing a default out or leaving it implicit compares equal."""
    from .data.datasets import DATASETS
    from .models import EXTERNAL_PREFIXES, MODELS

    data = to_dict(config)
    for key in ("student", "teacher", "model"):
        section = data.get(key)
        if isinstance(section, dict) and not section["name"].startswith(EXTERNAL_PREFIXES) and section["name"] in MODELS:
            section["options"] = {**MODELS.get(section["name"]).defaults, **section["options"]}
    if data["data"]["name"] in DATASETS:
        data["data"]["options"] = {**DATASETS.get(data["data"]["name"]).defaults, **data["data"]["options"]}
    for method in data.get("methods", []):
        if method["name"] in METHODS:
            method.update({**METHODS.get(method["name"]).defaults, **method})
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
    return [f"{k} {_show(before.get(k, _ABSENT))} -> {_show(after.get(k, _ABSENT))}: {RESUMABLE[k]}" for k in changed]


def verify_checkpoint(run_dir: Path, modules: dict[str, nn.Module], epochs: int) -> None:
    """The run's checkpoint can be read and every saved state fits the module built for it.  Reads only."""
    path = run_dir / CHECKPOINT
    state = load_checkpoint(path)
    for key in ("student", "methods", "optimizer", "epoch", "step", "rng"):
        if key not in state:
            raise CheckpointError(f"{path}: not a training checkpoint (no {key!r} entry; written by another "
                                  "kdzoo command?)")
    for key, module in modules.items():
        check_state_fits(module, state[key], str(path), "student" if key == "student" else "methods' adapters")
    if not isinstance(state["epoch"], int) or state["epoch"] > epochs:
        raise ConfigError(f"--resume: train.epochs={epochs} but {path} is at epoch {state['epoch']}; "
                          f"give train.epochs >= {state['epoch']}")


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _report_changes(notes: list[str], verbose: bool) -> None:
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
