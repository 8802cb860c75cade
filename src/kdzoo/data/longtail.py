"""Long-tailed training splits of any in-memory labelled dataset (the ``imbalance_factor`` data option).

Class i of C keeps n_i = floor(n_max * factor^(-i / (C - 1))) training samples, the exponential profile of Cao
et al. 2019 (LDAM-DRW's ``get_img_num_per_cls``, ``img_max * imb_factor**(cls_idx / (cls_num - 1))`` with
``imb_factor = 1 / factor``) that DeiT-LT's CIFAR-10-LT / CIFAR-100-LT use: class 0 keeps the most, class
C - 1 keeps n_max / factor.  n_max is the smallest class count of the full split (every class of a balanced
set such as CIFAR-10: 5000), so each class can supply its share.  Which samples a class keeps is drawn with
`seed` (LDAM shuffles with numpy seed 0, then keeps the first n_i).  The test split is never touched.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Annotated

import torch

from ..errors import ConfigError
from ..registry import Range
from .arrays import UInt8Images
from .loaders import TensorData

ImbalanceFactor = Annotated[float, Range(ge=1)]  # 1: the split as it is; 100: the usual "-LT" benchmark


def long_tail_counts(n_max: int, num_classes: int, factor: float) -> list[int]:
    """Samples kept per class: floor(n_max * factor^(-i / (C - 1))) for class i (n_max for a single class),
    written as LDAM's ``int(img_max * imb_factor ** (i / (C - 1)))`` so the counts are its counts bit for bit."""
    if num_classes == 1:
        return [n_max]
    return [int(n_max * (1.0 / factor) ** (i / (num_classes - 1))) for i in range(num_classes)]


def long_tailed(splits, factor: float, seed: int = 0):
    """`splits` (a DataSplits) whose training set follows the exponential long-tail profile; factor 1 returns
    them unchanged."""
    if factor == 1:
        return splits
    train = splits.train
    if not isinstance(train, (TensorData, UInt8Images)):
        raise ConfigError(f"data.options.imbalance_factor: {splits.name}'s training set ({type(train).__name__}) "
                          "is not held in memory, so it cannot be subsampled")
    labels = torch.as_tensor(train.labels, dtype=torch.long)
    present = torch.bincount(labels[labels >= 0], minlength=splits.num_classes)
    if int(present.min()) == 0:
        raise ConfigError(f"data.options.imbalance_factor: {splits.name} has no training sample of class "
                          f"{int(present.argmin())}")
    counts = long_tail_counts(int(present.min()), splits.num_classes, factor)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    keep = []
    for cls, count in enumerate(counts):
        keep.append(order[labels[order] == cls][:max(count, 1)])  # a class never vanishes entirely
    index = torch.cat(keep).sort().values
    return replace(splits, train=_subset(train, index))


def _subset(dataset, index: torch.Tensor):
    labels = torch.as_tensor(dataset.labels)[index]
    if isinstance(dataset, TensorData):
        return TensorData(dataset.images[index], labels)
    return UInt8Images(dataset.images[index], labels, dataset.mean, dataset.std, dataset.augment, dataset.classes,
                       dataset.resident)


def balanced_subset(splits, train_per_class: int, test_per_class: Optional[int] = None, seed: int = 0):
    """`splits` with at most `train_per_class` training (and `test_per_class` test) images of every class, drawn at
    random with `seed`: a CPU-sized slice of a dataset that keeps its classes balanced."""
    generator = torch.Generator().manual_seed(seed)

    def cut(dataset, per_class: int, what: str):
        if not isinstance(dataset, (TensorData, UInt8Images)):
            raise ConfigError(f"{what}: {splits.name}'s split ({type(dataset).__name__}) is not held in memory")
        labels = torch.as_tensor(dataset.labels, dtype=torch.long)
        order = torch.randperm(len(labels), generator=generator)
        keep = [order[labels[order] == cls][:per_class] for cls in range(splits.num_classes)]
        return _subset(dataset, torch.cat(keep).sort().values)

    if train_per_class < 1 or (test_per_class is not None and test_per_class < 1):
        raise ConfigError(f"balanced_subset: images per class must be >= 1, got {train_per_class}, {test_per_class}")
    test = splits.test if test_per_class is None else cut(splits.test, test_per_class, "test_per_class")
    return replace(splits, train=cut(splits.train, train_per_class, "train_per_class"), test=test)


__all__ = ["ImbalanceFactor", "long_tail_counts", "long_tailed", "balanced_subset"]
