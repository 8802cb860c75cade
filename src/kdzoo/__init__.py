"""kdzoo: knowledge distillation on unmodified PyTorch models."""
from .distiller import DistillOutput, Distiller
from .errors import CheckpointError, ConfigError, KdzooError, TrainingDiverged
from .methods import METHODS, Context, Method, create_method, register_method
from .models import MODELS, create_model, register_model
from .taps import Taps, discover_layout
from .train import evaluate, fit

__version__ = "0.1.0"

__all__ = [
    "Distiller", "DistillOutput", "Method", "Context", "create_method", "register_method", "METHODS",
    "create_model", "register_model", "MODELS", "Taps", "discover_layout", "fit", "evaluate",
    "KdzooError", "ConfigError", "CheckpointError", "TrainingDiverged",
]
