"""RDED (Sun et al. 2024, "On the Diversity and Realism of Distilled Dataset: An Efficient Dataset Distillation
Paradigm", CVPR): a selection, not an optimisation.  For every class, `mipc` random real images each give
`num_crop` random square crops (RandomResizedCrop to size/factor, scale (0.08, 1), ratio 1); the observer scores
every crop by its cross-entropy for the class (lower: more realistic and representative, the paper's
-log p(y|x)); each image keeps its lowest-loss crop, the class keeps the `ipc * factor^2` lowest of those, and
`factor x factor` of them are stitched into each synthetic image.  The set is evaluated by training fresh
networks on random crops (+ flip, + CutMix) relabelled online by the observer at T = 20.

Reference code read: github.com/LINs-lab/RDED (commit 3f6453d): synthesize/main.py (`init_images`),
synthesize/utils.py (`MultiRandomCrop`, `pad`, `cross_entropy`, `selector`, `mix_images`), argument.py (defaults
and the per-dataset batch size / AdamW lr / temperature), validation/main.py + validation/utils.py (the
evaluation: `ShufflePatches`, RandomResizedCrop(scale=(1/factor, 1)), flip, CutMix, KL at T, AdamW, half-period
cosine), scripts/*.sh (mipc 300, num_crop 5, factor 1 for CIFAR-10/100 and Tiny-ImageNet, 2 for the ImageNet
subsets).

Followed: crops are drawn as torchvision's RandomResizedCrop(size // factor, ratio=(1, 1), antialias=True) with
its default scale (0.08, 1); a crop is scored at full size, centred on a zero canvas (their `pad`, zeros in
network-input space, i.e. the per-channel mean pixel under a normalised space); the per-image minimum over
crops, then the class's `ipc * factor^2` smallest losses (ascending); stitching is `mix_images`: tile group k
(ranks k*ipc .. (k+1)*ipc - 1) fills grid cell (k // factor, k % factor) of every image, the first `H % factor`
rows / columns one pixel taller / wider by nearest-neighbour resizing.  The evaluation values are argument.py's
(table below), `schedule="half_cosine"` is validation/main.py's LambdaLR 0.5 (1 + cos(pi e / 2E)) per epoch.

Our reading / not implemented:
  * the crops are cut from network inputs (the references crop PIL pixels, then normalise): crop + resize
    commute with a per-channel affine normalisation, so this is the same up to float rounding;
  * the `mipc` images are drawn without replacement from the class (the reference reads a shuffled folder); a
    class with fewer images uses all it has, and at least `ipc * factor^2` are required (the reference fails);
  * RDED's evaluation shuffles the `factor x factor` patches of every image (validation/utils.py
    `ShufflePatches`: the column strips, then the row strips, each in a random order) before its crop.  With
    `factor` 1 (CIFAR-10/100, Tiny-ImageNet) that is the identity, so kdzoo's evaluation is RDED's.  For
    `factor` > 1 the set's protocol records `patch_shuffle = factor` and the evaluation's online crops apply
    `relabel.shuffle_patches` to every image before its crop;
  * non-square images: the crop box stays square (ratio 1) and is resized to (H // factor, W // factor);
  * `iterations` must stay 0: the selection runs once, when the set is first asked for (`final_images`), so
    there is nothing to checkpoint or resume.

Defaults (authors' values; `None` options resolve per dataset / IPC):
  mipc 300, num_crop 5 (every script); factor 1 for 32 and 64 pixel images (CIFAR-10/100, Tiny-ImageNet
  scripts), 2 for 128+ pixel images (ImageNet subsets); evaluation: 300 epochs, AdamW lr 1e-3 (ConvNet /
  ResNet-18 students), betas (0.9, 0.999), weight decay 0.01 on conv/linear weights, half-period cosine, CutMix
  (alpha 1) at T = 20, crop scale (1 / factor, 1); batch size 10 / 50 / 100 for IPC 1 / 10 / 50, x2 for 100 or
  1,000 classes, 100 for 200 classes (Tiny-ImageNet), at most ipc x classes; CIFAR-100 with a ConvNet-3 student
  and observer: batch 25, lr 2e-3 (argument.py "special experiment").
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..registry import NonNegativeInt, PositiveInt, register_condenser
from .base import EvalProtocol, SyntheticSet, jsonable, nearest_ipc
from .decoupled import SOFT_LABEL_EVAL, ObserverCondenser
from .relabel import OnlineCrops, random_resized_crop_boxes

RDED_PAPER = ("Sun et al. 2024, On the Diversity and Realism of Distilled Dataset: An Efficient Dataset "
              "Distillation Paradigm (CVPR)")

# argument.py: `re_batch_size` by IPC (then x2 for 100 and 1,000 classes; Tiny-ImageNet 100).
RDED_BATCH_BY_IPC = {1: 10, 10: 50, 50: 100}
RDED_LARGE_IMAGE = 128  # the ImageNet-subset scripts (128 and 224 pixels) stitch 2 x 2; CIFAR / Tiny (32, 64) 1 x 1
RDED_EVAL = dataclasses.replace(SOFT_LABEL_EVAL, epochs=300, lr=1e-3, batch_size=50, temperature=20.0,
                                optimizer="adamw", weight_decay=0.01, schedule="half_cosine", crop_scale=(1.0, 1.0),
                                mix="cutmix")
SELECTION_CROP_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop's default, which MultiRandomCrop keeps


def default_factor(image_size: tuple[int, int]) -> int:
    """RDED's scripts: 1 x 1 for 32 and 64 pixel images, 2 x 2 from 128 pixels on."""
    return 2 if min(image_size) >= RDED_LARGE_IMAGE else 1


def rded_batch_size(num_classes: int, ipc: int) -> int:
    """argument.py's evaluation batch size for `num_classes` and `ipc` (the nearest listed IPC for others)."""
    if num_classes == 200:  # "! tinyimagenet"
        batch = 100
    else:
        batch = nearest_ipc(RDED_BATCH_BY_IPC, ipc) * (2 if num_classes in (100, 1000) else 1)
    return min(batch, ipc * num_classes)


def is_convnet3(model: str, options: Optional[dict]) -> bool:
    return model == "convnet:convnet3" and int((options or {}).get("depth", 3)) == 3


# --- the selection, as pure functions ------------------------------------------------------------------------------


def square_crop_boxes(count: int, height: int, width: int, scale: tuple[float, float],
                      generator: Optional[torch.Generator]) -> torch.Tensor:
    """(count, 4) boxes (top, left, height, width) of RandomResizedCrop with ratio (1, 1) and `scale`
    (MultiRandomCrop's cropper), drawn as torchvision's `get_params`."""
    return random_resized_crop_boxes(count, height, width, OnlineCrops(scale=tuple(scale), ratio=(1.0, 1.0),
                                                                       flip_probability=0.0, mix="none"), generator)


def resize_crops(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop box b of image b and resize it to `size` with antialiased bilinear interpolation: torchvision's
    `resized_crop(..., antialias=True)` on tensors, batched over the crops that share a box size."""
    out = images.new_empty(len(images), images.shape[1], *size)
    boxes = boxes.long().cpu()
    for shape in torch.unique(boxes[:, 2:], dim=0).tolist():
        members = ((boxes[:, 2] == shape[0]) & (boxes[:, 3] == shape[1])).nonzero().squeeze(1)
        cut = torch.stack([images[i, :, t:t + shape[0], l:l + shape[1]]
                           for i, (t, l) in zip(members.tolist(), boxes[members, :2].tolist())])
        out[members.to(images.device)] = F.interpolate(cut, size=size, mode="bilinear", align_corners=False,
                                                       antialias=True)
    return out


def pad_to(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """RDED's `pad`: centre the images on a zero canvas of (height, width), the odd pixel after (bottom/right)."""
    vertical, horizontal = height - images.shape[-2], width - images.shape[-1]
    return F.pad(images, (horizontal // 2, horizontal - horizontal // 2, vertical // 2, vertical - vertical // 2))


@torch.no_grad()
def observer_losses(observer: nn.Module, images: torch.Tensor, label: int, chunk: int) -> torch.Tensor:
    """-log softmax(observer(x))[label] per image (RDED's `cross_entropy`), in chunks (eval mode: same values)."""
    parts = []
    for part in images.split(chunk):
        log_probs = F.log_softmax(observer(part).float(), -1)
        parts.append(-log_probs[:, label])
    return torch.cat(parts)


def best_crop_per_image(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For (crops, images) scores, lower better: each image's best crop index and its score (`selector`'s
    `argmin` over the crops; the first on ties)."""
    index = scores.argmin(0)
    return index, scores.gather(0, index[None]).squeeze(0)


def rank_images(keys: torch.Tensor, count: int, descending: bool = False) -> torch.Tensor:
    """The indices of the `count` smallest keys, smallest first (`descending`: largest first); stable on ties."""
    if count > len(keys):
        raise ConfigError(f"cannot keep {count} images of {len(keys)}")
    return torch.argsort(keys, descending=descending, stable=True)[:count]


def stitch(tiles: torch.Tensor, factor: int, size: tuple[int, int]) -> torch.Tensor:
    """RDED's `mix_images`: `factor^2 * n` tiles (ranked) -> n images of `size`.  Tile group k (tiles k*n ..
    (k+1)*n - 1) fills grid cell (k // factor, k % factor) of images 0 .. n-1; cells are size // factor, the first
    size % factor rows and columns one pixel larger, each tile resized to its cell by nearest neighbour."""
    if len(tiles) % (factor * factor):
        raise ConfigError(f"stitch: {len(tiles)} tiles do not fill {factor}x{factor} grids")
    n = len(tiles) // (factor * factor)
    (height, width), channels = size, tiles.shape[1]
    rows = [height // factor + (1 if i < height % factor else 0) for i in range(factor)]
    cols = [width // factor + (1 if j < width % factor else 0) for j in range(factor)]
    out = tiles.new_zeros(n, channels, height, width)
    top = 0
    for i, cell_h in enumerate(rows):
        left = 0
        for j, cell_w in enumerate(cols):
            k = i * factor + j
            group = tiles[k * n:(k + 1) * n]
            if tuple(group.shape[-2:]) != (cell_h, cell_w):
                group = F.interpolate(group, size=(cell_h, cell_w), mode="nearest")
            out[:, :, top:top + cell_h, left:left + cell_w] = group
            left += cell_w
        top += cell_h
    return out


@dataclass(frozen=True)
class ClassCandidates:
    """One class's candidates: `images` (n, C, H, W) real network inputs, `boxes` (crops, n, 4) square crop boxes
    and `tiles` (crops, n, C, H // factor, W // factor) the resized crops."""

    images: torch.Tensor
    boxes: torch.Tensor
    tiles: torch.Tensor


# --- the condenser -------------------------------------------------------------------------------------------------


@register_condenser("rded", paper=RDED_PAPER,
                    scope="the whole method as in LINs-lab/RDED (observer-scored crops, stitched factor x factor, online relabelling with patch shuffling); ours: crops cut from network inputs, test images not resized/centre-cropped")
@dataclass(eq=False)
class RDED(ObserverCondenser):
    """Options (beyond the observer's):
    mipc: real images drawn per class (None: 300, the scripts)
    num_crop: random crops scored per image (None: 5, the scripts)
    factor: a synthetic image is factor x factor stitched crops (None: 1 below 128 pixels, else 2)
    crop_scale: area range of the candidate crops (torchvision's RandomResizedCrop default)
    score_chunk: crops per observer forward while scoring (memory only)
    """

    iterations: NonNegativeInt = 0  # a selection: must stay 0
    mipc: Optional[PositiveInt] = None
    num_crop: Optional[PositiveInt] = None
    factor: Optional[PositiveInt] = None
    crop_scale: tuple[float, float] = SELECTION_CROP_SCALE
    score_chunk: PositiveInt = 512

    EVAL: ClassVar[EvalProtocol] = RDED_EVAL

    # -- options ---------------------------------------------------------------------------------------------------
    def resolve_options(self) -> None:
        name = self.registry_name
        self.check_iterations()
        for option in ("fyi", "committee_labels"):
            if getattr(self, option):
                raise ConfigError(f"{name}: {option} does not apply to a selection of real crops; remove it")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ConfigError(f"{name}: crop_scale must satisfy 0 < low <= high <= 1, got {tuple(self.crop_scale)}")
        self.crop_scale = (float(low), float(high))
        self.mipc = 300 if self.mipc is None else self.mipc
        self.num_crop = 5 if self.num_crop is None else self.num_crop
        size = tuple(self.data.image_size)
        self.factor = default_factor(size) if self.factor is None else self.factor
        if self.factor > min(size):
            raise ConfigError(f"{name}: factor {self.factor} leaves no pixel per tile of a {size} image")
        if self.mipc < self.ipc * self.factor ** 2:
            raise ConfigError(f"{name}: mipc={self.mipc} images per class cannot give ipc * factor^2 = "
                              f"{self.ipc * self.factor ** 2} distinct crops; raise mipc")
        if self.model_options is None and self.model.startswith("convnet:"):
            self.model_options = {"norm": "batchnorm"}  # RDED's ConvNet students use BatchNorm (load_model)

    def check_iterations(self) -> None:
        if self.iterations != 0:
            raise ConfigError(f"{self.registry_name}: iterations must be 0 (RDED selects crops once; it has no "
                              f"optimisation to iterate), got {self.iterations}")

    def evaluation_protocol(self) -> EvalProtocol:
        """argument.py's evaluation for this dataset, IPC and student; crops of scale (1 / factor, 1)."""
        batch, lr = rded_batch_size(self.num_classes, self.ipc), self.EVAL.lr
        if self.data.name == "cifar100" and is_convnet3(self.model, self.model_options) and \
                is_convnet3(self.observer_model, self.observer_options):
            batch, lr = 25, 2e-3  # argument.py's "special experiment"
        return dataclasses.replace(self.EVAL, batch_size=batch, lr=lr, crop_scale=(1.0 / self.factor, 1.0))

    # -- hooks -----------------------------------------------------------------------------------------------------
    def initial_images(self) -> torch.Tensor:
        """Zeros until the selection runs: the selected crops fill them when the set is first asked for."""
        return torch.zeros(self.num_classes * self.ipc, self.channels, *self.image_size, device=self.torch_device)

    def setup(self) -> None:
        self.selected = False

    def matching_loss(self) -> torch.Tensor:
        raise ConfigError(f"{self.registry_name}: a selection of real crops has no loss to optimise; keep "
                          "iterations=0")

    def final_images(self) -> torch.Tensor:
        self.ensure_selected()
        return self.images

    def ensure_selected(self) -> None:
        if not self.selected:
            with torch.no_grad():
                self.images.copy_(self.select())
            self.selected = True

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "selected": self.selected}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.selected = bool(state["selected"])

    def result(self) -> SyntheticSet:
        synthetic = super().result()
        synthetic.meta["eval"] = dataclasses.asdict(dataclasses.replace(self.evaluation_protocol(),
                                                                        patch_shuffle=self.factor))
        synthetic.meta["rded"] = jsonable({"factor": self.factor, "mipc": self.mipc, "num_crop": self.num_crop})
        return synthetic

    # -- the selection ---------------------------------------------------------------------------------------------
    @property
    def tile_size(self) -> tuple[int, int]:
        return self.image_size[0] // self.factor, self.image_size[1] // self.factor

    def class_candidates(self, label: int, generator: torch.Generator) -> ClassCandidates:
        """`mipc` random real images of class `label` (all if fewer) and `num_crop` square crops of each."""
        count = int(self.real.class_counts[label])
        needed = self.ipc * self.factor ** 2
        if count < needed:
            raise ConfigError(f"{self.registry_name}: class {label} has {count} training images, the selection "
                              f"needs ipc * factor^2 = {needed}")
        members = self.real.class_index[label, :count].cpu()
        chosen = members[torch.randperm(count, generator=generator)[:self.mipc]]
        images = self.real.images[chosen.to(self.torch_device)]
        n, (height, width) = len(images), self.image_size
        boxes = square_crop_boxes(self.num_crop * n, height, width, self.crop_scale, generator)
        tiles = resize_crops(images.repeat(self.num_crop, 1, 1, 1), boxes, self.tile_size)
        return ClassCandidates(images, boxes.view(self.num_crop, n, 4),
                               tiles.view(self.num_crop, n, *tiles.shape[1:]))

    def crop_scores(self, label: int, candidates: ClassCandidates) -> tuple[torch.Tensor, torch.Tensor]:
        """(within-image score, across-image key), both (crops, images): each image keeps its crop of lowest
        score, the class keeps the images of lowest key.  RDED: both are the observer's cross-entropy of the crop
        (centred on a zero canvas of the image size)."""
        tiles = candidates.tiles.flatten(0, 1)
        losses = observer_losses(self.observer_network, pad_to(tiles, *self.image_size), label, self.score_chunk)
        losses = losses.view(candidates.tiles.shape[:2])
        return losses, losses

    def rank_descending(self) -> bool:
        """Whether the class keeps the largest across-image keys (RDED: the smallest losses)."""
        return False

    def select_class(self, label: int, generator: torch.Generator) -> torch.Tensor:
        """The class's `ipc` stitched images."""
        candidates = self.class_candidates(label, generator)
        within, across = self.crop_scores(label, candidates)
        best, _ = best_crop_per_image(within)
        keys = across.gather(0, best[None]).squeeze(0)
        n = candidates.tiles.shape[1]
        best_tiles = candidates.tiles[best.to(candidates.tiles.device), torch.arange(n, device=candidates.tiles.device)]
        order = rank_images(keys, self.ipc * self.factor ** 2, self.rank_descending())
        return stitch(best_tiles[order.to(best_tiles.device)], self.factor, self.image_size)

    @torch.no_grad()
    def select(self) -> torch.Tensor:
        """Every class's stitched images, class-major; every draw from one generator seeded with `seed`."""
        generator = torch.Generator().manual_seed(self.seed)
        return torch.cat([self.select_class(label, generator) for label in range(self.num_classes)])


__all__ = ["RDED", "RDED_EVAL", "square_crop_boxes", "resize_crops", "pad_to", "observer_losses",
           "best_crop_per_image", "rank_images", "stitch", "default_factor", "rded_batch_size"]
