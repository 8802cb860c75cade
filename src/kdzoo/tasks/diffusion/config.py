"""``kdzoo diffusion`` configs: plain YAML mapped onto these dataclasses by `kdzoo.config.from_dict`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ...config import MethodConfig
from ...errors import ConfigError
from ...registry import DIFFUSION_METHODS, check_options

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "v_prediction", "sample")


def _choice(where: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(allowed)}")


@dataclass
class UNetConfig:
    """A diffusers ``UNet2DModel`` sized by these fields (the image size and channels come from the data)."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64])
    layers_per_block: int = 1
    attention: bool = False  # self-attention blocks at the lowest resolution
    norm_num_groups: int = 8
    class_conditional: bool = True  # a class embedding added to the time embedding

    def validate(self) -> None:
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            raise ConfigError(f"model.block_out_channels: positive widths needed, got {self.block_out_channels}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(f"model.block_out_channels {self.block_out_channels} must be multiples of "
                              f"model.norm_num_groups {self.norm_num_groups}")
        if self.layers_per_block < 1:
            raise ConfigError(f"model.layers_per_block: must be >= 1, got {self.layers_per_block}")


@dataclass
class DiffusionDataConfig:
    dataset: str = "digits"  # a kdzoo dataset (kdzoo methods --datasets): digits, fashion_mnist, cifar10, imagefolder
    options: dict[str, Any] = field(default_factory=lambda: {"image_size": 16})


@dataclass
class NoiseConfig:
    """The forward process and what the network predicts (diffusers' DDPMScheduler fields)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample

    def validate(self) -> None:
        _choice("noise.beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _choice("noise.prediction_type", self.prediction_type, PREDICTIONS)
        if self.num_train_timesteps < 2:
            raise ConfigError(f"noise.num_train_timesteps: must be >= 2, got {self.num_train_timesteps}")


@dataclass
class DiffusionTrainConfig:
    steps: int = 2000  # optimizer steps
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.0
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | constant (after the warm-up)
    max_grad_norm: float = 1.0  # 0: no clipping
    eval_every: int = 500  # steps between held-out denoising losses (and checkpoints)
    eval_batches: int = 4  # held-out batches at fixed timesteps and noise
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"  # auto (bf16 on CUDA) | bf16 | off
    progress: bool = True
    log_every: int = 20

    def validate(self) -> None:
        _choice("train.amp", self.amp, ("auto", "bf16", "off"))
        _choice("train.schedule", self.schedule, ("cosine", "constant"))
        for key in ("steps", "batch_size", "eval_every", "eval_batches", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("lr", "weight_decay", "warmup_steps", "max_grad_norm"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")


@dataclass
class DiffusionRunConfig:
    """A diffusion model trained on a dataset (``kdzoo diffusion teacher``)."""

    model: UNetConfig = field(default_factory=UNetConfig)
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    train: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)
    output_dir: str = "runs/diffusion"
    name: Optional[str] = None

    def validate(self) -> None:
        self.model.validate()
        self.noise.validate()
        self.train.validate()


@dataclass
class DiffusionDistillConfig:
    """A few-step student distilled from a diffusion teacher run (``kdzoo diffusion distill``): the student starts
    as a copy of the teacher (same UNet) unless `model` names a smaller one; data and noise are the teacher's."""

    teacher: str  # a kdzoo diffusion run directory (its config.yaml gives data and noise) or a diffusers pipeline
    method: MethodConfig  # a registered diffusion method with options (kdzoo methods --diffusion)
    model: Optional[UNetConfig] = None  # unset: the teacher's architecture and weights
    # the data, when the teacher is a plain diffusers pipeline folder (its noise comes from its scheduler config);
    # unset for a kdzoo teacher run, whose own data is used
    data: Optional[DiffusionDataConfig] = None
    train: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig)
    teacher_steps: int = 50  # the teacher's sampling steps the student is compared with
    output_dir: str = "runs/diffusion"
    name: Optional[str] = None

    def validate(self) -> None:
        if self.model is not None:
            self.model.validate()
        self.train.validate()
        if self.teacher_steps < 1:
            raise ConfigError(f"teacher_steps: must be >= 1, got {self.teacher_steps}")
        try:
            entry = DIFFUSION_METHODS.get(self.method.name)
        except ConfigError as err:
            raise ConfigError(f"method.name: {err}") from None
        check_options(f"method ({self.method.name})", self.method.options, entry.defaults)
