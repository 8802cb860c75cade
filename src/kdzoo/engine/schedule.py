"""Learning-rate schedules as pure functions of the step (so resuming needs only the step count).

One `Schedule` serves every task: image classification counts its length, milestones and warm-up in epochs
(`unit_steps` = optimizer steps per epoch), language models count them in optimizer steps (`unit_steps` = 1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

KINDS = ("multistep", "cosine", "constant")


@dataclass(frozen=True)
class Schedule:
    """The learning rate of each (0-based) optimizer step.

    - ``multistep``: `base_lr` times `gamma` at each milestone;
    - ``cosine``: half-cosine from `base_lr` down to `min_lr` over the steps after the warm-up;
    - ``constant``: `base_lr`.
    A linear warm-up from ~0 to `base_lr` covers the first `warmup` units.  `length`, `milestones` and `warmup`
    are in units of `unit_steps` optimizer steps.
    """

    base_lr: float
    length: float  # units (epochs, or steps)
    unit_steps: int = 1
    kind: str = "multistep"
    milestones: tuple[float, ...] = field(default_factory=tuple)
    gamma: float = 0.1
    warmup: float = 0.0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown schedule {self.kind!r} ({', '.join(KINDS)})")

    def __call__(self, step: int) -> float:
        unit = step / self.unit_steps
        if self.warmup > 0 and unit < self.warmup:
            return self.base_lr * ((step + 1) / (self.warmup * self.unit_steps))
        return self.base_lr * self.factor(step, unit)

    def factor(self, step: int, unit: float) -> float:
        """The schedule's multiple of `base_lr` after the warm-up."""
        if self.kind == "multistep":
            return self.gamma ** sum(unit >= m for m in self.milestones)
        if self.kind == "constant" or self.base_lr == 0:
            return 1.0
        warm = self.warmup * self.unit_steps
        progress = min(1.0, max(0.0, (step - warm) / max(1.0, self.length * self.unit_steps - warm)))
        floor = self.min_lr / self.base_lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


__all__ = ["Schedule", "KINDS"]
