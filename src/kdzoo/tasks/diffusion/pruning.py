"""One-shot layer pruning of a diffusers UNet2DModel by LAPTOP-Diff's output-loss criterion (Zhang et al. 2024),
as pure functions over the UNet.

The candidate layers are the UNet's residual layers (the paper's SD U-Net ResNet and Transformer layers): every
``ResnetBlock2D`` of the down blocks, the mid block and the up blocks, and every residual self-attention
(``Attention`` with ``residual_connection``) of the mid block and the ``Attn*Block2D`` levels.  Removing a layer
keeps its skip path, so the UNet's forward runs unmodified on the smaller network:

- a resnet computes (shortcut(resample(x)) + body(x)) / output_scale_factor; removed, it is
  shortcut(resample(x)) / output_scale_factor, where shortcut is its 1x1 ``conv_shortcut`` (kept with its trained
  weights) when it changes the width, else the identity.  Keeping the 1x1 projection where the widths differ
  (the first resnet of a level, every up-block resnet, whose input is concatenated with a skip connection) is our
  generalisation: the paper removes SD layers whose skip paths it does not describe;
- a residual attention computes (attention(x) + x) / rescale_output_factor; removed, x / rescale_output_factor.

The criterion (the paper's): the score of a layer is its *output loss*, the MSE between the UNet's output with that
layer alone removed and the original output, on a calibration batch noised at random timesteps.  The paper shows the
output loss is additive (the output loss of removing a set of layers is close to the sum of their individual
losses), so the combinatorial problem "remove layers freeing at least the parameter budget with the smallest output
loss" becomes a 0/1 knapsack on the individual scores and the layers' parameter counts, solved exactly here by
dynamic programming (`select_layers`).

A pruned UNet records what was removed in ``unet.kdzoo_pruned_layers``; `kdzoo.tasks.diffusion.models` saves that
list beside the weights so the run folder loads back pruned.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ...errors import ConfigError

PRUNED_LAYERS_ATTR = "kdzoo_pruned_layers"  # the removed layers' paths, on a pruned UNet
CANDIDATE_PARTS = ("down_blocks", "mid_block", "up_blocks")  # in forward order
KNAPSACK_RESOLUTION = 100_000  # parameter counts above this are solved in units of ceil(total / resolution)

__all__ = ["PRUNED_LAYERS_ATTR", "RemovedResnet", "RemovedAttention", "candidate_layers", "removed_layer",
           "remove_layers", "parameter_count", "removed_parameters", "layer_scores", "select_layers"]


class RemovedResnet(nn.Module):
    """A ResnetBlock2D without its body: shortcut(resample(x)) / output_scale_factor, called as the resnet is
    (``resnet(hidden_states, temb)``).  Its kept submodules have the resnet's names, so the state-dict keys are the
    resnet's ``conv_shortcut.*``."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        # the resamplers may be modules or plain functions (FIR / sde_vp kernels): kept as the resnet had them
        self.upsample, self.downsample = resnet.upsample, resnet.downsample
        self.conv_shortcut = resnet.conv_shortcut
        self.output_scale_factor = resnet.output_scale_factor

    def forward(self, input_tensor: torch.Tensor, temb: Optional[torch.Tensor] = None, *args, **kwargs):
        x = input_tensor
        if self.upsample is not None:
            x = self.upsample(x)
        elif self.downsample is not None:
            x = self.downsample(x)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x / self.output_scale_factor


class RemovedAttention(nn.Module):
    """A residual Attention without its attention: x / rescale_output_factor (called as the attention is)."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.rescale_output_factor = attention.rescale_output_factor

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states / self.rescale_output_factor


def _is_candidate(module: nn.Module) -> bool:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    if isinstance(module, ResnetBlock2D):
        return True
    # a non-residual attention has no skip path to fall back on
    return isinstance(module, Attention) and bool(module.residual_connection)


def candidate_layers(unet: nn.Module) -> list[str]:
    """The module paths of the UNet's prunable layers: its down blocks', mid block's and up blocks' resnets and
    residual attentions, in that order (module order within each); layers already removed are not listed."""
    paths = []
    for part in CANDIDATE_PARTS:
        module = getattr(unet, part, None)
        if module is None:
            continue
        paths += [name for name, child in module.named_modules(prefix=part) if _is_candidate(child)]
    return paths


def removed_layer(module: nn.Module) -> nn.Module:
    """What a candidate layer leaves when removed (sharing its kept weights)."""
    if not _is_candidate(module):
        raise ConfigError(f"{type(module).__name__} is not a prunable layer (a ResnetBlock2D or a residual Attention)")
    from diffusers.models.resnet import ResnetBlock2D

    return RemovedResnet(module) if isinstance(module, ResnetBlock2D) else RemovedAttention(module)


def _parent_and_name(unet: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (unet.get_submodule(parent_path) if parent_path else unet), name


def _layer(unet: nn.Module, path: str) -> nn.Module:
    try:
        return unet.get_submodule(path)
    except AttributeError:
        raise ConfigError(f"{path!r}: no such layer in the UNet (candidates: {', '.join(candidate_layers(unet))})") \
            from None


def remove_layers(unet: nn.Module, paths: Sequence[str]) -> nn.Module:
    """Replace the layers at `paths` by their skip paths, in place; the paths are added to the UNet's
    ``kdzoo_pruned_layers``.  Returns the UNet."""
    if len(set(paths)) != len(paths):
        raise ConfigError(f"layers: a layer is named twice in {list(paths)}")
    for path in paths:
        layer = _layer(unet, path)
        if not _is_candidate(layer):
            raise ConfigError(f"{path!r}: not a prunable layer (candidates: {', '.join(candidate_layers(unet))})")
    for path in paths:
        parent, name = _parent_and_name(unet, path)
        setattr(parent, name, removed_layer(getattr(parent, name)))
    setattr(unet, PRUNED_LAYERS_ATTR, list(getattr(unet, PRUNED_LAYERS_ATTR, None) or []) + list(paths))
    return unet


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def removed_parameters(unet: nn.Module, path: str) -> int:
    """The parameters removing the layer at `path` frees (its own, less the shortcut it keeps)."""
    layer = _layer(unet, path)
    return parameter_count(layer) - parameter_count(removed_layer(layer))


@torch.no_grad()
def layer_scores(unet: nn.Module, paths: Sequence[str], images: torch.Tensor, labels: Optional[torch.Tensor],
                 scheduler: Any, generator: torch.Generator) -> dict[str, float]:
    """LAPTOP-Diff's output loss of each layer in `paths`: the MSE between the UNet's output with that layer alone
    removed and its unpruned output, on `images` (in [-1, 1]) noised by `scheduler` (a DDPMScheduler) at random
    timesteps with noise drawn once from `generator` (CPU), the same for every layer.  The UNet is left unchanged."""
    noise = torch.randn(images.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(images),), generator=generator)
    noisy = scheduler.add_noise(images.detach().float().cpu(), noise, timesteps)
    device = next(unet.parameters()).device
    noisy, timesteps = noisy.to(device), timesteps.to(device)
    class_labels = labels.to(device) if labels is not None and unet.config.num_class_embeds else None
    was_training = unet.training
    unet.eval()
    try:
        reference = unet(noisy, timesteps, class_labels=class_labels).sample.float()
        scores = {}
        for path in paths:
            parent, name = _parent_and_name(unet, path)
            layer = getattr(parent, name)
            setattr(parent, name, removed_layer(layer))
            try:
                output = unet(noisy, timesteps, class_labels=class_labels).sample.float()
            finally:
                setattr(parent, name, layer)
            scores[path] = float((output - reference).square().mean())
    finally:
        unet.train(was_training)
    return scores


def select_layers(scores: Mapping[str, float], sizes: Mapping[str, int], budget: int,
                  resolution: int = KNAPSACK_RESOLUTION) -> list[str]:
    """The layers to remove: the set with the smallest summed score whose sizes (freed parameters) sum to at least
    `budget`, i.e. the complement of a 0/1 knapsack that keeps the largest summed score within the capacity
    sum(sizes) - budget, solved by dynamic programming.  Sizes are counted in units of ceil(total / resolution)
    (1 parameter for up to `resolution` parameters in all), the kept sizes rounded up, so the budget always holds
    and the solution is exact at unit 1.  Returned in the order of `scores`."""
    names = list(scores)
    if set(sizes) != set(names):
        raise ValueError("select_layers: scores and sizes must name the same layers")
    total = sum(int(sizes[n]) for n in names)
    if budget <= 0:
        return []
    if budget > total:
        raise ConfigError(f"prune_ratio: the budget of {budget:,} parameters exceeds the {total:,} the candidate "
                          "layers can free")
    unit = max(1, math.ceil(total / resolution))
    capacity = (total - budget) // unit  # the kept layers' size, in units
    weights = [math.ceil(int(sizes[n]) / unit) for n in names]
    best = np.zeros(capacity + 1)  # best[c]: the largest summed score kept within c units
    taken = np.zeros((len(names), capacity + 1), dtype=bool)
    for i, (name, weight) in enumerate(zip(names, weights)):
        if weight > capacity:
            continue
        candidate = best[:capacity + 1 - weight] + float(scores[name])
        better = candidate > best[weight:]
        taken[i, weight:] = better
        best[weight:] = np.where(better, candidate, best[weight:])  # RHS built before the write: 0/1, not unbounded
    kept, room = set(), capacity
    for i in reversed(range(len(names))):
        if taken[i, room]:
            kept.add(names[i])
            room -= weights[i]
    return [n for n in names if n not in kept]
