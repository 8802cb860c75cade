"""Scarce labels on any in-memory dataset: keep the labels of a fraction of the training samples, mark the rest
unlabelled (label -1, which the Distiller's cross-entropy skips), and optionally set some labelled samples
aside as held-out data (for choosing evaluation-time weights, never trained on).

Which samples keep their label is drawn uniformly with `seed`, independently of the labels themselves, so
the label of an unlabelled sample can influence nothing (not even which samples are chosen).
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from .arrays import UInt8Images
from .datasets import DataSplits
from .loaders import TensorData

UNLABELLED = -1


def withhold_labels(splits: DataSplits, labelled_fraction: float, held_out_fraction: float = 0.0,
                    seed: int = 0) -> DataSplits:
    """`splits` whose training set keeps the labels of `labelled_fraction` of its samples (at least one) and
    marks the others -1; `held_out_fraction` of the labelled samples (rounded, at least one left to train on)
    leave the training set for `DataSplits.held_out`."""
    check_label_fractions(labelled_fraction, held_out_fraction)
    train = splits.train
    if not isinstance(train, (TensorData, UInt8Images)):
        raise ConfigError(f"data.labelled_fraction: {splits.name}'s training set ({type(train).__name__}) is not held "
                          "in memory (TensorData or UInt8Images), so its labels cannot be withheld")
    labels = torch.as_tensor(train.labels, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_labelled = max(1, round(labelled_fraction * len(labels)))
    n_held = min(round(held_out_fraction * n_labelled), n_labelled - 1)  # one stays for training
    held_out_idx = order[:n_held].sort().values
    is_labelled = torch.zeros(len(labels), dtype=torch.bool)
    is_labelled[order[n_held:n_labelled]] = True
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held_out_idx] = False
    new_labels = torch.where(is_labelled, labels, torch.full_like(labels, UNLABELLED))
    train_part = _subset(train, keep.nonzero().flatten(), new_labels[keep])
    held = _subset(train, held_out_idx, labels[held_out_idx]) if len(held_out_idx) else None
    return replace(splits, train=train_part, held_out=held)


def keep_labels_of(splits: DataSplits, indices: torch.Tensor, where: str = "data.labelled_indices") -> DataSplits:
    """`splits` whose training set keeps the labels of the samples at `indices` (positions in the training set)
    and marks every other -1; the samples stay in place, so a position means the same sample before and after
    (active learning adds positions round after round)."""
    train = splits.train
    if not isinstance(train, (TensorData, UInt8Images)):
        raise ConfigError(f"{where}: {splits.name}'s training set ({type(train).__name__}) is not held in memory "
                          "(TensorData or UInt8Images), so its labels cannot be withheld")
    labels = torch.as_tensor(train.labels, dtype=torch.long)
    indices = torch.as_tensor(indices, dtype=torch.long).flatten()
    if len(indices) == 0:
        raise ConfigError(f"{where}: no sample keeps its label")
    bad = indices[(indices < 0) | (indices >= len(labels))]
    if len(bad):
        raise ConfigError(f"{where}: index {int(bad[0])} is outside the {len(labels)} training samples")
    if len(indices.unique()) != len(indices):
        raise ConfigError(f"{where}: an index is listed twice")
    is_labelled = torch.zeros(len(labels), dtype=torch.bool)
    is_labelled[indices] = True
    new_labels = torch.where(is_labelled, labels, torch.full_like(labels, UNLABELLED))
    return replace(splits, train=_subset(train, torch.arange(len(labels)), new_labels))


def check_label_fractions(labelled_fraction: float, held_out_fraction: float) -> None:
    """A one-line error naming the config key of a fraction out of range."""
    if not 0 < labelled_fraction <= 1:
        raise ConfigError(f"data.labelled_fraction: must be > 0 and <= 1, got {labelled_fraction}")
    if not 0 <= held_out_fraction < 1:
        raise ConfigError(f"data.held_out_fraction: must be >= 0 and < 1, got {held_out_fraction}")


def labelled_count(dataset: Dataset) -> int:
    """How many samples of an in-memory dataset carry a label."""
    return int((torch.as_tensor(dataset.labels) != UNLABELLED).sum())


def _subset(dataset, index: torch.Tensor, labels: torch.Tensor):
    if isinstance(dataset, TensorData):
        return TensorData(dataset.images[index], labels)
    return UInt8Images(dataset.images[index], labels, dataset.mean, dataset.std, dataset.augment, dataset.classes,
                       dataset.resident)


__all__ = ["withhold_labels", "keep_labels_of", "labelled_count", "check_label_fractions", "UNLABELLED"]
