"""A dual encoder as a zero-shot classifier: the frozen CLIP teacher of DHO and SSLD in ``kdzoo train``.

The teacher's logits are the image-text similarities over class prompts, as in DHO's code (erjui/DHO,
``train_others.py``): each class's prompts (every template with the class name) are embedded, L2-normalised,
averaged and normalised again (``clip_classifier``, CLIP's prompt ensembling); an image's logits are
``100 * normalize(image embedding) @ class_weights.T``, 100 being the constant DHO multiplies by (OpenAI CLIP's
learned scale ends at 100 too).  ``logit_scale: model`` uses the encoder's own learned scale instead, which suits a
small CLIP trained here whose scale stopped lower.

In a classification config the teacher is::

    teacher:
      name: clip:zero_shot
      options:
        run: runs/clip/clip_teacher_digits        # a kdzoo clip run folder, or
        # model: {source: transformers, path: DIR, pixel_mean: [...], pixel_std: [...]}
        templates: ["a photo of a {}."]           # default: CLIP's 18 CIFAR templates
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...config import from_dict, to_dict
from ...data import DataSplits
from ...errors import ConfigError
from .config import CLIP_CIFAR_TEMPLATES, ClipDataConfig, ClipModelConfig
from .data import caption_table, class_names_of, image_geometry
from .evaluation import class_embeddings
from .models import DualEncoder, build_encoder, load_encoder
from .task import run_data_config

DHO_LOGIT_SCALE = 100.0  # erjui/DHO: teacher_logits = 100. * feats @ clip_weights
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # what OpenAI CLIP was trained with (open_clip's OPENAI_DATASET_MEAN)
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
PROMPT_BATCH = 256


@dataclass
class ZeroShotTeacherConfig:
    """The options of ``teacher: {name: clip:zero_shot}``: one dual encoder (`run` or `model`), the prompts, the
    scale of the logits."""

    run: Optional[str] = None  # a kdzoo clip run folder (kdzoo clip teacher | distill)
    model: Optional[ClipModelConfig] = None  # or a pretrained dual encoder (source transformers or open_clip)
    templates: list[str] = field(default_factory=lambda: list(CLIP_CIFAR_TEMPLATES))  # "{}" takes the class name
    class_names: list[str] = field(default_factory=list)  # empty: the dataset's own names
    logit_scale: Any = DHO_LOGIT_SCALE  # a number, or "model": the encoder's learned scale

    def validate(self, where: str) -> None:
        if (self.run is None) == (self.model is None):
            raise ConfigError(f"{where}: name a kdzoo clip run folder (run) or a pretrained dual encoder (model), "
                              "one of them")
        if self.model is not None:
            if self.model.source == "config":
                raise ConfigError(f"{where}.model.source: a zero-shot teacher must already be trained; use "
                                  "transformers or open_clip, or a kdzoo clip run folder (run)")
            self.model.validate(f"{where}.model")
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ConfigError(f"{where}.templates: one or more templates, each taking the class name once as {{}}")
        scale = self.logit_scale
        if scale != "model" and (isinstance(scale, (bool, str)) or not scale > 0):
            raise ConfigError(f"{where}.logit_scale: a positive number or 'model', got {scale!r}")


class ZeroShotClassifier(nn.Module):
    """Logits of a frozen dual encoder over fixed class embeddings: ``scale * normalize(f(x)) @ W.T``."""

    def __init__(self, encoder: DualEncoder, class_weights: torch.Tensor, scale: float):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.register_buffer("class_weights", class_weights)
        self.scale = float(scale)

    def train(self, mode: bool = True) -> "ZeroShotClassifier":
        return super().train(False)  # a frozen teacher: its towers' dropout and norms stay in evaluation mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image_embeds = F.normalize(self.encoder.encode_image(images).float(), dim=-1)
        return self.scale * image_embeds @ self.class_weights.T


@torch.no_grad()
def class_weights_of(encoder: DualEncoder, tokenizer: Any, class_names: list[str], templates: list[str]) -> torch.Tensor:
    """(C, D) normalised prompt-ensembled class embeddings of `class_names` through `templates`."""
    captions = [template.format(name) for name in class_names for template in templates]
    ids, mask = caption_table(captions, tokenizer)
    device = next(encoder.parameters()).device
    embeds = torch.cat([encoder.encode_text(ids[i:i + PROMPT_BATCH].to(device), mask[i:i + PROMPT_BATCH].to(device))
                        .float() for i in range(0, len(captions), PROMPT_BATCH)])
    return class_embeddings(embeds.view(len(class_names), len(templates), -1))


def _from_run(run: str, splits: DataSplits, where: str) -> tuple[DualEncoder, Any]:
    if not Path(run).is_dir():
        raise ConfigError(f"{where}.run {run}: no such folder (a kdzoo clip run folder)")
    encoder, tokenizer = load_encoder(run)
    if encoder.adapter.data_channels != splits.in_channels:
        raise ConfigError(f"{where}.run: the encoder takes {encoder.adapter.data_channels}-channel data, "
                          f"{splits.name} has {splits.in_channels} channels")
    trained_on = run_data_config(run)
    if trained_on.dataset != splits.name:
        # the run's image adapter maps its own dataset's normalisation to the encoder's: another dataset's
        # pixels would reach the encoder mis-scaled
        print(f"warning: {where}.run was trained on {trained_on.dataset or trained_on.pairs}, not {splits.name}; its "
              "images are taken in that dataset's normalisation")
    return encoder, tokenizer


def _from_model(model: ClipModelConfig, splits: DataSplits, where: str) -> tuple[DualEncoder, Any]:
    geometry = image_geometry(splits)
    if geometry.mean is None:
        raise ConfigError(f"{where}.model: {splits.name} standardises images by its own statistics, so they cannot be "
                          "mapped to a pretrained model's normalisation; use a kdzoo clip run trained on it (run)")
    if model.pixel_mean is None:  # a pretrained CLIP takes CLIP's normalisation unless the config says otherwise
        model = from_dict(ClipModelConfig, {**to_dict(model), "pixel_mean": CLIP_MEAN, "pixel_std": CLIP_STD})
    try:
        return build_encoder(model, geometry, [])
    except ConfigError as err:
        raise ConfigError(f"{where}.{err}") from None


def build_zero_shot_teacher(options: dict, splits: DataSplits, where: str = "teacher") -> ZeroShotClassifier:
    """The frozen zero-shot classifier ``teacher: {name: clip:zero_shot, options: ...}`` names, for `splits`'
    classes."""
    cfg = from_dict(ZeroShotTeacherConfig, options, f"{where}.options")
    cfg.validate(f"{where}.options")
    if splits.task != "classification":
        raise ConfigError(f"{where}: a zero-shot CLIP teacher classifies; {splits.name} is a {splits.task} dataset")
    names = class_names_of(splits, ClipDataConfig(dataset=splits.name, class_names=cfg.class_names))
    if cfg.run is not None:
        encoder, tokenizer = _from_run(cfg.run, splits, f"{where}.options")
    else:
        encoder, tokenizer = _from_model(cfg.model, splits, f"{where}.options")
    encoder.eval()
    weights = class_weights_of(encoder, tokenizer, names, list(cfg.templates))
    scale = encoder.logit_scale.detach().float().exp().item() if cfg.logit_scale == "model" else cfg.logit_scale
    return ZeroShotClassifier(encoder, weights, scale)


__all__ = ["ZeroShotClassifier", "ZeroShotTeacherConfig", "build_zero_shot_teacher", "class_weights_of",
           "DHO_LOGIT_SCALE"]
