"""One vector per sample from any tapped feature, for the methods that compare embeddings."""
from __future__ import annotations

import torch

from ..errors import ConfigError


def pool_embedding(feature: torch.Tensor, owner: str = "method") -> torch.Tensor:
    """(B, D) as it is; a map (B, C, H, W) averaged over space; tokens (B, N, C) averaged over tokens."""
    if feature.dim() == 2:
        return feature
    if feature.dim() == 4:
        return feature.mean(dim=(2, 3))
    if feature.dim() == 3:
        return feature.mean(dim=1)
    raise ConfigError(f"{owner}: cannot make one embedding per sample from a feature of shape {tuple(feature.shape)}")


def embedding_width(shape: torch.Size, owner: str = "method") -> int:
    """The width `pool_embedding` gives a feature of `shape` (batch dimension included)."""
    if len(shape) in (2, 4):
        return int(shape[1])
    if len(shape) == 3:
        return int(shape[2])
    raise ConfigError(f"{owner}: cannot make one embedding per sample from a feature of shape {tuple(shape)}")
