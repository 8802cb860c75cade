"""``kdzoo eval``: a trained model from any weights file on its dataset's test split."""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from torch import nn

from ..config import DataConfig, ModelConfig, apply_overrides, from_dict, read_yaml, validate_data
from ..data import DataSplits
from ..engine.rundir import RUN_CONFIG
from ..engine.runtime import resolve_device
from ..errors import CheckpointError, ConfigError
from ..models.weights import fit_state_dict, read_state_dict, resolve_weights_path
from ..tasks.classification import task_class
from .build import build_data, build_model


class LoadedTarget(NamedTuple):
    """A trained model with the dataset it was trained on (names as its config gives them)."""

    model: nn.Module
    data: DataSplits
    model_name: str
    dataset_name: str


def load_target(target: str | Path, overrides: list[str] = (), device: str = "auto") -> LoadedTarget:
    """The trained model of a run directory, an exported .safetensors, a checkpoint or any state-dict file, on
    `device`, and its dataset.  ``model.*`` overrides name or change the model (a plain .pth records none), the
    others the data section."""
    target = Path(target)
    for item in overrides:
        key, sep, _ = item.partition("=")
        if sep and key and key.split(".")[0] not in ("model", "data"):  # would be ignored: the user meant something
            raise ConfigError(f"override {item!r}: kdzoo eval takes data.* and model.* overrides only")
    model_overrides = [item for item in overrides if item.startswith("model.")]
    data_overrides = [item for item in overrides if not item.startswith("model.")]
    run_config = target / RUN_CONFIG if target.is_dir() else target.parent / RUN_CONFIG
    state, meta = read_state_dict(target)
    if meta and "class" not in meta:  # exported from a config; fit() alone records only the model's class
        if not isinstance(meta.get("model"), str) or not isinstance(meta.get("data"), dict):
            raise CheckpointError(f"{target}: its kdzoo metadata names no model and dataset (not an exported model; "
                                  "a synthetic set is evaluated by kdzoo condense)")
        model_dict, data_dict = {"name": meta["model"], "options": meta.get("options", {})}, meta["data"]
        task = meta.get("task")
    elif run_config.is_file():
        raw = read_yaml(run_config)
        model_dict, data_dict = raw.get("student") or raw.get("model"), raw.get("data", {})
        task = raw.get("task")
        if not isinstance(model_dict, dict):
            raise ConfigError(f"{run_config}: names no student or model")
    elif model_overrides and any(item.startswith("data.name=") for item in data_overrides):
        model_dict, data_dict, task = {}, {}, None
    else:
        raise ConfigError(f"{target}: cannot tell which model this is (no kdzoo metadata, no config.yaml beside it); "
                          f"name it: kdzoo eval {target} model.name=tv:resnet18 data.name=imagefolder ...")
    model_dict = apply_overrides({"model": dict(model_dict)}, model_overrides)["model"]
    model_cfg = from_dict(ModelConfig, model_dict, "model")
    data_cfg = from_dict(DataConfig, apply_overrides({"data": dict(data_dict)}, data_overrides)["data"], "data")
    validate_data(data_cfg)
    data = build_data(data_cfg, task if isinstance(task, str) else None)
    model = build_model(ModelConfig(model_cfg.name, None, model_cfg.options), data)
    try:
        report = fit_state_dict(model, state, str(resolve_weights_path(target)), strict=model_cfg.strict)
    except CheckpointError as err:  # a half-loaded model would score noise
        raise CheckpointError(str(err).replace("strict: false", "model.strict=false")) from None
    if not report.exact:
        print(f"{'warning: ' if report.missing or report.unexpected else ''}{report.summary()}")
    return LoadedTarget(model.to(resolve_device(device)), data, model_cfg.name, data_cfg.name)


def evaluate_target(target: str | Path, overrides: list[str] = (), device: str = "auto") -> dict:
    """Evaluate a trained model (`load_target`) on its dataset's whole test split."""
    loaded = load_target(target, overrides, device)
    kind = task_class(loaded.data)
    metrics = kind.test_scores(loaded.model, loaded.data)
    return {"target": str(target), "model": loaded.model_name, "dataset": loaded.dataset_name, **metrics,
            "summary": kind.scores_line(metrics)}


__all__ = ["LoadedTarget", "evaluate_target", "load_target"]
