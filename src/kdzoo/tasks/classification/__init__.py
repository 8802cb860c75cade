"""Image classification on the engine's Trainer: `fit` one distiller, `fit_many` students of one teacher on the
same batches (stacked when they allow it), students as peers, the distillation plan."""
from .evaluation import evaluate, evaluation_model
from .multi import fit_many, stacking_obstacle
from .peers import PeerCallback, PeerDistiller, PeerModels
from .plan import distillation_plan, write_plan
from .task import (ClassificationTask, Distillable, FitOptions, default_callbacks, fit, lr_schedule, read_summary,
                   scaled_lr, task_class, train_runs, write_summary)
from .teacher_feed import TeacherCache, TeacherFeed

__all__ = ["fit", "fit_many", "train_runs", "evaluate", "evaluation_model", "FitOptions", "ClassificationTask",
           "Distillable", "default_callbacks", "stacking_obstacle", "PeerDistiller", "PeerModels", "PeerCallback",
           "distillation_plan", "write_plan", "TeacherCache", "TeacherFeed", "lr_schedule", "scaled_lr",
           "read_summary", "write_summary", "task_class"]
