"""Training: fit(), evaluation, schedules, checkpoints."""
from .checkpoint import export_weights, load_checkpoint, read_weights, save_checkpoint
from .trainer import FitResult, evaluate, fit

__all__ = ["fit", "evaluate", "FitResult", "save_checkpoint", "load_checkpoint", "export_weights", "read_weights"]
