"""Tasks: each kind of model kdzoo distils, as a plug-in on the engine's Trainer (registered in `TASKS`).

A task builds nothing of the loop: it puts its models on the device, gives the optimizer steps, each epoch's
batches (micro-batches with their teacher outputs), its evaluation and the words of its metrics; see
`kdzoo.engine.Task` and ``docs/adding-a-task.md``.
"""
from ..registry import TASKS
from . import classification, clip, dense, diffusion, lm  # noqa: F401  (register the tasks)

__all__ = ["TASKS"]
