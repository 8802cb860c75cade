"""Fixed soft labels from a committee of teachers: the ``committee_labels`` option of every condenser.

What this is: a committee of networks (one or several architectures) is trained on the real training images, minus
a held-out tenth; every member labels the FINAL synthetic images once with its softmax (at `label_temperature`),
and the members' probabilities are averaged with weights proportional to their held-out accuracy (our simple
vote).  The result replaces the hard labels of any method; the evaluation then trains on them with soft-target
cross-entropy.

What this is not: Cui et al. 2025's committee voting (``kdzoo condense cv_dd``, `cvdd.py`) recovers the images with
the committee and relabels every augmented batch during evaluation with the members' logits combined by
softmax(prior / 10) weights.  Hence the option is called ``committee_labels`` (fixed labels).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..engine.stacked import StackTraining
from ..errors import ConfigError
from .evaluate import accuracy, train_networks

if TYPE_CHECKING:
    from .base import Condenser

HOLDOUT_FRACTION = 0.1


def committee_members(spec: str, size: int) -> list[tuple[str, int]]:
    """``"a,b"`` and size 5 -> [("a", 3), ("b", 2)]: members spread round-robin over architectures."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names or size < 1:
        raise ConfigError(f"soft labels need committee architectures and committee_size >= 1 (got {spec!r}, {size})")
    counts = [size // len(names) + (i < size % len(names)) for i in range(len(names))]
    return [(n, c) for n, c in zip(names, counts) if c]


def vote(probabilities: torch.Tensor, accuracies: torch.Tensor) -> torch.Tensor:
    """(members, images, classes) member posteriors -> (images, classes), weighted by accuracy."""
    weights = accuracies.clamp_min(0)
    weights = weights / weights.sum() if float(weights.sum()) > 0 else torch.full_like(weights, 1 / len(weights))
    return (weights.view(-1, 1, 1) * probabilities).sum(0)


def committee_soft_labels(condenser: "Condenser", images: torch.Tensor) -> torch.Tensor:
    """Committee posteriors for `images`: (images, classes).  The condenser's own architecture is
    built with its `model_options`; other committee architectures with their defaults."""
    real = condenser.real
    order = torch.randperm(len(real.labels), device=real.labels.device)
    held = max(1, int(len(order) * HOLDOUT_FRACTION))
    held_out, train = order[:held], order[held:]
    probabilities, accuracies = [], []
    for name, count in committee_members(condenser.committee, condenser.committee_size):
        options = condenser.model_options if name == condenser.model else None
        settings = StackTraining(condenser.committee_epochs, decay_epoch=condenser.committee_epochs // 2)
        members = train_networks([condenser.new_network(name, options) for _ in range(count)],
                                 real.images[train], real.labels[train], settings, augment=condenser.dsa,
                                 progress=f"committee {name}" if condenser.progress else None)
        accuracies.append(accuracy(members, real.images[held_out], real.labels[held_out]))
        probabilities.append(torch.softmax(members.predict(images) / condenser.label_temperature, -1))
    return vote(torch.cat(probabilities), torch.cat(accuracies))
