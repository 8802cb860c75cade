"""Sharpness-aware minimisation around any optimizer step: SAM (Foret et al. 2021, "Sharpness-Aware
Minimization for Efficiently Improving Generalization") and ASAM (Kwon et al. 2021, "ASAM: Adaptive
Sharpness-Aware Minimization for Scale-Invariant Learning of Deep Neural Networks").

A step with SAM (`TrainStep` with ``StepOptions.sam_rho > 0``): the gradient g at the weights w as usual; every
parameter that has a gradient moves to w + e(w), with

    SAM:  e(w) = rho * g / ||g||
    ASAM: e(w) = rho * |w|^2 g / || |w| g ||      (T_w = |w|, elementwise)

(norms over all parameters together); the gradient is computed again there, the weights are restored exactly
(copies, not a subtraction) and the optimizer steps with that second gradient (clipped first if the step clips).

What we took from DeiT-LT's lineage: its authors' teachers are trained with ``sam.py`` of val-iisc/Saddle-LongTail
(Rangwani et al. 2022), lines 14-58: the perturbation above with 1e-12 added to the norm, ``adaptive`` multiplying
by ``p ** 2`` in e(w) and by ``|p|`` inside the norm for every parameter, weights restored before the base
optimizer's step (weight decay and momentum live in the base optimizer alone), and both forwards in training mode
(cifar_train_sam.py lines 300-310: BatchNorm's running statistics move in both).  Kwon et al.'s own ASAM adds
eta = 0.01 to |w| and leaves biases unscaled; we follow Saddle-LongTail's (davda54/sam's) form instead.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

NORM_EPSILON = 1e-12  # Saddle-LongTail sam.py line 18: rho / (grad_norm + 1e-12)


def sharpness_ascent(weights: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], rho: float,
                     adaptive: bool = False) -> list[torch.Tensor]:
    """The perturbation e(w) of each weight (see the module docstring): rho * T^2 g / (||T g|| + 1e-12), T = |w|
    with `adaptive` (ASAM), else 1 (SAM)."""
    scaled = [w.abs() * g if adaptive else g for w, g in zip(weights, grads)]
    if not scaled:
        return []
    # in float64: a handful of scalars, and the norm of many bf16/fp32 tensors keeps its digits
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s).double() for s in scaled]))
    scale = rho / (norm + NORM_EPSILON)
    return [(w.abs() * s if adaptive else s) * scale.to(s.dtype) for w, s in zip(weights, scaled)]


@contextlib.contextmanager
def sharpness_aware(parameters: Sequence[torch.Tensor], rho: float, adaptive: bool = False) -> Iterator[None]:
    """Inside the block every parameter with a gradient sits at w + e(w), computed from its current gradient; on
    leaving, each is set back to exactly w.  The gradients are left as the block makes them (the caller frees the
    first ones before its second backward)."""
    moved = [p for p in parameters if p.grad is not None]
    with torch.no_grad():
        saved = [p.detach().clone() for p in moved]
        for p, e in zip(moved, sharpness_ascent([p.detach() for p in moved], [p.grad for p in moved], rho,
                                                adaptive)):
            p.add_(e)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, w in zip(moved, saved):
                p.copy_(w)


__all__ = ["sharpness_ascent", "sharpness_aware", "NORM_EPSILON"]
