"""Diffusion models on the engine's Trainer (``kdzoo diffusion teacher``): a diffusers UNet learns to denoise the
dataset's images (DDPM forward process; epsilon, v or sample prediction), one optimizer step at a time.

The task supplies the denoising step (what DDP wraps), each step's rows, noise and timesteps (functions of
(seed, step), so a resumed run draws what the uninterrupted one did), a held-out denoising loss at fixed timesteps
and noise (cheap enough for every evaluation; FID is `kdzoo diffusion eval`), and the export: the run directory is
a diffusers DDIMPipeline folder, plus ``samples.png`` (DDIM samples at 1, 2, 4, ... steps from the same noise).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...config import from_dict, read_yaml
from ...data.datasets import DataSplits, build_dataset
from ...data.loaders import TensorData, batch_rows
from ...engine.distributed import Distributed
from ...engine.optim import LearningRate, OptimizerSlot, OptimizerSpec, build_optimizer
from ...engine.rundir import RUN_CONFIG, SUMMARY
from ...engine.runtime import atomic_write, seed_everything
from ...engine.schedule import Schedule
from ...engine.step import MeterReading, StepBatch, StepOptions, TrainStep
from ...engine.trainer import LoopConfig, Run, StepGroup, Task, Trainer
from ...errors import ConfigError
from ...plots import plot_sample_rows
from ...registry import DIFFUSION_METHODS, register_task
from .config import DiffusionDistillConfig, DiffusionRunConfig, NoiseConfig
from .method_base import DiffusionMethod, save_method_modules
from .models import ImageRange, build_unet, load_pipeline, noise_scheduler, sample, save_pipeline, training_target

CHECKPOINT_KEY = "unet"
PICTURE_STEPS = (1, 2, 4, 8, 16, 50)


def dataset_images(splits: DataSplits) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels) as tensors, images as the dataset normalises them."""
    out = []
    for split in (splits.train, splits.test):
        if isinstance(split, TensorData):  # normalised in-memory tensors: no per-item decoding
            out += [torch.as_tensor(split.images).float(), torch.as_tensor(split.labels).long()]
            continue
        items = [split[i] for i in range(len(split))]  # (image, label, index) items
        out += [torch.stack([torch.as_tensor(item[0]) for item in items]).float(),
                torch.tensor([int(item[1]) for item in items], dtype=torch.long)]
    return tuple(out)


class DenoiseStep(nn.Module):
    """The denoising loss of one micro-batch: MSE between the UNet's output on noised images and its target."""

    def __init__(self, unet: nn.Module, scheduler: Any):
        super().__init__()
        self.unet, self.scheduler = unet, scheduler

    def forward(self, clean, labels, noise, timesteps) -> dict[str, torch.Tensor]:
        noisy = self.scheduler.add_noise(clean, noise, timesteps)
        class_labels = labels if self.unet.config.num_class_embeds else None
        prediction = self.unet(noisy, timesteps, class_labels=class_labels).sample
        target = training_target(self.scheduler, clean, noise, timesteps)
        return {"denoise": F.mse_loss(prediction.float(), target.float())}


def _generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 97 + micro + 11)


@register_task("diffusion", family="image generation",
               description="diffusion models on diffusers UNets: a teacher trained to denoise the dataset "
                           "(kdzoo diffusion teacher), sampled with any number of DDIM steps")
class DiffusionTask(Task):
    metric = "val_denoise"
    higher_is_better = False
    log_axis = "step"
    unit = "img"

    def __init__(self, cfg: DiffusionRunConfig, splits: DataSplits, unet: nn.Module):
        self.cfg, self.splits, self.unet = cfg, splits, unet
        train_x, self.train_y, test_x, self.test_y = dataset_images(splits)
        if train_x.dim() != 4 or train_x.shape[-1] != train_x.shape[-2]:
            raise ConfigError(f"data: square images needed, got {tuple(train_x.shape[1:])}")
        self.image_range = ImageRange.of(train_x)
        self.train_x, self.test_x = self.image_range.to_model(train_x), self.image_range.to_model(test_x)
        self.scheduler = noise_scheduler(cfg.noise)
        tc = cfg.train
        self.steps_per_epoch, self.total_steps = min(tc.eval_every, tc.steps), tc.steps

    def setup(self, trainer: Trainer) -> None:
        self.group, self.device = trainer.group, trainer.device
        tc = self.cfg.train
        if tc.batch_size % self.group.world_size:
            raise ConfigError(f"train.batch_size {tc.batch_size} does not split over {self.group.world_size} processes")
        self.step_module = DenoiseStep(self.unet, self.scheduler).to(trainer.device)
        self.wrapped = (self.group.wrap(self.step_module, trainer.device) if self.group.active
                        else self.step_module)
        trainer.runs[0].modules[CHECKPOINT_KEY] = self.unet

    def schedule(self, trainer: Trainer) -> Schedule:
        tc = self.cfg.train
        return Schedule(tc.lr, tc.steps, 1, tc.schedule, warmup=tc.warmup_steps)

    def build_steps(self, trainer: Trainer) -> list[StepGroup]:
        tc, wrapped = self.cfg.train, self.wrapped
        spec = OptimizerSpec("adamw", tc.lr, weight_decay=tc.weight_decay, betas=(0.9, 0.999), decay_1d=False)
        optimizer = build_optimizer(self.unet.parameters(), spec, trainer.device)
        for group in self.extra_parameter_groups():
            lr = group["params"][0].new_tensor(tc.lr) if isinstance(optimizer.param_groups[0]["lr"], torch.Tensor) \
                else tc.lr
            optimizer.add_param_group({**group, "lr": lr * group.get("lr_scale", 1.0)})

        def forward(*inputs):  # the micro-batch's inputs, then the fractional epoch (unused)
            return [(None, wrapped(*inputs[:-1]))]

        step = TrainStep(forward, optimizer, trainer.device,
                         StepOptions(amp=tc.amp, max_grad_norm=tc.max_grad_norm, free_gradients_first=True),
                         clip_parameters=list(self.unet.parameters()),
                         sync=lambda last: Distributed.gradient_sync(wrapped, last))
        return [StepGroup(step, LearningRate(optimizer, trainer.schedule), [0], [OptimizerSlot(optimizer)])]

    def extra_parameter_groups(self) -> list[dict]:
        """Optimizer groups trained beside the UNet (none for a teacher)."""
        return []

    def train_mode(self) -> None:
        self.unet.train()

    def batches(self, trainer: Trainer, epoch: int, first_step: int) -> Iterator[Iterator[StepBatch]]:
        last = min((epoch + 1) * self.steps_per_epoch, self.total_steps)
        for step in range(first_step, last):
            yield iter([self.micro_batch(step)])

    def micro_batch(self, step: int) -> StepBatch:
        """Step `step`'s images on this process with their noise and timesteps, all fixed by (seed, step)."""
        tc = self.cfg.train
        rows = batch_rows(step, tc.batch_size, len(self.train_x), tc.seed)[self.group.rank::self.group.world_size]
        generator = _generator(tc.seed, step, self.group.rank)
        clean = self.train_x[rows]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, self.cfg.noise.num_train_timesteps, (len(rows),), generator=generator)
        device = self.device
        return StepBatch((clean.to(device), self.train_y[rows].to(device), noise.to(device), timesteps.to(device)),
                         len(rows), units=len(rows))

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, index: int) -> dict[str, float]:
        """The held-out denoising loss at timesteps and noise fixed once (comparable across evaluations)."""
        tc, total, count = self.cfg.train, 0.0, 0
        self.unet.eval()
        for b in range(tc.eval_batches):
            rows = torch.arange(b * tc.batch_size, (b + 1) * tc.batch_size) % len(self.test_x)
            generator = torch.Generator().manual_seed(10_007 + b)
            clean = self.test_x[rows]
            noise = torch.randn(clean.shape, generator=generator)
            timesteps = torch.randint(0, self.cfg.noise.num_train_timesteps, (len(rows),), generator=generator)
            losses = self.step_module(clean.to(self.device), self.test_y[rows].to(self.device), noise.to(self.device),
                                      timesteps.to(self.device))
            total, count = total + float(losses["denoise"]) * len(rows), count + len(rows)
        self.unet.train()
        return {"val_denoise": total / max(count, 1)}

    def train_metrics(self, reading: MeterReading, seconds: float, units: int) -> dict[str, float]:
        return {"images_per_s": units * self.group.world_size / max(seconds, 1e-9)}

    def describe(self, row: dict, run: Run) -> str:
        return f"held-out denoising loss {row['val_denoise']:.4f}  {row['images_per_s']:.0f} img/s"

    def finish(self, trainer: Trainer) -> None:
        """The run directory as a diffusers pipeline folder, a sample grid, summary.json."""
        run = trainer.runs[0]
        if not trainer.group.is_main:
            return
        save_pipeline(self.unet, self.scheduler, self.image_range, run.run_dir)
        labels = torch.arange(min(self.splits.num_classes, 10)).repeat(2)
        rows = {f"{steps} step{'s' * (steps > 1)}": sample(self.unet, self.scheduler.config, labels, steps,
                                                           torch.Generator().manual_seed(0)).cpu()
                for steps in PICTURE_STEPS}
        plot_sample_rows(rows, run.run_dir / "samples.png",
                         title=f"{run.run_dir.name}: DDIM samples, same noise and class per column")
        if run.history:
            summary = {"steps": self.total_steps, "seconds": run.history[-1]["seconds"], "final": run.history[-1],
                       "parameters": sum(p.numel() for p in self.unet.parameters())}
            text = json.dumps(summary, indent=2)
            atomic_write(run.run_dir / SUMMARY, lambda tmp: tmp.write_text(text))


class MethodStep(nn.Module):
    """One micro-batch of a distillation method: the student (a submodule, so DDP synchronises it) and the
    method's loss terms, its random draws seeded by (seed, step, rank)."""

    def __init__(self, student: nn.Module, method: DiffusionMethod, seed: int, rank: int):
        super().__init__()
        self.student, self.seed, self.rank = student, seed, rank
        self.__dict__["method"] = method  # checkpointed by the task under its own key
        # the networks the method trains beside the student (a score model, adapters): the same Parameter objects,
        # registered here so that DDP averages their gradients too
        self.method_parameters = nn.ParameterList([p for group in method.parameter_groups() for p in group["params"]
                                                   if p.requires_grad])

    def forward(self, clean, labels, step: int) -> dict[str, torch.Tensor]:
        return self.method.loss(clean, labels, _generator(self.seed, step, self.rank), step)


class DistillTask(DiffusionTask):
    """A few-step student from a diffusion teacher: the method's loss replaces the denoising loss; evaluation is
    the mean squared gap between the student's `student_steps` samples and the teacher's `teacher_steps` samples
    from the same noise and classes (how close the student lands to the teacher's ODE solution)."""

    metric = "val_gap"

    def __init__(self, cfg: DiffusionDistillConfig, teacher_cfg: DiffusionRunConfig, splits: DataSplits,
                 student: nn.Module, teacher: nn.Module, method: DiffusionMethod):
        super().__init__(teacher_cfg, splits, student)
        self.distill_cfg, self.teacher, self.method = cfg, teacher, method
        self.cfg = dataclasses.replace(teacher_cfg, train=cfg.train)  # the teacher's data and noise, this run's train
        self.unet = method.prepare_student(student, teacher, self.scheduler, self.train_x, self.train_y)
        tc = cfg.train
        self.steps_per_epoch, self.total_steps = min(tc.eval_every, tc.steps), tc.steps
        self.reference: Optional[torch.Tensor] = None

    def setup(self, trainer: Trainer) -> None:
        self.group, self.device = trainer.group, trainer.device
        self.teacher.to(trainer.device).eval().requires_grad_(False)
        self.method.attach(self.unet, self.teacher, self.scheduler)
        self.method.to(trainer.device)
        self.step_module = MethodStep(self.unet, self.method, self.cfg.train.seed, self.group.rank)
        self.wrapped = (self.group.wrap(self.step_module, trainer.device) if self.group.active
                        else self.step_module)
        trainer.runs[0].modules[CHECKPOINT_KEY] = self.unet
        trainer.runs[0].modules["method"] = self.method

    def extra_parameter_groups(self) -> list[dict]:
        return [{**group, "params": [p for p in group["params"] if p.requires_grad]}
                for group in self.method.parameter_groups()]

    def train_mode(self) -> None:
        self.unet.train()
        self.method.train()

    def micro_batch(self, step: int) -> StepBatch:
        """Step `step`'s images; first the method's update after step `step - 1` (an EMA, a new round): done here,
        just before the step, rather than right after the previous one, so it falls after that step's checkpoint
        and a resumed run repeats it exactly."""
        if step > 0:
            with torch.no_grad():
                self.method.after_step(step - 1)
        tc = self.cfg.train
        rows = batch_rows(step, tc.batch_size, len(self.train_x), tc.seed)[self.group.rank::self.group.world_size]
        return StepBatch((self.train_x[rows].to(self.device), self.train_y[rows].to(self.device), step), len(rows),
                         units=len(rows))

    def _probe(self) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(64) % self.splits.num_classes
        return labels, torch.Generator().manual_seed(12_345)

    @torch.no_grad()
    def evaluate(self, trainer: Trainer, index: int) -> dict[str, float]:
        labels, _ = self._probe()
        if self.reference is None:
            self.reference = sample(self.teacher, self.scheduler.config, labels, self.distill_cfg.teacher_steps,
                                    self._probe()[1]).cpu()
        student = self.method.sample(labels, self.method.student_steps, self._probe()[1]).cpu()
        return {"val_gap": float((student - self.reference).pow(2).mean())}

    def describe(self, row: dict, run: Run) -> str:
        return (f"gap to the teacher's {self.distill_cfg.teacher_steps}-step samples {row['val_gap']:.4f}  "
                f"{row['images_per_s']:.0f} img/s")

    def finish(self, trainer: Trainer) -> None:
        run = trainer.runs[0]
        if not trainer.group.is_main:
            return
        save_pipeline(self.unet, self.scheduler, self.image_range, run.run_dir)
        save_method_modules(self.method, run.run_dir)
        labels = torch.arange(min(self.splits.num_classes, 10)).repeat(2)
        noise = lambda: torch.Generator().manual_seed(0)  # noqa: E731  (the same noise in every row)
        k, n = self.method.student_steps, self.distill_cfg.teacher_steps
        rows = {f"teacher {n}": sample(self.teacher, self.scheduler.config, labels, n, noise()).cpu(),
                f"teacher {k}": sample(self.teacher, self.scheduler.config, labels, k, noise()).cpu(),
                f"student {k}": self.method.sample(labels, k, noise()).cpu()}
        plot_sample_rows(rows, run.run_dir / "samples.png",
                         title=f"{run.run_dir.name}: teacher and student steps, same noise and class per column")
        if run.history:
            summary = {"steps": self.total_steps, "seconds": run.history[-1]["seconds"], "final": run.history[-1],
                       "student_steps": k, "method": self.distill_cfg.method.name}
            text = json.dumps(summary, indent=2)
            atomic_write(run.run_dir / SUMMARY, lambda tmp: tmp.write_text(text))


def loop_config(cfg: DiffusionRunConfig | DiffusionDistillConfig) -> LoopConfig:
    tc = cfg.train
    return LoopConfig(seed=tc.seed, device=tc.device, eval_every=1, save_every=1, log_every=tc.log_every,
                      progress=tc.progress)


def build_diffusion_task(cfg: DiffusionRunConfig, device: torch.device, run_dir: Optional[Path] = None
                         ) -> DiffusionTask:
    """The dataset and a UNet whose initial weights depend on the seed alone."""
    splits = build_dataset(cfg.data.dataset, **cfg.data.options)
    seed_everything(cfg.train.seed)
    unet = build_unet(cfg.model, splits.image_size[0], splits.in_channels, splits.num_classes).to(device)
    return DiffusionTask(cfg, splits, unet)


def teacher_config(run_dir: str | Path) -> DiffusionRunConfig:
    """The config a diffusion teacher run was trained with (its data and noise)."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        raise ConfigError(f"teacher {run_dir}: not a kdzoo diffusion run directory (no {RUN_CONFIG})")
    try:
        return from_dict(DiffusionRunConfig, read_yaml(path), str(path))
    except ConfigError as err:
        raise ConfigError(f"{run_dir}: not a kdzoo diffusion run directory (its {RUN_CONFIG} is not a kdzoo diffusion "
                          f"config: {err})") from None


def distill_teacher_config(cfg: DiffusionDistillConfig) -> DiffusionRunConfig:
    """The teacher's data and noise: a kdzoo teacher run's config.yaml, or for a plain diffusers pipeline folder
    the distill config's `data` and the noise of the folder's scheduler config."""
    teacher = Path(cfg.teacher)
    if not teacher.exists():
        raise ConfigError(f"teacher {teacher}: the folder does not exist")
    if (teacher / RUN_CONFIG).is_file():
        found = teacher_config(teacher)
        if cfg.data is not None and cfg.data != found.data:
            raise ConfigError(f"data: the teacher run {teacher} was trained on {found.data.dataset} "
                              f"{found.data.options}; leave data unset (it is for plain diffusers pipeline teachers)")
        return found
    scheduler_dir = teacher / "scheduler"
    if not (teacher / "unet").is_dir() or not scheduler_dir.is_dir():
        raise ConfigError(f"teacher {teacher}: neither a kdzoo diffusion run (no {RUN_CONFIG}) nor a diffusers "
                          "pipeline folder (unet/ and scheduler/)")
    if cfg.data is None:
        raise ConfigError(f"data: the teacher {teacher} is a plain diffusers pipeline; name the dataset it models "
                          "(data: {dataset: ..., options: {...}})")
    try:
        scheduler = json.loads((scheduler_dir / "scheduler_config.json").read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"teacher {teacher}: unreadable scheduler/scheduler_config.json ({err})") from None
    if scheduler.get("trained_betas") is not None:
        raise ConfigError(f"teacher {teacher}: its scheduler has trained_betas; kdzoo needs a named beta_schedule")
    noise = NoiseConfig(num_train_timesteps=int(scheduler.get("num_train_timesteps", 1000)),
                        beta_schedule=scheduler.get("beta_schedule", "linear"),
                        prediction_type=scheduler.get("prediction_type", "epsilon"))
    noise.validate()
    return DiffusionRunConfig(data=cfg.data, noise=noise)


def build_distill_task(cfg: DiffusionDistillConfig, device: torch.device) -> DistillTask:
    """The teacher (frozen), a student starting as a copy of it (or a fresh `cfg.model`), and the method."""
    teacher_cfg = distill_teacher_config(cfg)
    splits = build_dataset(teacher_cfg.data.dataset, **teacher_cfg.data.options)
    teacher, _, _ = load_pipeline(cfg.teacher)
    seed_everything(cfg.train.seed)
    if cfg.model is None:
        student = copy.deepcopy(teacher)
    else:
        student = build_unet(cfg.model, splits.image_size[0], splits.in_channels, splits.num_classes)
    method = DIFFUSION_METHODS.build(cfg.method.name, **cfg.method.options)
    needed = getattr(method, "total_steps", None)  # progressive distillation: rounds x steps per round
    if needed is not None and cfg.train.steps != needed:
        raise ConfigError(f"train.steps: {cfg.method.name} runs {needed} optimizer steps (its rounds x "
                          f"steps_per_round); set train.steps={needed}")
    return DistillTask(cfg, teacher_cfg, splits, student.to(device).train(), teacher, method)


__all__ = ["DiffusionTask", "DistillTask", "DenoiseStep", "MethodStep", "build_diffusion_task", "build_distill_task",
           "teacher_config", "distill_teacher_config", "loop_config", "dataset_images", "CHECKPOINT_KEY"]
