"""kdzoo: knowledge distillation on unmodified PyTorch models."""
from . import functional
from .config import RunConfig, TeacherConfig, TrainConfig, load_config
from .data import DataSplits, build_dataset
from .distiller import Distiller, DistillOutput, TeacherOutputs, TrainingData
from .engine import Callback, FitResult, Run, Task, Trainer
from .errors import CheckpointError, ConfigError, KdzooError, TrainingDiverged
from .methods import METHODS, Context, Method, create_method, register_method
from .models import MODELS, create_model, register_model
from .taps import Taps, discover_layout
from .tasks.classification import FitOptions, evaluate, fit, fit_many

__version__ = "0.1.0"

__all__ = [
    "Distiller", "DistillOutput", "TeacherOutputs", "TrainingData", "Method", "Context", "create_method",
    "register_method", "METHODS", "create_model", "register_model", "MODELS", "Taps", "discover_layout", "fit",
    "fit_many", "FitOptions", "evaluate", "FitResult", "Trainer", "Task", "Run", "Callback", "TrainConfig", "RunConfig",
    "TeacherConfig", "load_config", "build_dataset", "DataSplits", "functional",
    "KdzooError", "ConfigError", "CheckpointError", "TrainingDiverged",
]
