"""Diffusion models on Hugging Face diffusers (``pip install 'kdzoo[diffusion]'``): ``kdzoo diffusion``.

`DiffusionTask` trains a UNet to denoise a kdzoo dataset on the engine's Trainer; `models` holds the UNet, the
noise schedule, DDIM sampling with any number of steps and the run folders (diffusers pipeline folders).
"""
from . import methods  # noqa: F401  (registers the distillation methods)
from .task import DiffusionTask, DistillTask, build_diffusion_task, build_distill_task

__all__ = ["DiffusionTask", "DistillTask", "build_diffusion_task", "build_distill_task"]
