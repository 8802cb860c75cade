"""Loaders with a per-epoch seed, so an epoch's order never depends on what ran before (exact resume)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from .arrays import PILItems, UInt8Images
from .device_loader import ResidentBatches


class TensorData(Dataset):
    """An in-memory dataset of already-normalised image and label tensors; items carry their index."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i], i


class WithIndex(Dataset):
    """Wraps an (image, label) dataset so items become (image, label, index)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, label = self.dataset[i]
        return image, label, i


class _TensorBatches:
    """Batches sliced straight from memory: no per-item Python calls."""

    def __init__(self, data: TensorData, batch_size: int, order: torch.Tensor, drop_last: bool):
        self.data, self.batch_size, self.order, self.drop_last = data, batch_size, order, drop_last

    def __len__(self) -> int:
        n = len(self.order)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for b in range(len(self)):
            idx = self.order[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.data.images[idx], self.data.labels[idx], idx


class ShardedBatches:
    """One process's share of every global batch: the strided slice ``[rank::world_size]``, each global batch
    first cut to a multiple of `world_size` (so every process steps on equal batches, and a global batch
    smaller than `world_size` is skipped by all).  The global batches are the ones a single process would
    draw for the same (seed, epoch), so N processes see exactly one process's batches between them."""

    def __init__(self, batches, rank: int, world_size: int, num_samples: int, global_batch: int, drop_last: bool):
        self.batches, self.rank, self.world_size = batches, rank, world_size
        full, rest = divmod(num_samples, global_batch)
        self.length = full + (1 if rest >= world_size and not drop_last else 0)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for images, labels, index in self.batches:
            keep = len(labels) - len(labels) % self.world_size
            if keep:
                share = slice(self.rank, keep, self.world_size)
                yield images[share], labels[share], index[share]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch's shuffle (and augmentation): a function of (seed, epoch) alone."""
    return seed * 1_000_003 + epoch


@dataclass(frozen=True)
class Placement:
    """Where a loader's batches are made, and for which process.  `device` is where the training step runs: a
    `UInt8Images` dataset that fits there is kept there and batched and augmented on it (its batches already
    live on `device`); one that does not goes through torchvision's PIL transforms in a DataLoader with
    `num_workers` workers (pinned memory for CUDA).  With `world_size` > 1 (data-parallel processes) the batches
    are process `rank`'s strided slice of the global batches (see `ShardedBatches`)."""

    device: Optional[torch.device | str] = None
    num_workers: int = 0
    rank: int = 0
    world_size: int = 1


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, epoch: int = 0,
                drop_last: bool = False, placement: Placement = Placement()):
    """An iterable of (images, labels, indices) batches; the shuffle is seeded by (seed, epoch).  On several
    processes `batch_size` is this process's share (see `Placement`)."""
    device, world_size = placement.device, placement.world_size
    if world_size > 1:
        one_process = Placement(device, placement.num_workers)
        global_batches = make_loader(dataset, batch_size * world_size, shuffle, seed, epoch, drop_last, one_process)
        return ShardedBatches(global_batches, placement.rank, world_size, len(dataset), batch_size * world_size,
                              drop_last)
    if isinstance(dataset, UInt8Images):
        if dataset.fits_on(device):
            return ResidentBatches(dataset, batch_size, shuffle, epoch_seed(seed, epoch), drop_last, device)
        dataset = PILItems(dataset)
    # seeds the shuffle and, through the DataLoader, its workers' augmentation
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    if isinstance(dataset, TensorData):
        n = len(dataset)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        return _TensorBatches(dataset, batch_size, order, drop_last)
    # a dataset whose items carry their index already and batch in their own way (detection targets: one dict of
    # boxes per image) says so with `yields_index` and `collate_batch`
    if not (isinstance(dataset, (WithIndex, PILItems)) or getattr(dataset, "yields_index", False)):
        dataset = WithIndex(dataset)
    pin_memory = device is not None and torch.device(device).type == "cuda"
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
                      num_workers=placement.num_workers, drop_last=drop_last, pin_memory=pin_memory,
                      persistent_workers=False, collate_fn=getattr(dataset, "collate_batch", None))


def batch_rows(step: int, batch_size: int, num_rows: int, seed: int) -> torch.Tensor:
    """Row indices of optimizer step `step`: a fresh permutation per pass over the data, seeded by (seed, pass),
    so a resumed run draws exactly the batches the uninterrupted one would."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    passes, offsets = positions // num_rows, positions % num_rows
    out = torch.empty(batch_size, dtype=torch.long)
    for p in passes.unique().tolist():
        generator = torch.Generator().manual_seed(seed * 1_000_003 + p)
        order = torch.randperm(num_rows, generator=generator)
        chosen = passes == p
        out[chosen] = order[offsets[chosen]]
    return out
