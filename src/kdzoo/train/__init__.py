"""Training: fit(), evaluation, schedules, checkpoints."""
from .checkpoint import export_weights, load_checkpoint, read_weights, save_checkpoint
from .multi import fit_many
from .trainer import FitResult, evaluate, fit

__all__ = ["fit", "fit_many", "evaluate", "FitResult", "save_checkpoint", "load_checkpoint", "export_weights", "read_weights"]
