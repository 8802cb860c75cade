"""Centred kernel alignment (CKA) between the layers of two networks, with bounded memory.

CKA(X, Y) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) for Gram matrices K of X and L of Y over the same
inputs (Kornblith et al. 2019).  A full-data Gram matrix is n x n; instead the data are read in
minibatches and the *unbiased* HSIC estimator (Song et al. 2012) of every batch is summed, as Nguyen,
Raghu & Kornblith (2021) do:

    HSIC_1(K, L) = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~ L~ 1] / (n(n-3)),

K~, L~ being K, L with their diagonal set to zero, n the batch size (>= 4).  Memory is one batch's Gram
matrices per layer, whatever the sample size; the estimate is unbiased in every batch, so the sums do not
drift with the batch size the way averaged biased CKA does.

Kernels: ``linear`` (K = X X') and ``rbf`` (K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2)), sigma^2 = `rbf_scale`^2
x the median off-diagonal squared distance of the batch, so the kernel is invariant to a common scaling of
the features, like Kornblith et al.'s median heuristic).  Both are invariant to orthogonal transforms and
isotropic scaling of the features, and CKA of a representation with itself is 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..taps import Taps, discover_layout

KERNELS = ("linear", "rbf")


def gram_linear(features: torch.Tensor) -> torch.Tensor:
    """(n, ...) features -> (n, n) linear Gram matrix, in float64."""
    x = features.reshape(features.shape[0], -1).double()
    return x @ x.T


def gram_rbf(features: torch.Tensor, rbf_scale: float = 1.0) -> torch.Tensor:
    """(n, ...) features -> (n, n) RBF Gram matrix with the median heuristic bandwidth, in float64."""
    x = features.reshape(features.shape[0], -1).double()
    squared = torch.cdist(x, x).square()
    n = squared.shape[0]
    off_diagonal = squared[~torch.eye(n, dtype=torch.bool, device=squared.device)]
    ordered = off_diagonal.sort().values  # the middle two averaged (torch.median returns the lower one)
    middle = ordered.numel() // 2
    median = ((ordered[middle - 1] + ordered[middle]) / 2 if ordered.numel() % 2 == 0 else ordered[middle])
    median = median.clamp_min(torch.finfo(torch.float64).tiny)
    return torch.exp(-squared / (2 * rbf_scale ** 2 * median))


def gram(features: torch.Tensor, kernel: str = "linear", rbf_scale: float = 1.0) -> torch.Tensor:
    if kernel == "linear":
        return gram_linear(features)
    if kernel == "rbf":
        return gram_rbf(features, rbf_scale)
    raise ConfigError(f"cka kernel {kernel!r}: choose one of {', '.join(KERNELS)}")


def _zero_diagonal(grams: torch.Tensor) -> torch.Tensor:
    return grams - torch.diag_embed(torch.diagonal(grams, dim1=-2, dim2=-1))


def hsic_unbiased_matrix(grams_x: torch.Tensor, grams_y: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC of every pair: (A, n, n) and (B, n, n) symmetric Gram matrices -> (A, B)."""
    n = grams_x.shape[-1]
    if n < 4:
        raise ConfigError(f"cka: the unbiased HSIC needs batches of at least 4 samples, got {n}")
    k, l = _zero_diagonal(grams_x), _zero_diagonal(grams_y)
    trace = torch.einsum("aij,bij->ab", k, l)  # tr(K L) for symmetric L
    k_rows, l_rows = k.sum(-1), l.sum(-1)  # K 1, L 1
    sums = k_rows.sum(-1)[:, None] * l_rows.sum(-1)[None, :]
    products = k_rows @ l_rows.T  # 1' K L 1
    return (trace + sums / ((n - 1) * (n - 2)) - 2 * products / (n - 2)) / (n * (n - 3))


def hsic_unbiased(gram_x: torch.Tensor, gram_y: torch.Tensor) -> torch.Tensor:
    return hsic_unbiased_matrix(gram_x[None], gram_y[None])[0, 0]


class MinibatchCKA:
    """Accumulates HSIC over minibatches for every (x layer, y layer) pair; `value()` is the CKA matrix."""

    def __init__(self, kernel: str = "linear", rbf_scale: float = 1.0):
        if kernel not in KERNELS:
            raise ConfigError(f"cka kernel {kernel!r}: choose one of {', '.join(KERNELS)}")
        self.kernel, self.rbf_scale = kernel, rbf_scale
        self.cross: Optional[torch.Tensor] = None
        self.self_x: Optional[torch.Tensor] = None
        self.self_y: Optional[torch.Tensor] = None
        self.batches = 0

    def update(self, xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> None:
        """One batch: the features of every x layer and every y layer on the same inputs."""
        grams_x = torch.stack([gram(x, self.kernel, self.rbf_scale) for x in xs])
        grams_y = torch.stack([gram(y, self.kernel, self.rbf_scale) for y in ys])
        cross = hsic_unbiased_matrix(grams_x, grams_y)
        self_x = torch.diagonal(hsic_unbiased_matrix(grams_x, grams_x))
        self_y = torch.diagonal(hsic_unbiased_matrix(grams_y, grams_y))
        if self.cross is None:
            self.cross, self.self_x, self.self_y = cross, self_x, self_y
        else:
            self.cross, self.self_x, self.self_y = self.cross + cross, self.self_x + self_x, self.self_y + self_y
        self.batches += 1

    def value(self) -> torch.Tensor:
        if self.cross is None:
            raise ConfigError("cka: no batch was seen")
        denominator = (self.self_x[:, None] * self.self_y[None, :]).clamp_min(0).sqrt()
        return self.cross / denominator.clamp_min(torch.finfo(torch.float64).tiny)


def cka(x: torch.Tensor, y: torch.Tensor, kernel: str = "linear", batch_size: Optional[int] = None,
        rbf_scale: float = 1.0) -> float:
    """CKA of two feature sets over the same n inputs, in minibatches of `batch_size` (default: all)."""
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"cka: {x.shape[0]} and {y.shape[0]} samples; the features must come from the same inputs")
    acc = MinibatchCKA(kernel, rbf_scale)
    step = batch_size or x.shape[0]
    for start in range(0, x.shape[0] - step + 1, step):  # whole batches only: the estimator wants n fixed
        acc.update([x[start:start + step]], [y[start:start + step]])
    return float(acc.value()[0, 0])


def default_taps(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Every stage output the model has, then the feature entering its classifier."""
    layout = discover_layout(model, example)
    taps = list(layout.stages)
    if layout.penultimate not in taps:
        taps.append(layout.penultimate)
    return taps


@dataclass
class CKAResult:
    teacher_taps: list[str]
    student_taps: list[str]
    maps: dict[str, torch.Tensor]  # kernel -> (teacher taps, student taps)
    samples: int


@torch.no_grad()
def model_cka(teacher: nn.Module, student: nn.Module, batches: Iterable[torch.Tensor],
              teacher_taps: Optional[Sequence[str]] = None, student_taps: Optional[Sequence[str]] = None,
              kernels: Sequence[str] = KERNELS, rbf_scale: float = 1.0,
              device: Optional[torch.device] = None) -> CKAResult:
    """CKA between every tap of `teacher` and every tap of `student` over `batches` of images (both models in
    eval mode; their training mode is restored).  Default taps: each model's stages and penultimate feature."""
    device = device or next(student.parameters()).device
    accumulators = {k: MinibatchCKA(k, rbf_scale) for k in kernels}
    modes = (teacher.training, student.training)
    teacher.eval(), student.eval()
    samples = 0
    t_taps = s_taps = None
    try:
        for images in batches:
            images = images.to(device)
            if t_taps is None:
                t_taps = list(teacher_taps or default_taps(teacher, images[:2]))
                s_taps = list(student_taps or default_taps(student, images[:2]))
            teacher_features = _features(teacher, t_taps, images)
            student_features = (teacher_features if student is teacher and s_taps == t_taps
                                else _features(student, s_taps, images))
            for acc in accumulators.values():
                acc.update(teacher_features, student_features)
            samples += len(images)
    finally:
        teacher.train(modes[0]), student.train(modes[1])
    if t_taps is None:
        raise ConfigError("cka: the data gave no batch")
    return CKAResult(t_taps, s_taps, {k: acc.value().float().cpu() for k, acc in accumulators.items()}, samples)


def _features(model: nn.Module, taps: Sequence[str], images: torch.Tensor) -> list[torch.Tensor]:
    with Taps(model, taps) as hooks:
        model(images)
        return [hooks.get(tap).float() for tap in taps]


__all__ = ["gram_linear", "gram_rbf", "gram", "hsic_unbiased", "hsic_unbiased_matrix", "MinibatchCKA", "cka",
           "model_cka", "default_taps", "CKAResult", "KERNELS"]
