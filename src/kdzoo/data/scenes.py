"""Offline scenes for dense prediction: scikit-learn's digits (or CIFAR-10 images) cut out and pasted onto textured
backgrounds, with exact masks and boxes; deterministic by seed, no download.

Each scene holds 1 to `max_objects` objects of random size, colour and position (later ones occlude earlier ones).
An object's shape is its digit's strokes (the 8x8 image above a threshold, upscaled); with ``source: cifar10`` the
object is a square crop of a CIFAR-10 image of that class (the JPEG copy in ImageFolder layout, `cifar_root`).
Segmentation targets are masks (0: background, k + 1: class k; every pixel labelled); detection targets are the
tight boxes of what stays visible of each object (objects hidden below `min_visible` pixels are dropped) with labels
1..10 (torchvision's detectors keep 0 for the background).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..engine.runtime import lazy_import
from ..errors import ConfigError
from ..registry import PositiveInt, register_dataset
from .datasets import DataSplits
from .loaders import TensorData

sklearn_datasets = lazy_import("sklearn.datasets")
torchvision = lazy_import("torchvision")

MEAN, STD = 0.5, 0.25  # segmentation inputs are normalised with these; detection inputs stay in [0, 1]


class DetectionData(Dataset):
    """Images in [0, 1] (N, 3, H, W) and per image a target ``{"boxes": (n, 4) xyxy pixels, "labels": (n,)}``;
    items are (image, target, index)."""

    def __init__(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]]):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i], i

    yields_index = True  # `make_loader` batches the items as they are, with `collate_batch`

    @staticmethod
    def collate_batch(items) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]], torch.Tensor]:
        """(images (B, 3, H, W), the B targets as a list, indices (B,)): boxes per image differ in number."""
        images, targets, index = zip(*items)
        return torch.stack(images), list(targets), torch.tensor(index)


def _objects(source: str, cifar_root: Optional[str]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(shapes in [0, 1] as (1, h, w) alpha, textures (3, h, w) or None, labels) of the objects to paste."""
    if source == "digits":
        bunch = sklearn_datasets.load_digits()
        shapes = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
        return list(shapes), [], torch.tensor(bunch.target, dtype=torch.long)
    root = Path(cifar_root or "")
    if not (root / "train").is_dir():
        raise ConfigError(f"data.options.cifar_root: {str(root)!r} holds no train/ folder of the CIFAR-10 JPEG copy "
                          "(tar xzf shared/data/cifar10-jpeg.tar.gz)")
    folder = torchvision.datasets.ImageFolder(str(root / "train"))
    picks = [i for c in range(10) for i in [j for j, t in enumerate(folder.targets) if t == c][:50]]
    textures = [torch.from_numpy(np.asarray(folder.loader(folder.samples[i][0]), dtype=np.float32) / 255
                                 ).permute(2, 0, 1) for i in picks]
    labels = torch.tensor([folder.targets[i] for i in picks], dtype=torch.long)
    return [torch.ones(1, *t.shape[1:]) for t in textures], textures, labels


def _background(size: int, generator: torch.Generator) -> torch.Tensor:
    """A smooth colour field plus fine noise: texture the models must learn to ignore."""
    coarse = torch.rand(1, 3, 4, 4, generator=generator)
    field = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)[0].clamp(0, 1)
    return (0.6 * field + 0.15 * torch.rand(3, size, size, generator=generator)).clamp(0, 1)


def draw_scene(objects: tuple, size: int, generator: torch.Generator,
               spec: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """One scene: (image (3, size, size) in [0, 1], mask (size, size) with class + 1, [(class, instance mask)])."""
    shapes, textures, labels = objects
    max_objects, min_side = spec
    image = _background(size, generator)
    mask = torch.zeros(size, size, dtype=torch.long)
    instances = torch.full((size, size), -1, dtype=torch.long)
    placed = []
    for k in range(int(torch.randint(1, max_objects + 1, (), generator=generator))):
        pick = int(torch.randint(len(labels), (), generator=generator))
        side = int(torch.randint(min_side, max(min_side + 1, size // 2), (), generator=generator))
        alpha = F.interpolate(shapes[pick][None], size=side, mode="bilinear", align_corners=False)[0, 0]
        if textures:
            look = F.interpolate(textures[pick][None], size=side, mode="bilinear", align_corners=False)[0]
        else:
            colour = 0.2 + 0.8 * torch.rand(3, 1, 1, generator=generator)
            look = colour.expand(3, side, side)
        solid = alpha > 0.3
        top, left = (int(torch.randint(0, size - side + 1, (), generator=generator)) for _ in range(2))
        region = (slice(top, top + side), slice(left, left + side))
        image[:, region[0], region[1]] = torch.where(solid, look, image[:, region[0], region[1]])
        mask[region][solid] = int(labels[pick]) + 1
        instances[region][solid] = k
        placed.append(int(labels[pick]))
    return image, mask, [(label, instances == k) for k, label in enumerate(placed)]


def _boxes(visible: list[tuple[int, torch.Tensor]], min_visible: int) -> dict[str, torch.Tensor]:
    boxes, labels = [], []
    for label, region in visible:
        if int(region.sum()) < min_visible:
            continue
        rows, cols = region.any(1).nonzero()[:, 0], region.any(0).nonzero()[:, 0]
        boxes.append([float(cols[0]), float(rows[0]), float(cols[-1]) + 1, float(rows[-1]) + 1])
        labels.append(label + 1)
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).view(-1, 4), "labels": torch.tensor(labels,
                                                                                                dtype=torch.long)}


@register_dataset("scenes", family="dense", paper="generated offline: digits (or CIFAR-10 images) pasted on textures")
def scenes(task: Literal["segmentation", "detection"] = "segmentation", image_size: PositiveInt = 64,
           train_size: PositiveInt = 256, test_size: PositiveInt = 64, max_objects: PositiveInt = 3,
           source: Literal["digits", "cifar10"] = "digits", cifar_root: Optional[str] = None,
           seed: int = 0) -> DataSplits:
    """Scenes of 1 to `max_objects` objects (10 classes) on textured backgrounds, `image_size` pixels square.

    Options:
        task: segmentation (masks, 11 classes with the background) or detection (boxes, labels 1..10)
        image_size: height and width of the scenes
        train_size: training scenes
        test_size: validation scenes (the whole split is evaluated)
        max_objects: most objects per scene
        source: digits (scikit-learn's, shapes in random colours) or cifar10 (image crops of the JPEG copy)
        cifar_root: the unpacked CIFAR-10 JPEG copy (source cifar10)
        seed: the scenes are a function of it alone
    """
    if image_size < 16:
        raise ConfigError(f"data.options.image_size: scenes need at least 16 pixels, got {image_size}")
    objects = _objects(source, cifar_root)
    generator = torch.Generator().manual_seed(seed)
    spec = (max_objects, max(8, image_size // 6))
    splits = []
    for count in (train_size, test_size):
        drawn = [draw_scene(objects, image_size, generator, spec) for _ in range(count)]
        images = torch.stack([image for image, _, _ in drawn])
        if task == "segmentation":
            splits.append(TensorData((images - MEAN) / STD, torch.stack([mask for _, mask, _ in drawn])))
        else:
            splits.append(DetectionData(images, [_boxes(visible, 4) for _, _, visible in drawn]))
    kinds = sorted(p.name for p in (Path(cifar_root) / "train").iterdir()) if source == "cifar10" else range(10)
    names = ("background",) + tuple(str(k) for k in kinds)  # detection labels 1..10 index the same names
    return DataSplits("scenes", splits[0], splits[1], 11, 3, (image_size, image_size), task=task, class_names=names)


__all__ = ["scenes", "DetectionData", "draw_scene", "MEAN", "STD"]
