"""NRR-DD (Tran, Le, Le, Do & Phung 2025, "Enhancing Dataset Distillation via Non-Critical Region Refinement",
CVPR, arXiv 2503.18267): RDED-style stitched real crops whose critical regions (high class activation) are kept
and whose non-critical regions are optimised towards class-general features, plus Distance-Based Representative
(DBR) knowledge transfer, which replaces a crop's stored soft label by two distances.

What the paper describes, and what this file does:
  1. Critical-based Initial Data Discovery (CIDD): crops that hold the class evidence (a high CAM ratio) but on
     which the observer is least confident.  Here: RDED's candidates (`rded.RDED`: `mipc` images, `num_crop`
     square crops each); each image keeps the crop holding the largest share of its CAM mass (`box_mass_ratio`
     of the image's CAM, Zhou et al. 2016), and the class keeps the `ipc * factor^2` crops of highest observer
     cross-entropy (`patch_order="low_confidence"`; "high_confidence" is RDED's order), stitched as RDED.
  2. Non-Critical Region Refinement (NRR): the mask M = max(0, epsilon - C) of the stitched image's normalised
     CAM C (`non_critical_mask`), and updates x <- x - M * eta * grad L_C with L_C = L_ce + alpha_bn L_bn: the
     observer's cross-entropy plus SRe2L's BatchNorm-statistics matching (`decoupled.BatchNormStatistics`).
     Critical pixels (C >= epsilon) never change.
  3. DBR: per augmented (cropped, CutMix-ed) instance the teacher's two distances d_org = CE(T(x), y_org) and
     d_aug = CE(T(x), y_aug) to one-hot labels (`dbr_distances`); the student minimises L_S = L_ce + alpha_dbr
     L_dbr (`dbr_student_loss`).  `train_dbr_networks` trains fresh networks that way on kdzoo's stacked trainer.

Reference code: github.com/tmtuan1307/NRR-DD could NOT be read (no snapshot of it was available to us), nor the
paper's method section; what is above comes from the paper's abstract and Fig. 2 caption and from secondary
summaries of it.  So these are OUR READINGS, each a choice to check against the authors' code:
  * CAM: `class_activation_maps` is the per-location contribution of the observer's last stage map to the class
    logit, sum_k f_k(h, w) dz_y / df_k(h, w) (exactly Zhou et al.'s CAM / (h w) for a global-pool + linear head,
    the exact logit share for ConvNet's flatten + linear head), min-max normalised per image and upsampled
    bilinearly (Zhou's `returnCAM`); the mask is computed once, on the stitched images before refinement;
  * CIDD's "top-t patches by CAM ratio" with t = 1 (the single highest-ratio crop per image);
  * the refinement optimiser: Adam with SRe2L's recover betas (`momentum_img`, 0.9) and lr 0.25, the step (not
    the gradient) masked, so with plain SGD it is exactly the paper's x - M eta grad; SRe2L's pixel clip after
    every step; epsilon 0.5, alpha_bn 0.01 with SRe2L's first-layer multiplier 10, 1000 iterations;
  * DBR: y_aug is the one-hot label of the CutMix partner (the class pasted in), L_ce the CutMix cross-entropy
    lambda CE(S, y_org) + (1 - lambda) CE(S, y_aug) with lambda the original image's area share, L_dbr the squared
    differences of the student's and the teacher's two distances, summed (batch mean), temperature 1, alpha_dbr 1;
  * the set's default evaluation is RDED's online soft-label protocol (the paper's main tables use soft labels;
    DBR is its storage-saving variant).  The paper stores the two distances per crop and epoch (FKD-style, 2
    floats in place of a class vector); `train_dbr_networks` computes the same two numbers online from the
    teacher per augmented batch, so nothing is stored and `SyntheticSet.labels` stays the (N,) classes.
    ``eval.teacher_labels=dbr`` (or `EvalOptions(teacher_labels="dbr")`) evaluates any set that carries a teacher
    with `train_dbr_networks` (temperature 1 unless ``eval.temperature`` says otherwise).
  * `train_dbr_networks` passes each image's class through `train_stack` in one extra input channel (a constant
    plane, `with_label_plane`), because `train_stack`'s `relabel` sees only the augmented inputs; the augmentation
    writes (y_org, y_aug, lambda) into that plane and the student's gradient function drops it before the
    forward pass.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, ClassVar, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from ..engine.optim import descend
from ..engine.stacked import GradientFn, StackedModels, StackHooks, StackTraining, train_stack
from ..errors import ConfigError
from ..registry import NonNegative, NonNegativeInt, Positive, UnitInterval, register_condenser
from ..taps import Taps, discover_layout
from .base import EvalProtocol, SyntheticSet
from .decoupled import BatchNormStatistics, clamp_to_pixels
from .evaluate import register_student_trainer
from .rded import RDED, RDED_EVAL, ClassCandidates, observer_losses, pad_to
from .relabel import DEFAULT_MIX_ALPHA, OnlineCrops, cutmix_box, cutmix_masks

NRR_PAPER = ("Tran, Le, Le, Do & Phung 2025, Enhancing Dataset Distillation via Non-Critical Region Refinement "
             "(CVPR)")
PATCH_ORDERS = ("low_confidence", "high_confidence")


# --- class activation maps and the non-critical mask --------------------------------------------------------------


def class_activation_maps(network: nn.Module, images: torch.Tensor, labels: torch.Tensor, layer: str) -> torch.Tensor:
    """(B, h, w): sum over channels of f * dz_y/df at `layer`'s output map f, z_y the logit of each image's label.
    For a linear head after `layer` this is each location's share of the logit (bias aside): Zhou et al.'s CAM
    sum_k w_yk f_k(h, w), divided by h * w, behind global average pooling."""
    with torch.enable_grad():
        x = images.detach().requires_grad_(True)  # puts the frozen network's map in a graph
        with Taps(network, [layer]) as taps:
            logits = network(x)
            feature = taps.get(layer)
        (gradient,) = torch.autograd.grad(logits.gather(1, labels.view(-1, 1)).sum(), feature)
    return (gradient * feature).sum(1).detach()


def normalised_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zhou et al.'s `returnCAM`: each map minus its minimum, divided by its maximum, resized bilinearly to
    `size`: (B, H, W) in [0, 1].  A constant map becomes zeros."""
    flat = maps.flatten(1)
    shifted = flat - flat.min(1, keepdim=True).values
    scaled = shifted / shifted.max(1, keepdim=True).values.clamp_min(torch.finfo(maps.dtype).tiny)
    return F.interpolate(scaled.view_as(maps)[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def non_critical_mask(cam: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The paper's M = max(0, epsilon - C): 0 on critical pixels (C >= epsilon), growing as C falls."""
    return (epsilon - cam).clamp_min(0)


def box_mass_ratio(maps: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """The share of each non-negative map's mass inside each box: `maps` (n, H, W), `boxes` (m, n, 4) of (top,
    left, height, width) -> (m, n).  A map without mass gives 0."""
    integral = F.pad(maps.double().cumsum(1).cumsum(2), (1, 0, 1, 0))  # (n, H + 1, W + 1), exact box sums
    top, left, height, width = (b.long() for b in boxes.to(maps.device).unbind(-1))
    image = torch.arange(maps.shape[0], device=maps.device).expand_as(top)

    def corner(rows, cols):
        return integral[image, rows, cols]

    inside = corner(top + height, left + width) - corner(top, left + width) - corner(top + height, left) + \
        corner(top, left)
    total = integral[:, -1, -1].expand_as(inside)
    return torch.where(total > 0, inside / total.clamp_min(1e-300), torch.zeros_like(inside)).to(maps.dtype)


def masked_update(updated: torch.Tensor, before: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The optimiser's step kept only where the mask lets it: before + M * (updated - before).  With plain
    gradient descent (updated = before - eta grad) this is the paper's x - M eta grad."""
    return before + mask * (updated - before)


def refinement_loss(logits: torch.Tensor, labels: torch.Tensor, bn_loss: torch.Tensor, bn_weight: float
                    ) -> torch.Tensor:
    """L_C = CE(logits, labels) + alpha_bn L_bn (L_bn: SRe2L's BatchNorm-statistics matching)."""
    return F.cross_entropy(logits, labels) + bn_weight * bn_loss


# --- DBR -----------------------------------------------------------------------------------------------------------


def dbr_distances(logits: torch.Tensor, original: torch.Tensor, augmented: torch.Tensor, temperature: float = 1.0
                  ) -> torch.Tensor:
    """(B, 2): the cross-entropy of softmax(logits / T) to the one-hot `original` and `augmented` labels,
    d = -log softmax(z / T)[y]."""
    log_probs = F.log_softmax(logits.float() / temperature, -1)
    return -torch.stack([log_probs.gather(-1, original.view(-1, 1)).squeeze(-1),
                         log_probs.gather(-1, augmented.view(-1, 1)).squeeze(-1)], -1)


def dbr_student_loss(student_logits: torch.Tensor, teacher_distances: torch.Tensor, original: torch.Tensor,
                     augmented: torch.Tensor, original_share: torch.Tensor, weight: float, temperature: float = 1.0
                     ) -> torch.Tensor:
    """L_S = L_ce + alpha_dbr L_dbr, batch means: L_ce = lambda CE(S, y_org) + (1 - lambda) CE(S, y_aug) (CutMix's
    mixed hard label, lambda = `original_share`), L_dbr = (d^S_org - d^T_org)^2 + (d^S_aug - d^T_aug)^2 with the
    student's distances `dbr_distances(student_logits)` at `temperature`."""
    hard = dbr_distances(student_logits, original, augmented)
    mixed_ce = (original_share * hard[:, 0] + (1 - original_share) * hard[:, 1]).mean()
    student = hard if temperature == 1.0 else dbr_distances(student_logits, original, augmented, temperature)
    return mixed_ce + weight * ((student - teacher_distances) ** 2).sum(-1).mean()


LABEL_CARRIER = 3  # carrier-plane entries: original label, augmented label, original's area share


def with_label_plane(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N, C + 1, H, W): the images with one more channel holding each image's class (constant plane), so the
    class travels with an image through `train_stack`'s batching (its `relabel` sees only the inputs)."""
    if images.shape[-2] * images.shape[-1] < LABEL_CARRIER:
        raise ConfigError("DBR training needs images of at least 3 pixels")
    plane = labels.to(images.dtype).view(-1, 1, 1, 1).expand(-1, 1, *images.shape[-2:])
    return torch.cat([images, plane], 1)


def read_carrier(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (original label, augmented label, original's share) an augmented batch carries in its last channel."""
    values = x[:, -1].flatten(1)[:, :LABEL_CARRIER]
    return values[:, 0].round().long(), values[:, 1].round().long(), values[:, 2]


@dataclass(frozen=True)
class DBRTraining:
    """How `train_dbr_networks` trains: the `teacher` whose two distances per augmented instance are matched
    (at `temperature`) with weight `weight`, on `crops` (crop + flip per image, then CutMix / MixUp / none per
    network's batch, as the soft-label evaluation)."""

    teacher: nn.Module
    temperature: Positive = 1.0
    weight: NonNegative = 1.0
    crops: OnlineCrops = field(default_factory=lambda: OnlineCrops(scale=RDED_EVAL.crop_scale, mix="cutmix"))


class DBRBatches:
    """`augment` and `relabel` for `train_stack` on `with_label_plane` inputs: crops and flips as `OnlineCrops`
    (same random stream), then per network's batch one CutMix box (or MixUp weight) with a random partner,
    recording (y_org, y_partner, lambda) in the carrier plane; `relabel` returns the teacher's two distances and
    the carrier: (B, 5) = (d_org, d_aug, y_org, y_aug, lambda)."""

    def __init__(self, dbr: DBRTraining):
        self.dbr = dbr
        self.crop_only = dataclasses.replace(dbr.crops, mix="none")

    def augment(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        original = x[:, -1, 0, 0].round().long()
        crops = self.crop_only.augment(x[:, :-1], groups=groups)
        mix, (height, width) = self.dbr.crops.mix, crops.shape[-2:]
        partner = torch.arange(len(x), device=x.device)
        share = torch.ones(len(x), dtype=crops.dtype, device=x.device)
        if mix != "none":
            per_group = len(x) // groups
            alpha = self.dbr.crops.mix_alpha or DEFAULT_MIX_ALPHA[mix]
            lams = torch.distributions.Beta(alpha, alpha).sample((groups,)).tolist()
            partner = torch.cat([g * per_group + torch.randperm(per_group) for g in range(groups)]).to(x.device)
            if mix == "mixup":
                share = torch.tensor(lams, dtype=crops.dtype, device=x.device).repeat_interleave(per_group)
                crops = share.view(-1, 1, 1, 1) * crops + (1 - share.view(-1, 1, 1, 1)) * crops[partner]
            else:
                boxes = torch.tensor([cutmix_box(height, width, lam, None) for lam in lams]).repeat_interleave(
                    per_group, 0).to(x.device)
                inside = cutmix_masks(boxes, (height, width))
                crops = torch.where(inside, crops[partner], crops)
                share = 1 - inside.flatten(1).to(crops.dtype).mean(1)
        carrier = torch.zeros(len(x), height * width, dtype=crops.dtype, device=x.device)
        carrier[:, 0], carrier[:, 1], carrier[:, 2] = original.to(crops.dtype), original[partner].to(crops.dtype), share
        return torch.cat([crops, carrier.view(len(x), 1, height, width)], 1)

    @torch.no_grad()
    def relabel(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        original, augmented, share = read_carrier(x)
        distances = dbr_distances(self.dbr.teacher(x[:, :-1]), original, augmented, self.dbr.temperature)
        return torch.cat([distances, original[:, None].float(), augmented[:, None].float(), share[:, None].float()], 1)


def dbr_gradient(base: nn.Module, weight: float, temperature: float) -> GradientFn:
    """The gradient of `dbr_student_loss` for one network on one carried batch, a pure function of (params,
    buffers, x, y) with y the (B, 5) rows of `DBRBatches.relabel`."""

    def loss(params, buffers, x, y):
        logits = functional_call(base, (params, buffers), (x[:, :-1],))
        return dbr_student_loss(logits, y[:, :2], y[:, 2].long(), y[:, 3].long(), y[:, 4], weight, temperature)

    return grad(loss)


def train_dbr_networks(networks: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor,
                       settings: StackTraining, dbr: DBRTraining, progress: Optional[str] = None) -> StackedModels:
    """Train same-architecture `networks` (for C-channel inputs) on (images (N, C, H, W), labels (N,)) with DBR
    knowledge transfer on `train_stack`: each network its own batch order and augmentation, every augmented
    batch labelled with the teacher's two distances, `dbr_student_loss` descended."""
    if len({type(n) for n in networks}) != 1:
        raise ConfigError("train_dbr_networks: all networks must share one architecture")
    vectorize = images.device.type == "cuda" if settings.vectorize is None else settings.vectorize
    stack = StackedModels(networks, vectorize=vectorize)
    batches = DBRBatches(dataclasses.replace(dbr, teacher=dbr.teacher.eval()))
    train_stack(stack, with_label_plane(images, labels), labels, settings,
                dbr_gradient(stack.template, dbr.weight, dbr.temperature),
                StackHooks(augment=batches.augment, relabel=batches.relabel), progress)
    return stack


# --- the condenser -------------------------------------------------------------------------------------------------


@register_condenser("nrr_dd", paper=NRR_PAPER,
                    scope="OUR READING of the paper's abstract and figure (the authors' code could not be read here): CAM-chosen crops, refinement of the non-critical region by CE + BN matching, and DBR (two distances per instance) as the evaluation mode eval.teacher_labels=dbr")
@dataclass(eq=False)
class NRRDD(RDED):
    """RDED's candidate crops chosen by CAM share and low confidence, stitched, then refined outside their critical
    (high-CAM) regions by cross-entropy + BN-statistics matching.

    Options:
    iterations: refinement steps of the non-critical regions (0: the CIDD selection only)
    lr_img: the refinement's Adam learning rate (SRe2L's recover lr)
    momentum_img: the refinement's Adam first beta (SRe2L's 0.5; the second is 0.9)
    epsilon: CAM level from which a pixel is critical (kept); the mask is max(0, epsilon - CAM)
    bn_weight: alpha_bn, the weight of the BatchNorm-statistics matching in L_C
    first_bn_multiplier: the first BatchNorm layer's extra weight (SRe2L's --first-bn-multiplier)
    patch_order: low_confidence (the paper's CIDD) or high_confidence (RDED's order) across a class's images
    cam_layer: the observer layer whose map gives the CAM (None: its last stage)
    """

    iterations: NonNegativeInt = 1000
    lr_img: Positive = 0.25
    momentum_img: UnitInterval = 0.5
    epsilon: UnitInterval = 0.5
    bn_weight: NonNegative = 0.01
    first_bn_multiplier: Positive = 10.0
    patch_order: Literal["low_confidence", "high_confidence"] = "low_confidence"
    cam_layer: Optional[str] = None

    EVAL: ClassVar[EvalProtocol] = RDED_EVAL

    def resolve_options(self) -> None:
        super().resolve_options()
        if not self.epsilon > 0:
            raise ConfigError(f"{self.registry_name}: epsilon must be in (0, 1] (0 freezes every pixel), got "
                              f"{self.epsilon}")

    def check_iterations(self) -> None:
        """Iterations are refinement steps here."""

    def setup(self) -> None:
        super().setup()
        self.image_optimizer = torch.optim.Adam([self.images], lr=self.lr_img, betas=(self.momentum_img, 0.9))
        self.mask = torch.zeros_like(self.images[:, :1])

    # -- CIDD -------------------------------------------------------------------------------------------------------
    @cached_property
    def observer_cam_layer(self) -> str:
        """`cam_layer`, or the observer's last stage (found once)."""
        if self.cam_layer is not None:
            return self.cam_layer
        return discover_layout(self.observer_network, self.real.images[:2]).stages[-1]

    def cams(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Normalised CAMs (B, H, W) of network inputs for their labels, in chunks of `score_chunk`."""
        layer = self.observer_cam_layer
        return torch.cat([normalised_maps(class_activation_maps(self.observer_network, x, y, layer), self.image_size)
                          for x, y in zip(images.split(self.score_chunk), labels.split(self.score_chunk))])

    def crop_scores(self, label: int, candidates: ClassCandidates) -> tuple[torch.Tensor, torch.Tensor]:
        """Within an image: minus the crop's share of the image's CAM mass (the most critical crop wins); across
        images: the observer's cross-entropy of the crop (centred on a zero canvas, as RDED)."""
        labels = torch.full((len(candidates.images),), label, device=self.torch_device)
        ratios = box_mass_ratio(self.cams(candidates.images, labels), candidates.boxes)
        tiles = candidates.tiles.flatten(0, 1)
        losses = observer_losses(self.observer_network, pad_to(tiles, *self.image_size), label, self.score_chunk)
        return -ratios, losses.view(candidates.tiles.shape[:2])

    def rank_descending(self) -> bool:
        return self.patch_order == "low_confidence"

    def ensure_selected(self) -> None:
        if not self.selected:
            super().ensure_selected()
            self.mask = non_critical_mask(self.cams(self.images.detach(), self.labels), self.epsilon)[:, None]

    # -- NRR ---------------------------------------------------------------------------------------------------------
    def matching_loss(self) -> torch.Tensor:
        self.ensure_selected()
        with BatchNormStatistics(self.observer_network) as statistics:
            logits = self.observer_network(self.images)
        return refinement_loss(logits, self.labels, statistics.loss(self.first_bn_multiplier), self.bn_weight)

    def step(self) -> float:
        loss = self.matching_loss()
        before = self.images.detach().clone()
        descend([self.image_optimizer], loss)
        with torch.no_grad():
            self.images.copy_(masked_update(self.images, before, self.mask))
        clamp_to_pixels(self, self.images)
        return loss.item()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "mask": self.mask.detach().cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.mask = state["mask"].to(self.torch_device)

    def result(self) -> SyntheticSet:
        synthetic = super().result()
        synthetic.meta["nrr_dd"] = {"epsilon": self.epsilon, "critical_pixels": float((self.mask == 0).float().mean()),
                                    "patch_order": self.patch_order}
        return synthetic


def _dbr_students(networks: Sequence[nn.Module], images: torch.Tensor, labels: torch.Tensor, settings: StackTraining,
                  teacher: nn.Module, crops: Optional[OnlineCrops], temperature: Optional[float],
                  progress: Optional[str]) -> StackedModels:
    """The ``dbr`` evaluation mode of `evaluate_synthetic` (no augmentation: whole images, no flip, no mix)."""
    crops = crops or OnlineCrops((1.0, 1.0), flip_probability=0.0, mix="none")
    dbr = DBRTraining(teacher, crops=crops, **({"temperature": temperature} if temperature is not None else {}))
    return train_dbr_networks(networks, images, labels, settings, dbr, progress=progress)


register_student_trainer("dbr", _dbr_students)


__all__ = ["NRRDD", "class_activation_maps", "normalised_maps", "non_critical_mask", "box_mass_ratio",
           "masked_update", "refinement_loss", "dbr_distances", "dbr_student_loss", "DBRTraining", "DBRBatches",
           "dbr_gradient", "train_dbr_networks", "with_label_plane", "read_carrier"]
