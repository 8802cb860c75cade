"""Diffusion models on Hugging Face diffusers (``pip install 'kdzoo[diffusion]'``): the UNet, the noise schedule,
the images' range, DDIM sampling with any number of steps, and run folders that diffusers loads as a pipeline.

A run directory holds ``unet/`` and ``scheduler/`` with ``model_index.json`` (``DDIMPipeline.from_pretrained(RUN)``
reads it) and ``image_range.json``: the per-channel minimum and maximum of the training images in the dataset's
normalisation, which map them affinely onto [-1, 1] (the range the model learns) and back (for a classifier
trained on the dataset as kdzoo loads it).  A layer-pruned UNet (`kdzoo.tasks.diffusion.pruning`) also leaves
``unet/kdzoo_pruned.json``, the removed layers, so `load_pipeline` rebuilds it pruned (diffusers alone cannot).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ...engine.runtime import atomic_write
from ...errors import CheckpointError, ConfigError
from .config import NoiseConfig, UNetConfig
from .pruning import PRUNED_LAYERS_ATTR, remove_layers

RANGE_FILE = "image_range.json"
PRUNED_FILE = "kdzoo_pruned.json"  # in unet/: the layers a pruned UNet lacks


def require_diffusers():
    """The diffusers module, or a ConfigError naming the extra to install."""
    try:
        import diffusers
    except ImportError:
        raise ConfigError("kdzoo diffusion needs Hugging Face diffusers: pip install 'kdzoo[diffusion]'") from None
    return diffusers


@dataclass
class ImageRange:
    """Per-channel minimum and maximum of the training images as the dataset gives them: `to_model` maps them
    onto [-1, 1], `to_data` back."""

    low: list[float]
    high: list[float]

    @classmethod
    def of(cls, images: torch.Tensor) -> "ImageRange":
        flat = images.transpose(0, 1).flatten(1)
        return cls(flat.min(1).values.tolist(), flat.max(1).values.tolist())

    def _shape(self, values: list[float], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)

    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        low, high = self._shape(self.low, images), self._shape(self.high, images)
        return (images - low) / (high - low).clamp_min(1e-8) * 2 - 1

    def to_data(self, images: torch.Tensor) -> torch.Tensor:
        low, high = self._shape(self.low, images), self._shape(self.high, images)
        return (images.clamp(-1, 1) + 1) / 2 * (high - low) + low


def build_unet(spec: UNetConfig, image_size: int, channels: int, num_classes: int) -> nn.Module:
    """A diffusers UNet2DModel: one down/up level per entry of `block_out_channels`, attention at the lowest when
    asked, a class embedding when class-conditional."""
    diffusers = require_diffusers()
    levels = len(spec.block_out_channels)
    if image_size % (2 ** (levels - 1)):
        raise ConfigError(f"model.block_out_channels: {levels} levels halve the image {levels - 1} times; "
                          f"{image_size} pixels do not divide by {2 ** (levels - 1)}")
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if spec.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return diffusers.UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                                 layers_per_block=spec.layers_per_block,
                                 block_out_channels=tuple(spec.block_out_channels), down_block_types=tuple(down),
                                 up_block_types=tuple(up), norm_num_groups=spec.norm_num_groups,
                                 num_class_embeds=num_classes if spec.class_conditional else None)


def noise_scheduler(noise: NoiseConfig):
    """The training-time forward process (diffusers' DDPMScheduler)."""
    diffusers = require_diffusers()
    return diffusers.DDPMScheduler(num_train_timesteps=noise.num_train_timesteps, beta_schedule=noise.beta_schedule,
                                   prediction_type=noise.prediction_type, clip_sample=False)


def ddim_scheduler(config: Any):
    """A deterministic DDIM sampler over the same forward process, with trailing timesteps (the spacing that keeps
    few-step sampling starting from pure noise)."""
    diffusers = require_diffusers()
    return diffusers.DDIMScheduler.from_config(config, timestep_spacing="trailing", clip_sample=False,
                                               set_alpha_to_one=True)


def training_target(scheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the network learns to output for `prediction_type`: the noise, the velocity or the clean image."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    return clean


@torch.no_grad()
def sample(unet: nn.Module, scheduler_config: Any, labels: Optional[torch.Tensor], steps: int,
           generator: torch.Generator, count: Optional[int] = None) -> torch.Tensor:
    """Images in [-1, 1] from `steps` deterministic DDIM steps (eta 0), one per label (or `count` unconditional).
    The starting noise is drawn from `generator` on the CPU, so a seed gives the same images on any device."""
    config = unet.config
    device = next(unet.parameters()).device
    count = len(labels) if labels is not None else count
    shape = (count, config.in_channels, config.sample_size, config.sample_size)
    x = torch.randn(shape, generator=generator).to(device)
    scheduler = ddim_scheduler(scheduler_config)
    scheduler.set_timesteps(steps)
    was_training = unet.training
    unet.eval()
    class_labels = labels.to(device) if labels is not None and config.num_class_embeds else None
    for t in scheduler.timesteps:
        out = unet(x, t.to(device), class_labels=class_labels).sample
        x = scheduler.step(out, t, x, eta=0.0).prev_sample
    unet.train(was_training)
    return x.clamp(-1, 1)


def save_pipeline(unet: nn.Module, scheduler, image_range: ImageRange, run_dir: Path) -> None:
    """``run_dir`` as a diffusers DDIMPipeline folder (unet/, scheduler/, model_index.json) plus the image range."""
    diffusers = require_diffusers()
    run_dir = Path(run_dir)
    pipeline = diffusers.DDIMPipeline(unet=unet, scheduler=ddim_scheduler(scheduler.config))
    pipeline.save_pretrained(str(run_dir))
    pruned, pruned_file = getattr(unet, PRUNED_LAYERS_ATTR, None), run_dir / "unet" / PRUNED_FILE
    if pruned:
        layers = json.dumps(list(pruned))
        atomic_write(pruned_file, lambda tmp: tmp.write_text(layers))
    else:
        pruned_file.unlink(missing_ok=True)  # a pruned UNet saved here before
    text = json.dumps({"low": image_range.low, "high": image_range.high})
    atomic_write(run_dir / RANGE_FILE, lambda tmp: tmp.write_text(text))


def load_pipeline(path: str | Path) -> tuple[nn.Module, Any, Optional[ImageRange]]:
    """(unet, scheduler config, image range or None) of a kdzoo diffusion run or any diffusers pipeline folder
    with a UNet2DModel."""
    diffusers = require_diffusers()
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: not a diffusion run or pipeline folder (the folder does not exist)")
    if not (path / "unet").is_dir():
        raise CheckpointError(f"{path}: not a diffusion run or pipeline folder (no unet/)")
    pruned_file = path / "unet" / PRUNED_FILE
    if pruned_file.is_file():
        unet = _load_pruned_unet(path / "unet", json.loads(pruned_file.read_text()))
    else:
        try:
            unet = diffusers.UNet2DModel.from_pretrained(str(path / "unet"))
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            raise CheckpointError(f"{path / 'unet'}: not a readable UNet2DModel folder "
                                  f"({' '.join(str(err).split())[:300]})") from None
    bad = next((name for name, p in unet.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if bad is not None:
        raise CheckpointError(f"{path / 'unet'}: its weights are not finite (NaN or inf), first in {bad}")
    scheduler_dir = path / "scheduler"
    config = (diffusers.DDIMScheduler.load_config(str(scheduler_dir)) if scheduler_dir.is_dir()
              else diffusers.DDPMScheduler().config)
    found = path / RANGE_FILE
    image_range = ImageRange(**json.loads(found.read_text())) if found.is_file() else None
    return unet, config, image_range


def _load_pruned_unet(unet_dir: Path, layers: list[str]) -> nn.Module:
    """The UNet2DModel of `unet_dir`'s config with `layers` removed, then its saved weights loaded strictly (every
    kept weight from the file, none left at random)."""
    diffusers = require_diffusers()
    from diffusers.utils import SAFETENSORS_WEIGHTS_NAME

    weights = unet_dir / SAFETENSORS_WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing (a pruned UNet is loaded from its safetensors weights)")
    unet = remove_layers(diffusers.UNet2DModel.from_config(diffusers.UNet2DModel.load_config(str(unet_dir))), layers)
    try:
        unet.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{weights}: does not fit the UNet pruned of {PRUNED_FILE}'s layers: {err}") from None
    return unet.eval()
