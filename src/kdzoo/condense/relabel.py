"""Relabel: per-crop teacher soft labels for a fixed set of images, stored compactly, and the student training that
replays them (the "relabel" stage of squeeze-recover-relabel: SRe2L, Yin et al. NeurIPS 2023; RDED, Sun et al. CVPR
2024; both built on FKD's crop-label storage, Shen & Xing 2022, "A Fast Knowledge Distillation Framework").

    labels = generate_crop_labels(teacher, images, RelabelOptions(epochs=300))   # -> CropLabels
    labels.save("labels.safetensors"); print(labels.summary())
    student = train_on_crop_labels(student, images, CropLabels.load("labels.safetensors"))

What one epoch of labels holds, as in SRe2L's relabel/generate_soft_label.py + relabel/utils_fkd.py:
  * an order of the images (SRe2L draws it with a seeded RandomSampler), cut into batches of `batch_size`; the
    student later trains on exactly these batches (SRe2L refuses a different `--batch-size` when loading);
  * per crop, a RandomResizedCrop box (scale (0.08, 1), ratio (3/4, 4/3)) resized back to the image size with
    bilinear interpolation, then a horizontal flip with probability 0.5;
  * per batch, CutMix (SRe2L/RDED default: one permutation, one lam ~ Beta(1, 1) and one box per batch, the box
    from the reference's `rand_bbox`) or MixUp (lam ~ Beta(0.8, 0.8)), or no mixing;
  * the teacher's softmax(logits / T) on the mixed crop, top-k of it (FKD's `marginal_smoothing_k5` labels) or all
    classes.

Our choices, not the references': crop boxes are stored as integer pixels (top, left, height, width) rather than
SRe2L/FKD's normalised floats, so the student's crop is reproduced bit for bit; the mix partner and CutMix box are
stored per crop (repeated over a batch) instead of per batch file; the probabilities are stored at the generation
temperature, where SRe2L stores the raw fp16 logits of all classes and applies the temperature when it trains; and
everything is one safetensors file instead of one pickled file per batch and epoch.

The crops are made from network inputs (already normalised): bilinear interpolation and flips commute with a
per-channel affine normalisation, so this equals cropping the pixels first as the references do.  A crop is never
larger than its image and is resized back to the image size, so the resize only ever upsamples and antialiasing
(torchvision's `antialias=True`, RDED) changes nothing.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from ..engine.checkpoint import read_weights
from ..engine.runtime import atomic_write
from ..engine.stacked import StackedModels, StackHooks, StackTraining, loss_gradient, schedule_factor, train_stack
from ..errors import CheckpointError, ConfigError

FORMAT = "kdzoo.crop_labels"
VERSION = 1
MIX_TYPES = ("cutmix", "mixup", "none")
FILLS = ("smooth", "renorm")
SCHEDULES = ("cosine", "half_cosine", "linear")
# the mixing Beta's alpha when none is given: SRe2L's and RDED's `--cutmix 1.0` and `--mixup 0.8`
DEFAULT_MIX_ALPHA = {"cutmix": 1.0, "mixup": 0.8}


# --- options ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RelabelOptions:
    """How crop labels are generated.  Defaults: SRe2L's relabel/relabel.sh (300 epochs, batch 1024, scale
    (0.08, 1), CutMix, fkd-seed 42) and the temperature of its validate/train_FKD.sh (-T 20; RDED's
    argument.py also takes 20 with CutMix, 4 with MixUp).  `top_k` None keeps every class (SRe2L keeps all 1000
    logits).  `inference_batch_size` only chunks the teacher's forward pass (eval mode: same labels)."""

    epochs: int = 300
    batch_size: int = 1024
    top_k: Optional[int] = None
    temperature: float = 20.0
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5
    mix: str = "cutmix"
    mix_alpha: Optional[float] = None
    inference_batch_size: Optional[int] = None
    seed: int = 42
    progress: bool = True

    @classmethod
    def small(cls, **overrides) -> "RelabelOptions":
        """A CPU-sized preset (ours): a few epochs, small batches."""
        return replace(cls(epochs=4, batch_size=64), **overrides)

    def check(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"relabel: epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"relabel: batch_size must be at least 1, got {self.batch_size}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"relabel: top_k must be at least 1, got {self.top_k}")
        if not self.temperature > 0:
            raise ConfigError(f"relabel: temperature must be positive, got {self.temperature}")
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"relabel: scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ConfigError(f"relabel: ratio must satisfy 0 < low <= high, got {self.ratio}")
        if not 0 <= self.flip_probability <= 1:
            raise ConfigError(f"relabel: flip_probability must be in [0, 1], got {self.flip_probability}")
        if self.mix not in MIX_TYPES:
            raise ConfigError(f"relabel: mix must be one of {', '.join(MIX_TYPES)}, got {self.mix!r}")
        if self.mix_alpha is not None and not self.mix_alpha > 0:
            raise ConfigError(f"relabel: mix_alpha must be positive, got {self.mix_alpha}")
        if self.inference_batch_size is not None and self.inference_batch_size < 1:
            raise ConfigError(f"relabel: inference_batch_size must be at least 1, got {self.inference_batch_size}")


@dataclass(frozen=True)
class CropTrainOptions:
    """How a student trains on crop labels: SRe2L's validate/train_FKD.py with train_FKD.sh's flags (AdamW lr
    1e-3, weight decay 0.01 on conv/linear weights only, `--cos` schedule stepped per epoch, KL divergence with
    batchmean reduction and no T^2 factor, its `loss * T * T` line is commented out).  RDED's validation/main.py
    is the same but for a half-period cosine (`half_cosine`: lr ends at half its start).  `optimizer="sgd"` is
    SRe2L's `--sgd` (its defaults: lr 1.024, momentum 0.875, weight decay 3e-5; set `lr` and `weight_decay`).
    `epochs` None: as many as the labels hold.  `fill`: how top-k labels become distributions (see
    `dense_soft_labels`)."""

    epochs: Optional[int] = None
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.875
    schedule: str = "cosine"
    temperature_squared: bool = False
    fill: str = "smooth"
    progress: bool = True

    def check(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError(f"train_on_crop_labels: epochs must be at least 1, got {self.epochs}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ConfigError(f"train_on_crop_labels: optimizer must be 'adamw' or 'sgd', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ConfigError(f"train_on_crop_labels: lr must be positive, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train_on_crop_labels: schedule must be one of {', '.join(SCHEDULES)}, "
                              f"got {self.schedule!r}")
        if self.fill not in FILLS:
            raise ConfigError(f"train_on_crop_labels: fill must be one of {', '.join(FILLS)}, got {self.fill!r}")


# --- the stored draws --------------------------------------------------------------------------------------------


@dataclass
class EpochDraw:
    """The random choices of one epoch, per position in its order: `order` (N,) image indices; `boxes` (N, 4)
    crop top, left, height, width in pixels; `flips` (N,) bool; with mixing, `mix_partner` (N,) the position (in
    this epoch) of the crop mixed in, and `mix_box` (N, 4) the CutMix region y1, x1, y2, x2 or `mix_lam` (N,) the
    MixUp weight of the crop itself."""

    order: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor
    mix_partner: Optional[torch.Tensor] = None
    mix_box: Optional[torch.Tensor] = None
    mix_lam: Optional[torch.Tensor] = None

    def select(self, positions: slice) -> "EpochDraw":
        def part(t):
            return None if t is None else t[positions]
        return EpochDraw(self.order[positions], self.boxes[positions], self.flips[positions],
                         part(self.mix_partner), part(self.mix_box), part(self.mix_lam))

    def to(self, device: torch.device) -> "EpochDraw":
        def move(t):
            return None if t is None else t.to(device)
        return EpochDraw(move(self.order), move(self.boxes), move(self.flips), move(self.mix_partner),
                         move(self.mix_box), move(self.mix_lam))


def random_resized_crop_boxes(count: int, height: int, width: int, options: "RelabelOptions | OnlineCrops",
                              generator: Optional[torch.Generator]) -> torch.Tensor:
    """(count, 4) int64 boxes (top, left, height, width) drawn as torchvision's `RandomResizedCrop.get_params`:
    up to 10 tries of an area fraction ~ U(scale) and a log-uniform aspect ratio, the first box that fits wins;
    if none fits, the largest centred box whose ratio is clamped into `ratio`.  Vectorised over `count` (each
    crop draws all 10 tries up front, so the random stream differs from torchvision's, not the distribution)."""
    tries = 10
    area = height * width
    low, high = options.scale
    target_area = area * (low + (high - low) * torch.rand(count, tries, generator=generator, dtype=torch.float64))
    log_low, log_high = math.log(options.ratio[0]), math.log(options.ratio[1])
    aspect = torch.exp(log_low + (log_high - log_low) * torch.rand(count, tries, generator=generator,
                                                                   dtype=torch.float64))
    w = torch.round(torch.sqrt(target_area * aspect)).long()
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(1)  # first fitting try (0 when none fits; masked below)
    any_fit = fits.any(1)
    h = h.gather(1, first[:, None]).squeeze(1)
    w = w.gather(1, first[:, None]).squeeze(1)
    # torchvision's fallback: the whole image, or its centred part at the nearest allowed aspect ratio
    in_ratio = width / height
    if in_ratio < options.ratio[0]:
        fallback_w, fallback_h = width, round(width / options.ratio[0])
    elif in_ratio > options.ratio[1]:
        fallback_h, fallback_w = height, round(height * options.ratio[1])
    else:
        fallback_w, fallback_h = width, height
    h = torch.where(any_fit, h, torch.full_like(h, fallback_h))
    w = torch.where(any_fit, w, torch.full_like(w, fallback_w))
    # top ~ U{0..height-h}, left ~ U{0..width-w}, as torch.randint(0, height - h + 1)
    top = (torch.rand(count, generator=generator, dtype=torch.float64) * (height - h + 1)).floor().long()
    left = (torch.rand(count, generator=generator, dtype=torch.float64) * (width - w + 1)).floor().long()
    top = torch.where(any_fit, top, torch.full_like(top, (height - fallback_h) // 2))
    left = torch.where(any_fit, left, torch.full_like(left, (width - fallback_w) // 2))
    return torch.stack([top, left, h, w], 1)


def cutmix_box(height: int, width: int, lam: float, generator: Optional[torch.Generator]
               ) -> tuple[int, int, int, int]:
    """SRe2L/RDED's `rand_bbox` (relabel/utils_fkd.py), in row/column names: a box of int(side * sqrt(1 - lam))
    around a uniformly drawn centre, each half int(cut / 2), clipped to the image; (y1, x1, y2, x2)."""
    cut_rows, cut_cols = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    centre_row = int(torch.randint(height, (1,), generator=generator))
    centre_col = int(torch.randint(width, (1,), generator=generator))
    y1, y2 = (min(max(centre_row + s * (cut_rows // 2), 0), height) for s in (-1, 1))
    x1, x2 = (min(max(centre_col + s * (cut_cols // 2), 0), width) for s in (-1, 1))
    return y1, x1, y2, x2


def draw_epoch(num_images: int, image_size: tuple[int, int], options: RelabelOptions,
               generator: torch.Generator) -> EpochDraw:
    """One epoch's order, crops, flips and (per batch of `options.batch_size`) mixing, all from `generator`."""
    height, width = image_size
    order = torch.randperm(num_images, generator=generator)
    boxes = random_resized_crop_boxes(num_images, height, width, options, generator)
    flips = torch.rand(num_images, generator=generator) < options.flip_probability
    if options.mix == "none":
        return EpochDraw(order, boxes, flips)
    alpha = options.mix_alpha or DEFAULT_MIX_ALPHA[options.mix]
    # torch draws no Beta from a Generator: a numpy generator seeded from the torch stream keeps it reproducible
    beta = np.random.default_rng(int(torch.randint(2 ** 62, (1,), generator=generator)))
    partner = torch.empty(num_images, dtype=torch.long)
    mix_box = torch.zeros(num_images, 4, dtype=torch.long)
    mix_lam = torch.ones(num_images, dtype=torch.float32)
    for start in range(0, num_images, options.batch_size):
        stop = min(start + options.batch_size, num_images)
        partner[start:stop] = start + torch.randperm(stop - start, generator=generator)
        lam = float(beta.beta(alpha, alpha))
        if options.mix == "cutmix":
            mix_box[start:stop] = torch.tensor(cutmix_box(height, width, lam, generator))
        else:
            mix_lam[start:stop] = lam
    if options.mix == "cutmix":
        return EpochDraw(order, boxes, flips, partner, mix_box=mix_box)
    return EpochDraw(order, boxes, flips, partner, mix_lam=mix_lam)


# --- applying a draw -----------------------------------------------------------------------------------------


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop box b of image b and resize it to `size` with bilinear interpolation, batched: for every image at once
    what `torchvision.transforms.v2.functional.resized_crop(image, *box, size)` does to one (PyTorch's
    `align_corners=False` sampling, source coordinates clamped to the crop)."""
    n, _, _, _ = images.shape
    out_h, out_w = size
    boxes = boxes.to(images.device).long()
    top, left, crop_h, crop_w = boxes.unbind(1)

    def axis(origin, extent, out):  # (n, out) lower index, upper index and weight of the upper one
        scale = extent.double() / out
        source = ((torch.arange(out, device=images.device, dtype=torch.float64) + 0.5) * scale[:, None] - 0.5)
        source = source.clamp_min(0)
        lower = source.floor().long().minimum(extent[:, None] - 1)
        upper = (lower + 1).minimum(extent[:, None] - 1)
        weight = (source - lower).to(images.dtype)
        return origin[:, None] + lower, origin[:, None] + upper, weight

    y0, y1, wy = axis(top, crop_h, out_h)
    x0, x1, wx = axis(left, crop_w, out_w)
    pixels = images.permute(0, 2, 3, 1)  # (n, H, W, C): one gather per corner
    batch = torch.arange(n, device=images.device)[:, None, None]

    def corner(ys, xs):
        return pixels[batch, ys[:, :, None], xs[:, None, :]]

    wy, wx = wy[:, :, None, None], wx[:, None, :, None]
    top_row = corner(y0, x0) * (1 - wx) + corner(y0, x1) * wx
    bottom_row = corner(y1, x0) * (1 - wx) + corner(y1, x1) * wx
    return (top_row * (1 - wy) + bottom_row * wy).permute(0, 3, 1, 2).contiguous()


def cutmix_masks(mix_box: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(n, 1, H, W) bool: inside box (y1, x1, y2, x2) of each crop."""
    rows = torch.arange(size[0], device=mix_box.device)
    cols = torch.arange(size[1], device=mix_box.device)
    y1, x1, y2, x2 = (c[:, None] for c in mix_box.long().unbind(1))
    inside_rows = (rows >= y1) & (rows < y2)
    inside_cols = (cols >= x1) & (cols < x2)
    return (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]


def make_crops(images: torch.Tensor, draw: EpochDraw, positions: slice) -> torch.Tensor:
    """The network inputs of the crops at `positions` of an epoch: crop+resize, flip, then mix with partners that
    lie in the same slice (a batch).  The teacher labelled exactly these tensors; the student trains on them."""
    part = draw.select(positions).to(images.device)
    crops = resized_crops(images[part.order], part.boxes, tuple(images.shape[-2:]))
    crops = torch.where(part.flips[:, None, None, None], crops.flip(-1), crops)
    if part.mix_partner is None:
        return crops
    local = part.mix_partner - (positions.start or 0)
    if part.mix_box is not None:
        return torch.where(cutmix_masks(part.mix_box, tuple(images.shape[-2:])), crops[local], crops)
    lam = part.mix_lam.to(crops.dtype)[:, None, None, None]
    return lam * crops + (1 - lam) * crops[local]


def shuffle_patches(images: torch.Tensor, factor: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """RDED's evaluation `ShufflePatches` (validation/utils.py) for one batch drawn image by image: the `factor`
    column strips in a random order, then the `factor` row strips in a random order (strips of size // factor,
    the last one to the edge)."""
    def strips(x: torch.Tensor, dim: int) -> list[torch.Tensor]:
        step = x.shape[dim] // factor
        return [x.narrow(dim, s * step, step if s < factor - 1 else x.shape[dim] - s * step) for s in range(factor)]

    out = []
    for image in images:
        columns = strips(image, -1)
        image = torch.cat([columns[p] for p in torch.randperm(factor, generator=generator).tolist()], -1)
        rows = strips(image, -2)
        out.append(torch.cat([rows[p] for p in torch.randperm(factor, generator=generator).tolist()], -2))
    return torch.stack(out)


# --- online crops (labels computed by the teacher per batch, not stored) -------------------------------------------


@dataclass(frozen=True)
class OnlineCrops:
    """The crops of the relabel protocol drawn afresh for every batch (RDED's and CV-DD's online relabelling;
    SRe2L stores the same draws with their labels): per image a RandomResizedCrop (`scale`, `ratio`) resized back
    and a flip with probability `flip_probability`, then per batch one `mix` (CutMix box or MixUp weight from
    Beta(alpha, alpha)) with a random partner of the same batch.  `augment(x, groups=K)`: K batches, each mixed
    within itself (one per stacked network), as `engine.stacked.train_stack` calls it."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_probability: float = 0.5
    mix: str = "cutmix"
    mix_alpha: Optional[float] = None
    patch_shuffle: int = 1  # RDED: shuffle each image's factor x factor patches first (`shuffle_patches`)

    def __post_init__(self) -> None:
        if self.patch_shuffle < 1:
            raise ConfigError(f"patch_shuffle must be >= 1, got {self.patch_shuffle}")
        RelabelOptions(epochs=1, batch_size=1, scale=tuple(self.scale), ratio=tuple(self.ratio),
                       flip_probability=self.flip_probability, mix=self.mix, mix_alpha=self.mix_alpha).check()

    def augment(self, x: torch.Tensor, groups: int = 1) -> torch.Tensor:
        n, size = len(x), tuple(x.shape[-2:])
        if self.patch_shuffle > 1:
            x = shuffle_patches(x, self.patch_shuffle)
        boxes = random_resized_crop_boxes(n, *size, self, None)
        crops = resized_crops(x, boxes, size)
        flips = (torch.rand(n) < self.flip_probability).to(x.device)
        crops = torch.where(flips[:, None, None, None], crops.flip(-1), crops)
        if self.mix == "none":
            return crops
        alpha = self.mix_alpha or DEFAULT_MIX_ALPHA[self.mix]
        per_group = n // groups
        lams = torch.distributions.Beta(alpha, alpha).sample((groups,)).tolist()
        partner = torch.cat([g * per_group + torch.randperm(per_group) for g in range(groups)]).to(x.device)
        if self.mix == "mixup":
            lam = torch.tensor(lams, dtype=crops.dtype, device=x.device).repeat_interleave(per_group)
            lam = lam[:, None, None, None]
            return lam * crops + (1 - lam) * crops[partner]
        mix_box = torch.tensor([cutmix_box(*size, lam, None) for lam in lams]).repeat_interleave(per_group, 0)
        return torch.where(cutmix_masks(mix_box.to(x.device), size), crops[partner], crops)


@dataclass(frozen=True)
class LogitMix:
    """MixUp of stored soft labels, per network's batch (INFER's static labels, ufc_validation/val_static.py): one
    lam ~ Beta(alpha, alpha) and a random partner in the same batch per batch; inputs mix linearly, the target is
    softmax(lam log p_i + (1 - lam) log p_j), which is the authors' softmax of the interpolated stored logits at the
    labels' temperature.  `__call__(x, y, groups=K)`, as `engine.stacked.train_stack`'s `mix` hook."""

    alpha: float = 0.8

    def __post_init__(self) -> None:
        if not self.alpha > 0:
            raise ConfigError(f"mix alpha must be positive, got {self.alpha}")

    def __call__(self, x: torch.Tensor, y: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        if not y.is_floating_point():
            raise ConfigError("static label mixing needs soft labels (N, classes); this set has class indices")
        per_group = len(x) // groups
        lam = torch.distributions.Beta(self.alpha, self.alpha).sample((groups,)).repeat_interleave(per_group)
        partner = torch.cat([g * per_group + torch.randperm(per_group) for g in range(groups)]).to(x.device)
        lam = lam.to(x.device, x.dtype)
        mixed_x = lam.view(-1, *[1] * (x.dim() - 1)) * x + (1 - lam.view(-1, *[1] * (x.dim() - 1))) * x[partner]
        log_p = y.float().clamp_min(1e-12).log()
        mixed_y = torch.softmax(lam[:, None] * log_p + (1 - lam[:, None]) * log_p[partner], -1)
        return mixed_x, mixed_y


# --- soft labels -------------------------------------------------------------------------------------------------


def top_k_probabilities(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of softmax(logits / T) and their class indices, largest first."""
    return torch.softmax(logits.float() / temperature, -1).topk(k, -1)


def dense_soft_labels(values: torch.Tensor, classes: Optional[torch.Tensor], num_classes: int,
                      fill: str = "smooth") -> torch.Tensor:
    """Stored top-k probabilities -> (..., num_classes) distributions.  `classes` None: `values` hold every class
    in class order.  `smooth` spreads the mass left outside the top k evenly over the other classes (FKD's
    `marginal_smoothing_k5`, RDED's `keep_top_k`); `renorm` rescales the top k to sum to 1 (FKD's
    `marginal_renorm`).  Ours: a final division by the sum absorbs float16 rounding, so targets sum to 1."""
    if fill not in FILLS:
        raise ConfigError(f"fill must be one of {', '.join(FILLS)}, got {fill!r}")
    values = values.float()
    if classes is None:
        dense = values.clamp_min(0)
    else:
        k = values.shape[-1]
        if fill == "smooth" and k < num_classes:
            rest = (1 - values.sum(-1, keepdim=True)).clamp_min(0) / (num_classes - k)
        else:
            rest = torch.zeros_like(values[..., :1])
        dense = rest.expand(*values.shape[:-1], num_classes).clone()
        dense.scatter_(-1, classes.long(), values)
    return dense / dense.sum(-1, keepdim=True).clamp_min(1e-12)


def soft_label_kl(student_logits: torch.Tensor, targets: torch.Tensor, temperature: float,
                  temperature_squared: bool = False) -> torch.Tensor:
    """KL(targets || softmax(student_logits / T)) summed over classes, mean over the batch: `nn.KLDivLoss(
    reduction='batchmean')(log_softmax(z / T), p)` as SRe2L and RDED compute it; x T^2 only if asked."""
    log_q = F.log_softmax(student_logits.float() / temperature, -1)
    kl = (torch.xlogy(targets, targets) - targets * log_q).sum(-1).mean()
    return kl * temperature ** 2 if temperature_squared else kl


# --- the file ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CropLabelSpec:
    """What a crop-label file was made with (its JSON metadata)."""

    num_images: int
    image_shape: tuple[int, int, int]
    num_classes: int
    top_k: int
    temperature: float
    batch_size: int
    mix: str
    mix_alpha: Optional[float]
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip_probability: float
    seed: int

    @property
    def full(self) -> bool:
        return self.top_k == self.num_classes


DRAW_KEYS = ("order", "boxes", "flips", "mix_partner", "mix_box", "mix_lam")


def _index_dtype(num_classes: int) -> torch.dtype:
    return torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32


def _format_bytes(count: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


@dataclass
class CropLabels:
    """E epochs x N crops of labels: per epoch and position the draw (`EpochDraw` fields stacked over epochs:
    order int32, boxes int16, flips bool, mix_partner int32, mix_box int16, mix_lam float32) and the teacher's
    `probs` (E, N, k) float16 with `classes` (E, N, k) int16 (int32 past 32767 classes); without `classes` when
    k is every class (probabilities in class order)."""

    spec: CropLabelSpec
    tensors: dict[str, torch.Tensor] = field(repr=False)

    @property
    def epochs(self) -> int:
        return self.tensors["order"].shape[0]

    def draw(self, epoch: int) -> EpochDraw:
        return EpochDraw(**{k: self.tensors[k][epoch].long() if k in ("order", "boxes", "mix_partner", "mix_box")
                            else self.tensors[k][epoch] for k in DRAW_KEYS if k in self.tensors})

    def targets(self, epoch: int, positions: slice, fill: str = "smooth") -> torch.Tensor:
        classes = self.tensors.get("classes")
        return dense_soft_labels(self.tensors["probs"][epoch, positions],
                                 None if classes is None else classes[epoch, positions], self.spec.num_classes, fill)

    def nbytes(self) -> int:
        """Bytes of the stored tensors (a saved file adds its JSON header: `file_bytes`)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def summary(self, size_bytes: Optional[int] = None) -> str:
        """One line, e.g. ``soft labels: 300 epochs x 500 crops, top-10 of 100 classes, 3.1 MB``."""
        spec = self.spec
        labels = f"full softmax of {spec.num_classes} classes" if spec.full else \
            f"top-{spec.top_k} of {spec.num_classes} classes"
        size = self.nbytes() if size_bytes is None else size_bytes
        return (f"soft labels: {self.epochs} epochs x {spec.num_images} crops, {labels}, T={spec.temperature:g}, "
                f"mix {spec.mix}, {_format_bytes(size)}")

    def save(self, path: str | Path) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        meta = json.dumps({"format": FORMAT, "version": VERSION, **asdict(self.spec)})
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"kdzoo": meta}))

    @classmethod
    def load(cls, path: str | Path) -> "CropLabels":
        tensors, meta = read_weights(path)
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a crop-label file (its metadata has no format {FORMAT!r})")
        if meta.get("version") != VERSION:
            raise CheckpointError(f"{path}: crop-label format version {meta.get('version')}, "
                                  f"this kdzoo reads {VERSION}")
        fields = {k: meta[k] for k in CropLabelSpec.__dataclass_fields__ if k in meta}
        missing = sorted(set(CropLabelSpec.__dataclass_fields__) - set(fields))
        if missing:
            raise CheckpointError(f"{path}: crop-label metadata lacks {', '.join(missing)}")
        for key in ("image_shape", "scale", "ratio"):
            fields[key] = tuple(fields[key])
        labels = cls(CropLabelSpec(**fields), tensors)
        labels.validate(str(path))
        return labels

    def validate(self, source: str = "crop labels") -> None:
        """The tensors agree with each other and with the spec; mix partners stay inside their batch."""
        spec, t = self.spec, self.tensors
        needed = {"order", "boxes", "flips", "probs"} | ({"mix_partner"} if spec.mix != "none" else set()) | \
            ({"mix_box"} if spec.mix == "cutmix" else set()) | ({"mix_lam"} if spec.mix == "mixup" else set()) | \
            (set() if spec.full else {"classes"})
        if not needed <= set(t):
            raise CheckpointError(f"{source}: missing tensor(s) {', '.join(sorted(needed - set(t)))}")
        epochs, n = t["order"].shape
        expected = {"boxes": (epochs, n, 4), "flips": (epochs, n), "mix_partner": (epochs, n),
                    "mix_box": (epochs, n, 4), "mix_lam": (epochs, n), "probs": (epochs, n, spec.top_k),
                    "classes": (epochs, n, spec.top_k)}
        for key, shape in expected.items():
            if key in t and tuple(t[key].shape) != shape:
                raise CheckpointError(f"{source}: tensor {key} has shape {tuple(t[key].shape)}, expected {shape}")
        if n != spec.num_images:
            raise CheckpointError(f"{source}: {n} crops per epoch, its metadata says {spec.num_images}")
        if "mix_partner" in t:
            position = torch.arange(n)
            if not torch.equal(t["mix_partner"].long() // spec.batch_size,
                               (position // spec.batch_size).expand(epochs, n)):
                raise CheckpointError(f"{source}: a mix partner lies outside its batch of {spec.batch_size}")

    def check_images(self, images: torch.Tensor) -> None:
        """`images` are the ones these labels were made for (count and shape)."""
        expected = (self.spec.num_images, *self.spec.image_shape)
        if tuple(images.shape) != expected:
            raise ConfigError(f"images: shape {tuple(images.shape)} does not match the crop labels' {expected}")


def file_bytes(path: str | Path) -> int:
    """Size of a saved crop-label file on disk."""
    return Path(path).stat().st_size


# --- generation ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_crop_labels(teacher: nn.Module, images: torch.Tensor, options: Optional[RelabelOptions] = None
                         ) -> CropLabels:
    """Label `options.epochs` epochs of random crops of `images` (N, C, H, W network inputs, on the teacher's
    device) with the teacher in eval mode (its mode is restored after).  Deterministic given `options.seed`:
    every draw comes from one CPU generator."""
    options = options or RelabelOptions()
    options.check()
    if images.dim() != 4 or images.shape[0] < 1:
        raise ConfigError(f"images: expected a non-empty (N, C, H, W) batch, got shape {tuple(images.shape)}")
    was_training = teacher.training
    teacher.eval()
    try:
        num_classes = teacher(images[:1]).shape[-1]
        k = num_classes if options.top_k is None else options.top_k
        if k > num_classes:
            raise ConfigError(f"relabel: top_k {k} exceeds the teacher's {num_classes} classes")
        alpha = None if options.mix == "none" else (options.mix_alpha or DEFAULT_MIX_ALPHA[options.mix])
        spec = CropLabelSpec(images.shape[0], tuple(images.shape[1:]), num_classes, k, float(options.temperature),
                             options.batch_size, options.mix, alpha, tuple(options.scale),
                             tuple(options.ratio), float(options.flip_probability), options.seed)
        return _label_epochs(teacher, images, options, spec)
    finally:
        teacher.train(was_training)


def _label_epochs(teacher: nn.Module, images: torch.Tensor, options: RelabelOptions, spec: CropLabelSpec
                  ) -> CropLabels:
    generator = torch.Generator().manual_seed(options.seed)
    n, size = spec.num_images, tuple(images.shape[-2:])
    chunk = options.inference_batch_size or options.batch_size
    draws, probs, classes = [], [], []
    for _ in tqdm(range(options.epochs), desc="relabel", disable=not options.progress, leave=False,
                  dynamic_ncols=True):
        draw = draw_epoch(n, size, options, generator)
        epoch_probs, epoch_classes = [], []
        for start in range(0, n, options.batch_size):
            crops = make_crops(images, draw, slice(start, min(start + options.batch_size, n)))
            for part in crops.split(chunk):
                logits = teacher(part)
                if spec.full:  # every class: probabilities in class order, no indices to store
                    epoch_probs.append(torch.softmax(logits.float() / spec.temperature, -1).half().cpu())
                    continue
                values, index = top_k_probabilities(logits, spec.top_k, spec.temperature)
                epoch_probs.append(values.half().cpu())
                epoch_classes.append(index.cpu())
        draws.append(draw)
        probs.append(torch.cat(epoch_probs))
        if not spec.full:
            classes.append(torch.cat(epoch_classes))
    tensors = {"order": torch.stack([d.order for d in draws]).int(),
               "boxes": torch.stack([d.boxes for d in draws]).short(),
               "flips": torch.stack([d.flips for d in draws]),
               "probs": torch.stack(probs)}
    if not spec.full:
        tensors["classes"] = torch.stack(classes).to(_index_dtype(spec.num_classes))
    if spec.mix != "none":
        tensors["mix_partner"] = torch.stack([d.mix_partner for d in draws]).int()
    if spec.mix == "cutmix":
        tensors["mix_box"] = torch.stack([d.mix_box for d in draws]).short()
    if spec.mix == "mixup":
        tensors["mix_lam"] = torch.stack([d.mix_lam for d in draws]).float()
    labels = CropLabels(spec, tensors)
    labels.validate()
    return labels


# --- training and evaluation on stored crop labels ----------------------------------------------------------------


def _as_labels(labels: "CropLabels | str | Path") -> CropLabels:
    return labels if isinstance(labels, CropLabels) else CropLabels.load(labels)


def lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    """The learning-rate multiplier of `epoch` for the crop-label schedules (see `engine.stacked.schedule_factor`)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    return schedule_factor(schedule, epoch, epochs)


def _label_epochs_used(labels: CropLabels, epochs: Optional[int]) -> int:
    if epochs is None:
        return labels.epochs
    if epochs > labels.epochs:
        raise ConfigError(f"epochs: {epochs} asked, the crop labels hold {labels.epochs}")
    return epochs


def _batches(labels: CropLabels) -> list[slice]:
    n, size = labels.spec.num_images, labels.spec.batch_size
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def train_on_crop_labels(student: nn.Module, images: torch.Tensor, labels: "CropLabels | str | Path",
                         options: Optional[CropTrainOptions] = None,
                         on_batch: Optional[Callable[[int, torch.Tensor], None]] = None) -> nn.Module:
    """Train `student` (on `images`' device) on the stored crops with the engine's stacked trainer
    (`engine.stacked.train_stack`): epoch e replays label epoch e batch by batch in the stored order and batch
    size, each crop rebuilt from its stored box, flip and mix (no teacher needed), and descends `soft_label_kl` at
    the labels' temperature; weight decay on conv/linear weights only (SRe2L's and RDED's parameter groups).
    Returns the student in eval mode.  `on_batch(epoch, crops)` sees every batch of inputs (for checks)."""
    options = options or CropTrainOptions()
    options.check()
    labels = _as_labels(labels)
    labels.check_images(images)
    epochs = _label_epochs_used(labels, options.epochs)
    temperature = labels.spec.temperature
    settings = StackTraining(epochs, options.lr, momentum=options.momentum, weight_decay=options.weight_decay,
                             optimizer=options.optimizer, betas=options.betas, schedule=options.schedule,
                             decay_weights_only=True, vectorize=False)

    def batches(epoch: int):
        draw = labels.draw(epoch).to(images.device)
        for positions in _batches(labels):
            crops = make_crops(images, draw, positions)
            if on_batch is not None:
                on_batch(epoch, crops)
            yield crops, labels.targets(epoch, positions, options.fill).to(images.device)

    stack = StackedModels([student.train()], vectorize=False)
    gradient = loss_gradient(stack.template, lambda logits, targets: soft_label_kl(
        logits, targets, temperature, options.temperature_squared))
    train_stack(stack, images, torch.zeros(len(images), device=images.device), settings, gradient,
                StackHooks(batches=batches), "train on crop labels" if options.progress else None)
    stack.write_back()
    return student.eval()


@torch.no_grad()
def crop_label_kl(model: nn.Module, images: torch.Tensor, labels: "CropLabels | str | Path",
                  epochs: Optional[int] = None, fill: str = "smooth") -> float:
    """Mean KL(stored label || model) over the stored crops of the first `epochs` epochs (all by default), the
    model in eval mode: how close a model is to the teacher on crops it need not have trained on."""
    labels = _as_labels(labels)
    labels.check_images(images)
    epochs = _label_epochs_used(labels, epochs)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for epoch in range(epochs):
        draw = labels.draw(epoch).to(images.device)
        for positions in _batches(labels):
            crops = make_crops(images, draw, positions)
            targets = labels.targets(epoch, positions, fill).to(images.device)
            total += float(soft_label_kl(model(crops), targets, labels.spec.temperature)) * len(crops)
            count += len(crops)
    model.train(was_training)
    return total / count


@torch.no_grad()
def top1_accuracy(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in % of `model` (eval mode) on network inputs `images` with class indices `targets`."""
    if len(images) != len(targets):
        raise ConfigError(f"test images: {len(images)} images but {len(targets)} labels")
    was_training = model.training
    model.eval()
    correct = sum(int((model(x).argmax(-1) == y.to(x.device)).sum())
                  for x, y in zip(images.split(batch_size), targets.split(batch_size)))
    model.train(was_training)
    return 100.0 * correct / max(1, len(images))


def evaluate_crop_labels(student: nn.Module, images: torch.Tensor, labels: "CropLabels | str | Path",
                         test_images: torch.Tensor, test_targets: torch.Tensor,
                         options: Optional[CropTrainOptions] = None) -> float:
    """The references' evaluation: train the fresh `student` on the crop labels, return its test accuracy in %."""
    trained = train_on_crop_labels(student, images, labels, options)
    return top1_accuracy(trained, test_images.to(images.device), test_targets)
