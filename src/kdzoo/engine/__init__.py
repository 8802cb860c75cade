"""The ground floor of kdzoo, task-agnostic: the Trainer (loop, callbacks, AMP, compile, gradient accumulation and
clipping), checkpoints (atomic, hashed, exact resume), run folders, learning-rate schedules, optimizers,
several processes (DDP/FSDP2), stacked models (torch.func) and the runtime (devices, seeds, atomic writes).

It imports nothing of kdzoo but its errors: tasks, condense and the orchestration build on it.
"""
from .checkpoint import (export_weights, load_checkpoint, read_weights, rng_state, save_checkpoint, set_rng_state,
                         state_digest, tensors_digest, write_weights)
from .distributed import Distributed
from .optim import LearningRate, OptimizerSlot, OptimizerSpec, build_optimizer
from .rundir import CHECKPOINT, METRICS, RUN_CONFIG, SUMMARY, holds_run, prepare_run_dir, removed_if_failed
from .runtime import atomic_write, is_main_process, resolve_device, seed_everything
from .schedule import Schedule
from .stacked import StackedModels, StackTraining, train_stack
from .step import StepBatch, StepOptions, TrainStep
from .trainer import (Callback, ConsoleLog, FitResult, LoopConfig, MetricsLog, Run, ShardedState, StepGroup, Task,
                      Trainer)

__all__ = ["Trainer", "Task", "Run", "LoopConfig", "StepGroup", "ShardedState", "FitResult", "Callback", "ConsoleLog",
           "MetricsLog", "TrainStep", "StepBatch", "StepOptions", "Schedule", "OptimizerSpec", "build_optimizer",
           "LearningRate", "OptimizerSlot", "Distributed", "StackedModels", "StackTraining", "train_stack",
           "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state", "export_weights", "write_weights",
           "read_weights", "tensors_digest", "state_digest", "CHECKPOINT", "METRICS", "RUN_CONFIG", "SUMMARY",
           "holds_run", "prepare_run_dir", "removed_if_failed", "atomic_write", "is_main_process", "resolve_device",
           "seed_everything"]
