"""Configs to runs: build data, models and the Distiller, train, export, evaluate."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .config import DataConfig, ModelConfig, RunConfig, TeacherConfig, read_yaml, from_dict, save_config
from .data import DataSplits, build_dataset, input_example, labels_of
from .distiller import Distiller
from .errors import CheckpointError, ConfigError
from .methods import create_method
from .models import create_model
from .train import FitResult, evaluate, fit, load_checkpoint, read_weights
from .runtime import resolve_device, seed_everything
from .train.trainer import CHECKPOINT

WEIGHT_FILES = ("model.safetensors", "student.safetensors")


def build_data(cfg: DataConfig) -> DataSplits:
    return build_dataset(cfg.name, **cfg.options)


def build_model(cfg: ModelConfig, data: DataSplits, where: str = "model") -> nn.Module:
    try:
        model = create_model(cfg.name, num_classes=data.num_classes, in_channels=data.in_channels, **cfg.options)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    if cfg.weights:
        load_weights(model, cfg.weights)
    return model


def weights_file(path: str | Path) -> Path:
    """A run directory resolves to its exported weights (or its checkpoint)."""
    path = Path(path)
    if path.is_dir():
        for name in WEIGHT_FILES + (CHECKPOINT,):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: no {', '.join(WEIGHT_FILES)} or {CHECKPOINT} in this directory")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or run directory")
    return path


def read_state(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """A model state dict from safetensors (with its metadata) or from a kdzoo checkpoint's student."""
    path = weights_file(path)
    if path.suffix == ".safetensors":
        return read_weights(path)
    return load_checkpoint(path)["student"], {}


def load_weights(model: nn.Module, path: str | Path) -> None:
    state, _ = read_state(path)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing, unexpected = result.missing_keys, result.unexpected_keys
        raise CheckpointError(
            f"{path}: weights do not fit {type(model).__name__} ({len(missing)} missing, e.g. "
            f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")


def prepare_run_dir(output_dir: str, name: str, resume: bool, run_dir: Optional[str] = None) -> Path:
    path = Path(run_dir) if run_dir else Path(output_dir) / name
    if not resume and (path / CHECKPOINT).exists():
        raise ConfigError(f"{path} already holds a run: pass --resume to continue it, or set name=... for a new one")
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_meta(cfg: ModelConfig, data: DataSplits, data_cfg: DataConfig) -> dict:
    return {"model": cfg.name, "options": cfg.options, "num_classes": data.num_classes,
            "in_channels": data.in_channels, "data": {"name": data_cfg.name, "options": data_cfg.options}}


def build_distiller(cfg: RunConfig, data: DataSplits, run_dir: Optional[Path] = None,
                    teacher: Optional[nn.Module] = None) -> Distiller:
    """`teacher`: an already built teacher to use instead of building cfg.teacher (students trained together
    by `fit_many` must share one teacher module)."""
    student = build_model(cfg.student, data, "student")
    if cfg.teacher is None:
        teacher = None
    elif teacher is None:
        teacher = build_model(cfg.teacher, data, "teacher")
    if cfg.teacher and not cfg.teacher.weights:
        print("warning: the teacher has no weights (teacher.weights); it is randomly initialised")
    methods = [create_method(m.name, **m.options) for m in cfg.methods]
    return Distiller(student, teacher, methods, example_input=input_example(data), ce_weight=cfg.ce_weight,
                     num_samples=len(data.train), train_labels=labels_of(data.train), train_data=data.train,
                     cache_dir=run_dir)


def train_run(cfg: RunConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> FitResult:
    data = build_data(cfg.data)
    seed_everything(cfg.train.seed)  # initial weights depend on the seed alone
    distiller = build_distiller(cfg, data, run_dir)
    save_config(cfg, run_dir / "config.yaml")
    return fit(distiller, data, cfg.train, run_dir, resume=resume,
               export_meta=model_meta(cfg.student, data, cfg.data), verbose=verbose)


def teacher_run(cfg: TeacherConfig, run_dir: Path, resume: bool = False, verbose: bool = True) -> FitResult:
    data = build_data(cfg.data)
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model, data)
    save_config(cfg, run_dir / "config.yaml")
    result = fit(Distiller(model), data, cfg.train, run_dir, resume=resume,
                 export_meta=model_meta(cfg.model, data, cfg.data), verbose=verbose)
    # A teacher run's weights are the model itself: name them so `teacher.weights: RUN_DIR` reads clearly.
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 wrote them
        (run_dir / "student.safetensors").replace(run_dir / "model.safetensors")
    return result


def evaluate_target(target: str | Path, overrides: list[str] = (), device: str = "auto") -> dict:
    """Evaluate a run directory, an exported .safetensors or a checkpoint on its dataset's test split."""
    from .config import apply_overrides

    target = Path(target)
    run_config = target / "config.yaml" if target.is_dir() else target.parent / "config.yaml"
    state, meta = read_state(target)
    if meta:
        model_cfg = ModelConfig(meta["model"], options=meta.get("options", {}))
        data_dict = meta["data"]
    elif run_config.is_file():
        raw = read_yaml(run_config)
        section = raw.get("student") or raw.get("model")
        model_cfg = from_dict(ModelConfig, section, "student")
        data_dict = raw.get("data", {})
    else:
        raise ConfigError(f"{target}: cannot tell which model this is (no kdzoo metadata, no config.yaml beside it)")
    data_cfg = from_dict(DataConfig, apply_overrides({"data": dict(data_dict)}, list(overrides))["data"], "data")
    data = build_data(data_cfg)
    model = build_model(ModelConfig(model_cfg.name, None, model_cfg.options), data)
    model.load_state_dict(state)
    model.to(resolve_device(device))
    metrics = evaluate(model, data.test)
    return {"target": str(target), "model": model_cfg.name, "dataset": data_cfg.name, **metrics}
