"""Good Student: Zhu, Luo, Zheng, Wang, Wang, "A Good Student is Cooperative and Reliable: CNN-Transformer
Collaborative Learning for Semantic Segmentation", ICCV 2023 (arXiv 2307.12574).

Two (or more) segmenters of different architectures, typically a CNN and a ViT, train together from scratch and
teach each other (online distillation, no pretrained teacher).  Student k's loss, besides its own cross-entropy:

- heterogeneous feature distillation (HFD): its low-layer feature, projected to the peer's width and size, mimics
  the peer's low-layer feature (`heterogeneous_feature_loss`);
- region-wise bidirectional selective distillation (BSD): on a grid of regions of the image, in each region the
  student whose prediction there has the higher cross-entropy against the mask mimics the other's feature there
  (`region_teacher_mask`, `region_selective_loss`), so knowledge flows one way per region;
- pixel-wise BSD: at each pixel the student with the higher cross-entropy against the mask learns the other's
  prediction by KL divergence (`pixel_teacher_mask`, `pixel_selective_loss`).

The students run through `kdzoo.tasks.classification.PeerDistiller` (a run config with ``peers:``), which hands
each student the others' logits and tapped features, detached, so each loss trains its own student alone.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...adapters import ConvAdapter, resize_like
from ...data.semi import UNLABELLED
from ...errors import ConfigError
from ...registry import NonNegative, Positive, PositiveInt, register_method
from ..base import Context, Method

__all__ = ["GoodStudent", "heterogeneous_feature_loss", "pixel_cross_entropy", "pixel_selective_loss",
           "pixel_teacher_mask", "region_cross_entropy", "region_selective_loss", "region_teacher_mask"]


def pixel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each pixel's prediction against the mask: (B, C, H, W) logits, (B, H, W) labels ->
    (B, H, W), 0 at unlabelled pixels (-1).  No gradient: it only chooses who teaches."""
    return F.cross_entropy(logits.detach().float(), labels, ignore_index=UNLABELLED, reduction="none")


def pixel_teacher_mask(student_logits: torch.Tensor, peer_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B, H, W) bool: the labelled pixels where the peer is the more reliable of the two, its cross-entropy
    against the mask strictly below the student's; there the peer teaches the student.  Swapping the two gives
    the complement on the labelled pixels (ties excepted): each pixel's knowledge flows one way."""
    labelled = labels != UNLABELLED
    return (pixel_cross_entropy(peer_logits, labels) < pixel_cross_entropy(student_logits, labels)) & labelled


def pixel_selective_loss(student_logits: torch.Tensor, peer_logits: torch.Tensor, labels: torch.Tensor,
                         temperature: float = 1.0) -> torch.Tensor:
    """Pixel-wise BSD from one peer: with p = softmax(z_student / T), q = softmax(z_peer / T) at each pixel i,
    S the pixels of `pixel_teacher_mask` and L the labelled pixels of the batch::

        loss = T^2 / |L| * sum_{i in S} sum_c q_c(i) * (log q_c(i) - log p_c(i))

    i.e. KL(peer || student) where the peer is the more reliable, averaged over every labelled pixel (0 without
    any).  No gradient reaches the peer."""
    peer_logits = peer_logits.detach()
    teach = pixel_teacher_mask(student_logits, peer_logits, labels)
    log_p = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_q = F.log_softmax(peer_logits.float() / temperature, dim=1)
    divergence = (log_q.exp() * (log_q - log_p)).sum(1)  # (B, H, W)
    labelled = (labels != UNLABELLED).sum().clamp(min=1)
    return torch.where(teach, divergence, torch.zeros_like(divergence)).sum() / labelled * temperature ** 2


def region_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each region's reliability: the image cut into a `grid` x `grid` grid (the adaptive-pooling bins), the mean
    per-pixel cross-entropy over the region's labelled pixels, (B, grid, grid); and which regions have any
    labelled pixel, (B, grid, grid) bool."""
    labelled = (labels != UNLABELLED).float()[:, None]
    share = F.adaptive_avg_pool2d(labelled, grid)[:, 0]  # labelled fraction of each region
    total = F.adaptive_avg_pool2d(pixel_cross_entropy(logits, labels)[:, None], grid)[:, 0]
    return total / share.clamp(min=torch.finfo(share.dtype).tiny), share > 0


def region_teacher_mask(student_logits: torch.Tensor, peer_logits: torch.Tensor, labels: torch.Tensor,
                        grid: int) -> torch.Tensor:
    """(B, grid, grid) bool: the regions (with labelled pixels) where the peer's mean cross-entropy is strictly
    below the student's (`region_cross_entropy`); there the peer's feature teaches the student's."""
    own, labelled = region_cross_entropy(student_logits, labels, grid)
    peer, _ = region_cross_entropy(peer_logits, labels, grid)
    return (peer < own) & labelled


def region_selective_loss(projected: torch.Tensor, peer_feature: torch.Tensor, teach: torch.Tensor) -> torch.Tensor:
    """Region-wise BSD from one peer: `projected` the student's feature mapped onto the peer's (B, C, h, w)
    `peer_feature`, `teach` the (B, g, g) `region_teacher_mask`.  With e(i) = mean_c (projected_c(i) -
    peer_c(i))^2 at each position and a region's error the mean of e over its positions (adaptive-pooling bins
    of the h x w map, the same cells as the mask's on the image)::

        loss = sum_{regions r taught} error(r) / (B * g * g)

    No gradient reaches the peer."""
    if projected.shape != peer_feature.shape:
        raise ConfigError(f"good_student: the projected feature {list(projected.shape)} and the peer's feature "
                          f"{list(peer_feature.shape)} differ in shape")
    error = (projected.float() - peer_feature.detach().float()).pow(2).mean(1, keepdim=True)
    region_error = F.adaptive_avg_pool2d(error, teach.shape[-2:])[:, 0]
    return torch.where(teach, region_error, torch.zeros_like(region_error)).sum() / teach.numel()


def heterogeneous_feature_loss(projected: torch.Tensor, peer_feature: torch.Tensor) -> torch.Tensor:
    """HFD from one peer: the mean squared error between the student's low-layer feature projected onto the
    peer's (same shape) and the peer's, ``mean_{b, c, i} (projected - peer)^2``.  No gradient reaches the peer."""
    if projected.shape != peer_feature.shape:
        raise ConfigError(f"good_student: the projected feature {list(projected.shape)} and the peer's feature "
                          f"{list(peer_feature.shape)} differ in shape")
    return F.mse_loss(projected.float(), peer_feature.detach().float())


@register_method("good_student", family="dense", cross_arch=True,
                 description="CNN+ViT peers: feature mimicry + selective KD",
                 scope="our reading of the paper (its method section and code were not available to us): HFD, "
                       "region-wise and pixel-wise bidirectional selective distillation as `kdzoo methods` describes",
                 layers="stage:0 (HFD) and decoder:0 (region-wise BSD) of each student, onto the peer's same taps",
                 paper="Zhu et al. 2023, A Good Student is Cooperative and Reliable: CNN-Transformer Collaborative "
                       "Learning for Semantic Segmentation")
class GoodStudent(Method):
    """Heterogeneous feature distillation and bidirectional selective distillation between peers.

    Our reading, not a verified reproduction: we could read only the paper's abstract (no method section and no
    code of the authors were available), so the following are our choices.

    - HFD: each student's ``hfd_layer`` (default ``stage:0``, the first tap of every layout: the lowest encoder
      layer) passes a learned 1x1 conv + BatchNorm (no ReLU, since a transformer's features are signed) to the
      peer's width, is resized to the peer's map (average-pooled down, bilinear up), and its MSE to the peer's
      same tap is the loss.  The projection is on the learning side, so the target (the peer) is never a
      learned map and the two cannot agree on a collapsed common space.
    - Region-wise BSD: regions are a ``region_grid`` x ``region_grid`` grid of the image; a region's reliability
      is the mean per-pixel cross-entropy of a student's prediction over the region's labelled pixels, and where
      the peer's is lower the student's ``region_layer`` feature (default ``decoder:0``, the feature entering the
      classifier), projected as in HFD, mimics the peer's by MSE.  Averaged over all regions.
    - Pixel-wise BSD: at each labelled pixel, where the peer's cross-entropy against the mask is lower, the
      student learns KL(peer || student) of the softened predictions; averaged over all labelled pixels, T^2
      scaled.  Unlabelled pixels (-1) have no reliability and exchange nothing; ties exchange nothing.
    - With more than two students each term is averaged over the peers, as DML.  Weights 1 and temperature 1
      are our defaults (the total loss is each student's cross-entropy plus the three terms).

    Options:
        hfd_weight: multiplier of the heterogeneous feature distillation term (0 turns it off)
        region_weight: multiplier of the region-wise selective distillation term (0 turns it off)
        pixel_weight: multiplier of the pixel-wise selective distillation term (0 turns it off)
        temperature: softmax temperature of the pixel-wise KL
        region_grid: regions per side of the image for the region-wise term
        hfd_layer: tap whose feature HFD matches between the students (a low layer)
        region_layer: tap whose feature the region-wise term matches between the students
    """

    ce_weight = 1.0
    needs_teacher = False
    needs_peers = True
    reads_labels = True
    reads_maps = True
    tasks = frozenset({"segmentation"})

    def __init__(self, hfd_weight: NonNegative = 1.0, region_weight: NonNegative = 1.0,
                 pixel_weight: NonNegative = 1.0, temperature: Positive = 1.0, region_grid: PositiveInt = 4,
                 hfd_layer: str = "stage:0", region_layer: str = "decoder:0"):
        super().__init__()
        self.hfd_weight, self.region_weight, self.pixel_weight = hfd_weight, region_weight, pixel_weight
        self.temperature, self.region_grid = temperature, region_grid
        self.hfd_layer, self.region_layer = hfd_layer, region_layer
        wanted = [hfd_layer] * bool(hfd_weight) + [region_layer] * bool(region_weight)
        self.student_taps = tuple(dict.fromkeys(wanted))
        self._own_shapes: dict[str, torch.Size] = {}

    def build(self, setup) -> None:
        self._own_shapes = {tap: setup.student_shapes[tap] for tap in self.student_taps}

    def build_peers(self, peer_shapes: Sequence[dict[str, torch.Size]]) -> None:
        """One projection per peer and per term, from this student's map to the peer's width and size."""
        if self.hfd_weight:
            self.hfd_adapters = nn.ModuleList([self._projection(self.hfd_layer, shapes, "hfd_layer")
                                               for shapes in peer_shapes])
        if self.region_weight:
            self.region_adapters = nn.ModuleList([self._projection(self.region_layer, shapes, "region_layer")
                                                  for shapes in peer_shapes])
            for shapes in peer_shapes:
                self._check_grid(self._own_shapes[self.region_layer], shapes[self.region_layer])

    def _projection(self, tap: str, peer_shapes: dict[str, torch.Size], option: str) -> nn.Module:
        own, peer = self._own_shapes.get(tap), peer_shapes.get(tap)
        if own is None or peer is None or len(own) != 4 or len(peer) != 4:
            shown = [list(shape) if shape is not None else None for shape in (own, peer)]
            raise ConfigError(f"good_student: {option} {tap!r} needs (B, C, h, w) maps on every student, got "
                              f"{shown[0]} (this student) and {shown[1]} (the peer)")
        return ConvAdapter(own[1], peer[1], tuple(peer[2:]), relu=False)

    def _check_grid(self, own: torch.Size, peer: torch.Size) -> None:
        smallest = min(*own[2:], *peer[2:])
        if self.region_grid > smallest:
            raise ConfigError(f"good_student: region_grid {self.region_grid} exceeds the {self.region_layer} maps "
                              f"{list(own[2:])} / {list(peer[2:])}; use at most {smallest}")

    def forward(self, ctx: Context) -> dict[str, torch.Tensor]:
        if not ctx.peer_logits:
            raise ConfigError("good_student: no peer outputs; train it with a 'peers:' section (two or more "
                              "students)")
        count = len(ctx.peer_logits)
        built = len(getattr(self, "hfd_adapters", getattr(self, "region_adapters", [None] * count)))
        if built != count or len(ctx.peer_features) != count:
            raise ConfigError(f"good_student: built for {built} peers, got {count} peers' logits and "
                              f"{len(ctx.peer_features)} peers' features")
        losses: dict[str, torch.Tensor] = {}
        if self.hfd_weight:
            own = ctx.student[self.hfd_layer]
            terms = [heterogeneous_feature_loss(self._project(self.hfd_adapters[k], own, peer[self.hfd_layer]),
                                                peer[self.hfd_layer]) for k, peer in enumerate(ctx.peer_features)]
            losses["hfd"] = self.hfd_weight * torch.stack(terms).mean()
        if self.region_weight:
            own = ctx.student[self.region_layer]
            terms = []
            for k, (peer, peer_logits) in enumerate(zip(ctx.peer_features, ctx.peer_logits)):
                teach = region_teacher_mask(ctx.student_logits, peer_logits, ctx.labels, self.region_grid)
                projected = self._project(self.region_adapters[k], own, peer[self.region_layer])
                terms.append(region_selective_loss(projected, peer[self.region_layer], teach))
            losses["region_bsd"] = self.region_weight * torch.stack(terms).mean()
        if self.pixel_weight:
            terms = [pixel_selective_loss(ctx.student_logits, peer_logits, ctx.labels, self.temperature)
                     for peer_logits in ctx.peer_logits]
            losses["pixel_bsd"] = self.pixel_weight * torch.stack(terms).mean()
        return losses

    @staticmethod
    def _project(adapter: nn.Module, own: torch.Tensor, peer: torch.Tensor) -> torch.Tensor:
        return resize_like(adapter(own), tuple(peer.shape[-2:]))  # the peer's size in this batch
