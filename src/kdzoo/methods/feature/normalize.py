"""Normalized multi-layer feature loss: Zhang et al., "LAPTOP-Diff: Layer Pruning and Normalized Distillation
for Compressing Diffusion Models", 2024.

Feature losses summed over layers are dominated by the few layers whose features are numerically largest.
LAPTOP-Diff re-weights each layer's term by the size of the teacher's feature there, so every layer counts
alike: term_l / ||T_l||^2.  Here ||T_l||^2 is the mean square of the teacher-side target the layer's loss
matches (the teacher's feature for FitNet / ReviewKD / OFD, its attention map for AT), detached and in
float32, so a squared-error term becomes a relative error and does not change when the teacher's feature
is scaled.  One helper, used by every multi-layer feature method through its ``normalize_layers`` option.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["layer_normalizer", "layer_normalized_loss"]


def layer_normalizer(teacher_target: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """The mean square of a teacher-side target, detached, float32 (kept above `eps`)."""
    return teacher_target.detach().float().pow(2).mean().clamp_min(eps)


def layer_normalized_loss(layer_losses: Sequence[torch.Tensor], teacher_targets: Sequence[torch.Tensor],
                          normalize: bool = True) -> torch.Tensor:
    """sum_l layer_losses[l] / mean(teacher_targets[l]^2) (LAPTOP-Diff) with `normalize`, else the plain sum."""
    if len(layer_losses) != len(teacher_targets):
        raise ValueError(f"{len(layer_losses)} layer losses but {len(teacher_targets)} teacher targets")
    if not normalize:
        return sum(layer_losses)
    return sum(loss / layer_normalizer(target) for loss, target in zip(layer_losses, teacher_targets))
