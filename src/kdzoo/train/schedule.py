"""Learning-rate schedules as pure functions of the step (so resuming needs only the step count)."""
from __future__ import annotations

import math
from typing import Sequence


def learning_rate(step: int, *, base_lr: float, steps_per_epoch: int, epochs: int, schedule: str = "multistep",
                  milestones: Sequence[int] = (), gamma: float = 0.1, warmup_epochs: float = 0.0,
                  min_lr: float = 0.0) -> float:
    """The learning rate for optimizer step `step` (0-based).

    - ``multistep``: times `gamma` at each milestone epoch;
    - ``cosine``: half-cosine from `base_lr` to `min_lr` over the steps after warm-up;
    - ``constant``.
    A linear warm-up from ~0 to the schedule's value covers the first `warmup_epochs`.
    """
    epoch = step / steps_per_epoch
    if schedule == "multistep":
        lr = base_lr * gamma ** sum(epoch >= m for m in milestones)
    elif schedule == "cosine":
        warm = warmup_epochs * steps_per_epoch
        total = max(1.0, epochs * steps_per_epoch - warm)
        progress = min(1.0, max(0.0, (step - warm) / total))
        lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))
    elif schedule == "constant":
        lr = base_lr
    else:
        raise ValueError(f"unknown schedule {schedule!r} (multistep, cosine, constant)")
    if warmup_epochs > 0 and epoch < warmup_epochs:
        lr *= (step + 1) / (warmup_epochs * steps_per_epoch)
    return lr
