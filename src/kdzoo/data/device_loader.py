"""The device-resident loader: a whole uint8 dataset lives on the training device, batches are cut there.

Per epoch it draws, from one CPU generator seeded by (seed, epoch), the shuffle order, every sample's crop
offset and every flip, and moves them to the device once.  Each step is then a few kernels on a whole
batch (gather, pad, one gather for crop + flip, normalise): no worker process, no per-sample Python, no
read back to the host.  Drawing on the CPU makes the epoch bit-identical on every device, so a resumed
run repeats exactly what the interrupted one would have done.  RandAugment (``AugmentSpec.rand_augment``) runs
after them on each image with torchvision's ``transforms.v2.RandAugment``, its draws from torch's CPU generator
seeded per batch from the epoch's generator (and restored afterwards), so it too depends on (seed, epoch) alone.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F

from ..engine.runtime import lazy_import
from .arrays import UInt8Images, normalize_batch

transforms_v2 = lazy_import("torchvision.transforms.v2")


def crop_and_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """RandomCrop(size, padding) with zero fill, then RandomHorizontalFlip, on a whole uint8 batch at once.

    `offsets` (B, 2): each crop's top-left corner (row, column) in the padded image, in [0, 2 * padding]
    (the shift is offset - padding); `flips` (B,) bool.  The flip is folded into the column indices, so
    crop and flip are one gather.
    """
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    padded_width = width + 2 * padding
    rows = offsets[:, :1] + torch.arange(height, device=images.device)  # (B, H)
    cols = torch.arange(width, device=images.device).expand(batch, width)
    cols = torch.where(flips[:, None], width - 1 - cols, cols) + offsets[:, 1:]  # (B, W)
    flat = (rows[:, :, None] * padded_width + cols[:, None, :]).view(batch, 1, height * width)
    out = padded.view(batch, channels, -1).gather(2, flat.expand(batch, channels, height * width))
    return out.view(batch, channels, height, width)


def draw_augmentation(n: int, padding: int, flip: bool, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop offsets uniform on [0, 2 * padding]^2 and fair coin flips for `n` samples."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator)
    flips = torch.randint(0, 2, (n,), generator=generator).bool() if flip else torch.zeros(n, dtype=torch.bool)
    return offsets, flips


def rand_augment_batch(images: torch.Tensor, num_ops: int, magnitude: int, seed: int) -> torch.Tensor:
    """torchvision's RandAugment(num_ops, magnitude) on each uint8 image of a batch (each its own operations),
    drawn from torch's CPU generator seeded with `seed`; the global generator's state is left as it was."""
    augment = transforms_v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([augment(image) for image in images])


class ResidentBatches:
    """One epoch of (images, labels, indices) batches, cut from the copy of `dataset` on `device`.

    Iterating twice gives the same epoch: the generator is created from `epoch_seed` on each iteration.
    """

    def __init__(self, dataset: UInt8Images, batch_size: int, shuffle: bool, epoch_seed: int,
                 drop_last: bool = False, device: Optional[torch.device | str] = None):
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.epoch_seed, self.drop_last = epoch_seed, drop_last
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        images, labels, mean, std = self.dataset.on_device(self.device)
        n = len(labels)
        generator = torch.Generator().manual_seed(self.epoch_seed)
        # the same draw as the in-memory TensorData loader, so both shuffle alike for a (seed, epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        order = order.to(self.device, non_blocking=True)
        spec = self.dataset.augment
        if spec is not None:
            offsets, flips = draw_augmentation(n, spec.crop_padding, spec.flip, generator)
            offsets, flips = offsets.to(self.device, non_blocking=True), flips.to(self.device, non_blocking=True)
            if spec.rand_augment is not None:  # drawn after the crops and flips, which stay as without it
                first_seed = int(torch.randint(0, 2**62, (), generator=generator))
        for b in range(len(self)):
            batch = slice(b * self.batch_size, (b + 1) * self.batch_size)
            index = order[batch]
            picked = images.index_select(0, index)  # row copies: much faster than images[index] on the CPU
            if spec is not None:
                picked = crop_and_flip(picked, offsets[batch], flips[batch], spec.crop_padding)
                if spec.rand_augment is not None:
                    picked = rand_augment_batch(picked, *spec.rand_augment, seed=first_seed + b)
            yield normalize_batch(picked, mean, std), labels.index_select(0, index), index


__all__ = ["ResidentBatches", "crop_and_flip", "draw_augmentation", "rand_augment_batch"]
