"""LAPTOP-Diff (Zhang et al. 2024): one-shot layer pruning of the teacher by the output-loss criterion, then
retraining of the pruned copy with normalised feature distillation.

Pruning (`kdzoo.tasks.diffusion.pruning`): each candidate layer (the UNet's resnets and residual attentions) is
scored by the MSE between the teacher's output with that layer alone removed and its full output, on a calibration
batch of training images noised at random timesteps (fixed seeds, so a resumed run prunes the same layers).  By the
paper's additivity of the output loss, the layers to remove are the set with the smallest summed score that frees at
least `prune_ratio` of the UNet's parameters (the paper states its pruning ratios in parameters): a 0/1 knapsack,
solved exactly.  A removed resnet keeps its shortcut (identity, or its 1x1 projection where the width changes:
our generalisation for UNet2DModel's width-changing resnets), a removed attention becomes the identity.

Retraining loss (the paper's three terms, following BK-SDM's retraining):
task = MSE(student output, denoising target), output_kd = MSE(student output, teacher output), and the normalised
feature KD  feature_kd = sum_l ||F_S^l - F_T^l||^2 / ||F_T^l||^2  over the outputs of every down block, the mid
block and every up block (BK-SDM's stage-level feature points, which LAPTOP-Diff keeps): each term is divided by
the squared L2 norm of the teacher's feature map, so no numerically large block dominates the sum (the paper's
imbalance issue).  The norms are taken over the whole micro-batch's feature tensor, and all three weights default
to 1; the paper's text was not available to us beyond its summary (features "normalised by the L2 norm of the
teacher's feature maps"), so the squared norm, the batch-level ratio and the unit weights are our reading.

Pruning removes layers, not sampling steps: the student samples with DDIM at `student_steps` (the teacher's usual
count by default).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from ....errors import ConfigError
from ....registry import NonNegative, PositiveInt, UnitInterval, register_diffusion_method
from ..method_base import DiffusionMethod
from ..pruning import (candidate_layers, layer_scores, parameter_count, remove_layers, removed_parameters,
                       select_layers)
from .schedule_math import add_noise, alpha_sigma, denoising_target, unet_output

CALIBRATION_SEED = 20_240_417  # the calibration rows, noise and timesteps: fixed, so every run prunes alike

__all__ = ["LaptopDiff", "normalized_feature_loss", "distilled_blocks", "capture_outputs", "prune_teacher"]


def normalized_feature_loss(student_features: Sequence[torch.Tensor],
                            teacher_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """LAPTOP-Diff's normalised feature KD: sum over feature points of ||F_S - F_T||^2 / ||F_T||^2 (norms over the
    whole batch tensor; equal to MSE(F_S, F_T) / mean(F_T^2))."""
    terms = [(s.float() - t.float()).square().sum() / t.float().square().sum().clamp_min(1e-12)
             for s, t in zip(student_features, teacher_features, strict=True)]
    return torch.stack(terms).sum()


def distilled_blocks(unet: nn.Module) -> list[str]:
    """The feature points: the outputs of every down block, the mid block and every up block."""
    points = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    points += ["mid_block"] if getattr(unet, "mid_block", None) is not None else []
    return points + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]


@contextlib.contextmanager
def capture_outputs(unet: nn.Module, paths: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """The outputs of the modules at `paths` during the forward passes inside the block (a down block's hidden
    states, not its skip outputs), by path."""
    found: dict[str, torch.Tensor] = {}

    def keep(path):
        def hook(module, inputs, output):
            found[path] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = [unet.get_submodule(path).register_forward_hook(keep(path)) for path in paths]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def prune_teacher(teacher: nn.Module, scheduler: Any, images: torch.Tensor, labels: Optional[torch.Tensor],
                  prune_ratio: float, calibration_images: int) -> tuple[list[str], dict[str, float]]:
    """(the layers to remove, every candidate's score): the smallest-summed-output-loss set freeing at least
    `prune_ratio` of the teacher's parameters, scored on `calibration_images` training images drawn with a fixed
    seed.  The teacher is left unchanged."""
    candidates = candidate_layers(teacher)
    sizes = {path: removed_parameters(teacher, path) for path in candidates}
    budget = math.ceil(prune_ratio * parameter_count(teacher))
    if budget > sum(sizes.values()):
        reachable = sum(sizes.values()) / parameter_count(teacher)
        raise ConfigError(f"prune_ratio: {prune_ratio} of the UNet's parameters cannot be pruned; removing every "
                          f"resnet and attention frees {reachable:.3f}")
    rows = torch.randperm(len(images), generator=torch.Generator().manual_seed(CALIBRATION_SEED))[:calibration_images]
    scores = layer_scores(teacher, candidates, images[rows], None if labels is None else labels[rows], scheduler,
                          torch.Generator().manual_seed(CALIBRATION_SEED + 1))
    return select_layers(scores, sizes, budget), scores


@register_diffusion_method("laptop_diff", paper="Zhang et al. 2024, LAPTOP-Diff: Layer Pruning and Normalized "
                                                "Distillation for Compressing Diffusion Models",
                           description="one-shot layer pruning of the teacher (output-loss scores, additive, "
                                       "parameter-budget knapsack) and retraining with task + output KD + block "
                                       "feature KD normalised by the teacher features' squared norms; our reading: "
                                       "removed layers keep their shortcut, the exact normalisation and weights")
class LaptopDiff(DiffusionMethod):
    """The student is a copy of the teacher with layers removed (chosen once, before training), retrained with the
    task, output-KD and normalised feature-KD losses; it samples with DDIM.

    Options:
        prune_ratio: the fraction of the UNet's parameters to remove (at least; the paper's 50% by default)
        calibration_images: training images the output loss of each layer is measured on
        task_weight: weight of the denoising loss against the training target
        output_weight: weight of the output KD (MSE to the teacher's output)
        feature_weight: weight of the normalised feature KD
        layers: the module paths to remove (e.g. ``mid_block.resnets.1``), skipping the search; unset: searched
        student_steps: the DDIM steps the student is evaluated at (pruning keeps the teacher's step count)
    """

    def __init__(self, prune_ratio: UnitInterval = 0.5, calibration_images: PositiveInt = 64,
                 task_weight: NonNegative = 1.0, output_weight: NonNegative = 1.0, feature_weight: NonNegative = 1.0,
                 layers: Optional[list[str]] = None, student_steps: PositiveInt = 50):
        super().__init__()
        self.prune_ratio, self.calibration_images = prune_ratio, calibration_images
        self.task_weight, self.output_weight, self.feature_weight = task_weight, output_weight, feature_weight
        self.layers, self.student_steps = (None if layers is None else list(layers)), student_steps
        self.removed_layers: list[str] = []

    def prepare_student(self, student: nn.Module, teacher: nn.Module, scheduler: Any, images: torch.Tensor,
                        labels: torch.Tensor) -> nn.Module:
        """The teacher's copy with the chosen layers removed, on the default student's device."""
        if dict(student.config) != dict(teacher.config):
            raise ConfigError("model: laptop_diff prunes the teacher; leave model unset (the student is the pruned "
                              "teacher)")
        pruned = copy.deepcopy(teacher).to(next(student.parameters()).device)
        for parameter in pruned.parameters():
            parameter.grad = None
        if self.layers is not None:
            unknown = [path for path in self.layers if path not in candidate_layers(pruned)]
            if unknown:
                raise ConfigError(f"layers: {', '.join(unknown)} not among the UNet's prunable layers "
                                  f"({', '.join(candidate_layers(pruned))})")
            chosen = self.layers
        else:
            chosen, _ = prune_teacher(pruned, scheduler, images, labels, self.prune_ratio, self.calibration_images)
        before = parameter_count(pruned)
        remove_layers(pruned, chosen)
        after = parameter_count(pruned)
        self.removed_layers = list(chosen)
        print(f"laptop_diff: removed {len(chosen)} of {len(candidate_layers(teacher))} layers "
              f"({', '.join(chosen) or 'none'}); parameters {before:,} -> {after:,} "
              f"({100 * (1 - after / before):.1f}% fewer)", flush=True)
        return pruned.requires_grad_(True).train()

    def attach(self, student: nn.Module, teacher: nn.Module, scheduler: Any) -> None:
        super().attach(student, teacher, scheduler)
        self.prediction_type = scheduler.config.prediction_type
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.detach().float().clone(), persistent=False)
        self.feature_points = distilled_blocks(student)

    def target(self, clean: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor,
               sigma: torch.Tensor) -> torch.Tensor:
        """The denoising target of the prediction type: the noise, the velocity or the clean image."""
        return denoising_target(clean, noise, alpha, sigma, self.prediction_type)

    def terms(self, clean: torch.Tensor, labels: Optional[torch.Tensor], noise: torch.Tensor,
              timesteps: torch.Tensor) -> dict[str, Any]:
        """Student and teacher outputs and block features on x_t, and the denoising target."""
        alpha, sigma = alpha_sigma(self.alphas_cumprod.to(clean.device), timesteps)
        clean, noise = clean.float(), noise.float()
        noisy = add_noise(clean, noise, alpha, sigma)
        with capture_outputs(self.student, self.feature_points) as student_features:
            output = unet_output(self.student, noisy, timesteps, labels)
        with torch.no_grad(), capture_outputs(self.teacher, self.feature_points) as teacher_features:
            teacher_output = unet_output(self.teacher, noisy, timesteps, labels)
        return {"output": output, "teacher_output": teacher_output, "target": self.target(clean, noise, alpha, sigma),
                "student_features": [student_features[p] for p in self.feature_points],
                "teacher_features": [teacher_features[p] for p in self.feature_points]}

    def loss(self, clean: torch.Tensor, labels: Optional[torch.Tensor], generator: torch.Generator,
             step: int) -> dict[str, torch.Tensor]:
        noise = torch.randn(clean.shape, generator=generator).to(clean.device)
        timesteps = torch.randint(0, len(self.alphas_cumprod), (len(clean),), generator=generator).to(clean.device)
        parts = self.terms(clean, labels, noise, timesteps)
        return {"task": self.task_weight * (parts["output"] - parts["target"]).square().mean(),
                "output_kd": self.output_weight * (parts["output"] - parts["teacher_output"]).square().mean(),
                "feature_kd": self.feature_weight * normalized_feature_loss(parts["student_features"],
                                                                            parts["teacher_features"])}
