"""The observer of the decoupled dataset-distillation methods: the model trained on the real data ("squeeze" in
SRe2L) whose BatchNorm statistics the images are recovered against, whose confidence selects RDED's region crops
and whose soft labels the evaluation replays.

Where it comes from (the `observer` option of every decoupled method):
  * ``squeeze`` (default): trained here on the real training images (`decoupled.squeeze`), saved to
    `observer_file` when one is given and reused from there by a later run with the same settings;
  * ``pretrained``: the library's published weights of `observer_model` (``tv:resnet18``, ``timm:...``), only for
    a dataset with the weights' 1,000 ImageNet classes;
  * a path: a weights file or a ``kdzoo teacher`` / ``kdzoo train`` run folder, loaded strictly into
    `observer_model` built with `observer_options`.

Its description (model, options, file) goes into the synthetic set's metadata, so `evaluate_synthetic` can load
it again from the file beside the set.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..engine.checkpoint import read_weights, write_weights
from ..errors import CheckpointError, ConfigError
from ..models import MODELS, create_model
from ..models.weights import load_weights

SOURCES = ("squeeze", "pretrained")  # or a path
IMAGENET_CLASSES = 1000


@dataclass(frozen=True)
class ObserverSpec:
    """Which observer network: `source` (``squeeze``, ``pretrained`` or a path), the zoo `model` and its
    `options`, and the data it labels (classes, channels, image size)."""

    source: str
    model: str
    options: Optional[dict]
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]

    def model_options(self) -> dict:
        options = dict(self.options or {})
        if self.model in MODELS and "image_size" in MODELS.get(self.model).defaults:
            options.setdefault("image_size", tuple(self.image_size))
        return options

    def meta(self) -> dict:
        return {"model": self.model, "options": self.options, "num_classes": self.num_classes,
                "in_channels": self.in_channels, "image_size": list(self.image_size)}


def new_observer(spec: ObserverSpec, device: torch.device, pretrained: bool = False) -> nn.Module:
    """`spec.model`, freshly initialised (or with its library's weights) on `device`."""
    with torch.device(device):
        return create_model(spec.model, num_classes=spec.num_classes, in_channels=spec.in_channels,
                            pretrained=pretrained, **spec.model_options())


def frozen(model: nn.Module) -> nn.Module:
    """Eval mode (running BatchNorm statistics), no gradients to its parameters."""
    return model.eval().requires_grad_(False)


def load_observer(spec: ObserverSpec, device: torch.device) -> nn.Module:
    """An observer from ``pretrained`` or from a path (``squeeze`` is trained by the condenser)."""
    if spec.source == "pretrained":
        if spec.num_classes != IMAGENET_CLASSES:
            raise ConfigError(f"observer=pretrained: {spec.model}'s published weights have {IMAGENET_CLASSES} "
                              f"ImageNet classes, the dataset has {spec.num_classes}; train an observer with "
                              "`kdzoo teacher` and pass its folder as observer=PATH (or observer=squeeze)")
        return frozen(new_observer(spec, device, pretrained=True))
    path = Path(spec.source)
    if not path.exists():
        raise ConfigError(f"observer={spec.source!r}: expected squeeze, pretrained or a weights file / run folder "
                          "that exists")
    model = new_observer(spec, device)
    load_weights(model, path, what="observer")
    return frozen(model)


def save_observer(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """The observer's state dict (safetensors, atomic) with what made it as metadata."""
    write_weights(path, {k: v.detach().cpu() for k, v in model.state_dict().items()}, {"observer": meta})


def read_saved_observer(path: str | Path, spec: ObserverSpec, meta: dict[str, Any], device: torch.device
                        ) -> Optional[nn.Module]:
    """The observer saved at `path` if it was made with exactly `meta` (else None: it is trained again)."""
    if not Path(path).is_file():
        return None
    tensors, saved = read_weights(path)
    if saved.get("observer") != json.loads(json.dumps(meta)):
        return None
    model = new_observer(spec, device)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: not an observer of {spec.model} ({str(err).splitlines()[0]})") from None
    return frozen(model)


# Loaders of teachers made of several saved networks (CV-DD's "committee", INFER's "ensemble"), registered by the
# method that records them under that key of meta["observer"].
TEACHER_LOADERS: dict[str, Callable[[dict, torch.device], nn.Module]] = {}


def register_teacher_loader(key: str, loader: Callable[[dict, torch.device], nn.Module]) -> None:
    TEACHER_LOADERS[key] = loader


def has_saved_teacher(meta: dict[str, Any]) -> bool:
    """Whether a set's metadata names teacher files `observer_from_meta` can load."""
    description = meta.get("observer") or {}
    return bool(description.get("file") or any(description.get(key) for key in TEACHER_LOADERS))


def observer_from_meta(meta: dict[str, Any], device: torch.device) -> nn.Module:
    """The observer a synthetic set's metadata names (its `file`), for the soft-label evaluation."""
    description = meta.get("observer")
    for key, loader in TEACHER_LOADERS.items():  # several networks, each in its own file
        if description and description.get(key):
            return loader(meta, device)
    if not description or not description.get("file"):
        raise ConfigError("this set is evaluated with its observer's soft labels, but no observer file is recorded; "
                          "pass teacher=MODEL to evaluate_synthetic (or eval.teacher_labels=none for hard labels)")
    path = Path(description["file"])
    if not path.is_file():
        raise ConfigError(f"the set's observer {path} is missing; keep it beside the set, pass teacher=MODEL, or "
                          "evaluate with eval.teacher_labels=none")
    spec = ObserverSpec(str(path), description["model"], description.get("options"), description["num_classes"],
                        description["in_channels"], tuple(description["image_size"]))
    model = new_observer(spec, device)
    load_weights(model, path, what="observer")
    return frozen(model)


def soft_targets(teacher: nn.Module, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """The teacher's soft labels of `x` at `temperature`: softmax(logits / T), or the teacher's own
    ``soft_labels(x, temperature)`` when it has one (a committee's vote)."""
    if hasattr(teacher, "soft_labels"):
        return teacher.soft_labels(x, temperature)
    return torch.softmax(teacher(x).float() / temperature, -1)


__all__ = ["ObserverSpec", "SOURCES", "new_observer", "load_observer", "save_observer", "read_saved_observer",
           "observer_from_meta", "frozen", "soft_targets", "register_teacher_loader", "has_saved_teacher",
           "TEACHER_LOADERS"]
